# tuned int8_mm defaults: tg128 bf16 vs int8 at batch 1 and 16 (same command), then each shape's default against dense
export PYTHONPATH=$PWD TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 PORTABLE_CACHE_DIR=/tmp/pc
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/gpu.txt; grep -c "n >= 16 \* k" backends/kernels/int8_mm.py >> $OUT/gpu.txt
timeout 200 python3 -m portable bench --measure-peak -m preset:llama-3.2-1b,preset:qwen3-1.7b -b cuda -p bf16,int8 -t tg128 \
    --batch 1,16 -r 3 -q -o $OUT/bench.json > $OUT/bench.log 2>&1; echo "bench rc $?"; grep -E "tg128|peak bandwidth" $OUT/bench.log
timeout 60 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels.py -k int8_mm 2>&1 | tail -1
true
