"""Tune the batch-1 GEMV kernel on a GPU: every linear layer shape of a model, each config timed as a CUDA graph of
one launch per layer over distinct weights (as in a real decode step, so L2 cannot hold them), launched with
programmatic dependent launch as the decode step does, against cuBLAS
(F.linear) on the same weights and the device's copy bandwidth.

    python benchmarks/gemv_tune.py llama-3.2-1b qwen3-1.7b --out tune.json
    python benchmarks/gemv_tune.py llama-3.2-1b qwen3-1.7b --stream --out stream.json   # the bulk-copy GEMV
                                                     # (stream_gemv.cu) per chunk/ring size, vs the default config

Prints the best config per shape and its share of the copy bandwidth; writes every measurement as JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backends.kernels.gemv import GemvConfig, gemv  # noqa: E402
from portable import presets  # noqa: E402


def copy_bandwidth() -> float:
    n = 2 * 1024**3 // 2
    a = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        b.copy_(a)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / 20
    del a, b
    torch.cuda.empty_cache()
    return 2 * n * 2 / dt / 1e9


def graph_time(fn, reps: int = 20) -> float:
    """Median seconds of one replay of a graph of `fn`."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def shapes(name: str) -> list[dict]:
    c = presets.get(name)
    h, i = c.hidden_size, c.intermediate_size
    d = getattr(c, "head_dim", None) or h // c.num_attention_heads
    qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * d
    layers = c.num_hidden_layers
    return [
        {"name": "qkv", "n": qkv, "k": h, "gated": False, "acc": False, "norm": True, "count": layers},
        {"name": "gate_up", "n": i, "k": h, "gated": True, "acc": False, "norm": True, "count": layers},
        {"name": "down", "n": h, "k": i, "gated": False, "acc": True, "norm": False, "count": layers},
        {"name": "head", "n": c.vocab_size, "k": h, "gated": False, "acc": False, "norm": True, "count": 1},
    ]


def candidates(shape: dict):
    """Around the configs that won the first sweep (2026-11-22, H100): narrow programs, long K tiles, deeper
    pipelines; with and without loading the first tile before the programmatic-dependent-launch wait."""
    if shape["acc"]:
        space = itertools.product((16, 32), (256, 512), (4, 8), (3, 4), (2, 4, 8), (False, True))
    else:
        space = itertools.product((4, 8) if shape["gated"] else (8, 16), (512, 1024), (4, 8), (3, 4, 5), (1,),
                                  (False, True))
    for bn, bk, warps, stages, split, preload in space:
        if shape["k"] % (bk * split) == 0:
            yield GemvConfig(block_n=bn, block_k=bk, split_k=split, num_warps=warps, num_stages=stages), preload


def operands(shape: dict, dtype, x_dtype) -> tuple:
    """One shape's weights (`count` distinct ones, so L2 cannot hold them), up weights when gated, x, norm weight,
    output, and the bytes of weights one pass reads."""
    n, k, count = shape["n"], shape["k"], shape["count"]
    ws = [torch.randn(n, k, device="cuda", dtype=dtype) / k**0.5 for _ in range(count)]
    us = [torch.randn(n, k, device="cuda", dtype=dtype) / k**0.5 for _ in range(count)] if shape["gated"] else None
    x = torch.randn(k, device="cuda").to(x_dtype)
    nw = torch.randn(k, device="cuda", dtype=dtype) if shape["norm"] else None
    out = torch.zeros(n, device="cuda", dtype=torch.float32 if shape["acc"] else dtype)
    nbytes = sum(w.numel() * w.element_size() for w in ws) * (2 if us else 1)
    return ws, us, x, nw, out, nbytes


def tune(name: str, dtype=torch.bfloat16) -> list[dict]:
    rows = []
    for shape in shapes(name):
        n, k, count = shape["n"], shape["k"], shape["count"]
        ws, us, x, nw, out, nbytes = operands(shape, dtype, x_dtype=torch.float32)

        xb = x.to(dtype)[None]

        def cublas():
            for j, w in enumerate(ws):
                y = torch.nn.functional.linear(xb, w)
                if us:
                    y = torch.nn.functional.silu(y) * torch.nn.functional.linear(xb, us[j])
        t_cublas = graph_time(cublas)
        best = None
        for cfg, preload in candidates(shape):
            def ours(cfg=cfg, preload=preload):
                for j, w in enumerate(ws):
                    gemv(x, w, out, norm_w=nw, up=us[j] if us else None, accumulate=shape["acc"], config=cfg,
                         pdl=True, preload=preload)
            try:
                t = graph_time(ours)
            except Exception as e:  # a config the compiler rejects (registers, shared memory)
                print(f"  skip {cfg}: {type(e).__name__}", flush=True)
                continue
            row = {"model": name, **shape, "config": {**cfg.__dict__, "preload": preload}, "seconds": t,
                   "GBps": nbytes / t / 1e9,
                   "cublas_seconds": t_cublas, "cublas_GBps": nbytes / t_cublas / 1e9}
            rows.append(row)
            if best is None or t < best["seconds"]:
                best = row
        print(f"{name} {shape['name']:8s} n={n:6d} k={k:5d} x{count}: best {best['GBps']:7.1f} GB/s "
              f"{best['config']}  cuBLAS {best['cublas_GBps']:7.1f} GB/s", flush=True)
        del ws, us
        torch.cuda.empty_cache()
    return rows


def tune_stream(name: str, dtype=torch.bfloat16) -> list[dict]:
    """The bulk-copy GEMV at each shape for a few chunk and ring sizes, beside the Triton GEMV's default config."""
    from backends.kernels import stream_gemv

    rows = []
    for shape in shapes(name):
        n, k, count = shape["n"], shape["k"], shape["count"]
        # x as the decode step has it: the fp32 residual, or the bf16 activations before the down projection
        ws, us, x, nw, out, nbytes = operands(shape, dtype, x_dtype=dtype if shape["acc"] else torch.float32)

        def triton_default():
            for j, w in enumerate(ws):
                gemv(x, w, out, norm_w=nw, up=us[j] if us else None, accumulate=shape["acc"], pdl=True)
        t = graph_time(triton_default)
        line = [f"triton {nbytes / t / 1e9:6.0f}"]
        rows.append({"model": name, **shape, "impl": "triton default", "seconds": t, "GBps": nbytes / t / 1e9})
        for chunk, ring in itertools.product((8192, 16384, 32768), (64 * 1024, 96 * 1024, 144 * 1024)):
            def ours(chunk=chunk, ring=ring):
                for j, w in enumerate(ws):
                    stream_gemv.stream_gemv(x, w, out, norm_w=nw, up=us[j] if us else None, accumulate=shape["acc"],
                                            pdl=True, chunk_bytes=chunk, ring_bytes=ring)
            t = graph_time(ours)
            rows.append({"model": name, **shape, "impl": "stream", "chunk": chunk, "ring": ring, "seconds": t,
                         "GBps": nbytes / t / 1e9})
            line.append(f"{chunk // 1024}k/{ring // 1024}k {nbytes / t / 1e9:6.0f}")
        print(f"{name} {shape['name']:8s} n={n:6d} k={k:5d} x{count} GB/s: " + "  ".join(line), flush=True)
        del ws, us
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="+")
    parser.add_argument("--out", type=Path, default=Path("gemv_tune.json"))
    parser.add_argument("--stream", action="store_true", help="the bulk-copy GEMV instead of the Triton sweep")
    args = parser.parse_args()
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw:.0f} GB/s", flush=True)
    rows = []
    for name in args.models:
        rows.extend(tune_stream(name) if args.stream else tune(name))
    args.out.write_text(json.dumps({"copy_GBps": bw, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
