#!/bin/bash
# Why a first `evalsuite run` on a machine (7B shape) starts up seconds slower than a later one:
# a cProfile of each, on the same machine, in the order perf/fresh_process.py runs them.
#   1. the plain loop, the machine's first process (it warms the page cache for both sides);
#   2. evalsuite cold: empty EVALSUITE_CACHE and inductor cache (the hash runs, kernels compile);
#   3. evalsuite warm: the same caches, now filled, writing its reference into another empty
#      reference cache, so it does the cold run's work less the hash and the compiles.
# Writes under $OUT: run_timing.json (both runs' phases), profile_{cold,warm}.txt (cumulative and own
# time), diff.txt (own time and cumulative time by function, cold minus warm).
#   bash perf/profile_cold_warm.sh   (needs .gem/199801.txt and .gem/tok49953)
set -u
source perf/common.sh
build_7b
W=/tmp/pcw; rm -rf $W; mkdir -p $W
export EVALSUITE_CACHE=$W/cache TORCHINDUCTOR_CACHE_DIR=$W/inductor
unset TRITON_CACHE_DIR
ARGS="--model $M --corpus .gem/199801.txt --max-tokens 65536 --batch-size 4 --tasks none --no-progress --fresh"
/usr/bin/time -f "plain_first wall %e s" python perf/plain_loop.py --model $M --text .gem/199801.txt \
  --max-tokens 65536 --batch 4 | tail -1 | tee "$OUT/plain_first.json"
# main() returned normally, not the console's startup.leave: its os._exit would skip cProfile's dump
printf 'import sys\nfrom evalsuite.cli import main\nsys.exit(main(sys.argv[1:]))\n' > $W/es_main.py
for run in cold warm; do
  /usr/bin/time -f "$run wall %e s" python -m cProfile -o $W/$run.prof $W/es_main.py run $ARGS --out $W/o_$run \
    --reference-cache $W/ref_$run 2>&1 | tail -1
done
python - <<'PY'
import json, os, pstats
out, w = os.environ.get("OUT", "/tmp/out"), "/tmp/pcw"
timing = {r: json.load(open(f"{w}/o_{r}/results.json"))["provenance"]["run_timing"] for r in ("cold", "warm")}
json.dump(timing, open(f"{out}/run_timing.json", "w"), indent=1)
stats = {}
for r in ("cold", "warm"):
    with open(f"{out}/profile_{r}.txt", "w") as f:
        p = pstats.Stats(f"{w}/{r}.prof", stream=f)
        p.sort_stats("cumulative").print_stats(200)
        p.sort_stats("tottime").print_stats(60)
    stats[r] = p.stats  # {(file, line, name): (cc, nc, tottime, cumtime, callers)}
with open(f"{out}/diff.txt", "w") as f:
    for col, label in ((2, "own time"), (3, "cumulative time")):
        keys = set(stats["cold"]) | set(stats["warm"])
        get = lambda r, k: stats[r].get(k, (0, 0, 0.0, 0.0))[col]
        rows = sorted(keys, key=lambda k: get("warm", k) - get("cold", k))[:80]
        print(f"## {label}: cold - warm, seconds (cold, warm, calls cold/warm)", file=f)
        for k in rows:
            n = (stats["cold"].get(k, (0, 0))[1], stats["warm"].get(k, (0, 0))[1])
            print(f"{get('cold', k) - get('warm', k):8.3f} {get('cold', k):8.3f} {get('warm', k):8.3f} {n} "
                  f"{k[0][-70:]}:{k[1]}({k[2]})", file=f)
for r in ("cold", "warm"):
    print(r, {k: v for k, v in timing[r]["phases"].items() if v >= 0.05})
PY
