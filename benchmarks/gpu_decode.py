"""End-to-end decode speed of our CUDA fast path on real-shape presets, with its correctness against the Hugging Face
path on the same GPU, and the bandwidth limit from a copy benchmark.

    python benchmarks/gpu_decode.py llama-3.2-1b qwen3-1.7b --prompt 64 --new 256 --batch 1,16 --out gpu.json

Timed region (seed 000's procedure): after the graph is captured and warmed up, `new - 1` decode steps with greedy
argmax on the device and one synchronisation at the end; median of `--reps` repetitions. Tokens per second counts
batch x steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backends.hf_torch import HFRunner  # noqa: E402
from backends.fast_runner import FastRunner  # noqa: E402
from portable import models  # noqa: E402
from portable.config import RunConfig  # noqa: E402
from benchmarks.gemv_tune import copy_bandwidth  # noqa: E402


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def kv_bytes(config, tokens: int, batch: int, itemsize: int) -> int:
    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * d * tokens * batch * itemsize


def run(name: str, batch: int, prompt: int, new: int, reps: int, kernels: str, bw: float, pdl: bool) -> dict:
    source = models.resolve(f"preset:{name}")
    config = RunConfig(backend="cuda", precision="bf16", kernels=kernels)
    loaded = models.load(source, precision="bf16", device="cuda")
    device = torch.device("cuda")
    fast = FastRunner(loaded, backend="cuda", config=config, device=device, pdl=pdl)
    hf = HFRunner(loaded, backend="cuda", precision="bf16", device=device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (batch, prompt), generator=g)
    mask = torch.ones_like(ids)
    cache = hf.prefill(ids, mask)

    # correctness: logits of the first steps against the HF path on the same GPU and weights
    hf.start(cache, new)
    t0 = time.perf_counter()
    fast.start(cache, new)
    compile_s = time.perf_counter() - t0
    tok = cache.next_token_logits.argmax(-1)
    errs, agree = [], 0
    for _ in range(8):
        a = hf.decode_step(tok).float()
        b = fast.decode_step(tok).float()
        errs.append(float((a - b).norm() / a.norm()))
        agree += int((a.argmax(-1) == b.argmax(-1)).all())
        tok = a.argmax(-1)

    def timed_decode() -> float:
        fast.start(cache, new)
        cur = cache.next_token_logits.argmax(-1).to(device)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(new - 1):
            cur = fast.decode_step(cur).argmax(-1)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    timed_decode()  # warm-up
    times = [timed_decode() for _ in range(reps)]
    dt = statistics.median(times)
    tps = batch * (new - 1) / dt
    wb = weight_bytes(loaded.model)
    kvb = kv_bytes(loaded.config, prompt + new, batch, 2)
    limit = bw * 1e9 / (wb + kvb)  # steps per second the bandwidth allows (each step reads weights + KV once)
    row = {"model": name, "batch": batch, "kernels": kernels, "pdl": fast.decoder.pdl, "prompt": prompt, "new": new, "tok_per_s": round(tps, 1),
           "step_ms": round(dt / (new - 1) * 1e3, 4), "limit_tok_per_s_bs1": round(limit, 1),
           "pct_of_limit": round(100 * (tps / batch) / limit, 1) if batch == 1 else None,
           "weights_GB": round(wb / 1e9, 3), "compile_s": round(compile_s, 2),
           "logit_rel_err_vs_hf_max": max(errs), "argmax_agree_steps": agree, "times": times}
    print(json.dumps({k: v for k, v in row.items() if k != "times"}), flush=True)
    del fast, hf, loaded
    torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="+")
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--batch", default="1,16")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--kernels", default="triton")
    parser.add_argument("--pdl", default="0,1", help="programmatic dependent launch off/on (comma list)")
    parser.add_argument("--out", type=Path, default=Path("gpu_decode.json"))
    args = parser.parse_args()
    bw = copy_bandwidth()
    print(json.dumps({"copy_GBps": round(bw, 1), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}),
          flush=True)
    rows = []
    for name in args.models:
        for batch in (int(b) for b in args.batch.split(",")):
            for kernels, pdl in ((k, bool(int(p))) for k in args.kernels.split(",") for p in args.pdl.split(",")):
                try:
                    rows.append(run(name, batch, args.prompt, args.new, args.reps, kernels, bw, pdl))
                except Exception as e:  # keep going: one failing point must not lose the others
                    print(json.dumps({"model": name, "batch": batch, "kernels": kernels,
                                      "error": f"{type(e).__name__}: {e}"[:500]}), flush=True)
    args.out.write_text(json.dumps({"copy_GBps": bw, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
