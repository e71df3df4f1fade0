"""Every program of the checkout prints its --help: the trainer, evaluator and exporter, the scripts, the benchmarks
and MiniBooth's, found by their ``if __name__ == "__main__"`` guard (a new program is checked without being listed).
One child process runs them all, so torch is imported once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = [".", "scripts", "benchmarks", "benchmarks/minibooth", "examples"]
NOT_COMMAND_LINES = {"examples/quickstart.py"}  # runs a demo; takes no flags

CHILD = """
import contextlib, io, json, runpy, sys
results = {}
for path in sys.argv[1:]:
    out = io.StringIO()
    sys.argv = [path, "--help"]
    code = None
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            runpy.run_path(path, run_name="__main__")
    except SystemExit as stop:
        code = stop.code
    except BaseException as err:
        code = f"{type(err).__name__}: {err}"
    results[path] = [code, out.getvalue()]
print(json.dumps(results))
"""


def programs() -> list[str]:
    found = []
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).glob("*.py")):
            relative = str(path.relative_to(ROOT))
            if relative not in NOT_COMMAND_LINES and 'if __name__ == "__main__"' in path.read_text():
                found.append(relative)
    return found


def test_every_program_prints_its_help():
    names = programs()
    assert len(names) >= 15 and "train_dreambooth_gsoft.py" in names and "benchmarks/minibooth/run.py" in names
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "120", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, *names], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for name in names:
        code, text = results[name]
        assert code in (0, None), f"{name} --help: {code}\n{text[-2000:]}"
        assert "usage:" in text and "--" in text.split("usage:", 1)[1], f"{name} --help printed no usage:\n{text}"
        assert "%%" not in text, name  # a literal % in a help text is escaped exactly once
