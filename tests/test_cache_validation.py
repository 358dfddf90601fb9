"""The cache file contract on real prefill-made files: header checksum and dtypes, lengths against the mask, shapes
against the model's config, `cache inspect` of files that would not load, file modes, and a fuzz test whose
mutations aim at the header's dtype strings, shapes and offsets as well as at the payload."""

from __future__ import annotations

import json
import os
import random
import re
import struct
import zlib

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache
from typer.testing import CliRunner

from caches import PromptCache, load_cache, read_metadata, save_cache
from caches import hf as hf_caches
from caches import store
from caches.fileformat import CHECKSUM_KEY, HEADER_CHECKSUM_KEY
from caches.inspect import inspect_file
from portable import pipeline
from portable.architectures import ARCHITECTURES
from portable.cli import app
from portable.config import RunConfig
from portable.errors import CacheFileError
from portable.report import megabytes
from tests.conftest import run_cli
from tests.models import PROMPTS, TINY_CONFIGS
from tests.test_cache_format import assert_same, make_cache, rewrite


@pytest.fixture(scope="module")
def prefilled(tmp_path_factory):
    """Two real caches of the embedded model (batch 2, unequal prompts): native and int8 storage."""
    folder = tmp_path_factory.mktemp("real")
    paths = {}
    for storage in ("native", "int8"):
        paths[storage] = folder / f"{storage}.safetensors"
        pipeline.prefill(RunConfig(prompts=PROMPTS, cache_path=paths[storage], cache_storage=storage))
    return paths


@pytest.fixture
def real(prefilled, tmp_path):
    path = tmp_path / "real.safetensors"
    path.write_bytes(prefilled["native"].read_bytes())
    return path


# ---- raw header surgery: what a flipped byte, a foreign writer or an older version leaves behind ----

def split(data: bytes) -> tuple[bytes, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return data[8:8 + n], data[8 + n:]


def join(raw: bytes, payload: bytes) -> bytes:
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + payload


def restamp(raw: bytes) -> bytes:
    """`raw` with a header checksum that matches it, as a writer with a bug would leave a lying header (`raw` as it
    is where it no longer parses)."""
    try:
        header = json.loads(raw)
    except json.JSONDecodeError:
        return raw
    header["__metadata__"][HEADER_CHECKSUM_KEY] = "0" * 8
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return raw.replace(b'"%s":"00000000"' % HEADER_CHECKSUM_KEY.encode(),
                       b'"%s":"%08x"' % (HEADER_CHECKSUM_KEY.encode(), zlib.crc32(raw)))


def edit_header(path, edit, stamp=True, old=False) -> None:
    """Apply `edit(header)` to the file's parsed header; re-stamp the header checksum, or (`old`) make it a file as
    portable wrote them before the header checksum: no `header_crc32`, no `checksums` or `layouts` metadata."""
    raw, payload = split(path.read_bytes())
    header = json.loads(raw)
    edit(header)
    if old:
        meta = json.loads(header["__metadata__"]["portable"])
        del meta["checksums"], meta["layouts"]
        header["__metadata__"]["portable"] = json.dumps(meta)
        del header["__metadata__"][HEADER_CHECKSUM_KEY]
    raw = json.dumps(header, separators=(",", ":")).encode()
    path.write_bytes(join(restamp(raw) if stamp and not old else raw, payload))


def set_dtype(name, code):
    def edit(header):
        header[name]["dtype"] = code
    return edit


# ---- header checksum and dtypes ----

@pytest.mark.parametrize("name, old, new", [("attention_mask", "I64", "F64"), ("layers.0.keys", "F32", "I32")])
def test_a_same_length_dtype_flip_fails_the_header_checksum(real, name, old, new):
    data = real.read_bytes()
    flipped = data.replace(f'"{name}":{{"dtype":"{old}"'.encode(), f'"{name}":{{"dtype":"{new}"'.encode(), 1)
    assert flipped != data and len(flipped) == len(data)
    real.write_bytes(flipped)
    with pytest.raises(CacheFileError, match="header checksum does not match"):
        load_cache(real)


DTYPE_LIES = [("attention_mask", "F64", "'attention_mask' is float64 .*expected int64"),
              ("input_ids", "F64", "'input_ids' is float64 .*expected int64"),
              ("next_token_logits", "I32", "'next_token_logits' is int32 .*expected float32"),
              ("layers.0.keys", "I32", "'layers.0.keys' is int32 .*expected float32"),
              ("layers.5.values", "I32", "'layers.5.values' is int32 .*expected float32")]


@pytest.mark.parametrize("name, code, message", DTYPE_LIES)
@pytest.mark.parametrize("how", ["older file (no header checksum)", "re-stamped header checksum"])
def test_each_tensor_dtype_is_checked_against_the_metadata(real, name, code, message, how):
    edit_header(real, set_dtype(name, code), old=how.startswith("older"))
    with pytest.raises(CacheFileError, match=message):
        load_cache(real)


def test_half_precision_codes_cannot_be_swapped(tmp_path):
    path = tmp_path / "bf16.safetensors"
    save_cache(make_cache(dtype=torch.bfloat16), path)
    edit_header(path, set_dtype("layers.1.keys", "F16"))
    with pytest.raises(CacheFileError, match="'layers.1.keys' is float16 .*expected bfloat16"):
        load_cache(path)


def test_int8_storage_dtypes_are_checked(prefilled, tmp_path):
    path = tmp_path / "q.safetensors"
    for name, code, message in [("layers.0.keys", "U8", "not int8"), ("layers.0.keys_scale", "I32", "keys_scale")]:
        path.write_bytes(prefilled["int8"].read_bytes())
        edit_header(path, set_dtype(name, code))
        with pytest.raises(CacheFileError, match=message):
            load_cache(path)


def test_a_mamba_cache_may_keep_its_ssm_state_in_float32(tmp_path):
    cache = make_cache(dtype=torch.bfloat16)
    layer = cache.layers[2]
    cache.layers[2] = type(layer)(conv_state=layer.conv_state, recurrent_state=layer.recurrent_state.float())
    save_cache(cache, tmp_path / "m.safetensors")
    assert_same(cache, load_cache(tmp_path / "m.safetensors"))


# ---- files written before the header checksum ----

def test_a_file_without_header_checksum_from_before_it_still_loads(real, prefilled):
    edit_header(real, lambda header: None, old=True)
    assert HEADER_CHECKSUM_KEY not in split(real.read_bytes())[0].decode()
    loaded = load_cache(real)
    assert_same(load_cache(prefilled["native"]), loaded)
    assert loaded.file_info["file_format_version"] == store.FORMAT_VERSION
    assert inspect_file(real)[1] is None


def test_a_file_that_lists_the_header_checksum_but_lost_it_is_refused(real):
    def flip_its_name(header):
        header["__metadata__"]["header_crc33"] = header["__metadata__"].pop(HEADER_CHECKSUM_KEY)
    edit_header(real, flip_its_name, stamp=False)
    with pytest.raises(CacheFileError, match="lacks the checksum header_crc32 its metadata lists"):
        load_cache(real)


def test_written_files_record_both_checksums_and_the_layout_of_each_kind(tmp_path):
    save_cache(make_cache(), tmp_path / "c.safetensors")
    raw = json.loads(split((tmp_path / "c.safetensors").read_bytes())[0])["__metadata__"]
    assert re.fullmatch("[0-9a-f]{8}", raw[CHECKSUM_KEY]) and re.fullmatch("[0-9a-f]{8}", raw[HEADER_CHECKSUM_KEY])
    meta = read_metadata(tmp_path / "c.safetensors")
    assert meta["version"] == store.FORMAT_VERSION and meta["checksums"] == [CHECKSUM_KEY, HEADER_CHECKSUM_KEY]
    assert meta["layouts"]["recurrent"] == {"conv_state": "[batch, channels, conv_kernel]",
                                            "recurrent_state": "[batch, channels, state_size]"}
    assert meta["layouts"]["full_attention"]["keys"] == "[batch, kv_heads, seq, head_dim]"


# ---- lengths and positions against the mask ----

def test_recorded_lengths_and_positions_must_match_the_mask(good_synthetic):
    for field, message in [("prompt_lengths", "prompt_lengths"), ("positions", "positions")]:
        path = good_synthetic()
        rewrite(path, meta_change=lambda meta: meta.__setitem__(field, [12, 6]))
        with pytest.raises(CacheFileError, match=f"{message} \\[12, 6\\] do not match .* \\[12, 7\\]"):
            load_cache(path)


def test_the_mask_must_be_a_left_padded_0_1_mask(good_synthetic):
    cache = make_cache()
    for mask, message in [(cache.attention_mask * 2, "other than 0 and 1"),
                          (cache.attention_mask.flip(-1), "not a left-padded prompt")]:
        path = good_synthetic()
        rewrite(path, change={"attention_mask": mask}, meta_change=lambda meta: meta.update(
            prompt_lengths=mask.sum(-1).tolist(), positions=mask.sum(-1).tolist()))
        with pytest.raises(CacheFileError, match=message):
            load_cache(path)


def test_token_ids_must_lie_in_the_vocabulary(good_synthetic):
    path = good_synthetic()
    ids = make_cache().input_ids.clone()
    ids[0, -1] = 100  # the logits cover 100 tokens
    rewrite(path, change={"input_ids": ids})
    with pytest.raises(CacheFileError, match="outside the vocabulary of 100"):
        load_cache(path)


@pytest.fixture
def good_synthetic(tmp_path):
    counter = iter(range(100))

    def make():
        path = tmp_path / f"s{next(counter)}.safetensors"
        save_cache(make_cache(), path)
        return path
    return make


# ---- shapes against the model's config ----

def prefill_in_memory(name: str) -> tuple[PromptCache, object]:
    config = TINY_CONFIGS[name]()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(3, 100, (2, 11))
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=DynamicCache(config=config), use_cache=True)
    hf = getattr(out, "past_key_values", None) or out.cache_params
    cache = PromptCache(input_ids=ids, attention_mask=torch.ones_like(ids), next_token_logits=out.logits[:, -1],
                        layers=hf_caches.from_hf(hf), model={})
    return cache, config


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_layer_shapes_are_checked_against_the_models_config(name):
    cache, config = prefill_in_memory(name)
    hf_caches.check_compatible(cache, config)  # the real cache fits
    last = len(cache.layers) - 1
    if name == "mamba":
        changes = {"channels": lambda t: torch.cat([t, t], 1), "conv_kernel": lambda t: t[..., :-1],
                   "state_size": lambda t: torch.cat([t, t], -1)}
    else:
        changes = {"kv_heads": lambda t: torch.cat([t, t], 1), "head_dim": lambda t: torch.cat([t, t], -1)}
    for what, change in changes.items():
        layer = cache.layers[last]
        if what == "conv_kernel":
            bad = type(layer)(conv_state=change(layer.conv_state), recurrent_state=layer.recurrent_state)
        elif what == "state_size":
            bad = type(layer)(conv_state=layer.conv_state, recurrent_state=change(layer.recurrent_state))
        else:
            bad = layer.map_tensors(change)  # keys and values (or both states) changed consistently
        broken = PromptCache(**{**cache.__dict__, "layers": [*cache.layers[:last], bad]})
        with pytest.raises(CacheFileError, match=rf"layer {last} \({layer.kind}\) of the cache has {what} "):
            hf_caches.check_compatible(broken, config)


def test_decode_of_a_cache_with_other_kv_heads_is_one_line_error(real, tmp_path):
    tensors, raw = store.fileformat.read(real)
    for name in list(tensors):
        if name.startswith("layers."):  # [batch, 2 kv heads, seq, 64] -> [batch, 4, seq, 32], keys and values alike
            b, h, s, d = tensors[name].shape
            tensors[name] = tensors[name].reshape(b, h * 2, s, d // 2)
    store.fileformat.write(real, tensors, {"portable": raw["portable"]})
    load_cache(real)  # consistent in itself: only the model can tell
    proc = run_cli("decode.py", "--cache", str(real), "-n", "2", "--no-parity", check=False)
    assert proc.returncode == 2
    assert "error: layer 0 (full_attention) of the cache has kv_heads 4 (the model's 2), head_dim 32" in proc.stderr
    assert "Traceback" not in proc.stderr and "unexpected" not in proc.stderr


# ---- cache inspect ----

def test_inspect_prints_each_kinds_layout(tmp_path):
    save_cache(make_cache(), tmp_path / "c.safetensors")
    text, problem = inspect_file(tmp_path / "c.safetensors")
    assert problem is None and not text.startswith("warning")
    assert "full_attention: keys, values [batch, kv_heads, seq, head_dim] = [2, 2, 12, 16]" in text
    assert "sliding_attention: keys, values [batch, kv_heads, kept, head_dim] = [2, 2, 7, 16]" in text
    assert ("recurrent: conv_state [batch, channels, conv_kernel] = [2, 32, 4]; "
            "recurrent_state [batch, channels, state_size] = [2, 32, 8]") in text


def test_inspect_gives_the_kv_size_in_the_file_of_int8_storage(prefilled):
    """int8 storage keeps the keys and values in about a quarter of the bytes a load holds in memory: the summary
    gave the memory figure alone, the same as the native file's."""
    lines = {storage: next(line for line in inspect_file(path)[0].splitlines() if "KV " in line)
             for storage, path in prefilled.items()}
    in_memory = load_cache(prefilled["int8"]).kv_nbytes
    tensors = read_metadata(prefilled["int8"])["_tensors"]
    stored = sum(e["data_offsets"][1] - e["data_offsets"][0] for n, e in tensors.items() if n.startswith("layers."))
    assert stored < in_memory / 3, (stored, in_memory)
    assert f"KV {megabytes(in_memory)} in memory, {megabytes(stored)} in the file" in lines["int8"], lines
    assert "in memory, file" in lines["native"], lines  # native: what the file holds is what a load holds


def corrupt_payload(path):
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))


def newer_version(path):
    rewrite(path, meta_change=lambda meta: meta.__setitem__("version", store.FORMAT_VERSION + 1))


def truncate(path):
    path.write_bytes(path.read_bytes()[:-1000])


@pytest.mark.parametrize("damage, reason", [(corrupt_payload, "payload checksum"),
                                            (newer_version, f"version {store.FORMAT_VERSION + 1}, newer"),
                                            (truncate, "truncated")])
def test_inspect_summarises_a_file_that_would_not_load(real, damage, reason):
    damage(real)
    with pytest.raises(CacheFileError):
        load_cache(real)
    text, problem = inspect_file(real)
    first, *rest = text.splitlines()
    assert first.startswith("warning: this file would not load: ") and reason in first and reason in problem
    assert "default (LlamaForCausalLM, 6 layers" in text and "checksum NOT verified" in text
    assert "full_attention: keys, values [batch, kv_heads, seq, head_dim] = [2, 2, " in text
    as_json = json.loads(inspect_file(real, as_json=True)[0])
    assert reason in as_json["_load_error"] and as_json["batch"] == 2
    result = CliRunner().invoke(app, ["cache", "inspect", str(real)])
    assert result.output.startswith("warning: this file would not load")


def test_inspect_of_an_unreadable_file_is_the_load_error(tmp_path):
    (tmp_path / "junk").write_bytes(b"\xff" * 100)
    with pytest.raises(CacheFileError, match="not a safetensors file|corrupt header"):
        inspect_file(tmp_path / "junk")


# ---- file mode ----

def test_files_get_the_usual_mode_not_0600(tmp_path):
    old = os.umask(0o027)
    try:
        save_cache(make_cache(), tmp_path / "c.safetensors")
        save_cache(make_cache(), tmp_path / "c.safetensors")  # replacing a file too
    finally:
        os.umask(old)
    assert (tmp_path / "c.safetensors").stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]


# ---- fuzz over real prefill-made files ----

FIELD = re.compile(rb'"dtype":"[A-Z0-9]+"|"shape":\[[0-9,]*\]|"data_offsets":\[[0-9,]+\]')
SAME_SIZE = [[b"F64", b"I64"], [b"F32", b"I32"], [b"F16", b"BF16", b"I16"], [b"I8", b"U8", b"BOOL"]]
CODES = [code for group in SAME_SIZE for code in group]


def mutate_field(raw: bytes, rng: random.Random) -> bytes:
    """One dtype code, shape or offset of one tensor entry changed (the same length where it can be)."""
    match = rng.choice(list(FIELD.finditer(raw.split(b'"__metadata__"')[0])))
    text = match.group()
    if text.startswith(b'"dtype"'):  # half the time one of the same element size: every byte range stays valid
        code = text[9:-1]
        same = next(group for group in SAME_SIZE if code in group)
        new = b'"dtype":"' + rng.choice([c for c in (same if rng.random() < 0.5 else CODES) if c != code]) + b'"'
    else:
        digits = [i for i, c in enumerate(text) if chr(c).isdigit()]
        i = rng.choice(digits)
        new = text[:i] + rng.choice([d for d in b"0123456789" if d != text[i]]).to_bytes(1, "little") + text[i + 1:]
    return raw[:match.start()] + new + raw[match.end():]


def mutate(data: bytes, rng: random.Random, kind: int) -> tuple[bytes, bool]:
    """A mutated copy of the file, and whether the header checksum was re-stamped to match the mutated header."""
    raw, payload = split(data)
    if kind == 0:  # a header field, checksum intact: the header checksum must catch it
        return join(mutate_field(raw.rstrip(), rng), payload), False
    if kind == 1:  # a header field that also passes the header checksum: the structural checks must catch it
        return join(restamp(mutate_field(raw, rng).rstrip()), payload), True
    if kind == 2:  # payload bytes
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            mutated[8 + len(raw) + rng.randrange(len(payload))] ^= 1 << rng.randrange(8)
        return bytes(mutated), False
    if kind == 3:  # truncation, anywhere
        return data[:rng.randrange(len(data))], False
    mutated = bytearray(data)  # a random byte of the header
    mutated[rng.randrange(8, 8 + len(raw))] ^= 1 << rng.randrange(8)
    return bytes(mutated), False


@pytest.mark.parametrize("storage", ["native", "int8"])
def test_fuzz_a_real_cache_file(prefilled, tmp_path, storage):
    """Every mutated load either succeeds with identical tensors or raises CacheFileError, never anything else."""
    original = load_cache(prefilled[storage])
    data = prefilled[storage].read_bytes()
    path = tmp_path / "m.safetensors"
    rng = random.Random(1)
    outcomes = {"ok": 0, "error": 0}
    for i in range(500):
        mutated, restamped = mutate(data, rng, i % 5)
        path.write_bytes(mutated)
        try:
            loaded = load_cache(path)
        except CacheFileError:
            outcomes["error"] += 1
            continue
        assert restamped, f"mutation {i} (kind {i % 5}) loaded despite the checksums"
        assert_same(original, loaded)
        outcomes["ok"] += 1
    assert outcomes["error"] >= 490, outcomes


# ---- header fields that parse as numbers only after a cast ----

@pytest.mark.parametrize("field, value", [("shape", ["2", 5]), ("shape", [2.0, 5.5]), ("shape", [True, 5]),
                                          ("shape", [float("inf"), 5]), ("data_offsets", ["0", 80])])
def test_header_sizes_must_be_json_integers(real, field, value):
    def edit(header):
        header["input_ids"][field] = value
    edit_header(real, edit)
    with pytest.raises(CacheFileError, match="corrupt header entry for tensor 'input_ids'"):
        load_cache(real)
