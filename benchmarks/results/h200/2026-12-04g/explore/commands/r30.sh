#!/bin/bash
export PYTHONUNBUFFERED=1
timeout 250 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_stream_gemv.py 2>&1 | tail -15 | tee $OUT/gpu_tests.txt
V='default,stream fuse_mlp=1,stream fuse_mlp=1 mlp144,default'
timeout 200 python3 benchmarks/gpu_profile.py qwen3-1.7b llama-3.2-1b --variants "$V" --prompt 1 --new 129 --out $OUT/fused.json 2>&1 | grep -v Warn > $OUT/fused.log
grep -v "^    exposed" $OUT/fused.log
cp backends/kernels/stream_gemv.cu /tmp/new.cu; cp devrun/old_stream_gemv.cu backends/kernels/stream_gemv.cu
echo "== main's stream_gemv.cu"
timeout 100 python3 benchmarks/gpu_profile.py qwen3-1.7b llama-3.2-1b --variants default --prompt 1 --new 129 --out $OUT/old.json 2>&1 | grep -v Warn > $OUT/old.log
grep "graph step" $OUT/old.log
cp /tmp/new.cu backends/kernels/stream_gemv.cu
