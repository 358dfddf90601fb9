"""`portable bench kernels`: each Triton kernel of backends/kernels against its PyTorch reference (seed 001's
micro-benchmarks, in `triton.testing.perf_report` style: one `triton.testing.Benchmark` per kernel, x = a size,
lines = Triton and PyTorch, y = GB/s from the bytes the kernel must move).

On a GPU each call is timed by `triton.testing.do_bench` (median, with the 20th/80th percentiles as the band).
Without one the kernels run only in Triton's interpreter on the CPU: `--interpret` allows that with tiny sizes, timed
by the host clock — it tests the harness, the numbers mean nothing. The tables and plots are written by a small
runner of our own (perf_report's `run` needs pandas, which the project does not otherwise use).
"""

from __future__ import annotations

import csv
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from caches.fileformat import atomic_file
from portable.errors import PortableError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Shapes:
    """Sizes of a real model (Llama-3.2-1B) on a GPU, and tiny ones for the interpreter."""

    hidden: int
    inter: int
    hq: int
    hk: int
    d: int
    tokens: tuple[int, ...]  # x axis of the row-wise kernels
    gemv_n: tuple[int, ...]  # x axis of gemv (square N x N weights)
    slots: tuple[int, ...]  # x axis of decode attention


GPU = Shapes(2048, 8192, 32, 8, 64, (1, 16, 256, 4096), (1024, 2048, 4096, 8192), (256, 1024, 4096, 16384))
TINY = Shapes(64, 128, 4, 2, 16, (1, 4), (32, 64), (16, 32))


def _rand(*shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(device)


def _case_rmsnorm(k, s: Shapes, x: int, dtype, device):
    t, w = _rand(x, s.hidden, dtype=dtype, device=device), _rand(s.hidden, dtype=dtype, device=device, seed=1)
    fns = {"triton": lambda: k.norms.rmsnorm(t, w, 1e-6), "torch": lambda: k.norms.rmsnorm_torch(t, w, 1e-6)}
    return fns, (2 * t.numel() + w.numel()) * t.element_size()


def _case_add_rmsnorm(k, s: Shapes, x: int, dtype, device):
    t, w = _rand(x, s.hidden, dtype=dtype, device=device), _rand(s.hidden, dtype=dtype, device=device, seed=1)
    r = _rand(x, s.hidden, dtype=torch.float32, device=device, seed=2)
    fns = {"triton": lambda: k.norms.add_rmsnorm_(t, r, w, 1e-6),
           "torch": lambda: k.norms.add_rmsnorm_torch_(t, r, w, 1e-6)}
    return fns, 2 * t.numel() * t.element_size() + 2 * r.numel() * r.element_size()


def _case_gated(k, s: Shapes, x: int, dtype, device):
    g, u = _rand(x, s.inter, dtype=dtype, device=device), _rand(x, s.inter, dtype=dtype, device=device, seed=1)
    fns = {"triton": lambda: k.activation.gated(g, u), "torch": lambda: k.activation.gated_torch(g, u)}
    return fns, 3 * g.numel() * g.element_size()


def _case_rope_qk(k, s: Shapes, x: int, dtype, device):
    q, kk = _rand(x, s.hq, s.d, dtype=dtype, device=device), _rand(x, s.hk, s.d, dtype=dtype, device=device, seed=1)
    pos = torch.arange(x, device=device)
    inv = 1.0 / (10000 ** (torch.arange(0, s.d, 2, device=device).float() / s.d))
    fns = {"triton": lambda: k.rope.rope_qk(q, kk, pos, inv), "torch": lambda: k.rope.rope_qk_torch(q, kk, pos, inv)}
    return fns, 2 * (q.numel() + kk.numel()) * q.element_size()


def _case_gemv(k, s: Shapes, x: int, dtype, device):
    w, v = _rand(x, x, dtype=dtype, device=device), _rand(x, dtype=dtype, device=device, seed=1)
    out = torch.empty(x, dtype=dtype, device=device)
    fns = {"triton": lambda: k.gemv.gemv(v, w, out), "torch": lambda: k.gemv.gemv_torch(v, w, out)}
    return fns, w.numel() * w.element_size()


@dataclass
class _DecodeAttention:
    """One new token's packed q/k/v over `x` cached slots (batch 1), with the fused kernels' workspace."""

    kc: torch.Tensor
    vc: torch.Tensor
    start: torch.Tensor
    slot: torch.Tensor
    qkv: torch.Tensor
    positions: torch.Tensor
    inv: torch.Tensor
    q: torch.Tensor
    scale: float
    fused: object

    @classmethod
    def make(cls, k, s: Shapes, x: int, dtype, device) -> "_DecodeAttention":
        kc, vc = (_rand(1, s.hk, x, s.d, dtype=dtype, device=device, seed=i) for i in (1, 2))
        return cls(kc=kc, vc=vc, start=torch.zeros(1, dtype=torch.int32, device=device),
                   slot=torch.full((1,), x - 1, dtype=torch.int32, device=device),
                   qkv=_rand(1, (s.hq + 2 * s.hk) * s.d, dtype=dtype, device=device),
                   positions=torch.full((1,), x - 1, dtype=torch.long, device=device),
                   inv=1.0 / (10000 ** (torch.arange(0, s.d, 2, device=device).float() / s.d)),
                   q=torch.empty(1, s.hq, s.d, dtype=dtype, device=device), scale=s.d ** -0.5,
                   fused=k.attention.RopeAttention(1, s.hq, s.hk, s.d, x, device))

    def fused_attention(self) -> None:
        """RoPE + cache write + split attention (pass 1), as the decode step launches it."""
        self.fused.rope_attention(self.qkv, self.positions, self.inv, 1.0, self.kc, self.vc, self.start, self.slot,
                                  self.scale, 0, None, None, 1e-6, 0.0)

    def torch_attention(self, k) -> torch.Tensor:
        """The same job through the PyTorch references: [1, hq, d]."""
        k.rope.qkv_rope_cache_torch_(self.qkv, self.positions, self.inv, 1.0, self.q, self.kc, self.vc, self.slot)
        return k.attention.decode_attention_torch(self.q, self.kc, self.vc, self.start, self.slot, self.scale)

    @property
    def kv_bytes(self) -> int:
        return 2 * self.kc.numel() * self.kc.element_size()


def _case_attention(k, s: Shapes, x: int, dtype, device):
    """Decode attention of one new token over `x` cached slots (batch 1), with RoPE and the cache write fused in as
    the decode step runs it (`RopeAttention`): both sides do that whole job from the packed q/k/v projections."""
    a = _DecodeAttention.make(k, s, x, dtype, device)
    out = torch.empty(1, s.hq, s.d, dtype=dtype, device=device)

    def triton_():
        a.fused_attention()
        return a.fused.combine(out)

    def torch_():
        return out.copy_(a.torch_attention(k))

    return {"triton": triton_, "torch": torch_}, a.kv_bytes


def _case_attention_oproj(k, s: Shapes, x: int, dtype, device):
    """Batch 1 as the fast decode step runs it: RoPE + cache write + attention over `x` slots, then the combine folded
    into the output projection, added to the fp32 residual (`combine_oproj_`); against RoPE, attention and
    `F.linear` through PyTorch. Bytes: the keys and values read, and W_o."""
    a = _DecodeAttention.make(k, s, x, dtype, device)
    wo = _rand(s.hidden, s.hq * s.d, dtype=dtype, device=device, seed=3) / (s.hq * s.d) ** 0.5
    h = torch.zeros(s.hidden, dtype=torch.float32, device=device)

    def triton_():
        a.fused_attention()
        a.fused.combine_oproj_(wo, h)
        return h

    def torch_():
        return h.add_(torch.nn.functional.linear(a.torch_attention(k).reshape(1, -1), wo)[0].float())

    return {"triton": triton_, "torch": torch_}, a.kv_bytes + wo.numel() * wo.element_size()


# name: (case builder, x axis name, the Shapes field holding the x values)
KERNELS: dict[str, tuple[Callable, str, str]] = {
    "rmsnorm": (_case_rmsnorm, "tokens", "tokens"),
    "add_rmsnorm": (_case_add_rmsnorm, "tokens", "tokens"),
    "gated": (_case_gated, "tokens", "tokens"),
    "rope_qk": (_case_rope_qk, "tokens", "tokens"),
    "gemv": (_case_gemv, "N = K", "gemv_n"),
    "attention": (_case_attention, "cache slots", "slots"),
    "attention_oproj": (_case_attention_oproj, "cache slots", "slots"),
}


def _host_timer(fn, reps: int = 3) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile) milliseconds by the host clock (interpreter runs)."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return statistics.median(times), times[0], times[-1]


def _kernel_modules(interpret: bool):
    """Import the kernel modules in the requested mode (Triton reads TRITON_INTERPRET when it is imported and when a
    kernel is defined)."""
    from portable.bench import device as dev

    if not interpret and not dev.gpu_available():
        raise PortableError("`portable bench kernels` needs a GPU: the Triton kernels compile for CUDA/ROCm. Pass "
                            "--interpret to run them in Triton's CPU interpreter with tiny sizes (for testing the "
                            "harness; the timings mean nothing).")
    try:
        import backends.kernels as k
        from backends.kernels import activation, attention, gemv, norms, rope  # noqa: F401
    except ImportError as e:
        raise PortableError(f"the Triton kernels cannot be imported here: {e}") from e
    if k.interpreting() != interpret:
        raise PortableError("the Triton kernels were already loaded in the other mode in this process; run "
                            "`portable bench kernels` in a fresh process")
    return k


def run(names: tuple[str, ...], dtype: str = "bf16", out: Path = Path("bench-kernels"),
        interpret: bool = False) -> list[tuple[str, Path]]:
    """Benchmark the named kernels; write <kernel>.png and <kernel>.csv under `out`; return (table text, png)."""
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton in this process
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import triton.testing

    if dtype not in DTYPES:
        raise PortableError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    k = _kernel_modules(interpret)
    shapes, device = (TINY, "cpu") if interpret else (GPU, "cuda")
    timer = _host_timer if interpret else (lambda fn: tuple(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    reports = []
    for name in names:
        build, xlabel, axis = KERNELS[name]
        bench = triton.testing.Benchmark(
            x_names=["x"], x_vals=list(getattr(shapes, axis)), line_arg="provider", line_vals=["triton", "torch"],
            line_names=["Triton", "PyTorch"], plot_name=f"{name}-{dtype}", args={}, xlabel=xlabel, ylabel="GB/s",
            x_log=True)
        rows = []
        for x in bench.x_vals:
            fns, nbytes = build(k, shapes, x, DTYPES[dtype], device)
            row = [x]
            for provider in bench.line_vals:
                ms, fast, slow = timer(fns[provider])  # GB/s: the fastest time gives the top of the band
                row += [nbytes / (ms * 1e-3) / 1e9, nbytes / (slow * 1e-3) / 1e9, nbytes / (fast * 1e-3) / 1e9,
                        ms]
            rows.append(row)
        header = [xlabel] + [f"{n} {c}" for n in bench.line_names for c in ("GB/s", "GB/s low", "GB/s high", "ms")]
        with atomic_file(out / f"{bench.plot_name}.csv", "w", newline="") as f:  # an interrupted run leaves the
            csv.writer(f).writerows([header] + rows)  # previous files whole
        plt.figure()
        ax = plt.subplot()
        for i, line in enumerate(bench.line_names):
            xs = [r[0] for r in rows]
            ax.plot(xs, [r[1 + 4 * i] for r in rows], label=f"{line} ({bench.ylabel})")
            ax.fill_between(xs, [r[2 + 4 * i] for r in rows], [r[3 + 4 * i] for r in rows], alpha=0.15)
        ax.legend()
        ax.set_xlabel(bench.xlabel)
        ax.set_ylabel(bench.ylabel)
        ax.set_xscale("log" if bench.x_log else "linear")
        ax.set_title(f"{bench.plot_name}{' (interpreter: not a timing)' if interpret else ''}")
        png = out / f"{bench.plot_name}.png"
        with atomic_file(png) as f:
            plt.savefig(f, format="png")
        plt.close()
        lines = [f"{bench.plot_name}:", f"{xlabel:>12} {'Triton GB/s':>12} {'PyTorch GB/s':>13} {'speed-up':>9}"]
        for r in rows:
            lines.append(f"{r[0]:>12} {r[1]:>12.4g} {r[5]:>13.4g} {r[1] / r[5]:>8.3g}x")
        reports.append(("\n".join(lines), png))
    return reports
