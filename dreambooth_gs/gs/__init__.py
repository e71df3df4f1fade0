"""The Group-and-Shuffle core: the pure tensor math (``functional``: permutations, Cayley / exp blocks, block-diagonal
and GS products, dense materialisation), the adapter config (``config.GSOFTConfig``) and the adapter layer that wraps
a frozen ``nn.Linear`` (``layers.GSOFTLinear``).

The bottom of the house: it imports torch, and PEFT's config base class (``GSOFTConfig`` is a ``PeftConfig``), and
nothing of diffusers, training or files. Every other path
(forward, merge, export, GS-SOC convolutions, tests) calls this math instead of repeating it.
"""
