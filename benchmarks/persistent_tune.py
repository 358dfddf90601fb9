"""The persistent decode step (backends/kernels/persistent.py) against the separate-kernel step, per variant: the
graph step time at a fixed cache length, and its logits against the separate-kernel step's on the same inputs.

    python benchmarks/persistent_tune.py llama-3.2-1b qwen3-1.7b --variants off,d2,d2-l16 --out tune.json

Every variant's kernels are compiled first by `--jobs` processes at once (compile only, nothing runs: persistent
kernels of two processes on one GPU could not all be resident), then timed one after another in this process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backends.fast_runner import FastRunner  # noqa: E402
from backends.hf_torch import HFRunner  # noqa: E402
from benchmarks.gpu_profile import replay_ms  # noqa: E402
from portable import models  # noqa: E402
from portable.config import RunConfig  # noqa: E402

# name -> PersistentStep options (None: the separate-kernel step)
VARIANTS = {
    "off": None,
    "d1": dict(depth=1), "d2": dict(depth=2), "d3": dict(depth=3),
    "t16-d2": dict(tile_bytes=16384, depth=2), "t16-d3": dict(tile_bytes=16384, depth=3),
    "d2-l4": dict(depth=2, look=4), "d2-l8": dict(depth=2, look=8), "d1-l8": dict(depth=1, look=8),
    "d2-p128": dict(depth=2, programs=128), "t16-d3-p128": dict(tile_bytes=16384, depth=3, programs=128),
    "d2-dot": dict(depth=2, dot=True),
}


def runner(loaded, variant: str) -> FastRunner:
    r = FastRunner(loaded, backend="cuda", config=RunConfig(kernels="triton"), device=torch.device("cuda"))
    options = VARIANTS[variant]
    r.decoder.persistent = options is not None
    r.decoder.persistent_options = dict(options or {}, spin_limit=1 << 18)
    r._capture_with_artifact = r._capture  # compile into Triton's cache, where the warm-up processes put the kernels
    return r


def setup(name: str, prompt: int):
    loaded = models.load(models.resolve(f"preset:{name}"), precision="bf16", device="cuda")
    hf = HFRunner(loaded, backend="cuda", precision="bf16", device=torch.device("cuda"))
    ids = torch.randint(10, 1000, (1, prompt), generator=torch.Generator().manual_seed(0))
    return loaded, hf.prefill(ids, torch.ones_like(ids))


def warm(name: str, variants: list[str], prompt: int, new: int) -> None:
    """Compile the persistent kernels of `variants` into Triton's cache (no launch)."""
    loaded, cache = setup(name, prompt)
    for v in variants:
        if VARIANTS[v] is None:
            continue
        r = runner(loaded, v)
        r.decoder.load_cache(cache, new)
        for greedy in (False, True):
            start = time.perf_counter()
            r.decoder.persistent_step.warmup(greedy)
            print(f"warm {name} {v} greedy={greedy} {time.perf_counter() - start:.1f} s", flush=True)


def compare(ref: FastRunner, run: FastRunner, cache, new: int, steps: int = 8) -> dict:
    """Logits of `steps` graph steps of both runners on the same tokens (the reference's argmax), and their greedy
    picks from the same start."""
    ref.start(cache, new)
    run.start(cache, new)
    token = cache.next_token_logits.argmax(-1)
    errs, agree = [], 0
    step = run.decoder.persistent_step
    for i in range(steps):
        a, b = ref.decode_step(token).clone(), run.decode_step(token).clone()
        if step is not None and i == 0:
            step.check()  # a variant whose programs cannot all run at once stops here, not after 200 timed steps
        errs.append(float((a - b).double().norm() / a.double().norm()))
        agree += int(a.argmax(-1).item() == b.argmax(-1).item())
        token = a.argmax(-1)
    g1, g2 = ref.greedy_steps(token, 16), run.greedy_steps(token, 16)
    if step is not None:
        step.check()
    same = int((g1 == g2).cumprod(-1).sum())
    return {"max_rel_err": max(errs), "argmax_agree": f"{agree}/{steps}", "greedy_prefix_equal": f"{same}/16"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="+")
    parser.add_argument("--variants", default="off,d2")
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("persistent_tune.json"))
    parser.add_argument("--warm", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    if args.warm:
        warm(args.models[0], variants, args.prompt, args.new)
        return
    start = time.perf_counter()
    jobs = [(m, v) for m in args.models for v in variants if VARIANTS[v] is not None]
    with ThreadPoolExecutor(args.jobs) as pool:
        done = list(pool.map(lambda mv: subprocess.run(
            [sys.executable, __file__, mv[0], "--variants", mv[1], "--warm", "--prompt", str(args.prompt), "--new",
             str(args.new)], capture_output=True, text=True, timeout=900), jobs))
    for (m, v), proc in zip(jobs, done):
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
        print(f"compile {m} {v}: exit {proc.returncode}", *tail, sep="\n    ", flush=True)
    print(f"compiled {len(jobs)} variants in {time.perf_counter() - start:.0f} s", flush=True)
    results = []
    for name in args.models:
        loaded, cache = setup(name, args.prompt)
        ref = runner(loaded, "off")
        for v in variants:
            row = {"model": name, "variant": v, "options": VARIANTS[v], "prompt": args.prompt}
            try:
                r = ref if v == "off" else runner(loaded, v)
                row.update(compare(ref, r, cache, args.new))
                r.start(cache, args.new)
                row["graph_step_us"] = round(replay_ms(r) * 1e3, 1)
                if r.decoder.persistent_step is not None:
                    r.decoder.persistent_step.check()
            except Exception as e:  # noqa: BLE001 - one variant's failure is a row, the others still run
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            results.append(row)
            print(json.dumps(row), flush=True)
        del ref, loaded
        torch.cuda.empty_cache()
    args.out.write_text(json.dumps(results, indent=1))
    print(f"\n{'model':14s} {'variant':12s} {'step us':>9s} {'rel err':>9s} argmax greedy")
    for r in results:
        print(f"{r['model']:14s} {r['variant']:12s} {r.get('graph_step_us', 0):9.1f} "
              f"{r.get('max_rel_err', float('nan')):9.2e} {r.get('argmax_agree', '')} {r.get('greedy_prefix_equal', '')}"
              f" {r.get('error', '')[:80]}")


if __name__ == "__main__":
    main()
