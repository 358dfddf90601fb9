"""The architectures portable covers, and how each one's forward takes its cache.

The tests parametrize over `ARCHITECTURES` (each with a tiny config built in tests/models.py) and the decode loop
asks `for_model_type` how to call a model. An architecture not listed here still runs through the Hugging Face
path with behaviour read off its forward signature.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Architecture:
    name: str
    model_type: str
    cache_kinds: tuple[str, ...]  # the layer kinds its cache holds
    cache_arg: str = "past_key_values"  # the forward's keyword for the cache object (for_model reads the installed
                                        # transformers' name off the signature: see cache_keyword)
    uses_positions: bool = True  # the forward takes position_ids
    mask_during_decode: bool = True  # generate() passes the 2-d attention mask on decode steps
    llama_family: bool = False  # served by our own fused decode forward on GPU (backends/llama_fast.py)
    onnx_export: bool = True  # torch.onnx.export (dynamo) can take it (backends/onnxruntime.py)
    onnx_prefill: bool = True  # ... its prefill too (Mamba: the decode step only; its scan loops over the prompt)


ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    Architecture("llama", "llama", ("full_attention",), llama_family=True),
    Architecture("qwen3", "qwen3", ("full_attention",), llama_family=True),
    Architecture("mistral", "mistral", ("sliding_attention",), llama_family=True),
    Architecture("gemma3", "gemma3_text", ("sliding_attention", "full_attention"), llama_family=True),
    Architecture("gpt_bigcode", "gpt_bigcode", ("full_attention",)),
    # generate() drops the mask after the first step for Mamba (MambaForCausalLM.prepare_inputs_for_generation).
    Architecture("mamba", "mamba", ("recurrent",), cache_arg="cache_params", uses_positions=False,
                 mask_during_decode=False, onnx_prefill=False),
)}


def cache_keyword(model, default: str = "past_key_values") -> str:
    """The forward's keyword for the cache object. transformers 5.24 renamed `past_key_values` (and Mamba's
    `cache_params`) to `cache`, deprecating the old names until 5.40; we support both sides of the rename."""
    params = inspect.signature(model.forward).parameters
    return next((name for name in ("cache", "cache_params", "past_key_values") if name in params), default)


def output_cache(out):
    """The cache object of a forward's output, under either side of the rename (`cache`; `past_key_values` or
    `cache_params` before 5.24)."""
    for name in ("cache", "past_key_values", "cache_params"):
        value = getattr(out, name, None)
        if value is not None:
            return value
    return None


def for_model(model) -> Architecture:
    """The entry for a loaded model; unknown model types get one derived from the forward's signature."""
    model_type = model.config.model_type
    for arch in ARCHITECTURES.values():
        if arch.model_type == model_type:
            return replace(arch, cache_arg=cache_keyword(model, arch.cache_arg))
    params = inspect.signature(model.forward).parameters
    return Architecture(
        name=model_type, model_type=model_type, cache_kinds=(), cache_arg=cache_keyword(model),
        uses_positions="position_ids" in params, onnx_export=False,
    )
