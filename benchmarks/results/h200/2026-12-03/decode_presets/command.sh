# one command on the H200 machine, the working tree of ef2c402 (its git metadata said 9ab6daa-dirty: decode code identical)
export PYTHONPATH=$PWD TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 PORTABLE_CACHE_DIR=/tmp/pc
for m in llama-3.2-1b qwen3-1.7b; do
  python3 prefill.py --model preset:$m --backend cpu --out /tmp/$m.safetensors -q
  for n in 1 2; do   # 1: compile + save the kernels; 2: a second process reuses them
    python3 decode.py --cache /tmp/$m.safetensors --model preset:$m --backend cuda --precision bf16 -n 256 --ignore-eos \
        --no-parity --sync-every 16 -q --json $OUT/decode_${m}_$n.json
  done
done
python3 -m portable bench --measure-peak -m preset:llama-3.2-1b,preset:qwen3-1.7b -b cuda -p bf16 -t tg128 --batch 1 -r 3 --compare hf -q -o $OUT/bench.json
