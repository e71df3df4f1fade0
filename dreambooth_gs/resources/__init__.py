"""Files the package needs at run time, shipped inside it (a wheel or ``pip install .`` carries them): the paper's
prompt sets, the DreamBooth subjects, the generated demo subject and the tiny pipelines' configs.

Read them through :func:`resource_path`, never through the source tree's layout.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def resource_path(*parts: str) -> Path:
    """The path of a shipped resource, e.g. ``resource_path("prompts", "objects.txt")`` (installed unzipped)."""
    return Path(str(files(__name__).joinpath(*parts)))


PROMPTS_DIR = resource_path("prompts")
SUBJECTS_FILE = resource_path("subjects.json")
DEMO_SUBJECT_DIR = resource_path("demo_subject")
TINY_SD_CONFIG_DIR = resource_path("tiny_sd")
TINY_SDXL_CONFIG_DIR = resource_path("tiny_sdxl")
TINY_SD3_CONFIG_DIR = resource_path("tiny_sd3")
TINY_FLUX_CONFIG_DIR = resource_path("tiny_flux")
