"""The whole-UNet training-step benchmark behind ``benchmarks/bench_unet_step.py`` (the script parses and dispatches).

``step``: the step itself (batch, forward / loss / backward / AdamW, the methods and setting of a run, its memory
measures); ``runs``: where the steps run (every method in one process on a shared UNet, or a fresh child process per
method; the children's entry points); ``profile``: ``--profile``, where GSOFT's extra time and memory go;
``tables``: the goals, the step table, ``--saved-only``'s table and the plot. Timing loops and saved-tensor counting
are :mod:`benchmarks.measure`'s, RSS :mod:`benchmarks.memory`'s, Markdown :mod:`benchmarks.report`'s; imports point
from here to those and to ``dreambooth_gs``, never back.
"""
