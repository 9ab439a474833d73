#!/usr/bin/env bash
# Every GPU measurement in BENCHMARKS.md, in one call on a CUDA machine (writes under $OUT or ./bench-out).
#   bash benchmarks/gpu_all.sh PATH/TO/199801.txt
set -uo pipefail
text=${1:?usage: gpu_all.sh PEOPLES_DAILY_TXT}
out=${OUT:-bench-out}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -m pytest tests/test_gpu.py tests/test_divergence.py tests/test_runner.py -q -p no:cacheprovider 2>&1 | tail -4 | tee "$out/pytest.txt"
python3 benchmarks/kernel_tune.py 2>&1 | tee "$out/kernel_tune.txt"
python3 benchmarks/core_gpu.py --text "$text" --out "$out" 2>&1 | grep -v Warning | tee "$out/core_gpu.txt"
if [ -f benchmarks/numerics_overhead.py ]; then
  python3 benchmarks/numerics_overhead.py --text "$text" --out "$out" 2>&1 | grep -v Warning | tee "$out/numerics_overhead.txt"
fi
