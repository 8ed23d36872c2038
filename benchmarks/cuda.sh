#!/usr/bin/env bash
# The checks on a CUDA machine, in one go: the device tests, the whole test suite, then the
# benchmark table (float32 and bfloat16, the A/A check of the drop-ins, the peak memory of
# AdaIN and CIN) and its report. Runs from the repository root with the machine's own torch:
#
#     bash benchmarks/cuda.sh OUTDIR
#
# Each step has a time limit, so that one slow step cannot take the others' time.
set -u
out=${1:-cuda-results}
mkdir -p "$out"
export PYTHONPATH=src PYTHONUNBUFFERED=1
py=python3

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv \
    | tee "$out/gpu.txt"
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
torch.cuda.get_device_name())" | tee -a "$out/gpu.txt"

echo "== device tests"
timeout 120 $py -m pytest -q -p no:cacheprovider tests/test_devices.py 2>&1 \
    | tee "$out/tests_devices.log" | tail -n 15
echo "== whole suite"
workers=$($py -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
# shellcheck disable=SC2086  # $workers is empty or two words
timeout 100 $py -m pytest -q -p no:cacheprovider $workers 2>&1 \
    | tee "$out/tests_all.log" | tail -n 25

echo "== benchmarks"
bench="$py benchmarks/run.py --devices cuda --rounds 3 --min-run-time 0.05"
timeout 200 $bench --json "$out/cuda.json" > "$out/bench.log" 2>&1
tail -n 3 "$out/bench.log"
timeout 60 $bench --ops instance_norm,batch_norm --dtypes float32 --self-check \
    --json "$out/cuda_self.json" > "$out/bench_self.log" 2>&1
timeout 60 $bench --ops adain,cin --dtypes float32 --memory \
    --json "$out/cuda_memory.json" > "$out/bench_memory.log" 2>&1
$py benchmarks/report.py "$out"/cuda*.json > "$out/report.md" 2>&1
head -n 40 "$out/report.md"
