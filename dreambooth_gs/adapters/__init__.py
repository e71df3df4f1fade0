"""Adapter folders and the pipelines they go into: ``serialization`` saves and loads the folder every method writes
(``adapter_config.json`` + ``adapter_model.safetensors``, text-encoder adapters in subfolders) and loads it into a
model or a diffusers pipeline; ``named`` loads them under names at strengths; ``saving`` makes a model that holds
unmerged adapters save its base weights and its adapters apart; ``sampling`` loads a base pipeline and draws images
for (prompt, seed) lists, shared by validation, class images, the evaluator and the exporter.

May import :mod:`~dreambooth_gs.gs`, :mod:`~dreambooth_gs.methods`, :mod:`~dreambooth_gs.families` and
:mod:`~dreambooth_gs.fileio`; nothing of training, evaluation or export.
"""
