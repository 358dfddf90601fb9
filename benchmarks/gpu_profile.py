"""Per-kernel GPU time of one decode step of the fast path, for several variants, from the PyTorch profiler.

    python benchmarks/gpu_profile.py llama-3.2-1b --out profile.json

For each variant: the step time of the captured graph (CUDA events, median of 200 replays, each launched on an idle
GPU), the time per step of 64 greedy steps back to back (as the decode loop replays them) and, from an eager step
under the profiler, the summed device time per kernel name (what each kind of launch costs, without launch gaps).
With --timeline, instead of the eager step: when each kernel of the captured graph starts and ends within the step
(profiled graph replays; a kernel launched early by programmatic dependent launch starts before its predecessor
ends), summed per kernel kind and position in the layer, and the time no kernel ran. With --stamps, instead: when
the stream GEMVs' programs start, pass their wait and receive their weights, from timer stamps the kernel writes
(see stamps()).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backends.hf_torch import HFRunner  # noqa: E402
from backends import quantize  # noqa: E402
from backends.kernels import gemv  # noqa: E402
from backends.kernels.gemv import GemvConfig  # noqa: E402
from backends.fast_runner import FastRunner  # noqa: E402
from portable import models  # noqa: E402
from portable.config import RunConfig  # noqa: E402

VARIANTS = {
    "default": dict(),  # the bulk-copy GEMVs on NVIDIA sm_90+ (backends/kernels/stream_gemv.cu)
    "triton": dict(gemv_impl="triton"),  # the Triton GEMVs (the default before 2026-12-04)
    "attn bs32": dict(attention_block_s=32),
    "attn bs32 w8": dict(attention_block_s=32, attention_warps=8),
    "attn bs16": dict(attention_block_s=16),
    "attn w8": dict(attention_warps=8),
    "oproj64": dict(oproj_block_n=64),
    "oproj128 w8": dict(oproj_warps=8),
    "oproj256 w8": dict(oproj_block_n=256, oproj_warps=8),
    "oproj h2": dict(oproj_heads=2),  # the default since 2026-12-04 (evening), where head_dim <= 128
    # the default before: one head per combine + W_o program, a 144 KiB ring for the qkv GEMV too
    "oproj h1 qkv144": dict(oproj_heads=1, stream_rings={"qkv": 144 * 1024}),
    "oproj h2 attn bs64": dict(oproj_heads=2, attention_block_s=64),
    "oproj h4 attn bs64": dict(oproj_heads=4, attention_block_s=64),
    "oproj h4": dict(oproj_heads=4),
    "oproj h8": dict(oproj_heads=8),
    "oproj64 h4": dict(oproj_block_n=64, oproj_heads=4),
    "oproj64 h8": dict(oproj_block_n=64, oproj_heads=8),
    "oproj32 h8 w4": dict(oproj_block_n=32, oproj_heads=8),
    "oproj64 h8 w8": dict(oproj_block_n=64, oproj_heads=8, oproj_warps=8),
    # the per-shape winners of gemv_tune.py on an H200 (2026-12-02) where they differ from default_config
    "gu bn4 w4 s5": dict(gemv_configs={"gate_up": GemvConfig(4, 512, 1, 4, 5, True)}),
    "gu+qkv s5": dict(gemv_configs={"gate_up": GemvConfig(4, 512, 1, 4, 5, True),
                                    "qkv": GemvConfig(8, 1024, 1, 8, 5, True)}),
    "trigger last": dict(trigger="last"),
    "attn w4": dict(attention_warps=4),
    "p2min16": dict(attention_min_chunks_p2=16),  # the combines' chunk axis at least 16 long
    "p2min32": dict(attention_min_chunks_p2=32),
    "attn bs64": dict(attention_block_s=64),
    # with --int8: the dense defaults' tiles (the same columns, half the bytes) instead of the int8 defaults
    "dense tiles": {"_dense": True},
    # with --int8: widen int8 with the int-to-float unit (cvt) rather than gemv.widen's byte permutes
    "i2f": {"_i2f": True},
    "i2f dense tiles": {"_i2f": True, "_dense": True},
    # the GEMVs through backends/kernels/stream_gemv.cu (bulk copies into shared memory, a producer warp)
    "stream": dict(gemv_impl="stream"),
    "stream ring64": dict(gemv_impl="stream", stream_ring_bytes=64 * 1024),
    "stream ring144": dict(gemv_impl="stream", stream_ring_bytes=144 * 1024),
    "stream ring200": dict(gemv_impl="stream", stream_ring_bytes=200 * 1024),
    "stream chunk8k": dict(gemv_impl="stream", stream_chunk_bytes=8 * 1024),
    "stream chunk32k": dict(gemv_impl="stream", stream_chunk_bytes=32 * 1024),
    "int8 gu w4": dict(gemv_configs={"gate_up": GemvConfig(8, 1024, 1, 4, 4, True)}),
    "int8 head w8": dict(gemv_configs={"head": GemvConfig(8, 1024, 1, 8, 4, True)}),
}


def variant_knobs(variant: str) -> dict:
    """A variant's decoder knobs: from VARIANTS, or "stream [ringN] [chunkM] [downN ...] [knob=value ...]" (the
    bulk-copy GEMVs; sizes in KiB; qkvN / gate_upN / downN / headN: that kind's ring, the others' as the default;
    knob=value: any other integer knob of the decoder, e.g. attention_warps=4)."""
    if variant in VARIANTS:
        return dict(VARIANTS[variant])
    words = variant.split()
    if words and words[0] == "stream":
        knobs = {"gemv_impl": "stream"}
        for word in words[1:]:
            if "=" in word:
                knob, value = word.split("=", 1)
                knobs[knob] = int(value)
                continue
            for prefix, knob in (("ring", "stream_ring_bytes"), ("chunk", "stream_chunk_bytes")):
                if word.startswith(prefix):
                    knobs[knob] = int(word[len(prefix):].rstrip("k")) * 1024
            for kind in ("qkv", "gate_up", "down", "head"):
                if word.startswith(kind) and word[len(kind):].rstrip("k").isdigit():
                    knobs.setdefault("stream_rings", {})[kind] = int(word[len(kind):].rstrip("k")) * 1024
        return knobs
    raise SystemExit(f"unknown variant {variant!r}")


def dense_tiles(decoder) -> dict:
    """Per GEMV kind, the config the dense weights of the same shape get by default."""
    layer = decoder.layers[0]
    shapes = {"qkv": (layer.wqkv.shape, False, False), "gate_up": (layer.wg.shape, True, False),
              "down": (layer.wd.shape, False, True), "head": (decoder.head.shape, False, False)}
    return {"gemv_configs": {kind: gemv.default_config(*shape, gated, acc, itemsize=2)
                             for kind, (shape, gated, acc) in shapes.items()}}


def widen_i2f(on: bool) -> None:
    """Have the int8 kernels convert with cvt (on) or with gemv.widen's byte permutes (off, the default)."""
    from backends.kernels import attention, fast_int8

    gemv.fast_int8 = attention.fast_int8 = (lambda device: False) if on else fast_int8


def restorer(decoder, names=("positions", "slot")):
    """A function that puts the decoder's `names` buffers back as they are now, so that every measured step runs at
    the same cache slot (the prompt's end) and the slots in use stay `--prompt`."""
    saved = [(getattr(decoder, n), getattr(decoder, n).clone()) for n in names]

    def restore():
        for buf, value in saved:
            buf.copy_(value)
    return restore


def replay_ms(runner, reps=200) -> float:
    """Median time of one replay, every replay at the same cache slot (put back outside the timed events)."""
    g, restore = runner._graph, restorer(runner.decoder)
    times = []
    for _ in range(reps):
        restore()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def greedy_ms(runner, steps=64, reps=7) -> float:
    """Median time per step (ms) of `steps` greedy steps back to back, replayed as `greedy_steps` replays them (the
    one-step graph), every repetition from the prompt's end; what a decode loop that reads tokens back every
    `steps` steps gets, less the read-back and the first launch."""
    return sorted(context_curve(runner, steps, steps)[0] for _ in range(reps))[reps // 2] / 1e3


def context_curve(runner, steps, chunk=16) -> list[float]:
    """Time per step (µs) of each run of `chunk` greedy steps in `steps` steps back to back from the prompt's end
    (events between the chunks, on the GPU's time line): how the step time grows with the slots in use. The
    decoder's buffers and the runner's host-side slot are put back before and after."""
    d = runner.decoder
    put_back, slot = restorer(d, ("positions", "slot", "tokens")), runner._slot

    def restore():
        put_back()
        runner._slot = slot

    restore()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(steps // chunk + 1)]
    torch.cuda.synchronize()
    events[0].record()
    for e in events[1:]:
        runner.greedy_steps(d.tokens, chunk)
        e.record()
    events[-1].synchronize()
    restore()
    return [a.elapsed_time(b) * 1e3 / chunk for a, b in zip(events, events[1:])]


def profile(runner, steps=5) -> dict:
    d = runner.decoder
    from torch.profiler import ProfilerActivity, profile as prof

    restore = restorer(d)

    def step():
        restore()
        d.step()

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    totals, counts = defaultdict(float), defaultdict(int)
    for e in p.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            name = e.name.split("(")[0][:60]
            if "elementwise" in name or "copy" in name.lower():  # the restoring copies
                continue
            totals[name] += e.device_time_total / steps
            counts[name] += 1
    return {k: {"us_per_step": round(v, 1), "launches_per_step": counts[k] // steps}
            for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def timeline(runner, reps=20) -> dict:
    """The captured greedy step's kernels on one time line: per kind (the kernel name and its place among the
    layer's launches), the mean time from the previous kernel's end to this one's end ("exposed": what this kernel
    adds to the step), its mean duration, and the step's idle time (no kernel running)."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile as prof

    g, d = runner._greedy_graph, runner.decoder
    restore = restorer(d, ("positions", "slot", "tokens"))  # the greedy step also feeds its pick back

    def replay():
        restore()
        g.replay()

    for _ in range(3):
        replay()
    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(reps):
            replay()
            torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        p.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    kernels = [e for e in kernels if "elementwise" not in e["name"] and "copy" not in e["name"].lower()]
    steps, cur = [], []
    for e in kernels:  # a step starts at the embedding kernel
        if "_embed_kernel" in e["name"] and cur:
            steps.append(cur)
            cur = []
        cur.append(e)
    steps.append(cur)
    steps = [s for s in steps if len(s) == len(steps[-1])]
    per_layer = (len(steps[0]) - 3) // len(d.layers)  # embed, layers, head, advance
    exposed, duration, early = defaultdict(float), defaultdict(float), defaultdict(float)
    idle = total = 0.0
    for s in steps:
        t0, prev_end, busy_until = s[0]["ts"], s[0]["ts"], s[0]["ts"]
        for i, e in enumerate(s):
            j = i - 1
            place = j % per_layer if 0 <= j < per_layer * len(d.layers) else "-"
            kind = f"{place} {e['name'].split('(')[0][:40]}"
            end = e["ts"] + e["dur"]
            exposed[kind] += (end - prev_end) / len(steps)
            duration[kind] += e["dur"] / len(steps)
            early[kind] += (prev_end - e["ts"]) / len(steps)  # how long before its predecessor ended it started
            idle += max(0.0, e["ts"] - busy_until) / len(steps)
            busy_until = max(busy_until, end)
            prev_end = end
        total += (prev_end - t0) / len(steps)
    return {"steps": len(steps), "step_us": round(total, 1), "idle_us": round(idle, 1),
            "kinds": {k: {"exposed_us": round(exposed[k], 1), "duration_us": round(duration[k], 1),
                          "started_early_us": round(early[k], 1)} for k in sorted(exposed, key=lambda k: -exposed[k])}}


def stamps(runner, reps=10) -> dict:
    """Per stream GEMV kind (qkv, gate_up, down, head), from its programs' timer stamps (stream_gemv.cu) in the
    captured greedy step, mean over the layers but the first and over `reps` replays, in µs: how far apart its
    programs started ("start spread": the median and the last program after the first; "late programs": how many
    started over 2 µs after the first), the first ring issued, the consumers' dependency wait passed ("release", from
    the first program's start, its spread, and from the end of the kernel before it where that is a stream GEMV too),
    then, from the release: x' in registers, the first ring all arrived (0: it had when the wait passed), the chunks of
    the first ring consumed, the last chunk arrived, the outputs written (the last program). "sample": every
    program's start, SM and chunk arrivals of the middle layer's GEMVs. The timer advances in steps (its finest step
    seen is reported), so single stamps are coarse; the means over layers and replays are finer."""
    g, d = runner._greedy_graph, runner.decoder
    restore = restorer(d, ("positions", "slot", "tokens"))
    acc = defaultdict(lambda: defaultdict(float))
    counts = defaultdict(int)
    resolution, sample = None, {}
    for _ in range(reps):
        restore()
        d.stamps.zero_()
        g.replay()
        torch.cuda.synchronize()
        names = d.stamp_kinds  # the step's stream launches in order (the replayed graph's, recorded at its capture)
        st = d.stamps[:len(names)].cpu()
        prev_end = None
        seen = defaultdict(int)
        for i, name in enumerate(names):
            layer = seen[name]
            seen[name] += 1
            t = st[i]
            t = t[t[:, 0] > 0].double() / 1e3
            start0 = t[:, 0].min()
            release = t[:, 1].median()
            end = t[:, 5].max()
            u = t[:, :7].flatten().unique()
            if len(u) > 1:
                step = float((u[1:] - u[:-1]).min() * 1e3)
                resolution = step if resolution is None else min(resolution, step)
            if layer > 0 or name == "head":  # not the first layer's
                a = acc[name]
                a["start spread median"] += float(t[:, 0].median() - start0)
                a["start spread last"] += float(t[:, 0].max() - start0)
                a["ring issued"] += float((t[:, 6] - t[:, 0]).median())
                a["release from start"] += float(release - start0)
                a["release spread"] += float(t[:, 1].max() - t[:, 1].min())
                if prev_end is not None:
                    a["release after prev"] += float(t[:, 1].min() - prev_end)
                a["x ready"] += float((t[:, 2] - t[:, 1]).median())
                a["ring full"] += float((t[:, 62] - t[:, 1]).median())  # 0: full when the wait passed
                a["ring consumed"] += float((t[:, 3] - t[:, 2]).median())
                a["last chunk"] += float(t[:, 4].max() - release)
                a["written"] += float(end - release)
                a["late programs"] += float((t[:, 0] > start0 + 2).sum())  # started over 2 µs after the first
                counts[name] += 1
                if name != "head" and layer == len(d.layers) // 2:
                    late = t[:, 0] > start0 + 2
                    sample[name] = {"sm": t[:, 7].mul(1e3).round().long().tolist(), "late": late.tolist(),
                                    "start_us": (t[:, 0] - start0).round(decimals=2).tolist(),
                                    "ring_full_us": (t[:, 62] - release).round(decimals=2).tolist(),
                                    "chunks_us": [[round(float(v - release), 2) for v in row[8:62] if v > 0]
                                                  for row in t]}
            # the next stream GEMV follows this one directly (down after gate/up, the next layer's qkv or the head
            # after down); qkv is followed by the attention, Gemma's GEMVs by a norm
            prev_end = end if name in ("gate_up", "down") and not d.gemma else None
    out = {k: {m: round(v / counts[k], 2) for m, v in a.items()} for k, a in acc.items()}
    return {"timer_step_ns": resolution, "kinds": out, "sample": sample}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="+")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", type=Path, default=Path("gpu_profile.json"))
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens (the step measured is the first)")
    parser.add_argument("--new", default="256", help="new tokens the static cache has room for (a comma list: each)")
    parser.add_argument("--int8", action="store_true", help="weight-only int8 (backends/quantize.py)")
    parser.add_argument("--timeline", action="store_true", help="the captured step's time line (see above)")
    parser.add_argument("--stamps", action="store_true", help="instead of a profile: the stream GEMVs' programs' "
                        "timer stamps (see stamps())")
    parser.add_argument("--curve", type=int, metavar="STEPS", help="instead of a profile: the time per step of each "
                        "16 greedy steps in STEPS steps from the prompt's end (how it grows with the slots in use)")
    args = parser.parse_args()
    results = []
    for name in args.models:
        loaded = models.load(models.resolve(f"preset:{name}"), precision="bf16", device="cuda")
        int8 = quantize.quantize_linears_(loaded.model) if args.int8 else None
        hf = HFRunner(loaded, backend="cuda", precision="bf16", device=torch.device("cuda"))
        ids = torch.randint(10, 1000, (1, args.prompt), generator=torch.Generator().manual_seed(0))
        cache = hf.prefill(ids, torch.ones_like(ids))
        for new, variant in [(int(n), v) for n in args.new.split(",") for v in args.variants.split(",")]:
            v = variant_knobs(variant)
            runner = FastRunner(loaded, backend="cuda", config=RunConfig(kernels="triton"), device=torch.device("cuda"),
                                int8=int8)
            if v.pop("_dense", False):
                v.update(dense_tiles(runner.decoder))
            widen_i2f(v.pop("_i2f", False))
            for knob, value in v.items():
                setattr(runner.decoder, knob, value)
            if args.stamps:
                runner.decoder.stamps = torch.zeros(5 * len(runner.decoder.layers) + 2, 1024, 64, dtype=torch.int64,
                                                    device="cuda")
            try:
                runner.start(cache, new)
                if args.curve:
                    curve = [round(t, 1) for t in context_curve(runner, args.curve)]
                    results.append({"model": name, "variant": variant, "prompt": args.prompt, "new": new,
                                    "slots": runner.decoder.shape[1], "curve_us": curve})
                    print(f"{name} {variant:26s} prompt {args.prompt} slots {runner.decoder.shape[1]}: per step, "
                          f"each 16 steps (us): {' '.join(f'{t:.1f}' for t in curve)}", flush=True)
                    continue
                if args.stamps:
                    line = stamps(runner)
                    results.append({"model": name, "variant": variant, "prompt": args.prompt, "new": new, **line})
                    print(f"{name} {variant:26s} stamps (us; timer step {line['timer_step_ns']} ns)")
                    metrics = list(next(iter(line["kinds"].values())))
                    for k, m in line["kinds"].items():
                        print(f"    {k:8s} " + "  ".join(f"{n} {m.get(n, float('nan')):.2f}" for n in metrics),
                              flush=True)
                    continue
                step_ms, steady = replay_ms(runner), greedy_ms(runner)
                if args.timeline:
                    line = timeline(runner)
                    results.append({"model": name, "variant": variant, "graph_step_ms": round(step_ms, 4),
                                    "greedy_step_ms": round(steady, 4), **line})
                    print(f"{name} {variant:26s} graph step {step_ms * 1e3:7.1f} us  greedy {steady * 1e3:7.1f} us"
                          f"  profiled {line['step_us']} us  idle {line['idle_us']} us", flush=True)
                    for k, v2 in line["kinds"].items():
                        print(f"    exposed {v2['exposed_us']:7.1f}  dur {v2['duration_us']:7.1f}  early "
                              f"{v2['started_early_us']:6.1f}  {k}", flush=True)
                    continue
                kernels = profile(runner)
            except Exception as e:
                print(json.dumps({"model": name, "variant": variant, "error": f"{type(e).__name__}: {e}"[:400]}))
                continue
            total = sum(k["us_per_step"] for k in kernels.values())
            row = {"model": name, "variant": variant, "int8": args.int8, "prompt": args.prompt, "new": new,
                   "graph_step_ms": round(step_ms, 4), "greedy_step_ms": round(steady, 4),
                   "kernel_sum_us": round(total, 1), "kernels": kernels}
            results.append(row)
            print(f"{name} {variant:26s} graph step {step_ms * 1e3:7.1f} us  greedy {steady * 1e3:7.1f} us  kernels "
                  f"{total:7.1f} us", flush=True)
            for k, v2 in list(kernels.items())[:8]:
                print(f"    {v2['us_per_step']:7.1f} us  x{v2['launches_per_step']:3d}  {k}", flush=True)
            del runner
        del hf, loaded
        torch.cuda.empty_cache()
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
