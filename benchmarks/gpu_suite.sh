#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md, in one command on one machine, so every ratio comes from one run:
#
#     bash benchmarks/gpu_suite.sh [PART ...]      (parts: env tests bench suite peer decode resume; default: all)
#
# Results and logs go under $OUT (default ./gpu_results). Runs from a checkout without installing it (python3 -m
# portable); needs a CUDA GPU and the project's dependencies. Each part has its own time limit, so one part that
# hangs does not take the others with it.
#
# The parts' limits add up to 1,980 s (33 min), more than one device command may run (COMMAND_LIMIT, default 600 s):
# the script refuses parts whose limits exceed it, before any work. Groups that fit: "env tests" (420 s), "bench"
# (480 s), "suite decode" (540 s), "peer resume" (540 s). COMMAND_LIMIT=0 runs any parts (a machine of one's own).
set -uo pipefail
OUT=${OUT:-gpu_results}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 PORTABLE_CACHE_DIR=${PORTABLE_CACHE_DIR:-/tmp/portable-cache}
PRESETS=preset:llama-3.2-1b,preset:qwen3-1.7b
parts=${*:-env tests bench suite peer decode resume}
declare -A LIMIT=([env]=60 [tests]=360 [bench]=480 [suite]=240 [peer]=300 [decode]=300 [resume]=240)
total=0
for p in $parts; do total=$((total + ${LIMIT[$p]:-0})); done
if [ "${COMMAND_LIMIT:-600}" -gt 0 ] && [ "$total" -gt "${COMMAND_LIMIT:-600}" ]; then
    echo "error: parts '$parts' may take up to $total s, more than COMMAND_LIMIT=${COMMAND_LIMIT:-600} s of one" \
         "command; run them in groups: env tests | bench | suite decode | peer resume" >&2
    exit 2
fi
mkdir -p "$OUT"

part() {  # part NAME SECONDS COMMAND...: run one part with a limit, log it, note its exit status
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date +%T))"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    echo "=== $name exit ${PIPESTATUS[0]}" | tee -a "$OUT/status.log"
}

for p in $parts; do
    case $p in
    env)
        part env ${LIMIT[env]} bash -c 'nvidia-smi -L; python3 -c "import torch, transformers, triton, onnxruntime, sys;
print(sys.version.split()[0], torch.__version__, transformers.__version__, triton.__version__, onnxruntime.__version__,
onnxruntime.get_available_providers(), torch.cuda.get_device_name())"; git rev-parse HEAD 2>/dev/null || true' ;;
    tests)  # the GPU-marked tests: fp32 exact on CUDA, bf16/fp16 verdicts, artifact reuse, graph vs eager, kernels
        part tests ${LIMIT[tests]} python3 -m pytest -q -m gpu -p no:cacheprovider tests ;;
    bench)  # llama-bench tg128 at batch 1 and 16, both HF generate engines timed beside each bf16 point (int8: none)
        part bench ${LIMIT[bench]} python3 -m portable bench --measure-peak -m $PRESETS -b cuda -p bf16,int8 -t tg128 \
            --batch 1,16 -r 3 --compare hf -q -o "$OUT/bench.json" ;;
    suite)  # seed 003's quick suite (short 64/64, medium 256/256); HF's dynamic cache only (each static-cache point
            # costs a torch.compile of its own, and tg128 above already times that engine)
        part suite ${LIMIT[suite]} python3 -m portable bench -m $PRESETS -b cuda -p bf16 --suite quick --batch 1 -r 3 \
            --compare hf-dynamic -q -o "$OUT/suite.json" ;;
    peer)  # the Hugging Face baseline script the issues quote, on this machine
        part peer ${LIMIT[peer]} python3 benchmarks/peers/hf_peer.py llama-3.2-1b qwen3-1.7b ;;
    decode)  # the headline use on the embedded model: CPU prefill -> CUDA decode, parity per precision; the second
             # bf16 run loads the compiled kernels the first one saved
        part decode ${LIMIT[decode]} bash -c '
            python3 prefill.py --backend cpu --out "$OUT/cpu_cache.safetensors" -q || exit 1
            n=0; for p in fp32 bf16 fp16 bf16 int8; do
                n=$((n + 1))
                python3 decode.py --cache "$OUT/cpu_cache.safetensors" --backend cuda --precision $p -q \
                    --json "$OUT/decode_${n}_$p.json" || exit 1
                python3 -c "import json, sys; r = json.load(open(sys.argv[1])); t = r[\"timing\"]; p = r[\"parity\"]
print(sys.argv[2], p[\"verdict\"], p.get(\"matched_tokens\"), {k: t.get(k) for k in (\"compile_s\", \"save_s\",
\"load_s\", \"artifact_reused\")}, \"tps\", t[\"decode\"][\"tps\"], \"p50_ms\", t[\"decode\"][\"step_p50_ms\"])" \
                    "$OUT/decode_${n}_$p.json" $p
            done' ;;
    resume)  # issue 3: load a saved >= 2,000-token cache + first step vs prefill again, on a ~1B shape
        part resume ${LIMIT[resume]} python3 benchmarks/cache_io.py --model preset:llama-3.2-1b --backend cuda --precision bf16 \
            --out "$OUT/cache_io.md" ;;
    *) echo "unknown part $p" ;;
    esac
done
cat "$OUT/status.log"
