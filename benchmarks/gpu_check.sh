#!/usr/bin/env bash
# The suite's GPU checks in one run (under 10 minutes on one GPU): the tests marked `cuda`, then the step-time and
# whole-fit benchmarks on the device, in fp32 and bf16-mixed; one summary table at the end. Full outputs go to
# $GPU_CHECK_OUT (default: gpu_check/). Needs a CUDA build of torch (`make install` picks one on a machine with an
# NVIDIA driver).
#
#     bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${GPU_CHECK_OUT:-gpu_check}
mkdir -p "$OUT"
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: torch sees no CUDA device (torch.cuda.is_available() is False); nothing to check" >&2
    exit 2
fi

status=0
step() {  # step NAME COMMAND...: run, keep the output, remember a failure
    local name=$1
    shift
    echo "== $name: $*"
    local started=$SECONDS
    if timeout 300 "$@" >"$OUT/$name.txt" 2>&1; then
        echo "   ok ($((SECONDS - started)) s)"
    else
        echo "   FAILED ($((SECONDS - started)) s): see $OUT/$name.txt"
        status=1
    fi
}

step cuda_tests "$PY" -m pytest -q -m cuda tests -p no:cacheprovider
step probes "$PY" benchmarks/bench_probes.py --device cuda --quick --repeats 2
step normgrad "$PY" benchmarks/bench_normgrad.py --device cuda --account
step suite_fp32 "$PY" benchmarks/bench_suite.py --device cuda --rounds 2
step suite_bf16 "$PY" benchmarks/bench_suite.py --device cuda --precision bf16-mixed --rounds 1

echo
echo "| check | result |"
echo "|---|---|"
echo "| tests marked cuda | $(grep -E '[0-9]+ (passed|failed)' "$OUT/cuda_tests.txt" | tail -1) |"
for run in suite_fp32 suite_bf16; do
    grep -E '^### |whole-fit ratio' "$OUT/$run.txt" | paste - - | sed -E "s/^### ([^:]+):[^*]*\*\*(whole-fit ratio [0-9.]+x)\*\*.*/| $run \1 | \2 |/"
done
grep -E '^\| (NormStatsMonitor|GradFlowMonitor|both) \|' "$OUT/normgrad.txt" | awk -F'|' '{print "| normgrad " $2 "| logged " $7 ", amortized " $8 " |"}'
grep -E '^\| digits CNN|^\| ResNet' "$OUT/probes.txt" | awk -F'|' '
    $4 ~ /x\)/ { print "| probes per step," $2 "| frozen" $4 ", online" $5 "|"; next }
    NF > 6 { print "| probes frozen fit per epoch," $2 "|" $6 "of an epoch |" }'
exit $status
