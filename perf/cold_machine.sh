#!/bin/bash
# What makes evalsuite's first run on a fresh machine start up slower than its later runs (7B shape),
# when the plain loop ran just before it: each pair below starts from an empty page cache (the
# device's root may drop it), so every pair is "the machine's first two processes" again.
#   pair cold:     plain loop, then evalsuite with empty caches (hash, kernel compiles, reference stored)
#   pair warm:     plain loop, then evalsuite with those caches filled (nothing to hash or compile)
#   pair nocache:  plain loop, then evalsuite with empty caches and --no-reference-cache (no hash)
# Short passes (--max-tokens, default 8192): the start-up is what is measured. Writes $OUT/cold_machine.jsonl.
#   bash perf/cold_machine.sh [TOKENS]   (needs .gem/199801.txt and .gem/tok49953)
set -u
source perf/common.sh
build_7b
N=${1:-8192}
W=/tmp/pcm; rm -rf $W; mkdir -p $W
export TORCHINDUCTOR_CACHE_DIR=$W/inductor
unset TRITON_CACHE_DIR
ARGS="--model $M --corpus .gem/199801.txt --max-tokens $N --batch-size 4 --tasks none --no-progress --fresh"
drop() { sync; echo 3 > /proc/sys/vm/drop_caches || echo "could not drop the page cache"; }
pair() {  # name, EVALSUITE_CACHE, extra evalsuite arguments
  drop
  local t0=$(date +%s.%N)
  python perf/plain_loop.py --model $M --text .gem/199801.txt --max-tokens $N --batch 4 > $W/plain_$1.json
  local t1=$(date +%s.%N)
  EVALSUITE_CACHE=$2 python -m evalsuite run $ARGS --out $W/o_$1 $3 > $W/log_$1.txt 2>&1
  local t2=$(date +%s.%N)
  python - "$1" "$t0" "$t1" "$t2" <<'PY' | tee -a "$OUT/cold_machine.jsonl"
import json, sys
name, t0, t1, t2 = sys.argv[1], *map(float, sys.argv[2:])
plain = json.load(open(f"/tmp/pcm/plain_{name}.json"))
steps = sum(d["load_s"] + d["pass_s"] for d in plain["dtypes"].values())
phases = json.load(open(f"/tmp/pcm/o_{name}/results.json"))["provenance"]["run_timing"]["phases"]
print(json.dumps({"pair": name, "plain_wall_s": round(t1 - t0, 2), "plain_startup_s": round(plain["wall_s"] - steps, 2),
                  "evalsuite_wall_s": round(t2 - t1, 2),
                  "phases": {k: v for k, v in phases.items() if v >= 0.05}}))
PY
}
pair cold $W/cache ""
pair warm $W/cache ""
pair nocache $W/cache2 "--no-reference-cache"
pair warm2 $W/cache ""
