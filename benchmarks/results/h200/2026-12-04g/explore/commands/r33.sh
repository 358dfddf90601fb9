#!/bin/bash
export PYTHONUNBUFFERED=1
V='default,stream fuse_mlp=1 mlp144'
timeout 150 python3 benchmarks/gpu_profile.py qwen3-1.7b --variants "$V" --prompt 1 --new 129 --timeline --out $OUT/tl.json 2>&1 | grep -v Warn > $OUT/tl.log
cat $OUT/tl.log
timeout 120 python3 benchmarks/gpu_profile.py qwen3-1.7b --variants "$V" --prompt 1 --new 129 --stamps --out $OUT/stamps.json 2>&1 | grep -v Warn > $OUT/stamps.log
cat $OUT/stamps.log
