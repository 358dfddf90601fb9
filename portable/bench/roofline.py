"""Bandwidth utilisation: what a decode step must read, and how close to the device's bandwidth it gets there.

Cost model of one decode step (batch-1 decoding is bound by memory bandwidth, so bytes read set the limit):

    read(step) = weights + sum over attention layers of  bytes_per_token x min(context, window)  + recurrent states

`weights` are the model's unique parameter bytes (tied embeddings count once; an untied input embedding and a
learned position table are left out, since a step reads only a row of each); the KV part grows with the context,
which is why tg128@d4096 reads more than tg128. Achieved GB/s = bytes read by the timed steps / their time. The
device's peak is measured once by a copy benchmark (`portable bench --measure-peak`, device.copy_bandwidth) and
remembered per device in a small JSON file under the user cache folder ($PORTABLE_CACHE_DIR, else
$XDG_CACHE_HOME/portable, else ~/.cache/portable).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.nn.utils import parametrize

from caches import PromptCache, RecurrentLayer, SlidingWindowLayer
from portable.config import user_cache_dir

PEAK_FILE = "bench_bandwidth.json"


def weight_bytes(model) -> int | None:
    """Bytes of weights one decode step reads; None for a runner without a torch module (e.g. ONNX Runtime)."""
    if model is None or not hasattr(model, "parameters"):
        return None
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    # An embedding table is looked up (a row per sequence), not read: every one but the output head's weight is left
    # out (the untied input embedding, a learned position table such as GPTBigCode's wpe).
    embed_out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    # a head whose weight is computed from int8 rows (backends/quantize.py, lean) is no embedding's: not read here,
    # which would build the dense weight
    head = embed_out.weight.data_ptr() if embed_out is not None and not parametrize.is_parametrized(
        embed_out, "weight") else None
    for ptr, weight in {m.weight.data_ptr(): m.weight for m in model.modules()
                        if isinstance(m, torch.nn.Embedding)}.items():
        if ptr != head and ptr in seen:
            total -= weight.numel() * weight.element_size()
    return total


@dataclass
class CostModel:
    weights: int | None
    attention: list[tuple[float, int]] = field(default_factory=list)  # per layer: (bytes per position, window or 0)
    # a sliding layer attends to `window` positions (the new one included) but keeps only `window - 1` between steps
    states: int = 0  # recurrent layers: state bytes read per step

    @classmethod
    def of(cls, weights: int | None, cache: PromptCache) -> "CostModel":
        """Per-position sizes read off a prompt cache of the whole batch (so batch and dtype are included)."""
        attention, states = [], 0
        for layer in cache.layers:
            if isinstance(layer, RecurrentLayer):
                states += layer.nbytes
            else:
                kept = max(layer.keys.shape[2], 1)
                window = layer.window if isinstance(layer, SlidingWindowLayer) else 0
                attention.append((layer.nbytes / kept, window))
        return cls(weights, attention, states)

    def kv_bytes(self, positions: int) -> float:
        """The cache's size after `positions` positions (a sliding layer keeps the last `window - 1`)."""
        return self.states + sum(per * (min(positions, w - 1) if w else positions) for per, w in self.attention)

    def read_bytes(self, start: int, steps: int) -> float | None:
        """Bytes read by `steps` decode steps starting after `start` cached positions (step i sees start + i + 1)."""
        if self.weights is None or steps <= 0:
            return None
        context = start + 1 + np.arange(steps, dtype=np.float64)
        kv = sum(per * (np.minimum(context, w) if w else context) for per, w in self.attention)
        return float(self.weights * steps + np.sum(kv) + self.states * steps)


def device_key(device_type: str, device_name: str) -> str:
    return f"{device_type}:{device_name}"


def _read() -> dict:
    try:
        data = json.loads((user_cache_dir() / PEAK_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}  # damaged by hand or by another tool: as if none was measured


def remembered_peak(key: str) -> float | None:
    entry = _read().get(key)
    try:
        return float(entry["gbps"])
    except (TypeError, KeyError, ValueError):  # no entry, or one damaged by hand: measure again
        return None


def remember_peak(key: str, gbps: float, method: str) -> Path:
    """Store a device's measured bandwidth, keeping every other device's (atomically: a concurrent reader never sees
    half a file; under a lock: two runs measuring at the same time, on a cache folder that CI jobs share, both keep
    their entries rather than the later write dropping the earlier one's)."""
    from portable.bench.sinks import write

    folder = user_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder / f"{PEAK_FILE}.lock"):
        data = _read()
        data[key] = {"gbps": gbps, "method": method,
                     "measured": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        write(json.dumps(data, indent=1), folder / PEAK_FILE)
    return folder / PEAK_FILE


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` across processes. flock's lock dies with its process, so a run killed inside
    leaves no stale lock; where there is no fcntl (Windows) there is no lock."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def measure_peak(device) -> tuple[str, float]:
    """Measure this device's copy bandwidth and remember it; returns (key, GB/s)."""
    from portable.bench import device as dev

    gbps = dev.copy_bandwidth(device)
    key = device_key(device.type, dev.name(device))
    remember_peak(key, gbps, "copy (read + write) of a 2 GiB GPU / 256 MiB CPU buffer, median of 5 rounds")
    return key, gbps
