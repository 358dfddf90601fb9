#!/usr/bin/env bash
# H100: the target (env + bench, 540 s). Otherwise: done-when decode part + a clock trace of the profile.
export PYTHONPATH=$PWD PORTABLE_CACHE_DIR=/tmp/portable-cache
git log --oneline -1 > $OUT/tree.txt 2>/dev/null
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "gpu: $gpu" | tee $OUT/gpu.txt
trace() { nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active --format=csv -lms "$2" > "$OUT/$1" 2>&1 & }
case "$gpu" in
*H100*)
    trace clocks_bench.csv 200
    bash benchmarks/gpu_suite.sh env bench
    pkill nvidia-smi ;;
*)
    bash benchmarks/gpu_suite.sh env decode
    trace clocks_profile.csv 50
    timeout 200 python3 benchmarks/gpu_profile.py qwen3-1.7b llama-3.2-1b --variants default --prompt 1 --new 129 \
        --out $OUT/profile.json > $OUT/profile.log 2>&1; echo "profile rc $?"
    pkill nvidia-smi; tail -5 $OUT/profile.log ;;
esac
true
