# Two commands for a new user: `make demo` (the main job) and `make test`. Both set up .venv first (idempotent).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo demo-compare test lint bench clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# Teaches the shipped MiniBooth world model a subject it never drew: outputs/demo/demo.png (before / after) and the
# attribute oracle's scores (docs/demo.md). demo-compare trains LoRA as well, side by side.
demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m dreambooth_gs.demo --output_dir outputs/demo

demo-compare: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m dreambooth_gs.demo --output_dir outputs/demo --compare lora

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# Two single-threaded workers: the tests use tiny models, where intra-op threads cost more than they give.
test: $(STAMP) lint
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(PY) -m pytest -n 2

bench: $(STAMP)
	$(PY) benchmarks/bench_layer_speed.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
