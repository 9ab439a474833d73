#!/bin/bash
# Where a rerun with a cached reference spends its time (7B shape): cProfile of the second run.
#   bash perf/profile_cached.sh   (needs .gem/199801.txt and .gem/tok49953; writes $OUT/profile_cached.txt)
set -u
source perf/common.sh
build_7b
export EVALSUITE_CACHE=/tmp/pc-cache
args="run --model $M --corpus .gem/199801.txt --max-tokens 65536 --batch-size 4 --tasks none --no-progress --fresh"
python -m evalsuite $args --out /tmp/pc-o1 2>&1 | tail -2
python -m cProfile -o /tmp/cached.prof -m evalsuite $args --out /tmp/pc-o2 2>&1 | tail -2
python - <<'PY' > "$OUT/profile_cached.txt"
import pstats
p = pstats.Stats("/tmp/cached.prof")
p.sort_stats("cumulative").print_stats(70)
p.sort_stats("tottime").print_stats(30)
PY
grep -E "refcache|logits.py|reference.py|kept.py|loop.py|readinto|_sha256|digest|restore" "$OUT/profile_cached.txt" | head -40
