#!/bin/bash
# Where a cold `evalsuite run` (7B shape) spends the seconds the plain loop does not: imports, the
# tokenizer, the loads. Fresh processes on an empty kernel cache; writes under $OUT:
#   imports_{plain,evalsuite}.txt  python -X importtime of each side's imports
#   startup.txt                    each start-up step timed alone in a fresh process (with and without the hash thread)
#   profile_cold.txt               cProfile of a cold `evalsuite run` (cumulative and own time)
#   profile_plain.txt              cProfile of perf/plain_loop.py on the same model and tokens
#   bash perf/profile_cold.sh   (needs .gem/199801.txt and .gem/tok49953)
set -u
source perf/common.sh
build_7b
python -X importtime -c "import torch; from transformers import AutoModelForCausalLM, AutoTokenizer" 2> "$OUT/imports_plain.txt"
python -X importtime -c "import evalsuite.cli, evalsuite.passes.runner, evalsuite.passes.loop; from transformers import AutoModelForCausalLM, AutoTokenizer" 2> "$OUT/imports_evalsuite.txt"
for hash in 0 1; do
python - "$M" $hash <<'PY' >> "$OUT/startup.txt" 2>&1
import sys, time
t0 = time.perf_counter(); marks = []
def mark(what): marks.append((what, round(time.perf_counter() - t0, 3)))
import torch; mark("import torch")
import evalsuite.passes.runner as runner; mark("import evalsuite runner")
from pathlib import Path
if sys.argv[2] == "1":
    from evalsuite.store.digests import checkpoint_digest
    from concurrent.futures import ThreadPoolExecutor
    fut = ThreadPoolExecutor(1).submit(checkpoint_digest, sys.argv[1], None); mark("hash started")
torch.cuda.init(); torch.zeros(1, device="cuda"); mark("cuda init")
from evalsuite.model.loading import load_tokenizer
from evalsuite.model.source import max_positions
max_positions(sys.argv[1]); mark("max_positions (config)")
import transformers; mark("import transformers")
from transformers import AutoTokenizer; mark("from transformers import AutoTokenizer")
tok = load_tokenizer(sys.argv[1]); mark("load_tokenizer")
if sys.argv[2] == "1":
    fut.result(); mark("hash done")
print("hash thread" if sys.argv[2] == "1" else "no hash thread", marks)
PY
done
export EVALSUITE_CACHE=/tmp/pcold-cache TORCHINDUCTOR_CACHE_DIR=/tmp/pcold-inductor
rm -rf /tmp/pcold-cache /tmp/pcold-inductor
python -m cProfile -o /tmp/cold.prof -m evalsuite run --model $M --corpus .gem/199801.txt --max-tokens 65536 \
  --batch-size 4 --tasks none --no-progress --fresh --out /tmp/pcold-o1 2>&1 | tail -1
python -m cProfile -o /tmp/plain.prof perf/plain_loop.py --model $M --text .gem/199801.txt --max-tokens 65536 --batch 4 | tail -1
python - <<'PY'
import json, os, pstats
out = os.environ.get("OUT", "/tmp/out")
for name, prof in (("profile_cold", "/tmp/cold.prof"), ("profile_plain", "/tmp/plain.prof")):
    with open(f"{out}/{name}.txt", "w") as f:
        p = pstats.Stats(prof, stream=f)
        p.sort_stats("cumulative").print_stats(150)
        p.sort_stats("tottime").print_stats(40)
print(json.load(open("/tmp/pcold-o1/results.json"))["provenance"]["run_timing"])
PY
