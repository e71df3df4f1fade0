"""The evaluator: its options (``options``), the plan of runs, prompts and images (``plan``), CLIP-I / CLIP-T / DINO
scoring (``metrics``), tables, plots and grids (``report``) and the run that generates, scores and writes them
(``evaluation.evaluate``).

May import :mod:`~dreambooth_gs.adapters` (sampling), :mod:`~dreambooth_gs.families`, the subject-image helpers of
:mod:`dreambooth_gs.train.data` and the package resources; never the training loop, the exporter or the commands.
"""
