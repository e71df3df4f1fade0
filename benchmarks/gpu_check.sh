#!/usr/bin/env bash
# The GPU checks of issue 19 in one call of under 8 minutes, from the repository root:
#
#     bash benchmarks/gpu_check.sh
#
# 1. the environment (nvidia-smi, torch / CUDA, the libraries), failing at once without CUDA or a library;
# 2. tests/test_cuda.py (CUDA against the CPU) and the cost-model fit's tests;
# 3. benchmarks/bench_unet_step.py --device cuda --latent 64 --batch 4 --bf16 --methods paper (the paper's setting:
#    docs/benchmarks.md's unet_step_gpu section and docs/images/unet_step_gpu.png);
# 4. benchmarks/fit_cost_model.py --device cuda --precision fp32 bf16 (the cost_model_cuda section; the timings as
#    JSON, to refit anywhere with --load);
# 5. benchmarks/bench_layer_speed.py --device cuda, fp32 and --bf16 (the layer_speed_cuda[_bf16] sections);
# 6. the same at the transformer widths of issue 34, bf16: --shapes sdxl, sd3 and flux (the
#    layer_speed_{sdxl,sd3,flux}_cuda_bf16 sections);
# 7. benchmarks/bench_block_step.py --device cuda --bf16: one SDXL, SD3.5 and FLUX.1 block per training step (the
#    block_step_{sdxl,sd3,flux}_cuda_bf16 sections);
# 8. the existing tests that run on the GPU there (the tiny trainer picks CUDA when it sees one), with what is left.
# Each step runs under `timeout`, capped by what is left of GPU_CHECK_BUDGET (default 450 s); a failed step is
# logged and the next one runs; the exit status says whether any failed. Docs sections are edited in place.
#
# What comes back: $OUT (the device tool's folder; /tmp/gpu_check elsewhere) gets gpu_check.log (everything
# printed), benchmarks.md.diff (what this run changed in docs/benchmarks.md: `git apply` it in the checkout),
# benchmarks.md, unet_step_gpu.png (to docs/images/) and cost_model_timings.json.
#
# How a session prepares the GPU machine. It gets a copy of the working tree, not .venv: .venv is 5.9 GiB (a call
# carries 64 MiB) and built for this machine's Python 3.11. The GPU image's python3 has torch, accelerate, peft,
# transformers, pytest and pytest-xdist but no diffusers, so carry the pinned pure-Python wheels (~20 MB):
#
#     echo /.whl/ >> .git/info/exclude
#     .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#         diffusers==0.42.1 peft==0.21.2 transformers==5.23.0
#
# then call the device tool's run with command "bash benchmarks/gpu_check.sh", carry [".whl"] and timeout_s 540:
# wheels in .whl/ are installed to /tmp/site (no index, no dependencies) and put first on PYTHONPATH. PYTHON
# chooses the interpreter (default .venv/bin/python where it exists and imports torch, else python3).
#
# GPU_CHECK_CPU_DRY_RUN=1 runs the same steps on the CPU at tiny sizes, printing only (the tests skip what needs
# CUDA): a check of this script's wiring on a machine without a GPU, about 2 minutes on one core.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT_DIR=${OUT:-/tmp/gpu_check}
BUDGET=${GPU_CHECK_BUDGET:-450}
mkdir -p "$OUT_DIR"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 MPLBACKEND=Agg

if [[ ${GPU_CHECK_CPU_DRY_RUN:-0} == 1 ]]; then
    DEVICE=cpu
    UNET=(benchmarks/bench_unet_step.py --quick --no-rss)
    FIT=(benchmarks/fit_cost_model.py --quick --rounds 1 --repeats 1 --no-write)
    LAYER=(benchmarks/bench_layer_speed.py --rounds 1 --repeats 1 --threads 1 --no-write)
    LAYER_BF16=()  # bf16 matmuls on a CPU take minutes at these shapes
    WIDE_SHAPES=()  # SDXL / SD3.5 / FLUX.1 widths: minutes per call set on a CPU
    BLOCKS=(benchmarks/bench_block_step.py --block sdxl --quick)
    EXISTING_TESTS=()
else
    DEVICE=cuda
    UNET=(benchmarks/bench_unet_step.py --device cuda --latent 64 --batch 4 --bf16 --methods paper --rounds 8)
    FIT=(benchmarks/fit_cost_model.py --device cuda --precision fp32 bf16)
    LAYER=(benchmarks/bench_layer_speed.py --device cuda --rounds 15 --repeats 20)
    LAYER_BF16=("${LAYER[@]}" --bf16)
    WIDE_SHAPES=(sdxl sd3 flux)
    BLOCKS=(benchmarks/bench_block_step.py --device cuda --bf16 --block all --rounds 5)
    EXISTING_TESTS=(tests/test_layers.py tests/test_training.py tests/test_training_flags.py)
fi

FAILED=""

# step NAME LIMIT COMMAND...: run COMMAND under timeout, at most LIMIT seconds and at most what the budget has left;
# a failure (or a timeout, status 124) is logged and remembered, never the end of the script.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - SECONDS))
    if ((limit > left)); then
        limit=$left
    fi
    if ((limit < 15)); then
        echo "== $name: skipped, ${left}s of the budget left"
        FAILED+=" $name(skipped)"
        return 0
    fi
    echo
    echo "== $name (at most ${limit}s, at ${SECONDS}s): $*"
    local begin=$SECONDS status=0
    timeout --kill-after=10 "$limit" "$@" || status=$?
    echo "== $name: exit status $status after $((SECONDS - begin))s"
    if ((status != 0)); then
        FAILED+=" $name($status)"
    fi
}

main() {
    if [[ -z ${PYTHON:-} ]]; then
        PYTHON=python3
        if [[ -x .venv/bin/python ]] && .venv/bin/python -c "import torch" 2>/dev/null; then
            PYTHON=.venv/bin/python
        fi
    fi
    if compgen -G ".whl/*.whl" >/dev/null; then
        echo "== installing the carried wheels: $(ls .whl)"
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi

    echo "== environment ($PYTHON, $DEVICE)"
    nvidia-smi || echo "(no nvidia-smi)"
    "$PYTHON" - "$DEVICE" <<'EOF'
import platform, sys

import torch

print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"{torch.get_num_threads()} threads")
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    print(f"GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs")
elif sys.argv[1] == "cuda":
    sys.exit("torch sees no CUDA device: nothing here can be measured")
import accelerate, diffusers, peft, transformers  # noqa: E401  the missing ones: see the wheels above

import dreambooth_gs

versions = {m.__name__: m.__version__ for m in (diffusers, peft, transformers, accelerate)}
print(", ".join(f"{k} {v}" for k, v in versions.items()), f"dreambooth_gs from {dreambooth_gs.__file__}")
EOF
    cp docs/benchmarks.md /tmp/gpu_check_benchmarks_before.md

    local xdist=()
    if "$PYTHON" -c "import xdist" 2>/dev/null; then
        xdist=(-n 8)
    fi
    local pytest=("$PYTHON" -m pytest -q -p no:cacheprovider)
    step cuda-tests 90 "${pytest[@]}" tests/test_cuda.py tests/test_cost_model_fit.py
    step unet-step 150 "$PYTHON" "${UNET[@]}"
    step cost-model-fit 100 "$PYTHON" "${FIT[@]}" --save "$OUT_DIR/cost_model_timings.json"
    step layer-speed 45 "$PYTHON" "${LAYER[@]}"
    if ((${#LAYER_BF16[@]})); then
        step layer-speed-bf16 45 "$PYTHON" "${LAYER_BF16[@]}"
    fi
    for shapes in ${WIDE_SHAPES[@]+"${WIDE_SHAPES[@]}"}; do
        step "layer-speed-$shapes" 40 "$PYTHON" "${LAYER_BF16[@]}" --shapes "$shapes"
    done
    step block-step 60 "$PYTHON" "${BLOCKS[@]}"
    if ((${#EXISTING_TESTS[@]})); then
        step existing-tests 300 env OMP_NUM_THREADS=2 "${pytest[@]}" ${xdist[@]+"${xdist[@]}"} "${EXISTING_TESTS[@]}"
    fi

    echo
    echo "== outputs in $OUT_DIR"
    diff -u --label a/docs/benchmarks.md --label b/docs/benchmarks.md /tmp/gpu_check_benchmarks_before.md \
        docs/benchmarks.md >"$OUT_DIR/benchmarks.md.diff" || true
    cp docs/benchmarks.md "$OUT_DIR/"
    if [[ -f docs/images/unet_step_gpu.png ]]; then
        cp docs/images/unet_step_gpu.png "$OUT_DIR/"
    fi
    ls -l "$OUT_DIR"
    if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        git diff --stat
    fi
    echo "== done in ${SECONDS}s; failed:${FAILED:- none}"
    [[ -z $FAILED ]]
}

main 2>&1 | tee "$OUT_DIR/gpu_check.log"
