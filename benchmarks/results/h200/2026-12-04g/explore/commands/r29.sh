#!/bin/bash
export PYTHONUNBUFFERED=1
git log --oneline -1 2>/dev/null
timeout 200 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_stream_gemv.py 2>&1 | tail -15 | tee $OUT/gpu_tests.txt
V='default,stream stream_batch=8,stream stream_mma=1,stream stream_mma=1 stream_batch=8,stream stream_mma=1 stream_batch=4,default'
timeout 330 python3 benchmarks/gpu_profile.py qwen3-1.7b llama-3.2-1b --variants "$V" --prompt 1 --new 129 --out $OUT/mma.json 2>&1 | grep -v Warn > $OUT/mma.log
grep -v "^    exposed" $OUT/mma.log
