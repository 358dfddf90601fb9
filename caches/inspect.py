"""`portable cache inspect`: a readable summary of any cache file, as far as it can be read.

A file that would not load (a damaged payload or header, a newer format version, a structure that does not hold) is
still summarised when its metadata parses, under a first line `warning: this file would not load: <why>`;
`inspect_file` returns that reason so that the CLI can exit non-zero. A file whose metadata cannot be read at all
raises the load's own `CacheFileError`.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from caches.layers import LAYER_KINDS
from caches.store import load_cache, read_metadata
from portable.errors import CacheFileError
from portable.report import megabytes


def summary(path: Path, as_json: bool = False) -> str:
    return inspect_file(path, as_json)[0]


def inspect_file(path: Path, as_json: bool = False) -> tuple[str, str | None]:
    """(the summary, None) for a file that loads; (the summary with a warning line, why it would not load) for one
    that does not but whose metadata is readable."""
    try:
        cache = load_cache(path)  # verifies the checksums and the structure too
        problem = None
    except CacheFileError as error:
        cache, problem = None, str(error)
        try:
            meta = read_metadata(path, strict=False)
        except CacheFileError:
            raise error from None
    else:
        meta = read_metadata(path)
    if as_json:
        meta = {k: v for k, v in meta.items() if k != "_tensors"}
        return json.dumps({**meta, "_load_error": problem}, indent=1), problem
    warning = [f"warning: this file would not load: {problem}"] if problem else []
    try:
        lines = _lines(path, meta, cache)
    except (AttributeError, KeyError, TypeError, ValueError):  # damaged metadata: show what there is, raw
        if problem is None:
            raise
        lines = [f"{path}: metadata (raw, not understood): {json.dumps(_printable(meta))}"]
    return "\n".join(warning + lines), problem


def _printable(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if not k.startswith("_")}


def _lines(path: Path, meta: dict, cache) -> list[str]:
    model, prefill = meta.get("model") or {}, meta.get("prefill") or {}
    layers = meta.get("layers") or []
    kinds = Counter(layer.get("kind") for layer in layers)
    windows = sorted({layer["window"] for layer in layers if "window" in layer})
    timing = prefill.get("timing") or {}
    tensors = meta.get("_tensors") or {}
    stored = sum(e["data_offsets"][1] - e["data_offsets"][0] for n, e in tensors.items() if n.startswith("layers."))
    if cache is not None:  # int8 storage keeps less in the file than a load holds in memory: both figures
        kv = f"KV {megabytes(cache.kv_nbytes)} in memory" + (
            f", {megabytes(stored)} in the file" if stored != cache.kv_nbytes else "")
    else:
        kv = f"KV {megabytes(stored)} in the file"
    lines = [
        f"{path}: portable cache, format version {meta.get('version')} (written by portable "
        f"{meta.get('portable_version')} on {meta.get('created')})",
        f"  model       {model.get('source')} ({model.get('architecture')}, {model.get('num_layers')} layers, "
        f"vocab {model.get('vocab_size')})",
        f"  fingerprint {model.get('fingerprint')}  tokenizer {model.get('tokenizer_fingerprint')}",
        f"  layers      {', '.join(f'{n} x {k}' for k, n in kinds.items())}"
        + (f" (window {', '.join(map(str, windows))})" if windows else ""),
        f"  batch       {meta.get('batch')} x {meta.get('seq_len')} slots, {meta.get('padding_side')} padded; prompt "
        f"lengths {meta.get('prompt_lengths')}; next positions {meta.get('positions')}",
        f"  tensors     {meta.get('dtype')}, storage {meta.get('storage')}; {kv}, file "
        f"{megabytes(meta['_file_bytes'])}; checksum {'verified' if cache is not None else 'NOT verified'}",
    ]
    lines += [f"  {'layout' if n == 0 else '':<11} {line}" for n, line in enumerate(_layouts(meta, layers, tensors))]
    lines.append(f"  made by     {prefill.get('backend')} {prefill.get('precision')} on "
                 f"{prefill.get('device_name') or prefill.get('device')}"
                 + (f", prefill {timing['time_per_batch_s'] * 1e3:.2f} ms ({timing['tps']:.1f} TPS)" if timing else ""))
    return lines


def _layouts(meta: dict, layers: list[dict], tensors: dict) -> list[str]:
    """One line per layer kind: each tensor's layout and its shape in the first layer of that kind."""
    recorded = meta.get("layouts") or {}  # not in files written before it: the layer classes know
    lines = []
    for kind in dict.fromkeys(layer.get("kind") for layer in layers):
        first = next(i for i, layer in enumerate(layers) if layer.get("kind") == kind)
        layouts = recorded.get(kind) or getattr(LAYER_KINDS.get(kind), "layouts", {})
        groups: dict[tuple, list[str]] = {}  # tensors of the same layout and shape (keys, values) on one line
        for name, layout in layouts.items():
            shape = tensors.get(f"layers.{first}.{name}", {}).get("shape")
            groups.setdefault((layout, str(shape)), []).append(name)
        parts = [f"{', '.join(names)} {layout} = {shape}" for (layout, shape), names in groups.items()]
        lines.append(f"{kind}: {'; '.join(parts) or 'unknown layout'}")
    return lines
