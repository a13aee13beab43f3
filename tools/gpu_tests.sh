#!/usr/bin/env bash
# The test suite on a GPU machine, one test file at a time, so that a time limit or a crash never loses what ran:
# each file writes its own junit XML, and a one-line result per file plus the ids of failing tests are appended to
# small text files as soon as the file ends. From the repository root:
#
#   bash tools/gpu_tests.sh                        # every tests/test_*.py, kernels first
#   OUT=/tmp/gpu BUDGET=500 bash tools/gpu_tests.sh tests/test_lse.py tests/test_triton_attention.py
#
# Environment (all optional): OUT (default: repro/runs/gpu_tests; $OUT on the lent device), BUDGET (seconds after
# which no further file starts; default none), WORKERS (pytest-xdist workers when xdist is installed; default 4),
# PYTHON (default python3). Writes $OUT/summary.txt ("file status passed failed skipped errors seconds"),
# $OUT/failures.txt (one failing test id per line, with its first error line) and $OUT/junit/<file>.xml.
set -uo pipefail
PYTHON=${PYTHON:-python3}
OUT=${OUT:-repro/runs/gpu_tests}
WORKERS=${WORKERS:-4}
mkdir -p "$OUT/junit"
: > "$OUT/summary.txt"
: > "$OUT/failures.txt"
# Kernels and their differential tests first: they are what a GPU run is for.
FIRST="tests/test_triton_attention.py tests/test_triton_mean_correction.py tests/test_lse.py tests/test_fp8.py tests/test_triton_selection.py
tests/test_nan_and_grad.py tests/test_selection_contract.py tests/test_flex_interop.py tests/test_real_activations.py
tests/test_hf_backend.py tests/test_hf_fallbacks.py tests/test_hf_varlen.py tests/test_triton_compile.py"
if [ $# -gt 0 ]; then files="$*"; else
    files="$FIRST $(ls tests/test_*.py | grep -v -x -F -f <(tr ' ' '\n' <<< "$FIRST" | grep .))"
fi
xdist=0
"$PYTHON" -c "import xdist" 2>/dev/null && xdist=1
# Files whose module fixture does all the work (one sm_90 compile of every kernel) run in one process: under xdist
# each worker would repeat it, and on 16 cores that ran past a 10-minute call.
SERIAL="tests/test_triton_compile.py"
start=$SECONDS
for f in $files; do
    if [ -n "${BUDGET:-}" ] && [ $((SECONDS - start)) -ge "$BUDGET" ]; then
        echo "$f not-run (budget ${BUDGET} s)" >> "$OUT/summary.txt"
        continue
    fi
    t0=$SECONDS
    xml="$OUT/junit/$(basename "$f" .py).xml"
    parallel=()
    [ "$xdist" = 1 ] && ! grep -q -x -F "$f" <<< "$(tr ' ' '\n' <<< "$SERIAL")" && parallel=(-n "$WORKERS")
    "$PYTHON" -m pytest -q -p no:cacheprovider "${parallel[@]}" --junitxml="$xml" "$f" > "$OUT/last.log" 2>&1
    status=$?
    "$PYTHON" - "$xml" "$f" "$status" "$((SECONDS - t0))" "$OUT" <<'EOF'
import sys, xml.etree.ElementTree as ET
path, name, status, seconds, out = sys.argv[1:]
try:
    root = ET.parse(path).getroot()
except (OSError, ET.ParseError):
    print(f"{name} crashed (exit {status}, no junit) - - - - {seconds}", file=open(f"{out}/summary.txt", "a"))
    sys.exit()
suites = [root] if root.tag == "testsuite" else list(root)
n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
print(f"{name} exit={status} passed={passed} failed={n['failures']} skipped={n['skipped']} errors={n['errors']} "
      f"{seconds}s", file=open(f"{out}/summary.txt", "a"))
with open(f"{out}/failures.txt", "a") as fails:
    for case in root.iter("testcase"):
        for bad in list(case.findall("failure")) + list(case.findall("error")):
            first = (bad.get("message") or "").splitlines()[0][:200] if bad.get("message") else ""
            print(f"{case.get('classname')}::{case.get('name')}  {first}", file=fails)
EOF
    tail -n 1 "$OUT/summary.txt"
done
echo "== failures ($(wc -l < "$OUT/failures.txt"))"
head -n 60 "$OUT/failures.txt"
