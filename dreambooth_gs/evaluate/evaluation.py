"""DreamBooth evaluation: trained runs -> generated images -> CLIP-I / CLIP-T / DINO rows -> reports.

The protocol (DreamBooth, as used by the OFT / BOFT / GSOFT papers): per subject the 25 prompts of its prompt set
(``resources/prompts/objects.txt`` or ``live.txt``) with ``images_per_prompt`` (10) images each, plus ``base_images``
(30) images of the base prompt "a photo of {token} {class}"; DDIM, 50 steps, guidance 7.0. CLIP-I (and DINO) compare
the base-prompt images with the subject's real images; CLIP-T compares each contextual prompt, placeholder token
removed, with its images. The bookkeeping (runs, prompts, seeds, paths) is in :mod:`.eval_plan`, the outputs in
:mod:`.eval_report`.

Generation is resumable (PNGs already on disk are not generated again) and sharded over processes under
``accelerate launch``; the main process scores and writes the reports. A run that cannot be evaluated is recorded as
a failure and the other runs go on; :func:`evaluate` raises only when every run failed. ``adapter_scale`` evaluates
each run at each strength as a run of its own (:func:`.plan.at_strength`: same seeds, its own image folder); a
strength a method refuses (PEFT's BOFT and a constrained OFT load at 1 only) fails that strength only.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import families
from ..adapters.sampling import generate_images, load_pipeline
from ..fileio import atomic_write, first_line, write_failure, write_failure_error
from ..train.data import load_image
from .metrics import (
    TINY_RANDOM,
    ReferenceEmbeddings,
    load_clip_scorer,
    load_dino_scorer,
    mean_cosine_to,
    mean_pairwise_cosine,
    remove_token,
)
from .options import EvaluationOptions
from .plan import (
    ImageJob,
    RunSpec,
    at_strength,
    check_record,
    load_prompt_set,
    load_subjects,
    plan_jobs,
    printable,
    resolve_run,
    seed_scope,
    shard,
)
from .report import write_reports

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TINY_RANDOM_NOTE = "CLIP is tiny-random: a small RANDOM-WEIGHT CLIP for smoke runs; its scores mean nothing"


def save_png(image, path: Path) -> None:
    """Write ``image`` through a temporary file and a rename: a PNG on disk is always complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def sampling_kwargs(run: RunSpec) -> dict:
    """The pipeline call's arguments that make it encode prompts as the run was trained (flow families: its T5
    length); part of the images' record."""
    return families.get(run.family).sampling_kwargs(run.max_sequence_length)


def drawn_resolution(run: RunSpec, requested: int | None) -> int | None:
    """The size the run's images are drawn at for ``--resolution requested`` (None: the model's own): what its
    family's pipeline draws (Flux rounds down to its latent patches), so that the record says what was drawn."""
    return families.get(run.family).sampling_resolution(run.base_model, requested)


def generate_missing(
    jobs: Sequence[ImageJob],
    runs: dict[str, RunSpec],
    options: EvaluationOptions,
    device: torch.device | str,
    dtype: torch.dtype,
    desc: str = "generating",
) -> dict[str, str]:
    """Generate ``jobs`` run by run (one pipeline with the run's merged adapter each); returns failures by run id."""
    by_run: dict[str, list[ImageJob]] = {}
    for job in jobs:
        by_run.setdefault(job.run_id, []).append(job)
    failures: dict[str, str] = {}
    with tqdm(total=len(jobs), desc=desc, unit="img", disable=not jobs) as bar:
        for run_id, run_jobs in by_run.items():
            run = runs[run_id]
            try:
                pipeline = load_pipeline(
                    run.base_model, run.path, merge=True, device=device, torch_dtype=dtype, adapter_scale=run.scale
                )
                sampling, resolution = sampling_kwargs(run), drawn_resolution(run, options.resolution)
                for start in range(0, len(run_jobs), options.batch_size):
                    batch = run_jobs[start : start + options.batch_size]
                    images = generate_images(
                        pipeline,
                        [job.prompt for job in batch],
                        [job.seed for job in batch],
                        num_inference_steps=options.num_inference_steps,
                        guidance_scale=options.guidance_scale,
                        batch_size=len(batch),
                        height=resolution,
                        width=resolution,
                        pipeline_kwargs=sampling,
                    )
                    for job, image in zip(batch, images):
                        save_png(image, job.path)
                    bar.update(len(batch))
            except Exception as err:  # one bad run (corrupt adapter, out of memory, ...) must not stop the others
                _stop_on_write_failure(err, f"the images of {run.name}", Path(options.output_dir))
                failures[run_id] = f"generation failed: {first_line(err)}"
                print(f"run {run.name}: generation failed: {first_line(err)}", file=sys.stderr)
            pipeline = None  # free the model before the next run's
    return failures


def _stop_on_write_failure(err: Exception, what: str, output_dir: Path) -> None:
    """A full disk or a read-only output folder is no failure of one run: every other run would fail the same way,
    so the evaluation stops with one line (what is on disk is kept, and a rerun resumes from it)."""
    if write_failure(err):
        kept = "the images already written are kept: make room (or fix the folder), then run again to resume"
        raise write_failure_error(f"{what} in {output_dir}", err, kept) from err


def score_run(run: RunSpec, jobs: Sequence[ImageJob], clip, dino, references: ReferenceEmbeddings, bar=None):
    """One row per prompt of the run: CLIP-I and DINO against the real images, CLIP-T against the prompt."""
    real_clip = references.get(clip, run.real_images)  # (M, D)
    real_dino = references.get(dino, run.real_images) if dino is not None else None
    groups: dict[tuple[str, str], list[ImageJob]] = {}
    for job in jobs:
        groups.setdefault((job.kind, job.prompt), []).append(job)
    rows = []
    for (kind, prompt), group in groups.items():
        images = [load_image(job.path) for job in group]
        embeddings = clip.image_embeddings(images)  # (N, D)
        text = clip.text_embeddings([remove_token(prompt, run.token)])[0]  # (D,)
        dino_score = mean_pairwise_cosine(dino.image_embeddings(images), real_dino) if dino is not None else None
        rows.append(
            {
                "method": run.label,
                "subject": run.subject,
                "prompt": prompt,
                "clip_i": mean_pairwise_cosine(embeddings, real_clip),
                "clip_t": mean_cosine_to(embeddings, text),
                "dino": dino_score,
                "n": len(images),
                "kind": kind,
                "run": run.run_id,
                "family": run.family,
                "scale": run.scale,
            }
        )
        if bar is not None:
            bar.update(1)
    return rows


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def _load_clip_everywhere(options: EvaluationOptions, state):
    """Main process loads CLIP before any generation (fail fast); every process raises the same error if it fails."""
    from accelerate.utils import broadcast_object_list

    clip, error = None, None
    if state.is_main_process:
        if options.clip_model == TINY_RANDOM:
            print(TINY_RANDOM_NOTE, file=sys.stderr)
        try:
            clip = load_clip_scorer(options.clip_model, options.clip_pretrained, state.device, options.score_batch_size)
        except ValueError as err:
            error = str(err)
    if state.num_processes > 1:
        error = broadcast_object_list([error])[0]
    if error:
        raise ValueError(error)
    return clip


def _plan(options: EvaluationOptions, images_dir: Path, dtype: torch.dtype, write_records: bool):
    """Resolve and plan every run at every strength: ``(runs by id, jobs by id, failures by entry)``; a run at
    another strength than 1 has its own id (and failure line)."""
    subjects = load_subjects(options.subjects_file)
    runs: dict[str, RunSpec] = {}
    jobs: dict[str, list[ImageJob]] = {}
    failures: dict[str, str] = {}
    resolved: set[str] = set()
    for entry in dict.fromkeys(options.runs):
        try:
            run = resolve_run(
                entry,
                subjects,
                subject=options.subject,
                dataset_dir=options.dataset_dir,
                prompt_set=options.prompt_set,
                token=options.token,
                base_model=options.pretrained_model_name_or_path,
            )
            if run.run_id in resolved:
                continue
            resolution = drawn_resolution(run, options.resolution)  # refuses a size the model cannot draw
        except (ValueError, FileNotFoundError, OSError) as err:
            failures[entry] = first_line(err)
            continue
        resolved.add(run.run_id)
        if resolution != options.resolution and write_records:
            print(
                f"run {run.entry}: {run.family} draws --resolution {options.resolution} as {resolution} x "
                f"{resolution} (a multiple of its latent patches); recorded as {resolution}",
                file=sys.stderr,
            )
        for scale in options.adapter_scale:
            strength_run = at_strength(run, scale)
            record = {
                "base_model": run.base_model,
                "adapter_sha256": run.adapter_sha256,
                "num_inference_steps": options.num_inference_steps,
                "guidance_scale": options.guidance_scale,
                "resolution": resolution,
                "dtype": str(dtype).removeprefix("torch."),
                "seed": options.seed,
                "seed_scope": seed_scope(run, options.paired_seeds),
            } | sampling_kwargs(run)
            if scale != 1:  # strength-1 records stay as they were: folders of earlier evaluations are reused
                record["adapter_scale"] = scale
            try:
                check_record(images_dir / strength_run.run_id, record, write=write_records)
            except (ValueError, OSError) as err:
                failures[strength_run.name] = first_line(err)
                continue
            runs[strength_run.run_id] = strength_run
            jobs[strength_run.run_id] = plan_jobs(
                strength_run,
                images_dir,
                options.images_per_prompt,
                options.base_images,
                options.base_prompt,
                options.max_prompts,
                options.seed,
                options.paired_seeds,
            )
    return runs, jobs, failures


def _generate_shard(state, runs, jobs, options: EvaluationOptions, dtype: torch.dtype) -> list[dict[str, str]]:
    """This process's share of the missing images; returns every process's failures (by run id) on each process."""
    from accelerate.utils import gather_object

    missing = [job for run_jobs in jobs.values() for job in run_jobs if not job.path.is_file()]
    state.wait_for_everyone()  # every process has listed the missing images before any process writes one
    mine = shard(missing, state.process_index, state.num_processes)
    desc = "generating" if state.num_processes == 1 else f"generating [process {state.process_index}]"
    failures = generate_missing(mine, runs, options, state.device, dtype, desc)
    gathered = gather_object([failures]) if state.num_processes > 1 else [failures]
    state.wait_for_everyone()
    return gathered


def _drop_incomplete(runs, jobs, failures: dict[str, str], generation_failures: list[dict[str, str]]) -> None:
    """Move runs whose generation failed (in any process) or whose images are missing from ``runs`` to ``failures``."""
    for found in generation_failures:
        for run_id, message in found.items():
            if run_id in runs:  # a run can fail in several processes: keep the first message
                failures[runs.pop(run_id).name] = message
    for run_id in list(runs):
        absent = sum(not job.path.is_file() for job in jobs[run_id])
        if absent:
            failures[runs.pop(run_id).name] = f"{absent} of {len(jobs[run_id])} images missing after generation"


def _score(runs, jobs, clip, options: EvaluationOptions, device, failures: dict[str, str]) -> tuple[list, list]:
    """Rows of every run that scores (the others move to ``failures``) and the notes for summary.md."""
    dino, note = load_dino_scorer(options.dino_model, device, options.score_batch_size) if runs else (None, None)
    notes = ([TINY_RANDOM_NOTE] if options.clip_model == TINY_RANDOM else []) + ([note] if note else [])
    if note:
        print(note, file=sys.stderr)
    references = ReferenceEmbeddings(Path(options.output_dir) / "cache")
    rows = []
    total = sum(len({(job.kind, job.prompt) for job in jobs[run_id]}) for run_id in runs)
    with tqdm(total=total, desc="scoring", unit="prompt", disable=not total) as bar:
        for run_id, run in list(runs.items()):
            try:
                rows.extend(score_run(run, jobs[run_id], clip, dino, references, bar))
            except Exception as err:  # e.g. an unreadable generated image: report it, score the others
                _stop_on_write_failure(err, f"the scores of {run.name}", Path(options.output_dir))
                failures[runs.pop(run_id).name] = f"scoring failed: {first_line(err)}"
                print(f"run {run.name}: scoring failed: {first_line(err)}", file=sys.stderr)
    return rows, notes


def drawn_resolutions(runs: Sequence[RunSpec], requested: int | None) -> dict:
    """summary.md's ``resolution`` setting: the size the runs were drawn at (by family where families differ), and
    the ``requested_resolution`` beside it where a family drew another size than asked."""
    by_family: dict[str, set] = {}
    for run in runs:
        by_family.setdefault(run.family, set()).add(drawn_resolution(run, requested))
    sizes = {size for found in by_family.values() for size in found}
    if not sizes or sizes == {requested}:
        return {"resolution": requested}
    if len(sizes) == 1:
        return {"resolution": sizes.pop(), "requested_resolution": requested}
    drawn = {family: sorted(found) if len(found) > 1 else found.pop() for family, found in sorted(by_family.items())}
    return {"resolution": drawn, "requested_resolution": requested}


def evaluate(options: EvaluationOptions) -> Path:
    """Generate (resumably, sharded over processes), score and report every run; returns the output folder.

    Runs that cannot be evaluated are listed under "Failures" in summary.md; raises ValueError only when every run
    failed (or for an error that concerns every run: unknown prompt set, unknown CLIP model, missing CLIP weights).
    """
    from accelerate import PartialState

    state = PartialState(cpu=int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available())
    if options.prompt_set is not None:
        load_prompt_set(options.prompt_set)  # an unknown set is an error for every run: say so at once
    output_dir = Path(options.output_dir)
    dtype = resolve_dtype(options.dtype, state.device)
    clip = _load_clip_everywhere(options, state)
    runs, jobs, failures = _plan(options, output_dir / "images", dtype, write_records=state.is_main_process)
    if state.is_main_process:
        for entry, message in failures.items():
            print(f"run {entry}: {message}", file=sys.stderr)
    generation_failures = _generate_shard(state, runs, jobs, options, dtype)
    if not state.is_main_process:
        return output_dir
    _drop_incomplete(runs, jobs, failures, generation_failures)
    rows, notes = _score(runs, jobs, clip, options, state.device, failures)
    settings = {k: v for k, v in asdict(options).items() if k != "runs"} | {"dtype": str(dtype).removeprefix("torch.")}
    settings |= drawn_resolutions(runs.values(), options.resolution)
    paths = write_reports(output_dir, rows, list(runs.values()), jobs, failures, notes, settings, options.grid_prompts)
    if not runs:
        first_entry, first_message = next(iter(failures.items()))
        raise ValueError(f"every run failed ({first_entry}: {first_message}); see {paths['summary']}")
    evaluated = f"{len(runs)} run(s)"
    if options.adapter_scale != [1.0]:
        evaluated = f"{len(runs)} (run, strength) pair(s)"
    print(printable(f"evaluated {evaluated}, {len(failures)} failed: {paths['results']}, {paths['summary']}"))
    return output_dir
