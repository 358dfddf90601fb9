"""Per-layer cache state: one small class per storage policy (after transformers' `cache_utils`).

A layer knows its tensors (named `layers.{i}.<suffix>` in the file), the metadata that describes it, how to check
that its tensors fit that metadata, and how to cast or move itself. Conversion to and from a framework's cache
objects lives elsewhere (`caches/hf.py`); this module only holds data.

Shapes:
    full attention     keys, values:      [batch, kv_heads, seq, head_dim]          seq = prompt length
    sliding attention  keys, values:      [batch, kv_heads, kept, head_dim]         kept = min(seen, window - 1)
    recurrent (Mamba)  conv_state:        [batch, channels, conv_kernel]
                       recurrent_state:   [batch, channels, state_size]
Lengths are tracked explicitly (`cumulative_length`, the container's `seen_tokens`), never inferred from tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import ClassVar

import torch

from portable.errors import CacheFileError

KV_LAYOUT = "[batch, kv_heads, seq, head_dim]"
SLIDING_LAYOUT = "[batch, kv_heads, kept, head_dim]"


@dataclass
class AttentionLayer:
    """Full attention: every prompt position is kept (left padding included)."""

    keys: torch.Tensor
    values: torch.Tensor

    kind: ClassVar[str] = "full_attention"
    tensor_names: ClassVar[tuple[str, ...]] = ("keys", "values")
    layouts: ClassVar[dict[str, str]] = {"keys": KV_LAYOUT, "values": KV_LAYOUT}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.tensor_names}

    def meta(self) -> dict:
        return {"kind": self.kind}

    @classmethod
    def from_file(cls, tensors: dict[str, torch.Tensor], meta: dict) -> "AttentionLayer":
        return cls(**tensors)

    def expected_seq(self, seen_tokens: int) -> int:
        return seen_tokens

    def validate(self, index: int, batch: int, seen_tokens: int) -> None:
        k, v = self.keys, self.values
        if k.ndim != 4 or v.shape != k.shape:
            raise CacheFileError(
                f"layer {index}: keys {tuple(k.shape)} and values {tuple(v.shape)} must have the same 4-d shape "
                f"{KV_LAYOUT}")
        expected = self.expected_seq(seen_tokens)
        if k.shape[0] != batch or k.shape[2] != expected:
            raise CacheFileError(
                f"layer {index} ({self.kind}): keys have shape {tuple(k.shape)}, expected batch {batch} and "
                f"{expected} positions {KV_LAYOUT}")

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def dtype(self) -> torch.dtype:
        return self.keys.dtype

    def map_tensors(self, fn) -> "AttentionLayer":
        """A copy with `fn` applied to every tensor (cast, move, select a batch row)."""
        return replace(self, **{name: fn(t) for name, t in self.tensors().items()})


@dataclass
class SlidingWindowLayer(AttentionLayer):
    """Sliding-window attention: only the last `window - 1` positions are kept, so the number of positions the layer
    has seen (`cumulative_length`) must be saved with it: the tensors alone cannot tell."""

    window: int = 0
    cumulative_length: int = 0

    kind: ClassVar[str] = "sliding_attention"
    layouts: ClassVar[dict[str, str]] = {"keys": SLIDING_LAYOUT, "values": SLIDING_LAYOUT}

    def meta(self) -> dict:
        return {"kind": self.kind, "window": self.window, "cumulative_length": self.cumulative_length}

    @classmethod
    def from_file(cls, tensors: dict[str, torch.Tensor], meta: dict) -> "SlidingWindowLayer":
        window, length = meta.get("window"), meta.get("cumulative_length")
        if type(window) is not int or type(length) is not int:  # not int(): 8.5 would pass as 8, Infinity overflow it
            raise CacheFileError(f"sliding-window layer metadata is incomplete: {meta}")
        return cls(**tensors, window=window, cumulative_length=length)

    def expected_seq(self, seen_tokens: int) -> int:
        return min(seen_tokens, self.window - 1)

    def validate(self, index: int, batch: int, seen_tokens: int) -> None:
        if self.window < 1 or self.cumulative_length != seen_tokens:
            raise CacheFileError(
                f"layer {index}: sliding window {self.window} with cumulative length {self.cumulative_length} does not "
                f"match the {seen_tokens} positions of the prompt")
        super().validate(index, batch, seen_tokens)


@dataclass
class RecurrentLayer:
    """A state-space (Mamba) layer: a rolling convolution window and the recurrent SSM state. Neither has a sequence
    axis, so the sequence position is tracked by the container, not by the layer."""

    conv_state: torch.Tensor
    recurrent_state: torch.Tensor

    kind: ClassVar[str] = "recurrent"
    tensor_names: ClassVar[tuple[str, ...]] = ("conv_state", "recurrent_state")
    layouts: ClassVar[dict[str, str]] = {"conv_state": "[batch, channels, conv_kernel]",
                                         "recurrent_state": "[batch, channels, state_size]"}

    # Hugging Face's Mamba keeps its SSM state in float32 whatever the model's dtype (MambaMixer), so a cast to the
    # decode precision leaves it there: a bf16 decode from a file then continues exactly as an uninterrupted one.
    float32_tensors = ("recurrent_state",)

    tensors = AttentionLayer.tensors
    map_tensors = AttentionLayer.map_tensors
    nbytes = AttentionLayer.nbytes

    def meta(self) -> dict:
        return {"kind": self.kind}

    @classmethod
    def from_file(cls, tensors: dict[str, torch.Tensor], meta: dict) -> "RecurrentLayer":
        return cls(**tensors)

    def validate(self, index: int, batch: int, seen_tokens: int) -> None:
        c, r = self.conv_state, self.recurrent_state
        if c.ndim != 3 or r.ndim != 3 or c.shape[0] != batch or r.shape[0] != batch or c.shape[1] != r.shape[1]:
            raise CacheFileError(
                f"layer {index} (recurrent): conv_state {tuple(c.shape)} and recurrent_state {tuple(r.shape)} must "
                f"be [batch={batch}, channels, conv_kernel] and [batch={batch}, channels, state_size]")

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_state.dtype


LayerState = AttentionLayer | SlidingWindowLayer | RecurrentLayer
LAYER_KINDS: dict[str, type] = {cls.kind: cls for cls in (AttentionLayer, SlidingWindowLayer, RecurrentLayer)}


def layer_field_names(cls) -> list[str]:
    return [f.name for f in fields(cls)]
