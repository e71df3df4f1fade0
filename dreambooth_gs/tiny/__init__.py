"""Offline models for tests, the demo and examples: tiny random-weight SD / SDXL / SD3 / Flux pipelines built from the
package's configs (``pipelines``) and the generated demo subject (``demo_subject``). Nothing here downloads.

May import :mod:`~dreambooth_gs.families`, :mod:`~dreambooth_gs.fileio` (atomic writes) and the package resources only.
"""
