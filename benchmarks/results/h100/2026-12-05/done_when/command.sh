# issue 7's done-when command on the two shapes: CPU prefill, decode.py on CUDA bf16 twice (2nd reuses saved kernels)
export PYTHONPATH=$PWD TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 PORTABLE_CACHE_DIR=/tmp/pc
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/gpu.txt
for m in llama-3.2-1b qwen3-1.7b; do
  python3 prefill.py --model preset:$m --backend cpu --out /tmp/$m.safetensors -q || exit 1
  for n in 1 2; do
    python3 decode.py --cache /tmp/$m.safetensors --model preset:$m --backend cuda --precision bf16 -n 256 --ignore-eos \
        --no-parity --sync-every 16 --json $OUT/decode_${m}_$n.json 2>&1 | tee $OUT/decode_${m}_$n.log | grep -v "^$" | tail -4
  done
done
timeout 150 python3 -m portable bench --measure-peak -m preset:llama-3.2-1b,preset:qwen3-1.7b -b cuda -p bf16 -t tg128 \
    --batch 1 -r 3 -q -o $OUT/bench.json 2>&1 | tee $OUT/bench.log | grep -E "peak|tg128"
true
