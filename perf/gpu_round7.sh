#!/bin/bash
# The H200 numbers of docs/performance.md "Round 7" (fresh processes), as run through the device tool:
#   bash perf/gpu_round7.sh small   # the GPU tests of this round, then the Qwen2-0.5B shape
#   bash perf/gpu_round7.sh large   # the Llama-2-7B shape
# Needs .gem/199801.txt (People's Daily, ../shared) and .gem/tok49953 (perf/make_tokenizer.py).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
if [ "${1:-small}" = small ]; then
  python -m pytest -q -p no:cacheprovider -m gpu tests/passes/test_prewarm.py tests/passes/test_hidden_reference.py \
    tests/model/test_forward.py 2>&1 | tail -4 | tee "$OUT/pytest_gpu.txt"
  python perf/fresh_process.py --shape qwen2-0.5b --tokenizer .gem/tok49953 --text .gem/199801.txt \
    --max-tokens 262144 --batch 8 --out "$OUT"
else
  python perf/fresh_process.py --shape llama2-7b --tokenizer .gem/tok49953 --text .gem/199801.txt \
    --max-tokens 65536 --batch 4 --out "$OUT"
fi
