#!/usr/bin/env bash
# The checks on a CUDA machine, in one go: the device tests, the benchmark table (the A/A
# check of the drop-ins, the peak memory of AdaIN and CIN) and its report, then the whole test
# suite, last because it is the slowest (it did not finish in 100-120 s on an H200 machine's
# 8 workers). Runs from the repository root with the machine's own torch:
#
#     bash benchmarks/cuda.sh OUTDIR     # DTYPES=float32 SELF_CHECK=0 SUITE_TIME=0 to do less
#
# It writes OUTDIR/log.txt, the JSON of each benchmark run and OUTDIR/report.md. Each step has
# a time limit, so that one slow step cannot take the others' time.
set -u
out=${1:-cuda-results}
mkdir -p "$out"
log="$out/log.txt"
export PYTHONPATH=src PYTHONUNBUFFERED=1
py=python3

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv \
    2>&1 | tee "$log"
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
torch.cuda.get_device_name())" 2>&1 | tee -a "$log"

echo "== device tests" | tee -a "$log"
timeout 120 $py -m pytest -q -p no:cacheprovider -rf --tb=short tests/test_devices.py \
    > "$out/tests.tmp" 2>&1 || echo "exit status $? (124: out of time)" >> "$out/tests.tmp"
tail -n 40 "$out/tests.tmp" | tee -a "$log"
rm -f "$out/tests.tmp"
echo "== benchmarks" | tee -a "$log"
bench="$py benchmarks/run.py --devices cuda --rounds 3 --min-run-time 0.02"
timeout 200 $bench --dtypes "${DTYPES:-float32,bfloat16}" --json "$out/cuda.json" >> "$log" 2>&1 \
    || echo "benchmarks: exit status $? (124: out of time; the JSON keeps the cases done)" \
    | tee -a "$log"
if [ "${SELF_CHECK:-1}" = 1 ]; then
    timeout 60 $bench --ops instance_norm,batch_norm --dtypes float32 --self-check \
        --json "$out/cuda_self.json" >> "$log" 2>&1
fi
timeout 60 $bench --ops adain,cin --dtypes float32 --memory \
    --json "$out/cuda_memory.json" >> "$log" 2>&1
$py benchmarks/report.py "$out"/cuda*.json > "$out/report.md" 2>&1
head -n 30 "$out/report.md"

if [ "${SUITE_TIME:-300}" != 0 ]; then
    echo "== whole suite" | tee -a "$log"
    workers=$($py -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
    # One thread per worker; $workers is empty or two words.
    # shellcheck disable=SC2086
    OMP_NUM_THREADS=1 timeout "${SUITE_TIME:-300}" \
        $py -m pytest -q -p no:cacheprovider -rf --tb=no $workers > "$out/tests.tmp" 2>&1 \
        || echo "exit status $? (124: out of time)" >> "$out/tests.tmp"
    grep -E "^(FAILED|ERROR)|passed|failed|exit status" "$out/tests.tmp" | tail -n 60 \
        | tee -a "$log"
    rm -f "$out/tests.tmp"
fi
