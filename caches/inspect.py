"""`portable cache inspect`: a readable summary of any cache file."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from caches.store import load_cache, read_metadata
from portable.report import megabytes


def summary(path: Path, as_json: bool = False) -> str:
    meta = read_metadata(path)
    cache = load_cache(path)  # verifies the checksum and the structure too
    if as_json:
        meta = {k: v for k, v in meta.items() if k != "_tensors"}
        return json.dumps(meta, indent=1)
    model, prefill = meta["model"], meta.get("prefill", {})
    kinds = Counter(layer["kind"] for layer in meta["layers"])
    windows = sorted({layer["window"] for layer in meta["layers"] if "window" in layer})
    timing = prefill.get("timing") or {}
    lines = [
        f"{path}: portable cache, format version {meta['version']} (written by portable {meta.get('portable_version')}"
        f" on {meta.get('created')})",
        f"  model       {model.get('source')} ({model.get('architecture')}, {model.get('num_layers')} layers, "
        f"vocab {model.get('vocab_size')})",
        f"  fingerprint {model.get('fingerprint')}  tokenizer {model.get('tokenizer_fingerprint')}",
        f"  layers      {', '.join(f'{n} x {k}' for k, n in kinds.items())}"
        + (f" (window {', '.join(map(str, windows))})" if windows else ""),
        f"  batch       {meta['batch']} x {meta['seq_len']} slots, {meta.get('padding_side')} padded; prompt lengths "
        f"{meta.get('prompt_lengths')}; next positions {meta.get('positions')}",
        f"  tensors     {meta['dtype']} {meta['layout']}, storage {meta['storage']}; KV {megabytes(cache.kv_nbytes)} "
        f"in memory, file {megabytes(meta['_file_bytes'])}; checksum verified",
        f"  made by     {prefill.get('backend')} {prefill.get('precision')} on {prefill.get('device_name') or prefill.get('device')}"
        + (f", prefill {timing['time_per_batch_s'] * 1e3:.2f} ms ({timing['tps']:.1f} TPS)" if timing else ""),
    ]
    return "\n".join(lines)
