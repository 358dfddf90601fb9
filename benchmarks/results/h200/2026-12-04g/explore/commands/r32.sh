#!/bin/bash
export PYTHONUNBUFFERED=1
timeout 330 python3 -m pytest -m gpu -q -p no:cacheprovider tests/ 2>&1 | grep -E "^E |passed|failed|^FAILED" | head -20 | tee $OUT/gpu_tests.txt
for i in 1 2; do
  for which in main inc; do
    cp devrun/${which}_stream_gemv.cu backends/kernels/stream_gemv.cu
    echo -n "$which $i: "; timeout 60 python3 benchmarks/gpu_profile.py qwen3-1.7b llama-3.2-1b --variants default --prompt 1 --new 129 --out $OUT/ab_${which}_$i.json 2>&1 | grep "graph step" | tr '\n' ' '; echo
  done
done
cp devrun/main_stream_gemv.cu backends/kernels/stream_gemv.cu
