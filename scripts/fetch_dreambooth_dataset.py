"""Fetch the DreamBooth dataset images (github.com/google/dreambooth, folder dataset/) and check what arrived.

    python scripts/fetch_dreambooth_dataset.py                   # -> datasets/dreambooth/<subject>/*.jpg (30 subjects)
    python scripts/fetch_dreambooth_dataset.py --verify_only     # only check an existing copy
    python evaluate_clip.py --runs out/dog-gsoft --subject dog   # then: real images from datasets/dreambooth/dog

Needs network access: a sparse git checkout of dataset/ (git >= 2.25), or else the repository's zip archive over
HTTPS. Subjects already present are kept. The images are never committed. Every subject of --subjects_file must end
up with a folder of readable images, or the script says which are missing and exits with status 2.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from dreambooth_gs.cli import run_cli
from dreambooth_gs.evaluate.plan import DATASET_DIR, load_subjects
from dreambooth_gs.resources import SUBJECTS_FILE
from dreambooth_gs.train.data import scan_images

REPOSITORY = "https://github.com/google/dreambooth"
DATASET_FOLDER = "dataset"


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fetch_dreambooth_dataset.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dest", default=str(DATASET_DIR), help="Where the subject folders go.")
    parser.add_argument("--subjects_file", default=str(SUBJECTS_FILE), help="The subjects to expect.")
    parser.add_argument("--method", choices=("auto", "git", "archive"), default="auto", help="auto: git, else zip.")
    parser.add_argument("--repository", default=REPOSITORY, help="The dataset's GitHub repository.")
    parser.add_argument("--ref", default="main", help="Branch of the zip archive.")
    parser.add_argument("--timeout", type=float, default=120.0, help="Seconds before a network step gives up.")
    parser.add_argument("--verify_only", action="store_true", help="Do not download; only check --dest.")
    return parser.parse_args(input_args)


def verify(dest: Path, subjects: list[str]) -> dict[str, int]:
    """Readable images per subject folder of ``dest``; ValueError naming every subject without any."""
    counts = {name: len(scan_images(dest / name)[0]) if (dest / name).is_dir() else 0 for name in subjects}
    missing = [name for name, count in counts.items() if count == 0]
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(subjects)} subjects have no images in {dest}: {', '.join(missing)} "
            "(run scripts/fetch_dreambooth_dataset.py with network access, without --verify_only)"
        )
    return counts


def _git_fetch(repository: str, staging: Path, timeout: float) -> Path:
    """Sparse, blob-less shallow clone holding only dataset/; returns that folder."""
    checkout = staging / "repo"
    commands = [
        ["git", "clone", "--quiet", "--depth", "1", "--filter=blob:none", "--sparse", repository, str(checkout)],
        ["git", "-C", str(checkout), "sparse-checkout", "set", DATASET_FOLDER],
    ]
    for command in commands:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            lines = (result.stderr or result.stdout).strip().splitlines()
            raise OSError(f"{' '.join(command[:3])} failed: {lines[-1] if lines else result.returncode}")
    return checkout / DATASET_FOLDER


def _archive_fetch(repository: str, ref: str, staging: Path, timeout: float) -> Path:
    """The repository's zip archive over HTTPS, with only its dataset/ members extracted; returns that folder."""
    url = f"{repository.rstrip('/')}/archive/refs/heads/{ref}.zip"
    archive = staging / "archive.zip"
    with urllib.request.urlopen(url, timeout=timeout) as response, open(archive, "wb") as out:
        shutil.copyfileobj(response, out)
    extracted = staging / "archive"
    with zipfile.ZipFile(archive) as bundle:
        members = [m for m in bundle.namelist() if m.split("/")[1:2] == [DATASET_FOLDER]]
        if not members:
            raise OSError(f"{url} has no {DATASET_FOLDER}/ folder")
        bundle.extractall(extracted, members)
    (top,) = {m.split("/")[0] for m in members}
    return extracted / top / DATASET_FOLDER


def fetch(dest: Path, method: str, repository: str, ref: str, timeout: float) -> list[str]:
    """Download dataset/ and move the subject folders missing from ``dest`` into it; returns the names moved."""
    dest.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=dest))
    errors = []
    try:
        source = None
        if method in ("auto", "git"):
            try:
                source = _git_fetch(repository, staging, timeout)
            except (OSError, subprocess.SubprocessError) as err:  # includes git not installed
                errors.append(f"git: {err}")
        if source is None and method in ("auto", "archive"):
            try:
                source = _archive_fetch(repository, ref, staging, timeout)
            except (OSError, urllib.error.URLError, zipfile.BadZipFile) as err:
                errors.append(f"archive: {getattr(err, 'reason', err)}")
        if source is None or not source.is_dir():
            raise ValueError(
                f"cannot download the DreamBooth dataset from {repository} ({'; '.join(errors) or 'no dataset/'}); "
                f"check network access, or download it by hand and put its {DATASET_FOLDER}/ subject folders in {dest}"
            )
        moved = []
        for folder in sorted(p for p in source.iterdir() if p.is_dir()):
            if not (dest / folder.name).exists():
                shutil.move(str(folder), dest / folder.name)
                moved.append(folder.name)
        return moved
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main(args: argparse.Namespace) -> dict[str, int]:
    dest = Path(args.dest)
    subjects = sorted(load_subjects(args.subjects_file))
    if not args.verify_only:
        have = {name for name in subjects if (dest / name).is_dir() and scan_images(dest / name)[0]}
        if have == set(subjects):
            print(f"all {len(subjects)} subjects are already in {dest}")
        else:
            moved = fetch(dest, args.method, args.repository, args.ref, args.timeout)
            print(f"fetched {len(moved)} subject folder(s) into {dest}")
    counts = verify(dest, subjects)
    print(f"{len(counts)} subjects, {sum(counts.values())} images in {dest}")
    return counts


if __name__ == "__main__":
    run_cli(main, parse_args(sys.argv[1:]), "fetch_dreambooth_dataset.py")
