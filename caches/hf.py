"""Conversion between our layer states and Hugging Face transformers' cache objects (transformers >= 5.17).

In transformers 5 every architecture we cover keeps a `DynamicCache` whose `layers[i]` is one of
`DynamicLayer` (full attention), `DynamicSlidingWindowLayer` (keeps the last `sliding_window - 1` positions and a
`cumulative_length`) or `LinearAttentionLayer` (Mamba: `conv_states[0]`, `recurrent_states[0]`). We restore the
attributes those classes read directly instead of replaying `update()`, which would recount the sliding window's
length from the tensors it was given — exactly the silent error the saved `cumulative_length` exists to prevent.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer, LinearAttentionLayer

from caches.container import PromptCache
from caches.layers import AttentionLayer, LayerState, RecurrentLayer, SlidingWindowLayer
from portable.errors import CacheFileError


def from_hf(hf_cache: DynamicCache) -> list[LayerState]:
    """Our layer states from a filled HF cache (tensors are shared, not copied)."""
    layers: list[LayerState] = []
    for i, layer in enumerate(hf_cache.layers):
        if isinstance(layer, LinearAttentionLayer):
            layers.append(RecurrentLayer(conv_state=layer.conv_states[0], recurrent_state=layer.recurrent_states[0]))
        elif isinstance(layer, DynamicSlidingWindowLayer):
            layers.append(SlidingWindowLayer(keys=layer.keys, values=layer.values, window=layer.sliding_window,
                                             cumulative_length=int(layer.cumulative_length)))
        elif isinstance(layer, DynamicLayer):
            layers.append(AttentionLayer(keys=layer.keys, values=layer.values))
        else:
            raise NotImplementedError(f"layer {i}: HF cache layer {type(layer).__name__} has no portable equivalent")
    return layers


def _expected_kinds(config) -> list[str]:
    template = DynamicCache(config=config)
    if not template.layers:  # no layer types known: a plain full-attention model
        return [AttentionLayer.kind] * config.get_text_config(decoder=True).num_hidden_layers
    return [from_kind(layer) for layer in template.layers]


def from_kind(layer) -> str:
    if isinstance(layer, LinearAttentionLayer):
        return RecurrentLayer.kind
    if isinstance(layer, DynamicSlidingWindowLayer):
        return SlidingWindowLayer.kind
    return AttentionLayer.kind


def expected_dims(config) -> dict[str, dict[str, int | None]]:
    """Per layer kind, the sizes of the non-batch, non-sequence axes that a model with `config` caches:
    attention {kv_heads, head_dim} of `[batch, kv_heads, seq, head_dim]`; recurrent {channels, conv_kernel,
    state_size} of `[batch, channels, conv_kernel]` and `[batch, channels, state_size]`. None: not in the config."""
    text = config.get_text_config(decoder=True)
    heads = getattr(text, "num_attention_heads", None)
    hidden = getattr(text, "hidden_size", None)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads  # GPTBigCode's multi_query maps it to 1
    head_dim = getattr(text, "head_dim", None) or (hidden // heads if hidden and heads else None)
    attention = {"kv_heads": kv_heads, "head_dim": head_dim}
    return {AttentionLayer.kind: attention, SlidingWindowLayer.kind: attention,
            RecurrentLayer.kind: {"channels": getattr(text, "intermediate_size", None),
                                  "conv_kernel": getattr(text, "conv_kernel", None),
                                  "state_size": getattr(text, "state_size", None)}}


def check_shapes(cache: PromptCache, config) -> None:
    """Refuse a cache whose per-layer tensor sizes are not those of a model with `config` (kv heads, head_dim, Mamba's
    channels, conv kernel and state size): otherwise decode fails deep inside attention, or worse, runs."""
    dims = expected_dims(config)
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, RecurrentLayer):
            got = {"channels": layer.conv_state.shape[1], "conv_kernel": layer.conv_state.shape[2],
                   "state_size": layer.recurrent_state.shape[2]}
            layout = f"conv_state {tuple(layer.conv_state.shape)}, recurrent_state {tuple(layer.recurrent_state.shape)}"
        else:
            got = {"kv_heads": layer.keys.shape[1], "head_dim": layer.keys.shape[3]}
            layout = f"keys {tuple(layer.keys.shape)} {layer.layouts['keys']}"
        want = dims[layer.kind]
        wrong = [f"{name} {got[name]} (the model's {want[name]})" for name in got
                 if want.get(name) is not None and got[name] != want[name]]
        if wrong:
            raise CacheFileError(f"layer {i} ({layer.kind}) of the cache has {', '.join(wrong)}: {layout} does not "
                                 f"fit this model; prefill again with it")


def check_compatible(cache: PromptCache, config) -> None:
    """Refuse a cache whose layer structure or tensor sizes cannot belong to a model with `config` (no --force for
    this): layer count, vocabulary, per-layer kinds and sliding windows, then `check_shapes`."""
    kinds = _expected_kinds(config)
    if len(kinds) != len(cache.layers):
        raise CacheFileError(f"the cache has {len(cache.layers)} layers but the model has {len(kinds)}")
    text = config.get_text_config(decoder=True)
    vocab = getattr(text, "vocab_size", None)
    if vocab is not None and cache.next_token_logits.shape[-1] != vocab:
        raise CacheFileError(f"the cache's logits cover {cache.next_token_logits.shape[-1]} tokens but the model's "
                             f"vocabulary has {vocab}")
    template = DynamicCache(config=config)
    for i, (want, layer) in enumerate(zip(kinds, cache.layers)):
        if layer.kind != want:
            raise CacheFileError(f"layer {i} is {layer.kind} in the cache but {want} in the model")
        if isinstance(layer, SlidingWindowLayer):
            window = template.layers[i].sliding_window
            if layer.window != window:
                raise CacheFileError(f"layer {i}: the cache's sliding window is {layer.window}, the model's {window}")
    check_shapes(cache, config)


def to_hf(layers: list[LayerState], config) -> DynamicCache:
    """A `DynamicCache` for `config` holding `layers` (tensors used as they are: cast and move them first)."""
    hf = DynamicCache(config=config)
    if not hf.layers:
        hf = DynamicCache()
        hf.layers = [DynamicLayer() for _ in layers]
    for i, (target, layer) in enumerate(zip(hf.layers, layers)):
        if isinstance(layer, RecurrentLayer):
            c, r = layer.conv_state, layer.recurrent_state
            target.lazy_initialization(conv_states=c, recurrent_states=r, state_idx=0, conv_kernel_size=c.shape[-1])
            target.conv_states[0].copy_(c)
            target.recurrent_states[0].copy_(r)
            target.has_previous_state[0] = True
            continue
        target.keys, target.values = layer.keys, layer.values
        target.dtype, target.device = layer.keys.dtype, layer.keys.device
        target.is_initialized = True
        if isinstance(layer, SlidingWindowLayer):
            target.cumulative_length = layer.cumulative_length
            target._sliding_window_tensor = target._sliding_window_tensor.to(layer.keys.device)
    return hf


def to_hf_cache(cache: PromptCache, config) -> DynamicCache:
    check_compatible(cache, config)
    return to_hf(cache.layers, config)


def clone_layers(layers: list[LayerState]) -> list[LayerState]:
    return [layer.map_tensors(torch.clone) for layer in layers]
