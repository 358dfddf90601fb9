"""Real-shape presets: published model configs with seeded random weights, for speed work without downloads.

`--model preset:NAME` builds the model directly in the target dtype on the target device. The weights are random,
so the text is noise and parity is meaningless (reports say so instead of giving a verdict). Prompts are encoded
byte by byte (`ByteTokenizer`): a preset has no tokenizer.
"""

from __future__ import annotations

import hashlib
import json

import torch

from portable.errors import ModelLoadError

SEED = 0


def _configs() -> dict:
    """Every preset's config, special token ids included: transformers' defaults are another model's (GPTBigCode's
    bos_token_id 50256 lies outside santacoder's vocabulary)."""
    from transformers import GPTBigCodeConfig, Gemma3TextConfig, LlamaConfig, MambaConfig, MistralConfig, Qwen3Config

    return {
        # meta-llama/Llama-3.2-1B
        "llama-3.2-1b": lambda: LlamaConfig(
            vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
            num_key_value_heads=8, head_dim=64, rope_theta=500000.0, tie_word_embeddings=True,
            max_position_embeddings=131072, rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001,
            rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 8192}),
        # Qwen/Qwen3-1.7B
        "qwen3-1.7b": lambda: Qwen3Config(
            vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
            num_key_value_heads=8, head_dim=128, rope_theta=1000000.0, tie_word_embeddings=True,
            max_position_embeddings=40960, rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645),
        # google/gemma-3-1b-pt (text)
        "gemma3-1b": lambda: Gemma3TextConfig(
            vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
            num_key_value_heads=1, head_dim=256, sliding_window=512, max_position_embeddings=32768,
            rope_theta=1000000.0, rope_local_base_freq=10000.0, query_pre_attn_scalar=256, bos_token_id=2,
            eos_token_id=1, pad_token_id=0),
        # bigcode/gpt_bigcode-santacoder (multi-query attention)
        "santacoder-1b": lambda: GPTBigCodeConfig(
            vocab_size=49280, n_positions=2048, n_embd=2048, n_layer=24, n_head=16, n_inner=8192,
            activation_function="gelu_pytorch_tanh", multi_query=True, bos_token_id=49152, eos_token_id=49152),
        # mistralai/Mistral-7B-v0.1
        "mistral-7b": lambda: MistralConfig(
            vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=8, head_dim=128, sliding_window=4096, max_position_embeddings=32768,
            rope_theta=10000.0, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2),
        # state-spaces/mamba-1.4b-hf
        "mamba-1.4b": lambda: MambaConfig(
            vocab_size=50280, hidden_size=2048, state_size=16, num_hidden_layers=48, expand=2, conv_kernel=4,
            time_step_rank=128, bos_token_id=0, eos_token_id=0, pad_token_id=0),
    }


def names() -> list[str]:
    return list(_configs())


def get(name: str):
    configs = _configs()
    if name not in configs:
        raise ModelLoadError(f"unknown preset {name!r}; presets: {', '.join(configs)}")
    return configs[name]()


def fingerprint(name: str) -> str:
    config = get(name).to_dict()
    config.pop("transformers_version", None)
    digest = hashlib.sha256(json.dumps({"preset": name, "seed": SEED, "config": config}, sort_keys=True).encode())
    return "preset-sha256:" + digest.hexdigest()[:32]


def build(name: str, dtype: torch.dtype, device: str, attn: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    config = get(name)
    config.architectures = [AutoModelForCausalLM._model_mapping[type(config)].__name__]
    torch.manual_seed(SEED)
    kwargs = {} if config.model_type == "mamba" else {"attn_implementation": attn}
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    return model


class ByteTokenizer:
    """Prompt text as UTF-8 bytes (token id = byte + 3); decodes ids back, showing ids outside the bytes as <id>."""

    offset = 3
    eos_token_id = None
    pad_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [b + self.offset for b in text.encode()]}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        out, pending = [], bytearray()
        for i in ids:
            if self.offset <= i < 256 + self.offset:
                pending.append(i - self.offset)
            else:
                out.append(pending.decode(errors="replace"))
                pending.clear()
                out.append(f"<{i}>")
        out.append(pending.decode(errors="replace"))
        return "".join(out)
