"""The embedded default model (portable/data/default_model): a small Llama with grouped-query attention that plain
transformers loads offline, as issue 2 asks."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from portable.models import DEFAULT_MODEL_DIR


def test_it_is_a_llama_with_grouped_query_attention():
    config = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert 1 <= config["num_key_value_heads"] < config["num_attention_heads"]
    assert config["num_attention_heads"] % config["num_key_value_heads"] == 0


def test_it_is_at_most_20_mb():
    size = sum(f.stat().st_size for f in DEFAULT_MODEL_DIR.rglob("*") if f.is_file())
    assert size <= 20 * 10**6, f"{size / 1e6:.1f} MB"


def test_it_loads_with_plain_transformers_and_runs():
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    attention = model.model.layers[0].self_attn
    assert attention.k_proj.out_features < attention.q_proj.out_features  # fewer KV heads than query heads
    ids = tokenizer("def hello_world():", return_tensors="pt").input_ids
    assert ids.shape[1] > 1
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size) and torch.isfinite(logits).all()
    assert (DEFAULT_MODEL_DIR / "README.md").exists()  # the model card
