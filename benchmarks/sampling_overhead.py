"""What seeded, reproducible sampling costs per decode step: sampled vs greedy step P50 on the embedded model (CPU).

    .venv/bin/python benchmarks/sampling_overhead.py [--new 64] [--reps 7] [--batch 1]

One process, one CPU fp32 runner, one cache file (the default prompt, prefilled here). Each repetition decodes
`--new` tokens (EOS ignored) with greedy, the suites' `sampled` and `full-pipe` settings (portable/bench/suites.py),
interleaved; the first repetition is a warm-up. Per setting: the P50 of every decode step of every timed
repetition (timed region as in portable/generation.py: the forward + the token pick). Greedy picks with an argmax
where the logits are; sampling brings the logits to the host and runs portable/sampling.py there (float64
transforms, host PCG64 draw), which is the design's cost. The pick alone (`Sampler.pick` on fixed logits) is timed
too, so the overhead can be read without the forward's noise, and again on random logits of a large vocabulary
(the host transforms scale with it; the embedded model's is 4096).

Prints one markdown line per sampled setting, and the machine's load average before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import backends  # noqa: E402
from caches import load_cache  # noqa: E402
from portable import models, pipeline  # noqa: E402
from portable.bench.suites import CONFIGS  # noqa: E402
from portable.config import RunConfig, SamplingConfig  # noqa: E402
from portable.generation import run_decode  # noqa: E402
from portable.sampling import Sampler  # noqa: E402

SETTINGS = {"greedy": SamplingConfig(), "sampled": CONFIGS["sampled"].sampling,
            "full-pipe": CONFIGS["full-pipe"].sampling}


def pick_alone_us(sampling: SamplingConfig, logits: torch.Tensor, history: list[list[int]], n: int = 300) -> float:
    sampler = Sampler(sampling, logits.shape[0])
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        sampler.pick(logits, history)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new", type=int, default=64, help="tokens per decode")
    parser.add_argument("--reps", type=int, default=7, help="repetitions per setting (the first is a warm-up)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--large-vocab", type=int, default=128256,
                        help="also time the pick alone on random logits of this vocabulary (Llama 3's by default)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    config = RunConfig(batch=args.batch, max_new_tokens=args.new, ignore_eos=True, quiet=True)
    with tempfile.TemporaryDirectory(prefix="sampling-overhead-") as tmp:
        path = Path(tmp) / "c.safetensors"
        pipeline.prefill(config.replace(cache_path=path))
        cache = load_cache(path)
    runner = backends.resolve("cpu").load(config, models.resolve("default"))
    stopper = pipeline.make_stopper(runner, config)
    steps: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for rep in range(args.reps):
        for name, sampling in SETTINGS.items():
            result = run_decode(runner, cache.to("cpu", torch.float32), Sampler(sampling, cache.batch), args.new,
                                stopper)
            if rep:
                steps[name].extend(result.step_times_s)
    p50 = {name: statistics.median(v) * 1e3 for name, v in steps.items()}

    history = [cache.prompt_tokens(b) + [0] * args.new for b in range(cache.batch)]
    logits = cache.next_token_logits.float()
    alone = {name: pick_alone_us(s, logits, history) for name, s in SETTINGS.items()}
    big = torch.randn(args.batch, args.large_vocab, generator=torch.Generator().manual_seed(0)) * 3
    alone_big = {name: pick_alone_us(s, big, history, n=50) for name, s in SETTINGS.items()}
    load_after = os.getloadavg()

    where = (f"embedded model, CPU fp32, {args.threads} threads, batch {args.batch}, {args.new} steps x "
             f"{args.reps - 1} reps")
    for name in ("sampled", "full-pipe"):
        extra = p50[name] - p50["greedy"]
        print(f"| sampling overhead, {name} ({SETTINGS[name].describe()}) | {where} | greedy step P50 "
              f"{p50['greedy']:.3f} ms | {name} step P50 {p50[name]:.3f} ms | {extra:+.3f} ms "
              f"({100 * extra / p50['greedy']:+.1f}%) | pick alone: greedy {alone['greedy']:.0f} us, {name} "
              f"{alone[name]:.0f} us |")
    print(f"| pick alone at vocab {args.large_vocab} (random logits), batch {args.batch} | "
          + " | ".join(f"{name} {us:.0f} us" for name, us in alone_big.items()) + " |")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}; vocab {logits.shape[-1]}")


if __name__ == "__main__":
    main()
