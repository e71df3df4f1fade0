"""Shared by the benchmark scripts: rewrite one marked section of a Markdown file, atomically."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def replace_section(path: Path, name: str, body: str) -> None:
    """Replace the text between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in ``path`` with ``body``."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = path.read_text()
    if begin not in text or end not in text:
        raise ValueError(f"{path} has no {begin} ... {end} markers; add them where the section should go")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        handle.write(f"{head}{begin}\n{body.rstrip()}\n{end}{tail}")
    os.replace(tmp, path)
