# CPU prefill -> CUDA decode: the embedded model per precision (gpu_suite decode part), then the done-when command on the
# two shapes (bf16, twice each: the second process reuses the saved kernels). Prints each run's end-to-end line.
export PYTHONPATH=$PWD TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 PORTABLE_CACHE_DIR=/tmp/pc
grep -c "end_to_end" portable/pipeline.py > $OUT/tree.txt
mkdir -p $OUT/decode $OUT/done_when
OUT=$OUT/decode bash benchmarks/gpu_suite.sh decode > /dev/null 2>&1
grep -E "exact|within|fp32|bf16|fp16|int8" $OUT/decode/decode.log | grep -v "^Decode" | head -12
for m in llama-3.2-1b qwen3-1.7b; do
  python3 prefill.py --model preset:$m --backend cpu --out /tmp/$m.safetensors -q || exit 1
  for n in 1 2; do
    timeout 120 python3 decode.py --cache /tmp/$m.safetensors --model preset:$m --backend cuda --precision bf16 -n 256 \
        --ignore-eos --no-parity --sync-every 16 --json $OUT/done_when/decode_${m}_$n.json > $OUT/done_when/${m}_$n.txt 2>&1
    echo "$m $n rc $?"; grep -E "^(Decode|Prefill|End|KV)" $OUT/done_when/${m}_$n.txt
  done
done
true
