"""The prompt cache: what a prefill leaves behind and a decode needs, as plain tensors on any device.

Batches are left padded (as Hugging Face `generate` pads): every row ends at the last slot, so the next token of
every sequence goes to the same slot and `attention_mask` marks the padding with zeros. `seen_tokens` (the padded
prompt length) is the number of slots every layer has been fed; a sequence's next RoPE position is its own
prompt length, `positions[b]`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from caches.layers import AttentionLayer, LayerState, RecurrentLayer, SlidingWindowLayer


@dataclass
class PromptCache:
    input_ids: torch.Tensor  # [batch, seq] int64, left padded with pad_token_id
    attention_mask: torch.Tensor  # [batch, seq] int64, 0 on padding
    next_token_logits: torch.Tensor  # [batch, vocab] float32: the logits that pick the first new token
    layers: list[LayerState]
    model: dict  # identity: architecture, model_type, source, fingerprint, tokenizer_fingerprint, num_layers, ...
    pad_token_id: int = 0
    prefill: dict = field(default_factory=dict)  # backend, precision, device, timing of the prefill that made it
    padding_side: str = "left"
    # Set when read from a file: format version, creation time, how it was stored, what cast the load applied.
    file_info: dict = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seen_tokens(self) -> int:
        return self.input_ids.shape[1]

    @property
    def prompt_lengths(self) -> list[int]:
        return self.attention_mask.sum(-1).tolist()

    @property
    def positions(self) -> torch.Tensor:
        """[batch] int64: the RoPE position of each sequence's next token (its number of real prompt tokens)."""
        return self.attention_mask.sum(-1)

    @property
    def kv_nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].dtype if self.layers else torch.float32

    def prompt_tokens(self, b: int) -> list[int]:
        """The real (unpadded) prompt token ids of sequence `b`."""
        return self.input_ids[b][self.attention_mask[b].bool()].tolist()

    def kinds(self) -> list[str]:
        return [layer.kind for layer in self.layers]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "PromptCache":
        """A copy with the layer states cast to `dtype` and everything moved to `device`.

        Token ids, mask and logits keep their dtypes; only floating layer tensors are cast, except those a layer kind
        keeps in float32 at every precision (`float32_tensors`: Mamba's SSM state).
        """
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device) if device is not None else t

        def cast(t: torch.Tensor, to: torch.dtype | None) -> torch.Tensor:
            if to is not None and t.is_floating_point():
                t = t.to(to)
            return move(t)

        def cast_layer(layer):
            keep = getattr(layer, "float32_tensors", ())
            return replace(layer, **{name: cast(t, torch.float32 if name in keep and dtype is not None else dtype)
                                     for name, t in layer.tensors().items()})

        return replace(self, input_ids=move(self.input_ids), attention_mask=move(self.attention_mask),
                       next_token_logits=move(self.next_token_logits),
                       layers=[cast_layer(layer) for layer in self.layers])

    def select(self, rows: list[int]) -> "PromptCache":
        """The cache of a subset of the batch (used to compare one sequence at a time)."""
        index = torch.tensor(rows, dtype=torch.long)

        def pick(t: torch.Tensor) -> torch.Tensor:
            return t.index_select(0, index.to(t.device))

        return replace(self, input_ids=pick(self.input_ids), attention_mask=pick(self.attention_mask),
                       next_token_logits=pick(self.next_token_logits),
                       layers=[layer.map_tensors(pick) for layer in self.layers])


__all__ = ["PromptCache", "AttentionLayer", "SlidingWindowLayer", "RecurrentLayer"]
