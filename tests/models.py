"""Tiny models of every registered architecture, built from configs (no downloads), with the embedded model's
tokenizer so that prompts are real text. Sliding windows are 8 so that test prompts (~20 tokens) exceed them."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, GPTBigCodeConfig, Gemma3TextConfig, LlamaConfig,
                          MambaConfig, MistralConfig, Qwen3Config)

from portable.models import DEFAULT_MODEL_DIR

VOCAB = 4096
WINDOW = 8
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, bos_token_id=None, eos_token_id=None, pad_token_id=0)

TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(**_COMMON),
    "qwen3": lambda: Qwen3Config(**_COMMON, head_dim=16),
    "mistral": lambda: MistralConfig(**_COMMON, sliding_window=WINDOW),
    "gemma3": lambda: Gemma3TextConfig(**{**_COMMON, "num_hidden_layers": 3}, head_dim=16, sliding_window=WINDOW,
                                       sliding_window_pattern=2),
    "gpt_bigcode": lambda: GPTBigCodeConfig(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, multi_query=True,
                                            n_positions=256, bos_token_id=None, eos_token_id=None, pad_token_id=0),
    "mamba": lambda: MambaConfig(vocab_size=VOCAB, hidden_size=64, state_size=8, num_hidden_layers=2, expand=2,
                                 conv_kernel=4, bos_token_id=None, eos_token_id=None, pad_token_id=0),
}

# Two prompts of unequal length, both longer than WINDOW tokens.
PROMPTS = ("import os\nimport sys\n\n\ndef main(argv):\n    parser = ", "class Stack:\n    def push(self, item):\n")


def build(name: str, folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[name]())
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR).save_pretrained(folder)
    return folder
