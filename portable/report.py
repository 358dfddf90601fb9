"""Report schemas, written once: the printed table and the JSON both come from these dataclasses."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path

from portable.metrics import PhaseMetrics
from portable.parity import ParityResult
from caches.fileformat import atomic_file


@dataclass
class Timing:
    prefill: PhaseMetrics | None = None  # the prefill that made the cache file (read from it)
    decode: PhaseMetrics | None = None
    decode_step_ms: list[float] | None = None  # every timed decode step: the samples the decode figures come from
    # the file's prefill + this decode, as if one run: time to first token is the prefill's time_per_batch_s
    end_to_end: PhaseMetrics | None = None
    model_load_s: float | None = None
    cache_load_s: float | None = None  # reading, checking, casting and moving the cache file
    cache_save_s: float | None = None
    compile_s: float | None = None  # first call including compilation / graph capture (GPU, ONNX Runtime)
    save_s: float | None = None  # saving a compiled artifact
    load_s: float | None = None  # loading a saved compiled artifact
    artifact_reused: bool | None = None
    parity_s: float | None = None  # reference + teacher-forced comparison (not part of decode throughput)


@dataclass
class PrefillReport:
    model: str
    backend: str
    precision: str
    device: str
    batch: int
    prompt_tokens: list[int]
    cache: dict  # path, bytes, kv_cache_bytes, layers, kinds, dtype, storage
    next_tokens: list[int]
    timing: Timing
    peak_memory_bytes: int
    environment: dict
    warnings: list[str] = field(default_factory=list)


@dataclass
class DecodeReport:
    model: str
    backend: str
    precision: str
    device: str
    batch: int
    prompt_tokens: list[int]
    new_tokens: list[int]
    tokens: list[list[int]]
    text: list[str]
    finish_reasons: list[str]
    timing: Timing
    kv_cache_bytes: int
    peak_memory_bytes: int
    parity: ParityResult
    sampling: dict
    cache: dict  # path, bytes, format version, storage, cast applied on load, where and how it was made
    backend_details: dict = field(default_factory=dict)
    environment: dict = field(default_factory=dict)


def to_dict(report) -> dict:
    return asdict(report)


def write_json(report, path: Path) -> None:
    """Write the report as JSON atomically (a half-written report never replaces a good one)."""
    with atomic_file(path, "w") as f:
        json.dump(to_dict(report), f, indent=1)
        f.write("\n")


_SKIPPED = {"tokens", "text", "per_step", "mismatches", "environment", "first_divergence", "finish_reasons"}


def rows(obj, prefix: str = "") -> list[tuple[str, str]]:
    """Flatten a report into (field path, value) rows for a table, from its dataclass fields."""
    out = []
    items = ((f.name, getattr(obj, f.name)) for f in fields(obj)) if is_dataclass(obj) else obj.items()
    for name, value in items:
        if name in _SKIPPED or value is None:
            continue
        key = f"{prefix}{name}"
        if is_dataclass(value) or isinstance(value, dict):
            out.extend(rows(value, key + "."))
        else:
            out.append((key, _fmt(value)))
    return out


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list) and len(value) > 8:
        return f"[{', '.join(map(_fmt, value[:8]))}, ...] ({len(value)})"
    return str(value)


def megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"
