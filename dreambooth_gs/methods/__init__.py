"""The adapter methods and how they enter a model: the registry (``registry``: one :class:`~.registry.Method` per
``--adapter``, with its kind, flags and defaults), PEFT's LoRA / OFT baselines (``baselines``), full fine-tuning of
the projections (``full``) and the injection of GS layers, with merge / unmerge / disable across every kind
(``injection``).

May import :mod:`dreambooth_gs.gs` and PEFT; nothing of families, files, training or evaluation. A new method is a
module here plus its entry in ``registry``.
"""
