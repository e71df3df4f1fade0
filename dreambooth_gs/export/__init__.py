"""Exports of a trained adapter for other tools: the merged diffusers folder, the LoRA file and the single file
(``formats``, with ``export_adapter``), the low-rank factorisation of weight changes (``lowrank``) and their LoRA key
layouts (``lora``), the adapter merged at a strength (``strength``, ``--scale``), the original SD / SDXL single-file
key layout (``ldm_layout``), model cards (``model_card``) and the converter of the GSOFT authors' checkpoints
(``authors``).

May import :mod:`~dreambooth_gs.gs`, :mod:`~dreambooth_gs.methods`, :mod:`~dreambooth_gs.families` and
:mod:`~dreambooth_gs.adapters`; never training, the evaluator or the commands.
"""
