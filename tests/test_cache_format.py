"""The cache file contract, without any model: round trips, int8 storage, and every kind of bad file."""

from __future__ import annotations

import errno
import json
import random
import struct
import zlib

import pytest
import safetensors
import torch

from caches import (AttentionLayer, PromptCache, RecurrentLayer, SlidingWindowLayer, load_cache, read_metadata,
                    save_cache)
from caches import store
from portable.errors import CacheFileError


def make_cache(batch=2, seq=12, window=8, dtype=torch.float32) -> PromptCache:
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, :5] = 0  # the second prompt is 5 tokens shorter (left padded)
    ids = torch.randint(3, 100, (batch, seq), generator=g).masked_fill(mask == 0, 0)
    kv = lambda n: torch.randn(batch, 2, n, 16, generator=g).to(dtype)  # noqa: E731
    layers = [
        AttentionLayer(keys=kv(seq), values=kv(seq)),
        SlidingWindowLayer(keys=kv(window - 1), values=kv(window - 1), window=window, cumulative_length=seq),
        RecurrentLayer(conv_state=torch.randn(batch, 32, 4, generator=g).to(dtype),
                       recurrent_state=torch.randn(batch, 32, 8, generator=g).to(dtype)),
    ]
    return PromptCache(input_ids=ids, attention_mask=mask, next_token_logits=torch.randn(batch, 100, generator=g),
                       layers=layers, model={"source": "test", "fingerprint": "sha256:x", "architecture": "Test"},
                       prefill={"backend": "cpu", "precision": "fp32"})


def assert_same(a: PromptCache, b: PromptCache, atol: float = 0.0) -> None:
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.attention_mask, b.attention_mask)
    assert torch.equal(a.next_token_logits, b.next_token_logits)
    assert a.kinds() == b.kinds()
    for la, lb in zip(a.layers, b.layers):
        assert la.meta() == lb.meta()
        for name, t in la.tensors().items():
            u = lb.tensors()[name]
            assert t.shape == u.shape and t.dtype == u.dtype
            assert torch.allclose(t.float(), u.float(), atol=atol, rtol=0), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_exact_for_every_layer_kind(tmp_path, dtype):
    cache = make_cache(dtype=dtype)
    save_cache(cache, tmp_path / "c.safetensors")
    loaded = load_cache(tmp_path / "c.safetensors")
    assert_same(cache, loaded)
    assert loaded.positions.tolist() == [12, 7]
    assert loaded.file_info["checksum_verified"] and loaded.file_info["cast"] is None


def test_load_casts_explicitly_and_reports_it(tmp_path):
    save_cache(make_cache(dtype=torch.bfloat16), tmp_path / "c.safetensors")
    loaded = load_cache(tmp_path / "c.safetensors", dtype=torch.float32)
    assert loaded.dtype == torch.float32
    assert loaded.file_info["cast"] == "bfloat16 -> float32"


def test_file_is_standard_safetensors_with_documented_names(tmp_path):
    save_cache(make_cache(), tmp_path / "c.safetensors")
    with safetensors.safe_open(str(tmp_path / "c.safetensors"), "pt") as f:
        names = set(f.keys())
        meta = json.loads(f.metadata()["portable"])
    assert {"input_ids", "attention_mask", "next_token_logits", "layers.0.keys", "layers.0.values",
            "layers.1.keys", "layers.1.values", "layers.2.conv_state", "layers.2.recurrent_state"} == names
    assert meta["layout"] == "[batch, kv_heads, seq, head_dim]"
    assert meta["layers"][1] == {"kind": "sliding_attention", "window": 8, "cumulative_length": 12}
    assert meta["prompt_lengths"] == [12, 7] and meta["padding_side"] == "left"


def test_int8_storage_is_smaller_and_close(tmp_path):
    cache = make_cache()
    save_cache(cache, tmp_path / "f.safetensors")
    save_cache(cache, tmp_path / "q.safetensors", storage="int8")
    loaded = load_cache(tmp_path / "q.safetensors")
    def payload_bytes(path):  # the tensors, without the header (which dominates a cache this small)
        _, start, size = store.fileformat.read_header(path)
        return size - start
    assert payload_bytes(tmp_path / "q.safetensors") < 0.6 * payload_bytes(tmp_path / "f.safetensors")
    for a, b in zip(cache.layers[:2], loaded.layers[:2]):
        for name, t in a.tensors().items():
            err = (t - b.tensors()[name]).abs()
            bound = t.abs().amax(-1, keepdim=True) / 127 / 2 + 1e-6  # half a quantization step per element
            assert (err <= bound).all()
    assert torch.equal(cache.layers[2].conv_state, loaded.layers[2].conv_state)  # recurrent state is kept as is
    assert loaded.file_info["storage"] == "int8-per-token"


def test_right_padded_file_is_converted_to_left_padding(tmp_path):
    left = make_cache()
    left.layers = left.layers[:1]
    save_cache(left, tmp_path / "c.safetensors")
    # Rewrite the file as another tool would write it right padded: rotate each row's slots to the front.
    tensors, raw = store.fileformat.read(tmp_path / "c.safetensors")
    meta = json.loads(raw["portable"])
    n = left.prompt_lengths
    seq = left.seen_tokens
    for name in ("input_ids", "attention_mask", "layers.0.keys", "layers.0.values"):
        dim = 1 if name in ("input_ids", "attention_mask") else 2
        tensors[name] = torch.stack([row.roll(-(seq - k), dims=dim - 1) for row, k in zip(tensors[name], n)])
    meta["padding_side"] = "right"
    store.fileformat.write(tmp_path / "r.safetensors", tensors, {"portable": json.dumps(meta)})
    assert_same(left, load_cache(tmp_path / "r.safetensors"))

    sliding = make_cache()
    save_cache(sliding, tmp_path / "s.safetensors")
    tensors, raw = store.fileformat.read(tmp_path / "s.safetensors")
    meta = json.loads(raw["portable"])
    meta["padding_side"] = "right"
    store.fileformat.write(tmp_path / "s2.safetensors", tensors, {"portable": json.dumps(meta)})
    with pytest.raises(CacheFileError, match="right padded"):
        load_cache(tmp_path / "s2.safetensors")


def test_the_checksum_is_zlibs_crc32_whichever_implementation_computes_it():
    data = random.Random(1).randbytes(100_003)
    assert store.fileformat._crc32(data) == zlib.crc32(data)
    assert store.fileformat._crc32(data[500:], zlib.crc32(data[:500])) == zlib.crc32(data)


def test_large_payload_is_checksummed_in_chunks(tmp_path):
    """A payload of several read chunks, with a tensor boundary inside one: the combined CRC equals zlib's one-pass
    CRC of the payload, safetensors reads the file, and a flipped byte deep inside is caught."""
    ff = store.fileformat
    tensors = {"a": torch.randn(2 * ff._CHUNK // 4 + 12345), "b": torch.arange(ff._CHUNK, dtype=torch.int16)}
    assert sum(t.numel() * t.element_size() for t in tensors.values()) > 3 * ff._CHUNK
    path = tmp_path / "big.safetensors"
    size = ff.write(path, tensors, {"note": "x", ff.CHECKSUM_KEY: "stale"})
    data = path.read_bytes()
    assert size == len(data)
    _, start, _ = ff.read_header(path)
    got, meta = ff.read(path)
    assert meta[ff.CHECKSUM_KEY] == f"{zlib.crc32(data[start:]):08x}" and meta["note"] == "x"
    assert all(torch.equal(got[k], t) for k, t in tensors.items())
    with safetensors.safe_open(path, "pt") as f:
        assert torch.equal(f.get_tensor("b"), tensors["b"])
    flipped = bytearray(data)
    flipped[start + 3 * ff._CHUNK + 5] ^= 0x10
    path.write_bytes(flipped)
    with pytest.raises(CacheFileError, match="checksum"):
        ff.read(path)


# ---- bad files: each one a CacheFileError with a specific message ----

@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.safetensors"
    save_cache(make_cache(), path)
    return path


def test_missing_file(tmp_path):
    with pytest.raises(CacheFileError, match="does not exist"):
        load_cache(tmp_path / "nope.safetensors")


def test_truncated_file(good, tmp_path):
    data = good.read_bytes()
    for cut in (4, 100, len(data) // 2, len(data) - 1):
        bad = tmp_path / f"t{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(CacheFileError, match="truncated|too short|not a safetensors"):
            load_cache(bad)


def test_flipped_payload_byte_fails_the_checksum(good):
    data = bytearray(good.read_bytes())
    data[-10] ^= 0xFF
    good.write_bytes(bytes(data))
    with pytest.raises(CacheFileError, match="checksum"):
        load_cache(good)


def test_flipped_header_byte_fails_to_parse(good):
    data = bytearray(good.read_bytes())
    data[9] ^= 0x40  # inside the JSON header
    good.write_bytes(bytes(data))
    with pytest.raises(CacheFileError, match="corrupt|not a"):
        load_cache(good)


def rewrite(path, drop=(), change=None, meta_change=None):
    tensors, raw = store.fileformat.read(path)
    meta = json.loads(raw["portable"])
    for name in drop:
        tensors.pop(name)
    for name, t in (change or {}).items():
        tensors[name] = t
    if meta_change:
        meta_change(meta)
    store.fileformat.write(path, tensors, {"portable": json.dumps(meta)})


def test_missing_tensor(good):
    rewrite(good, drop=["layers.1.values"])
    with pytest.raises(CacheFileError, match="missing tensor 'layers.1.values'"):
        load_cache(good)


def test_wrong_shape(good):
    rewrite(good, change={"layers.0.keys": torch.zeros(2, 2, 11, 16)})
    with pytest.raises(CacheFileError, match="layer 0"):
        load_cache(good)


def test_sliding_layer_with_wrong_cumulative_length(good):
    def lie(meta):
        meta["layers"][1]["cumulative_length"] = 3
    rewrite(good, meta_change=lie)
    with pytest.raises(CacheFileError, match="cumulative length"):
        load_cache(good)


def test_newer_format_version_names_both_versions(good):
    def bump(meta):
        meta["version"] = store.FORMAT_VERSION + 1
    rewrite(good, meta_change=bump)
    with pytest.raises(CacheFileError, match=rf"version {store.FORMAT_VERSION + 1}.*version {store.FORMAT_VERSION}"):
        load_cache(good)


def test_older_version_without_migration_names_both_versions(good, monkeypatch):
    def old(meta):
        meta["version"] = 0
    rewrite(good, meta_change=old)
    with pytest.raises(CacheFileError, match=rf"version 0.*format version {store.FORMAT_VERSION}"):
        load_cache(good)


def test_migration_hook_upgrades_an_older_file(good, monkeypatch):
    # Pretend version 0 kept prompt lengths under another key and named the logits differently.
    def to_v0(meta):
        meta["version"] = 0
        meta["lengths"] = meta.pop("prompt_lengths")
    tensors, raw = store.fileformat.read(good)
    tensors["last_logits"] = tensors.pop("next_token_logits")
    meta = json.loads(raw["portable"])
    to_v0(meta)
    store.fileformat.write(good, tensors, {"portable": json.dumps(meta)})

    def v0_to_v1(meta, tensors):
        meta["prompt_lengths"] = meta.pop("lengths")
        tensors["next_token_logits"] = tensors.pop("last_logits")
        return meta, tensors
    monkeypatch.setitem(store.MIGRATIONS, 0, v0_to_v1)
    loaded = load_cache(good)
    assert_same(make_cache(), loaded)
    assert loaded.file_info["file_format_version"] == 0


def test_not_a_cache_at_all(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"hello world, definitely not a cache file" * 10)
    with pytest.raises(CacheFileError):
        load_cache(junk)
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(3)}, str(plain))
    with pytest.raises(CacheFileError, match="not a portable cache"):
        load_cache(plain)
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(CacheFileError, match="directory"):
        load_cache(tmp_path / "dir.safetensors")


def test_unknown_layer_kind(good):
    def weird(meta):
        meta["layers"][0]["kind"] = "holographic"
    rewrite(good, meta_change=weird)
    with pytest.raises(CacheFileError, match="unknown kind"):
        load_cache(good)


def test_failed_write_leaves_the_old_file_untouched(good, monkeypatch):
    before = good.read_bytes()

    def explode(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(store.fileformat.os, "fsync", explode)
    with pytest.raises(CacheFileError, match=f"cannot write {good}: No space left on device$"):  # one line, no crash
        save_cache(make_cache(seq=5, window=3), good)
    assert good.read_bytes() == before
    assert [p.name for p in good.parent.iterdir()] == [good.name]  # no temporary file left behind


def test_a_file_replaced_while_it_is_read_is_read_whole(good, monkeypatch):
    """A concurrent `prefill --out` of the same path replaces the file (atomically) while decode reads it: the reader
    gets the file it opened, whole, not the header of one and the payload of the other (a false "corrupt")."""
    old, new = make_cache(), make_cache(seq=9, window=4)
    save_cache(new, good.parent / "new.safetensors")
    checked = store.fileformat.header_matches

    def replace_then_check(raw, recorded):  # runs after the header is read and before the payload is
        if (good.parent / "new.safetensors").exists():
            (good.parent / "new.safetensors").replace(good)
        return checked(raw, recorded)
    monkeypatch.setattr(store.fileformat, "header_matches", replace_then_check)
    tensors, _ = store.fileformat.read(good)
    assert torch.equal(tensors["layers.0.keys"], old.layers[0].keys)
    assert_same(load_cache(good), new)  # the next reader sees the new file


def test_fuzz_every_mutation_loads_identically_or_fails_cleanly(good):
    """Mutate a real cache file many ways; every load must succeed with identical tensors or raise CacheFileError."""
    original = load_cache(good)
    data = good.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    rng = random.Random(0)
    outcomes = {"ok": 0, "error": 0}
    for i in range(300):
        mutated = bytearray(data)
        kind = i % 5
        if kind == 0:  # flip random bits anywhere
            for _ in range(rng.randint(1, 4)):
                mutated[rng.randrange(len(mutated))] ^= 1 << rng.randrange(8)
        elif kind == 1:  # flip a bit in the header
            mutated[rng.randrange(8, 8 + header_len)] ^= 1 << rng.randrange(8)
        elif kind == 2:  # truncate
            mutated = mutated[:rng.randrange(len(mutated))]
        elif kind == 3:  # append garbage
            mutated += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        else:  # overwrite a run of bytes with a copy from elsewhere
            a, b = rng.randrange(len(data)), rng.randrange(len(data))
            n = rng.randint(1, 32)
            mutated[a:a + n] = data[b:b + n]
        good.write_bytes(bytes(mutated))
        try:
            loaded = load_cache(good)
        except CacheFileError:
            outcomes["error"] += 1
            continue
        assert_same(original, loaded)
        outcomes["ok"] += 1
    assert outcomes["error"] > 200  # nearly every mutation is caught


def test_read_metadata_does_not_need_the_payload(good):
    meta = read_metadata(good)
    assert meta["batch"] == 2 and meta["seq_len"] == 12
    assert set(meta["_tensors"]) >= {"input_ids", "layers.0.keys"}


def test_a_cache_of_no_sequences_is_refused(tmp_path):
    path = tmp_path / "empty.safetensors"
    save_cache(make_cache().select([]), path)
    with pytest.raises(CacheFileError, match="holds no sequences"):
        load_cache(path)


@pytest.mark.parametrize("key, value, message", [
    ("pad_token_id", "abc", "pad_token_id"), ("pad_token_id", None, "pad_token_id"),
    ("pad_token_id", -5, "pad_token_id"),
    ("pad_token_id", 10 ** 9, "pad_token_id"), ("prefill", "x", "prefill"), ("model", "x", "model")])
def test_metadata_fields_of_the_wrong_type_are_refused(good, key, value, message):
    rewrite(good, meta_change=lambda meta: meta.update({key: value}))
    with pytest.raises(CacheFileError, match=message):
        read_metadata(good)
        load_cache(good)


@pytest.mark.parametrize("window", [float("inf"), 8.5, "8"])
def test_a_sliding_window_must_be_an_integer(good, window):
    def change(meta):
        meta["layers"][1]["window"] = window
    rewrite(good, meta_change=change)
    with pytest.raises(CacheFileError, match="sliding-window layer metadata"):
        load_cache(good)


def test_an_interrupted_atomic_write_leaves_the_old_file_and_no_temporary_one(tmp_path):
    """atomic_file, which reports, bench tables and plots are written through: the new content appears whole or not
    at all."""
    from caches.fileformat import atomic_file

    path = tmp_path / "out.csv"
    with atomic_file(path, "w", newline="") as f:
        f.write("old\r\n")
    with pytest.raises(KeyboardInterrupt):
        with atomic_file(path, "w") as f:
            f.write("half of the new")
            raise KeyboardInterrupt
    assert path.read_bytes() == b"old\r\n" and [p.name for p in tmp_path.iterdir()] == ["out.csv"]
