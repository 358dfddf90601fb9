"""Real-shape presets: each published config is self-consistent and builds at its published size (on the meta device:
no memory), the bench's prompt ids lie inside its vocabulary, and the bench's pp and tg tests run on each preset
shrunk to tiny sizes (same architecture, vocabulary and special token ids)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from portable import presets
from portable.bench import run
from portable.cli import app

# unique parameters of the published checkpoints (tied embeddings counted once)
PUBLISHED_PARAMS = {"llama-3.2-1b": 1.236e9, "qwen3-1.7b": 1.721e9, "gemma3-1b": 1.000e9, "santacoder-1b": 1.125e9,
                    "mistral-7b": 7.242e9, "mamba-1.4b": 1.372e9}
# every size a config names, shrunk (mamba's intermediate_size is expand * hidden_size: 2 * 64)
TINY = {"num_hidden_layers": 2, "n_layer": 2, "hidden_size": 64, "n_embd": 64, "intermediate_size": 128,
        "n_inner": 128, "num_attention_heads": 4, "n_head": 4, "head_dim": 16, "time_step_rank": 8,
        "query_pre_attn_scalar": 16}


def test_the_presets_are_the_documented_ones():
    assert presets.names() == list(PUBLISHED_PARAMS)


def _ids(value) -> list[int]:
    return [] if value is None else [value] if isinstance(value, int) else list(value)


@pytest.mark.parametrize("name", presets.names())
def test_preset_config_is_self_consistent(name):
    config = presets.get(name)
    vocab = config.vocab_size
    special = {k: getattr(config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    assert isinstance(special["bos_token_id"], int), "a tg test starts from the BOS token"
    for key, value in special.items():
        assert all(0 <= i < vocab for i in _ids(value)), f"{key} {value} outside the vocabulary of {vocab}"
    if config.model_type == "mamba":
        assert config.intermediate_size == config.expand * config.hidden_size
        assert config.time_step_rank <= config.hidden_size
        return
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    assert heads % kv_heads == 0
    if getattr(config, "head_dim", None) is None:
        assert config.hidden_size % heads == 0
    for key in ("sliding_window", "max_position_embeddings"):
        if getattr(config, key, None) is not None:
            assert getattr(config, key) > 0


@pytest.mark.parametrize("name", presets.names())
def test_preset_builds_at_its_published_size_without_memory(name):
    model = presets.build(name, torch.bfloat16, "meta")
    params = list(model.parameters())  # tied weights appear once
    assert all(p.is_meta and p.dtype == torch.bfloat16 for p in params)
    assert sum(p.numel() for p in params) == pytest.approx(PUBLISHED_PARAMS[name], rel=0.01)
    assert presets.fingerprint(name).startswith("preset-sha256:")


@pytest.mark.parametrize("name", presets.names())
def test_bench_prompt_ids_lie_inside_the_vocabulary(name):
    config = presets.get(name)
    one, _ = run.prompt(config, 2, 1, seed=0)
    assert one.tolist() == [[config.bos_token_id]] * 2
    many, mask = run.prompt(config, 2, 64, seed=0)
    assert 0 <= many.min() and many.max() < config.vocab_size and mask.shape == many.shape


def _tiny(get):
    def tiny(name: str):
        config = get(name)
        d = config.to_dict()
        d.update({k: v for k, v in TINY.items() if k in d})
        if "num_key_value_heads" in d:
            d["num_key_value_heads"] = min(d["num_key_value_heads"], 2)
        if "layer_types" in d:  # keep every kind of layer (gemma3: sliding and full attention) in two layers
            kinds = list(dict.fromkeys(d["layer_types"]))
            d["layer_types"] = (kinds * 2)[:2]
        return type(config)(**d)
    return tiny


@pytest.mark.parametrize("name", presets.names())
def test_bench_pp_and_tg_run_on_each_preset_shrunk(name, monkeypatch):
    monkeypatch.setattr(presets, "get", _tiny(presets.get))
    assert presets.get(name).vocab_size == presets._configs()[name]().vocab_size
    result = CliRunner().invoke(app, ["bench", "-m", f"preset:{name}", "-t", "pp4,tg2", "-r", "1", "--warmup", "0",
                                      "--threads", "1", "-q", "-o", "json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [(r["test"], r["status"]) for r in rows] == [("pp4", "ok"), ("tg2", "ok")], rows
    assert all("meaningless" in r["parity"] for r in rows)
