# lean int8: GPU tests of the int8 paths, the kernel sweep at batch 16, tg128 bf16 vs int8 at batch 1 and 16 with
# peak memory, and the embedded model's CPU prefill -> CUDA int8 decode (parity).
export PYTHONPATH=$PWD TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 PORTABLE_CACHE_DIR=/tmp/pc
git log --oneline -1 > $OUT/tree.txt; grep -c "lean" backends/quantize.py >> $OUT/tree.txt
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests -k "int8 or real_shapes or exact or verdict" > $OUT/tests.log 2>&1; echo "tests rc $?"; tail -2 $OUT/tests.log
timeout 200 python3 -m portable bench --measure-peak -m preset:llama-3.2-1b,preset:qwen3-1.7b -b cuda -p bf16,int8 -t tg128 \
    --batch 1,16 -r 3 -q -o $OUT/bench.json > $OUT/bench.log 2>&1; echo "bench rc $?"; grep -E "tg128|peak bandwidth" $OUT/bench.log
python3 prefill.py --backend cpu --out /tmp/c.safetensors -q && timeout 60 python3 decode.py --cache /tmp/c.safetensors --backend cuda --precision int8 --json $OUT/decode_int8.json 2>&1 | tail -6
timeout 150 python3 devrun/mm_sweep.py $OUT/mm_sweep.json > $OUT/mm_sweep.log 2>&1; echo "sweep rc $?"; cat $OUT/mm_sweep.log | cut -c1-400
true
