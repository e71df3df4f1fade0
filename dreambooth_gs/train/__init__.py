"""The DreamBooth training run: its options (``options``: one dataclass, one flag per field), the subject data
(``data``), the objectives (``objectives``: DDPM and flow matching), the model components and their adapters
(``models``), crash-safe checkpoints and exact resume (``checkpoints``), what a run leaves in its output folder
(``run_folder``) and draws and writes around its steps (``run_outputs``), FSDP2 and the gradient average across
processes (``distributed``), the memory planner (``memory_plan``), the Hub upload (``hub``) and the loop that ties
them together (``loop.train``).

May import everything below it (:mod:`~dreambooth_gs.gs`, :mod:`~dreambooth_gs.methods`,
:mod:`~dreambooth_gs.families`, :mod:`~dreambooth_gs.adapters`, :mod:`~dreambooth_gs.tiny`); never the evaluator,
the exporter or the commands.
"""
