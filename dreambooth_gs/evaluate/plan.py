"""Evaluation bookkeeping: prompt sets, subjects, run folders, and the image jobs (prompt, seed, PNG path) of a run.

Every image has its own seed, a stable hash of (seed, run, prompt, index) (or, with paired seeds, of the subject
instead of the run, so that every method starts from the same noise): reruns and shards draw the same pictures.
A run evaluated at another adapter strength than 1 is a run of its own (its image folder ``<run_id>@s<strength>``)
with the same seeds, so a strength sweep is paired. Nothing here loads a model.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from .. import families
from ..adapters.serialization import CONFIG_NAME, WEIGHTS_NAME, read_adapter_config
from ..fileio import atomic_write_text
from ..resources import PROMPTS_DIR
from ..train.data import find_images

DATASET_DIR = Path("datasets") / "dreambooth"  # where scripts/fetch_dreambooth_dataset.py puts the real images
RUN_INFO_NAME = "training_args.json"
RECORD_NAME = "generation.json"
DEFAULT_TOKEN = "sks"
BASE_PROMPT = "a photo of {token} {class}"
SUBJECT_TYPES = {"object": "objects", "live": "live"}  # subject type -> prompt set (prompts/<set>.txt)
BASE, PROMPT = "base", "prompt"  # the subject's base prompt, and the prompts of its prompt set


@dataclass(frozen=True)
class RunSpec:
    """One trained run, resolved: what to load, which subject, which prompts, which real images."""

    entry: str  # as given on the command line
    path: Path
    run_id: str  # unique and file-name safe: the name of the run's image folder
    label: str  # the "method" of the tables
    method: str
    num_parameters: int
    base_model: str
    subject: str
    class_name: str
    token: str
    real_images: tuple[Path, ...]
    prompt_set: str
    adapter_sha256: str
    max_sequence_length: int | None = None  # the run's --max_sequence_length (flow families): sampled the same way
    family: str = ""  # the base model's family (sd, sdxl, sd3, flux): methods of different families are kept apart
    scale: float = 1.0  # the adapter's strength (load_adapter's scale); not 1: run_id ends in @s<strength>

    @property
    def name(self) -> str:
        """The run as messages and failures name it: its entry, and its strength when that is not 1."""
        return self.entry if self.scale == 1 else f"{self.entry} at strength {strength_text(self.scale)}"


@dataclass(frozen=True)
class ImageJob:
    """One image to generate (or already generated) at ``path``."""

    run_id: str
    kind: str  # BASE or PROMPT
    prompt: str
    index: int
    seed: int
    path: Path


# -- prompts, subjects, seeds ---------------------------------------------------------------------------------------


def load_prompt_set(name_or_path: str, prompts_dir: str | os.PathLike = PROMPTS_DIR) -> list[str]:
    """Templates of a prompt set: a name (``prompts/<name>.txt``) or a text file, one template per line."""
    path = Path(name_or_path)
    if not path.is_file():
        path = Path(prompts_dir) / f"{name_or_path}.txt"
    if not path.is_file():
        known = sorted(p.stem for p in Path(prompts_dir).glob("*.txt"))
        raise ValueError(f"unknown prompt set {name_or_path!r}; use one of {', '.join(known)} or a .txt file")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    templates = [line for line in lines if line and not line.startswith("#")]
    if not templates:
        raise ValueError(f"prompt set {path} holds no templates (one per line; # starts a comment)")
    for template in templates:
        format_prompt(template, DEFAULT_TOKEN, "dog", where=str(path))
    return templates


def format_prompt(template: str, token: str, class_name: str, where: str = "the template") -> str:
    """``template`` with {token} and {class} filled in (spaces collapsed); any other placeholder is an error."""
    try:
        return " ".join(template.format(**{"token": token, "class": class_name}).split())
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"{where}: template {template!r} may use only {{token}} and {{class}} ({err!r})") from err


def load_subjects(path: str | os.PathLike) -> dict[str, dict]:
    """``{name: {"class_name": ..., "prompt_set": ...}}`` from a subjects file (``resources/subjects.json``).

    The file holds ``{"subjects": [{"name", "class_name", "type"}, ...]}``; type ``object`` uses the ``objects``
    prompt set and ``live`` the ``live`` one (a ``prompt_set`` key overrides).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"subjects file {path} does not exist; pass --subjects_file")
    try:
        entries = json.loads(path.read_text())["subjects"]
        subjects = {}
        for entry in entries:
            kind = entry.get("type", "object")
            if kind not in SUBJECT_TYPES and "prompt_set" not in entry:
                raise ValueError(f"subject {entry['name']!r} has type {kind!r}; use {' or '.join(SUBJECT_TYPES)}")
            prompt_set = entry.get("prompt_set") or SUBJECT_TYPES[kind]
            subjects[entry["name"]] = {"class_name": entry["class_name"], "prompt_set": prompt_set}
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(
            f"{path} is not a subjects file ({{'subjects': [{{'name', 'class_name', 'type'}}, ...]}}): {err!r}"
        ) from err
    return subjects


def instance_token(instance_prompt: str | None, class_name: str, default: str = DEFAULT_TOKEN) -> str:
    """The placeholder token of an instance prompt: the word before the class noun ("a photo of sks dog" -> sks)."""
    found = re.search(rf"(\S+)\s+{re.escape(class_name)}\b", instance_prompt or "")
    return found.group(1) if found else default


def name_bytes(text: str) -> bytes:
    """UTF-8 bytes of ``text``, with a file name's undecodable bytes (``os.fsdecode``'s surrogate escapes, e.g.
    ``dog\\udcff.png`` for the bytes ``dog\\xff.png``) back as they are stored: what names are hashed as. Valid text
    gives its plain UTF-8 bytes, so seeds and run ids of ordinary names do not change."""
    return text.encode("utf-8", "surrogateescape")


def printable(text: str) -> str:
    """``text`` safe to write as UTF-8: a file name's undecodable bytes shown as ``\\xff`` escapes (other lone
    surrogates as ``\\udXXX``); valid text unchanged."""
    try:
        return name_bytes(text).decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that no file name decodes to
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def image_seed(seed: int, scope: str, prompt: str, index: int) -> int:
    """A stable 63-bit seed from (seed, scope, prompt, index): sha256, not Python's per-process salted hash().

    ``scope`` names the run (its folder name) by default, or the subject for paired comparisons across methods.
    """
    digest = hashlib.sha256(name_bytes(f"{seed}\x1f{scope}\x1f{prompt}\x1f{index}")).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def seed_scope(run: RunSpec, paired: bool = False) -> str:
    """What a run's seeds derive from: the run's folder name, or (paired) its subject, shared by every method."""
    return f"subject={run.subject}" if paired else f"run={run.path.name}"


def shard(items: Sequence, process_index: int, num_processes: int) -> list:
    """This process's share: every ``num_processes``-th item from ``process_index`` (disjoint, covering, balanced)."""
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index={process_index} is not in [0, {num_processes})")
    return list(items[process_index::num_processes])


def slug(text: str, limit: int = 80) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:limit] or "_"


# -- runs -----------------------------------------------------------------------------------------------------------


def split_label(entry: str) -> tuple[str | None, Path]:
    """``LABEL=FOLDER`` -> (LABEL, FOLDER); a plain folder (even one with '=' in its name) -> (None, folder)."""
    label, sep, rest = entry.partition("=")
    if sep and label and not Path(entry).exists():
        return label, Path(rest)
    return None, Path(entry)


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_run(
    entry: str,
    subjects: dict[str, dict],
    subject: str | None = None,
    dataset_dir: str | os.PathLike = DATASET_DIR,
    prompt_set: str | None = None,
    token: str | None = None,
    base_model: str | None = None,
) -> RunSpec:
    """Everything needed to evaluate one run folder; any problem raises one ValueError / FileNotFoundError line.

    The subject is ``subject`` or the name of the run's instance-image folder; the class noun comes from the run's
    training_args.json or the subjects file; the real images from ``dataset_dir/<subject>`` (when ``subject`` is
    given and that folder exists) or the run's instance images.
    """
    label, path = split_label(entry)
    if not path.is_dir():
        raise FileNotFoundError(f"run folder {path} does not exist")
    if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
        raise ValueError(f"{path} has no adapter ({CONFIG_NAME} + {WEIGHTS_NAME}); pass a folder the trainer wrote")
    adapter = read_adapter_config(path)
    info = json.loads((path / RUN_INFO_NAME).read_text()) if (path / RUN_INFO_NAME).is_file() else {}
    base_model = base_model or info.get("base_model") or adapter.get("base_model")
    if not base_model:
        raise ValueError(f"{path} does not name its base model; pass --pretrained_model_name_or_path")
    instance_dir = Path(info["instance_data_dir"]) if info.get("instance_data_dir") else None
    name = subject or (instance_dir.name if instance_dir else None)
    if not name:
        raise ValueError(f"{path} has no {RUN_INFO_NAME} naming its subject; pass --subject NAME")
    known = subjects.get(name, {})
    class_name = info.get("class_name") or known.get("class_name")
    if not class_name:
        raise ValueError(f"no class noun for subject {name!r}: add it to the subjects file or train with --class_name")
    candidates = ([Path(dataset_dir) / name] if subject else []) + ([instance_dir] if instance_dir else [])
    real_dir = next((d for d in candidates if d.is_dir()), None)
    if real_dir is None:
        tried = " or ".join(str(d) for d in candidates) or "no folder known"
        raise ValueError(
            f"subject {name!r} has no real images ({tried}: missing); run scripts/fetch_dreambooth_dataset.py or "
            "pass --dataset_dir"
        )
    chosen_set = prompt_set or known.get("prompt_set") or "objects"
    load_prompt_set(chosen_set)  # an unknown set fails here, before anything is generated
    return RunSpec(
        entry=entry,
        path=path,
        run_id=f"{slug(path.name, 40)}-{hashlib.sha256(name_bytes(str(path.resolve()))).hexdigest()[:6]}",
        label=label or adapter["method"],
        method=adapter["method"],
        num_parameters=int(adapter.get("num_parameters") or 0),
        base_model=str(base_model),
        subject=name,
        class_name=class_name,
        token=token or instance_token(info.get("instance_prompt"), class_name),
        real_images=tuple(find_images(real_dir)),
        prompt_set=chosen_set,
        adapter_sha256=sha256_file(path / WEIGHTS_NAME),
        max_sequence_length=(info.get("options") or {}).get("max_sequence_length"),
        family=families.detect(str(base_model)).name,
    )


def strength_text(scale: float) -> str:
    """A strength as folders and labels show it: ``0``, ``0.25``, ``1.25`` (the shortest text that reads back)."""
    text = f"{scale:g}"
    return text if float(text) == scale else repr(float(scale))


def at_strength(run: RunSpec, scale: float) -> RunSpec:
    """``run`` evaluated with its adapter at strength ``scale``: at 1 the run itself (its image folder unchanged, so
    earlier evaluations are reused), otherwise a run of its own, image folder ``<run_id>@s<strength>``. Seeds derive
    from the run folder's name (or the subject), not the strength: every strength draws from the same noise."""
    assert run.scale == 1, "at_strength takes a run as resolve_run gives it"
    if scale == 1:
        return run
    return replace(run, run_id=f"{run.run_id}@s{strength_text(scale)}", scale=float(scale))


def run_prompts(
    run: RunSpec, base_prompt: str = BASE_PROMPT, max_prompts: int | None = None, with_base: bool = True
) -> list[tuple[str, str]]:
    """``(kind, prompt)`` pairs of a run in report order: the base prompt (if ``with_base``), then the prompt set."""
    pairs = [(BASE, format_prompt(base_prompt, run.token, run.class_name, "--base_prompt"))] if with_base else []
    templates = load_prompt_set(run.prompt_set)[:max_prompts]
    return pairs + [(PROMPT, format_prompt(t, run.token, run.class_name)) for t in templates]


def plan_jobs(
    run: RunSpec,
    images_dir: str | os.PathLike,
    images_per_prompt: int = 10,
    base_images: int = 30,
    base_prompt: str = BASE_PROMPT,
    max_prompts: int | None = None,
    seed: int = 0,
    paired_seeds: bool = False,
) -> list[ImageJob]:
    """Every image of a run with its seed and PNG path ``<images_dir>/<run_id>/<kind>-<prompt>/<index>.png``."""
    scope = seed_scope(run, paired_seeds)
    jobs = []
    for kind, prompt in run_prompts(run, base_prompt, max_prompts, with_base=base_images > 0):
        folder = Path(images_dir) / run.run_id / f"{kind}-{slug(prompt)}"
        for index in range(base_images if kind == BASE else images_per_prompt):
            job_seed = image_seed(seed, scope, prompt, index)
            jobs.append(ImageJob(run.run_id, kind, prompt, index, job_seed, folder / f"{index:03d}.png"))
    return jobs


def check_record(folder: str | os.PathLike, record: dict, write: bool) -> None:
    """Refuse to mix images generated with other settings into ``folder``; write ``record`` there when asked.

    The record holds what a run's images depend on besides prompt and seed (base model, adapter file hash, steps,
    guidance, size, dtype, a flow run's T5 length): images made otherwise are never silently reused.
    """
    path = Path(folder) / RECORD_NAME
    if path.is_file():
        old = json.loads(path.read_text())
        changed = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in record.items() if old.get(k) != v]
        if changed:
            raise ValueError(
                f"{folder} holds images made with other settings ({'; '.join(changed)}); delete it or use another "
                "--output_dir"
            )
    elif write:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(record, indent=2) + "\n")
