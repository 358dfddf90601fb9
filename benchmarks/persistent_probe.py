"""Where the persistent decode step's time goes (a diagnostic for backends/kernels/persistent.py).

    python benchmarks/persistent_probe.py llama-3.2-1b            # graph step with and without its waits
    ncu -k regex:_decode_step_kernel -c 1 --section SpeedOfLight --section WarpStateStats \
        python benchmarks/persistent_probe.py llama-3.2-1b --once  # one eager step for the profiler

`spin_limit=0` makes every wait give up at once (the results are then wrong): the step time without them says how
much of the step is spent waiting for other programs rather than streaming weights.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.gpu_profile import replay_ms  # noqa: E402
from benchmarks.persistent_tune import runner, setup  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--variant", default="d2")
    parser.add_argument("--once", action="store_true")
    args = parser.parse_args()
    loaded, cache = setup(args.model, 64)
    r = runner(loaded, args.variant)
    if args.once:
        r.graphs = False
        r.start(cache, 256)
        r.decoder.step()
        torch.cuda.synchronize()
        return
    for limit in (1 << 18, 0):
        r = runner(loaded, args.variant)
        r.decoder.persistent_options["spin_limit"] = limit
        r.start(cache, 256)
        print(f"{args.model} {args.variant} spin_limit={limit}: graph step {replay_ms(r) * 1e3:.1f} us", flush=True)


if __name__ == "__main__":
    main()
