"""How long a kernel boundary costs: a chain of N kernels, each CTA spinning `spin` SM cycles after its wait.
MODE 0: plain stream order; 1: PDL, griddepcontrol.wait; 2: PDL, wait on a counter the previous kernel's CTAs
increment (release) after their work; 3: PDL, no wait at all (kernels overlap: the lower bound)."""
import json
import os
import sys

import torch
import triton
import triton.language as tl


@triton.jit
def _clock(dummy):
    return tl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l,r", [dummy], dtype=tl.int64, is_pure=False,
                                     pack=1)


@triton.jit
def _ld_acquire(p):
    return tl.inline_asm_elementwise("ld.global.acquire.gpu.b32 $0, [$1];", "=r,l", [p], dtype=tl.int32,
                                     is_pure=False, pack=1)


@triton.jit
def chain_kernel(cnt_ptr, flag_ptr, data_ptr, idx, G, spin, MODE: tl.constexpr):
    pid = tl.program_id(0)
    if (MODE == 1) | (MODE == 3) | (MODE == 7):  # 4: trigger after the wait; 5: flags without PDL
        tl.extra.cuda.gdc_launch_dependents()
    if (MODE == 1) | (MODE == 4):
        tl.extra.cuda.gdc_wait()
    if (MODE == 2) | (MODE == 5):
        if idx > 0:
            c = tl.atomic_add(cnt_ptr + idx - 1, 0, sem="acquire")
            while c < G:
                c = tl.atomic_add(cnt_ptr + idx - 1, 0, sem="acquire")
    if (MODE == 6) | (MODE == 7):  # per-CTA flag words: every thread polls ceil(G / 128) of them
        if idx > 0:
            offs = tl.arange(0, 512)
            fp = flag_ptr + (idx - 1) * 512 + offs
            f = tl.where(offs < G, _ld_acquire(fp), 1)
            while tl.min(f, axis=0) < 1:
                f = tl.where(offs < G, _ld_acquire(fp), 1)
    if (MODE == 2) | (MODE == 4) | (MODE == 6):
        tl.extra.cuda.gdc_launch_dependents()
    x = tl.load(data_ptr + pid)
    t0 = _clock(x)
    t = t0
    while t - t0 < spin:
        t = _clock(x)
    tl.store(data_ptr + pid, x + 1)
    if (MODE == 2) | (MODE == 5):
        tl.debug_barrier()
        tl.atomic_add(cnt_ptr + idx, 1, sem="release")
    if (MODE == 6) | (MODE == 7):
        tl.debug_barrier()
        tl.atomic_xchg(flag_ptr + idx * 512 + pid, 1, sem="release")


def run(mode, G, spin, n=200, warps=4):
    cnt = torch.zeros(n, dtype=torch.int32, device="cuda")
    flag = torch.zeros(n * 512, dtype=torch.int32, device="cuda")
    data = torch.zeros(G, dtype=torch.int32, device="cuda")
    opts = {"launch_pdl": True} if mode in (1, 2, 3, 4, 6, 7) else {}

    def body():
        cnt.zero_()
        flag.zero_()
        for i in range(n):
            chain_kernel[(G,)](cnt, flag, data, i, G, spin, MODE=mode, num_warps=warps, **opts)

    body()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        body()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        s.record()
        g.replay()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) * 1000 / n)
    times.sort()
    return times[len(times) // 2]


def main():
    out = []
    for G in (132, 264):
        for spin in (0, 2000, 8000):
            row = {"G": G, "spin": spin}
            for mode, name in ((0, "plain"), (1, "pdl_wait"), (4, "pdl_wait_late"), (2, "flag_late"), (5, "flag_nopdl"), (6, "cta_flags"), (7, "cta_flags_early"),
                               (3, "no_wait")):
                row[name] = round(run(mode, G, spin), 3)
            print(row, flush=True)
            out.append(row)
    json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "pdl_latency.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
