#!/usr/bin/env bash
# Every GPU measurement in docs/performance.md, in one call on a CUDA machine (writes under $OUT or ./bench-out).
#   bash perf/gpu_all.sh PATH/TO/199801.txt
# Needs lm-eval (pip install 'lm_eval>=0.4.13,<0.5'; on a machine without PyPI, carry the wheels).
# The data-parallel stage runs when two GPUs are visible; on one GPU it is skipped.
# (Measured on one H200: stage small 2.4 min, large 3.4 min (perf_d; the --compile run adds 30-50 s
# to each); the previous round's full run took about 12 minutes on 2 x H200. The stages can be run separately with --stages.)
set -uo pipefail
text=${1:?usage: gpu_all.sh PEOPLES_DAILY_TXT}
out=${OUT:-bench-out}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -m pytest tests/test_gpu.py tests/model/test_device_map.py tests/bench/test_bench_gpu.py -m gpu -q -p no:cacheprovider \
  2>&1 | tail -4 | tee "$out/pytest_gpu.txt"
tok=${TOKENIZER_DIR:-/tmp/evalsuite-tok49953}
[ -f "$tok/tokenizer.json" ] || python3 perf/make_tokenizer.py --text "$text" --out "$tok"
python3 perf/perf_gpu.py --text "$text" --tokenizer "$tok" --out "$out" \
  --stages kernel,small,large,huge,dp 2>&1 | grep -v -i warn | tee "$out/perf_gpu.log"
# where the time goes: the LM head's GEMM at odd vocabularies, the pass split up, a whole run under cProfile
python3 perf/head_align.py --out "$out" 2>&1 | grep -v -i warn | tee "$out/head_align.log"
# the GEMM + attention floor of the 7B shape against its eager body; a 7B BF16 pass with numerics, profiled
python3 perf/floor.py --out "$out" 2>&1 | grep -v -i warn | tee "$out/floor.log"
python3 perf/profile_pass.py --text "$text" --tokenizer "$tok" --out "$out" --shape llama2-7b --dtype bf16 \
  --numerics --batch 8 --more-batches "" --tokens 32768 2>&1 | grep -v -i warn | tee "$out/profile_pass_7b.log"
python3 perf/profile_pass.py --text "$text" --tokenizer "$tok" --out "$out" --tokens 131072 2>&1 \
  | grep -v -i warn | tee "$out/profile_pass.log"
python3 perf/profile_run.py --text "$text" --tokenizer "$tok" --out "$out" --shape qwen2-0.5b --tokens 262144 \
  2>&1 | grep -v -i warn | tee "$out/profile_run.log"
# torch.compile of the whole decoder against eager (slow: each mode compiled for 33-41 s on an H200, then again for
# a second batch shape; three of its four modes took about 6 minutes there. That is why evalsuite compiles module
# by module instead.)
python3 perf/compile_probe.py --out "$out" 2>&1 | grep -v -i warn | tee "$out/compile_probe.log"
