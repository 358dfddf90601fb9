export PYTHONPATH=$PWD TRITON_INTERPRET=0 PORTABLE_CACHE_DIR=/tmp/pc5 PYTHONUNBUFFERED=1
python3 -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__, torch.cuda.get_device_name())" | tee $OUT/env.log
( python3 prefill.py --backend cpu --out /tmp/c.safetensors -q && for n in 1 2; do
  python3 decode.py --cache /tmp/c.safetensors --backend cuda --precision bf16 -q --json $OUT/ours_$n.json
  python3 -c "import json,sys; t=json.load(open(sys.argv[1]))['timing']; print('ours', {k: t.get(k) for k in ('compile_s','save_s','load_s','artifact_reused')})" $OUT/ours_$n.json
done ) 2>&1 | tail -4 | tee $OUT/ours.log
timeout 190 python3 benchmarks/compile_artifacts.py --model default --device cuda --precision bf16 --timeout 90 --out $OUT/artifacts_default.json 2>&1 | grep -v Warn | tail -4 | cut -c1-1200
timeout 230 python3 benchmarks/compile_artifacts.py --model preset:llama-3.2-1b --device cuda --precision bf16 --timeout 110 --out $OUT/artifacts_llama.json 2>&1 | grep -v Warn | tail -4 | cut -c1-1200

# 2026-12-03, a later session (three commands, each timed; the tree of 9ab6daa + this script):
python3 benchmarks/compile_artifacts.py --model default --device cuda --precision bf16 --methods aoti --timeout 330 --out $OUT/aoti_default.json   # -> aoti_default_1.json
python3 -X faulthandler benchmarks/compile_artifacts.py --model default --device cuda --precision bf16 --methods aoti --timeout 120 --out $OUT/aoti_default.json   # -> aoti_default_2.json/.log
python3 benchmarks/compile_artifacts.py --model preset:llama-3.2-1b --device cuda --precision bf16 --methods compile-cache --timeout 95 --out $OUT/cc_llama.json
python3 -m pytest -q -m gpu tests -p no:cacheprovider   # -> gpu_tests_9ab6daa.log
python3 prefill.py --backend cpu --out /tmp/c.safetensors -q && for p in fp32 bf16; do python3 decode.py --cache /tmp/c.safetensors --backend cuda --precision $p -q --json $OUT/decode_$p.json; done
