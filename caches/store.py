"""Saving and loading prompt caches: the file contract.

One `.safetensors` file. Tensor names (stable; documented in caches/README.md):

    input_ids                  [batch, seq]        int64    prompt token ids, padded on `padding_side`
    attention_mask             [batch, seq]        int64    1 for real tokens, 0 for padding
    next_token_logits          [batch, vocab]      float32  logits after the prompt (pick the first new token)
    layers.{i}.keys            [batch, kv_heads, seq, head_dim]   attention layers (seq = kept positions)
    layers.{i}.values          [batch, kv_heads, seq, head_dim]
    layers.{i}.keys_scale      [batch, kv_heads, seq, 1] float32  only with int8 storage
    layers.{i}.values_scale    [batch, kv_heads, seq, 1] float32  only with int8 storage
    layers.{i}.conv_state      [batch, channels, conv_kernel]     recurrent layers
    layers.{i}.recurrent_state [batch, channels, state_size]      recurrent layers

The safetensors metadata holds `portable` (a JSON document, below), `payload_crc32` and `header_crc32`. Loading
checks, in order: the header parses, its checksum matches (files written before it existed have none, and say so by
not listing it in `checksums`) and its byte ranges fit the file; the metadata says this is a portable cache of a
known format version (older versions go through `MIGRATIONS`, newer ones are refused naming both versions); the
payload checksum; every tensor the metadata promises is present with a consistent shape and the dtype the metadata
implies; the attention mask agrees with the recorded lengths, positions and padding side. Any failure is a
`CacheFileError` with one line saying what is wrong. Shapes against a model's config (kv heads, head_dim, Mamba's
sizes) are checked where the model is known: `caches.hf.check_compatible`.
"""

from __future__ import annotations

import json
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from caches import fileformat, quant
from caches.container import PromptCache
from caches.layers import KV_LAYOUT, LAYER_KINDS, AttentionLayer
from portable import __version__
from portable.errors import CacheFileError, PortableError

FORMAT_NAME = "portable-kv-cache"
FORMAT_VERSION = 1
META_KEY = "portable"
STORAGE = {"native": "native", "int8": "int8-per-token"}
# Mamba keeps its SSM state in float32 whatever the model's dtype (transformers' MambaMixer), so a bf16 cache holds a
# float32 `recurrent_state` next to a bf16 `conv_state`.
_FLOAT32_ALLOWED = {"recurrent_state"}

# The checksums a file carries are listed in its metadata (`checksums`), so that damage to a checksum's own key cannot
# make the file pass for one written before that checksum existed (those, without `header_crc32`, still load).
CHECKSUMS = [fileformat.CHECKSUM_KEY, fileformat.HEADER_CHECKSUM_KEY]

# MIGRATIONS[v] turns (metadata, tensors) of format version v into version v + 1. Version 1 is the first format;
# when the layout changes, bump FORMAT_VERSION and add the step from the old version here. Additions that older
# readers can ignore (the header checksum, `checksums`, `layouts`) keep the version.
Migration = Callable[[dict, dict[str, torch.Tensor]], tuple[dict, dict[str, torch.Tensor]]]
MIGRATIONS: dict[int, Migration] = {}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_writable(path: Path, what: str = "cache", folder: bool = False) -> None:
    """Fail before any work if `path` cannot become the file of `what` (with `folder`, the folder for its files): a
    folder where a file is meant or the reverse, a parent that is a file, or a place where nothing can be created."""
    path = Path(path)
    error = CacheFileError if what == "cache" else PortableError
    if folder and path.exists() and not path.is_dir():
        raise error(f"{path} is not a directory; give a folder for the {what}")
    if not folder and path.is_dir():
        example = f" (e.g. {path / 'kv_cache.safetensors'})" if what == "cache" else ""
        raise error(f"{path} is a directory; give a file path for the {what}{example}")
    parent = next((p for p in [*([path] if folder else []), *path.parents] if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise error(f"cannot write {path}: {parent} is not a directory")
    if parent is not None:
        try:  # create a file rather than ask os.access, which says yes to root where none can be made (/proc, /sys)
            tempfile.TemporaryFile(dir=parent).close()
        except OSError as e:
            raise error(f"cannot write {path}: {parent} is not writable ({e.strerror or e})") from e


def save_cache(cache: PromptCache, path: Path, storage: str = "native") -> dict:
    """Write `cache` to `path` atomically. `storage="int8"` stores attention keys/values as int8 with per-token
    scales (about 4x smaller than fp32). Returns {"bytes", "seconds", "path"}."""
    if storage not in STORAGE:
        raise CacheFileError(f"unknown cache storage {storage!r}; choose from {', '.join(STORAGE)}")
    if cache.padding_side != "left":
        raise ValueError("caches are written left padded; convert before saving")
    start = time.perf_counter()
    tensors: dict[str, torch.Tensor] = {
        "input_ids": cache.input_ids.to(torch.int64),
        "attention_mask": cache.attention_mask.to(torch.int64),
        "next_token_logits": cache.next_token_logits.to(torch.float32),
    }
    for i, layer in enumerate(cache.layers):
        for name, t in layer.tensors().items():
            if storage == "int8" and isinstance(layer, AttentionLayer):
                q, scale = quant.quantize_per_token(t)
                tensors[f"layers.{i}.{name}"] = q
                tensors[f"layers.{i}.{name}_scale"] = scale
            else:
                tensors[f"layers.{i}.{name}"] = t
    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "portable_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": cache.model,
        "layout": KV_LAYOUT,
        "layouts": {layer.kind: dict(layer.layouts) for layer in cache.layers},
        "checksums": CHECKSUMS,
        "dtype": _dtype_name(cache.dtype),
        "storage": STORAGE[storage],
        "batch": cache.batch,
        "seq_len": cache.seen_tokens,
        "padding_side": cache.padding_side,
        "pad_token_id": cache.pad_token_id,
        "prompt_lengths": cache.prompt_lengths,
        "positions": cache.positions.tolist(),
        "layers": [layer.meta() for layer in cache.layers],
        "prefill": cache.prefill,
    }
    nbytes = fileformat.write(Path(path), tensors, {"format": "pt", META_KEY: json.dumps(meta)})
    return {"path": str(path), "bytes": nbytes, "seconds": time.perf_counter() - start}


def read_metadata(path: Path, strict: bool = True) -> dict:
    """The `portable` metadata of a cache file, after checking the header and the format version (no payload read).

    `strict=False` (for `cache inspect`) only needs the metadata to parse: no header checksum or byte-range checks,
    and a newer format version is read as far as it goes.
    """
    header, _, size = fileformat.read_header(path, strict=strict)
    meta = _parse_meta(Path(path), header.get("__metadata__", {}), strict=strict)
    meta["_file_bytes"] = size
    meta["_tensors"] = {k: v for k, v in header.items() if k != "__metadata__"}
    return meta


def _parse_meta(path: Path, raw: dict, strict: bool = True) -> dict:
    if META_KEY not in raw:
        raise CacheFileError(f"{path} is a safetensors file but not a portable cache (no '{META_KEY}' metadata)")
    try:
        meta = json.loads(raw[META_KEY])
    except json.JSONDecodeError as e:
        raise CacheFileError(f"{path} has corrupt cache metadata (not valid JSON: {e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        found = meta.get('format') if isinstance(meta, dict) else None
        raise CacheFileError(f"{path} is not a portable cache (format is {found!r})")
    version = meta.get("version")
    if not isinstance(version, int):
        raise CacheFileError(f"{path} has no valid format version")
    if version > FORMAT_VERSION and strict:
        raise CacheFileError(f"{path} uses cache format version {version}, newer than the version {FORMAT_VERSION} "
                             f"this portable {__version__} reads; upgrade portable")
    listed = meta.get("checksums", [])
    if not isinstance(listed, list) or not all(isinstance(key, str) for key in listed):
        raise CacheFileError(f"{path} has corrupt cache metadata (checksums is {listed!r})")
    missing = [key for key in listed if key not in raw]
    if missing and strict:
        raise CacheFileError(f"{path} lacks the checksum {', '.join(map(str, missing))} its metadata lists: the header "
                             f"was damaged or rewritten by another tool")
    if strict and not isinstance(meta.get("model"), dict):  # decode reads meta["model"]["source"] before the load
        raise CacheFileError(f"{path} has incomplete cache metadata (model is {meta.get('model')!r}, not an object)")
    return meta


def _migrate(path: Path, meta: dict, tensors: dict) -> tuple[dict, dict]:
    version = meta["version"]
    while version < FORMAT_VERSION:
        step = MIGRATIONS.get(version)
        if step is None:
            raise CacheFileError(f"{path} uses cache format version {version}, which this portable (format version "
                                 f"{FORMAT_VERSION}) cannot migrate; prefill the prompt again")
        meta, tensors = step(meta, tensors)
        version += 1
        meta["version"] = version
    return meta, tensors


def _check_dtype(path: Path, name: str, t: torch.Tensor, *allowed: torch.dtype) -> None:
    if t.dtype not in allowed:
        names = " or ".join(_dtype_name(d) for d in dict.fromkeys(allowed))
        raise CacheFileError(f"{path}: tensor {name!r} is {_dtype_name(t.dtype)} "
                             f"({fileformat.DTYPE_CODES[t.dtype]}), expected {names}")


def _check_lengths(path: Path, meta: dict, mask: torch.Tensor, padding_side: str) -> None:
    """The attention mask is 0/1, every row has a token, and it agrees with the recorded `prompt_lengths` and
    `positions` (so neither can be wrong in silence); a left-padded row is zeros then ones (right padding is checked
    where it is converted, `right_to_left_padding`)."""
    if ((mask != 0) & (mask != 1)).any():
        raise CacheFileError(f"{path}: attention_mask holds values other than 0 and 1")
    lengths = mask.sum(-1).tolist()
    for what in ("prompt_lengths", "positions"):
        if what in meta and meta[what] != lengths:
            raise CacheFileError(f"{path}: the metadata's {what} {meta[what]} do not match the attention mask's "
                                 f"lengths {lengths}")
    seq = mask.shape[1]
    for b, n in enumerate(lengths):
        if n < 1 or (padding_side == "left" and not bool(mask[b, seq - n:].all())):
            raise CacheFileError(f"{path}: row {b} of the attention mask is not a left-padded prompt of at least one "
                                 f"token")


def _require(path: Path, tensors: dict, name: str, ndim: int) -> torch.Tensor:
    if name not in tensors:
        raise CacheFileError(f"{path} is missing tensor {name!r}")
    t = tensors[name]
    if t.ndim != ndim:
        raise CacheFileError(f"{path}: tensor {name!r} has shape {tuple(t.shape)}, expected {ndim} dimensions")
    return t


def load_cache(path: Path, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
               verify: bool = True) -> PromptCache:
    """Read, check and (optionally) cast and move a cache file. `cache.file_info` reports what happened."""
    path = Path(path)
    start = time.perf_counter()
    header, _, _ = fileformat.read_header(path)
    _parse_meta(path, header.get("__metadata__", {}))  # is it a cache of a readable version, before reading it all
    tensors, raw_meta = fileformat.read(path, verify=verify)
    meta = _parse_meta(path, raw_meta)
    original_version = meta["version"]
    meta, tensors = _migrate(path, meta, tensors)
    read_s = time.perf_counter() - start

    try:
        batch, seq = int(meta["batch"]), int(meta["seq_len"])
        layer_meta = list(meta["layers"])
        padding_side = meta.get("padding_side", "left")
        storage = meta.get("storage", "native")
        model = dict(meta["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise CacheFileError(f"{path} has incomplete cache metadata (missing {e})") from e
    if storage not in STORAGE.values():
        raise CacheFileError(f"{path} uses unknown storage {storage!r}")
    if batch < 1:
        raise CacheFileError(f"{path} holds no sequences (batch {batch})")
    pad_token_id = meta.get("pad_token_id", 0)
    if type(pad_token_id) is not int or pad_token_id < 0:
        raise CacheFileError(f"{path}: the metadata's pad_token_id {pad_token_id!r} is not a token id")
    if not isinstance(meta.get("prefill", {}), dict):
        raise CacheFileError(f"{path} has corrupt cache metadata (prefill is {meta['prefill']!r}, not an object)")
    if padding_side not in ("left", "right"):
        raise CacheFileError(f"{path}: unknown padding side {padding_side!r}")
    stored = meta.get("dtype", "float32")
    cache_dtype = getattr(torch, stored, None) if isinstance(stored, str) else None
    if not isinstance(cache_dtype, torch.dtype) or not cache_dtype.is_floating_point:
        raise CacheFileError(f"{path}: the metadata's cache dtype {stored!r} is not a floating-point dtype")

    input_ids = _require(path, tensors, "input_ids", 2)
    mask = _require(path, tensors, "attention_mask", 2)
    logits = _require(path, tensors, "next_token_logits", 2)
    if tuple(input_ids.shape) != (batch, seq) or tuple(mask.shape) != (batch, seq) or logits.shape[0] != batch:
        raise CacheFileError(f"{path}: input_ids {tuple(input_ids.shape)}, attention_mask {tuple(mask.shape)} and "
                             f"next_token_logits {tuple(logits.shape)} do not match batch {batch} x {seq} tokens")
    _check_dtype(path, "input_ids", input_ids, torch.int64)
    _check_dtype(path, "attention_mask", mask, torch.int64)
    _check_dtype(path, "next_token_logits", logits, torch.float32)
    _check_lengths(path, meta, mask, padding_side)
    real_ids = input_ids[mask.bool()]
    if real_ids.numel() and (real_ids.min() < 0 or real_ids.max() >= logits.shape[1]):
        raise CacheFileError(f"{path}: input_ids hold token ids outside the vocabulary of {logits.shape[1]} tokens")
    if pad_token_id >= logits.shape[1]:  # fed to the model for padding and finished sequences
        raise CacheFileError(f"{path}: the metadata's pad_token_id {pad_token_id} is outside the vocabulary of "
                             f"{logits.shape[1]} tokens")

    layers = []
    for i, lm in enumerate(layer_meta):
        cls = LAYER_KINDS.get(lm.get("kind") if isinstance(lm, dict) else None)
        if cls is None:
            raise CacheFileError(f"{path}: layer {i} has unknown kind {lm!r}; known kinds: {', '.join(LAYER_KINDS)}")
        parts = {}
        for name in cls.tensor_names:
            key = f"layers.{i}.{name}"
            t = _require(path, tensors, key, 4 if issubclass(cls, AttentionLayer) else 3)
            if storage == STORAGE["int8"] and issubclass(cls, AttentionLayer):
                scale = _require(path, tensors, f"{key}_scale", 4)
                if t.dtype != torch.int8 or scale.shape != (*t.shape[:-1], 1):
                    raise CacheFileError(f"{path}: {key} is not int8 with per-token scales {tuple(t.shape[:-1])}+(1,)")
                _check_dtype(path, f"{key}_scale", scale, torch.float32)
                t = quant.dequantize_per_token(t, scale)
            elif name in _FLOAT32_ALLOWED:
                _check_dtype(path, key, t, cache_dtype, torch.float32)
            else:
                _check_dtype(path, key, t, cache_dtype)
            parts[name] = t
        layer = cls.from_file(parts, lm)
        layer.validate(i, batch, seq)
        layers.append(layer)
    expected = {"input_ids", "attention_mask", "next_token_logits"} | {
        f"layers.{i}.{n}{suffix}" for i, layer in enumerate(layers) for n in layer.tensor_names
        for suffix in (("", "_scale") if storage == STORAGE["int8"] and isinstance(layer, AttentionLayer) else ("",))}
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        raise CacheFileError(f"{path} holds tensors its metadata does not describe: {', '.join(unexpected[:5])}")

    cache = PromptCache(input_ids=input_ids.to(torch.int64), attention_mask=mask.to(torch.int64),
                        next_token_logits=logits.to(torch.float32), layers=layers, model=model,
                        pad_token_id=pad_token_id, prefill=meta.get("prefill", {}),
                        padding_side=padding_side)
    if padding_side == "right":
        cache = right_to_left_padding(cache, path)

    cast = None
    if dtype is not None and layers and cache.dtype != dtype:
        cast = f"{stored} -> {_dtype_name(dtype)}"
    elif storage != STORAGE["native"]:
        cast = f"{storage} -> {_dtype_name(dtype or torch.float32)}"
    if dtype is not None or device is not None:
        cache = cache.to(device=device, dtype=dtype)
    cache.file_info = {
        "path": str(path), "bytes": meta.get("_file_bytes", path.stat().st_size), "format_version": FORMAT_VERSION,
        "file_format_version": original_version, "created": meta.get("created"),
        "portable_version": meta.get("portable_version"), "storage": storage, "stored_dtype": stored,
        "cast": cast, "checksum_verified": verify, "payload_crc32": raw_meta.get(fileformat.CHECKSUM_KEY),
        "read_s": read_s, "load_s": time.perf_counter() - start,
    }
    return cache


def right_to_left_padding(cache: PromptCache, path: Path) -> PromptCache:
    """Turn a right-padded cache into the left-padded one decode expects, by rotating each row's slots.

    Valid for full-attention layers only: attention ignores slot order (the positions live in the rotated keys) but a
    sliding window keeps the last slots and a recurrent state has already run over the padding.
    """
    if any(layer.kind != AttentionLayer.kind for layer in cache.layers):
        raise CacheFileError(f"{path} is right padded, which is only supported for full-attention layers "
                             f"(this cache has {sorted(set(cache.kinds()))}); prefill it with left padding")
    lengths = cache.prompt_lengths
    seq = cache.seen_tokens

    def roll_rows(t: torch.Tensor, dim: int) -> torch.Tensor:
        return torch.stack([row.roll(seq - n, dims=dim - 1) for row, n in zip(t, lengths)])

    for b, n in enumerate(lengths):
        if cache.attention_mask[b, :n].sum() != n:
            raise CacheFileError(f"{path} says right padded but row {b} of its attention mask is not")
    layers = [layer.map_tensors(lambda t: roll_rows(t, 2)) for layer in cache.layers]
    return PromptCache(input_ids=roll_rows(cache.input_ids, 1), attention_mask=roll_rows(cache.attention_mask, 1),
                       next_token_logits=cache.next_token_logits, layers=layers, model=cache.model,
                       pad_token_id=cache.pad_token_id, prefill=cache.prefill, padding_side="left")
