"""Every registered architecture: prefill -> cache file -> decode in a fresh process gives exactly the tokens of one
uninterrupted Hugging Face `generate()`, at batch 2 with unequal prompt lengths longer than any sliding window."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from caches import load_cache
from portable.architectures import ARCHITECTURES
from tests.conftest import read_json, run_cli
from tests.models import PROMPTS, TINY_CONFIGS, WINDOW

NEW = 12


def test_every_registered_architecture_has_a_tiny_test_model():
    assert set(ARCHITECTURES) == set(TINY_CONFIGS)


def hf_generate(folder, prompts, new_tokens):
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    enc = tok(list(prompts), padding=True, padding_side="left", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return out[:, enc.input_ids.shape[1]:].tolist(), enc.attention_mask.sum(-1).tolist()


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_file_round_trip_matches_generate(name, tiny_model, tmp_path):
    folder = tiny_model(name)
    cache = tmp_path / "c.safetensors"
    args = ["--model", str(folder), "--out", str(cache)]
    for p in PROMPTS:
        args += ["--prompt", p]
    run_cli("prefill.py", *args, "-q")
    run_cli("decode.py", "--cache", str(cache), "-n", str(NEW), "--no-parity", "--json", str(tmp_path / "r.json"),
            "-q")
    report = read_json(tmp_path / "r.json")
    expected, lengths = hf_generate(folder, PROMPTS, NEW)
    assert report["prompt_tokens"] == lengths and lengths[0] != lengths[1]
    assert min(lengths) > WINDOW
    assert report["tokens"] == expected
    loaded = load_cache(cache)
    assert set(loaded.kinds()) == set(ARCHITECTURES[name].cache_kinds)


@pytest.mark.parametrize("backend", ["cpu", "onnxruntime"])
@pytest.mark.parametrize("name", [n for n, a in ARCHITECTURES.items() if "sliding_attention" in a.cache_kinds])
def test_a_decode_that_crosses_the_sliding_window_matches_generate(name, backend, tiny_model, tmp_path):
    """Prompts shorter than the window, whose decode then goes past it: the file holds every token so far, and the
    decode must start dropping the oldest ones at the right step (the test above starts past the window)."""
    folder = tiny_model(name)
    prompts = ("import os", "def f(x):")
    cache = tmp_path / "c.safetensors"
    run_cli("prefill.py", "--model", str(folder), "--out", str(cache), "--prompt", prompts[0], "--prompt", prompts[1],
            "-q")
    artifacts = ["--artifact-dir", str(tmp_path / "art")] if backend == "onnxruntime" else []
    run_cli("decode.py", "--cache", str(cache), "--backend", backend, "-n", str(NEW), "--no-parity", "--json",
            str(tmp_path / "r.json"), *artifacts, "-q")
    expected, lengths = hf_generate(folder, prompts, NEW)
    assert lengths[0] != lengths[1] and max(lengths) < WINDOW < min(lengths) + NEW
    assert read_json(tmp_path / "r.json")["tokens"] == expected


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_forward_calls_use_the_installed_transformers_cache_keyword(name, tiny_model):
    """transformers 5.24 renamed the forward's cache keyword (`past_key_values` / `cache_params` -> `cache`) and
    removes the old names in 5.40: our calls must not lean on the deprecated ones, whichever version is installed."""
    import warnings

    from backends.hf_torch import HFRunner
    from portable import models

    loaded = models.load(models.resolve(str(tiny_model(name))), precision="fp32", device="cpu")
    runner = HFRunner(loaded, backend="cpu", precision="fp32", device=torch.device("cpu"))
    ids = torch.tensor([[5, 6, 7, 8]])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*(past_key_values|cache_params).*deprecated", category=FutureWarning)
        cache = runner.prefill(ids, torch.ones_like(ids))
        runner.start(cache, 2)
        logits = runner.decode_step(cache.next_token_logits.argmax(-1))
    assert cache.layers and logits.shape[-1] == loaded.config.vocab_size


def test_mamba_bf16_keeps_its_ssm_state_in_float32_through_the_file(tiny_model, tmp_path):
    """HF's Mamba keeps the SSM state in float32 at bf16; a cache cast to bf16 on load must leave it there, so that a
    bf16 decode from the file continues exactly as one uninterrupted bf16 `generate()`."""
    folder = tiny_model("mamba")
    cache = tmp_path / "m.safetensors"
    args = ["--model", str(folder), "--out", str(cache), "--precision", "bf16"]
    for p in PROMPTS:
        args += ["--prompt", p]
    run_cli("prefill.py", *args, "-q")
    loaded = load_cache(cache, dtype=torch.bfloat16)
    assert {layer.recurrent_state.dtype for layer in loaded.layers} == {torch.float32}
    assert {layer.conv_state.dtype for layer in loaded.layers} == {torch.bfloat16}
    run_cli("decode.py", "--cache", str(cache), "--precision", "bf16", "-n", str(NEW), "--no-parity", "--json",
            str(tmp_path / "r.json"), "-q")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    enc = tok(list(PROMPTS), padding=True, padding_side="left", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=NEW, do_sample=False, pad_token_id=tok.pad_token_id)
    assert read_json(tmp_path / "r.json")["tokens"] == out[:, enc.input_ids.shape[1]:].tolist()
