#!/bin/bash
export PYTHONUNBUFFERED=1
timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_stream_gemv.py -k "decode_step or mlp" 2>&1 | grep -E "^E |passed|failed" | head -12 | tee $OUT/gpu_tests.txt
V='default,stream fuse_mlp=1 mlp144,stream fuse_mlp=2,stream fuse_mlp=2 mlp144,default'
timeout 200 python3 benchmarks/gpu_profile.py qwen3-1.7b llama-3.2-1b --variants "$V" --prompt 1 --new 129 --out $OUT/fused.json 2>&1 | grep -v Warn > $OUT/fused.log
grep "graph step" $OUT/fused.log
cp backends/kernels/stream_gemv.cu /tmp/new.cu
for i in 1 2; do
  for which in old new; do
    if [ $which = old ]; then cp devrun/old_stream_gemv.cu backends/kernels/stream_gemv.cu; else cp /tmp/new.cu backends/kernels/stream_gemv.cu; fi
    echo -n "$which $i: "; timeout 60 python3 benchmarks/gpu_profile.py qwen3-1.7b --variants default --prompt 1 --new 129 --out $OUT/ab_${which}_$i.json 2>&1 | grep "graph step"
  done
done
cp /tmp/new.cu backends/kernels/stream_gemv.cu
