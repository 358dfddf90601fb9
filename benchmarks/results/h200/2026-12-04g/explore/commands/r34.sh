#!/bin/bash
export PYTHONUNBUFFERED=1
timeout 60 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_stream_gemv.py -k "two_programs or decode_step" 2>&1 | grep -E "^E |passed|failed" | head -8 | tee $OUT/gpu_tests.txt
V='default,stream gate_up*2,stream gate_up*2 down*2,stream down*2,stream qkv*2,stream gate_up*2 qkv*2,default'
timeout 200 python3 benchmarks/gpu_profile.py qwen3-1.7b llama-3.2-1b --variants "$V" --prompt 1 --new 129 --out $OUT/pps.json 2>&1 | grep -v Warn > $OUT/pps.log
grep "graph step" $OUT/pps.log
