"""A runner over Hugging Face modeling code on any torch device: the reference path of every torch backend.

It calls the model exactly as `generate()` does (transformers 5.17): the prefill passes the padded prompt with
position ids from the attention mask's cumulative sum and `logits_to_keep=1`; each decode step passes one token, the
grown 2-d mask (except where generate drops it, e.g. Mamba) and each sequence's next position. That is what makes
prefill -> file -> decode token-exact with one uninterrupted `generate()`.
"""

from __future__ import annotations

import inspect
import time

import torch
from transformers import DynamicCache

from backends.base import RunnerInfo
from caches import PromptCache
from caches import hf as hf_caches
from portable import architectures
from portable.models import LoadedModel


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from portable.environment import cpu_name

    return cpu_name()


class HFRunner:
    """Hugging Face model + `DynamicCache`, one forward per decode step."""

    def __init__(self, loaded: LoadedModel, backend: str, precision: str, device: torch.device):
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.config = loaded.config
        self._device = torch.device(device)
        self.arch = architectures.for_model(self.model)
        self._logits_to_keep = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        self.info = RunnerInfo(backend=backend, device=str(self._device), device_name=device_name(self._device),
                               precision=precision, identity=loaded.identity, model_load_s=loaded.load_s,
                               details={"path": "hf", "attn": self.model.config._attn_implementation})
        self._hf_cache = None
        self._mask = None
        self._positions = None

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _forward(self, input_ids, attention_mask, position_ids, cache):
        kwargs = {self.arch.cache_arg: cache, "use_cache": True}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        if self.arch.uses_positions:
            kwargs["position_ids"] = position_ids
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        return self.model(input_ids=input_ids, **kwargs)

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> PromptCache:
        """One forward over the left-padded prompts; returns the cache (on this device) and the next-token logits."""
        input_ids = input_ids.to(self._device)
        attention_mask = attention_mask.to(self._device)
        position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        out = self._forward(input_ids, attention_mask, position_ids, DynamicCache(config=self.config))
        hf_cache = architectures.output_cache(out)
        return PromptCache(input_ids=input_ids, attention_mask=attention_mask,
                           next_token_logits=out.logits[:, -1].float(), layers=hf_caches.from_hf(hf_cache),
                           model=self.info.identity, pad_token_id=_pad_id(self.config, self.tokenizer))

    def start(self, cache: PromptCache, max_new_tokens: int) -> None:
        """Take a cache already cast and moved to this runner's dtype and device."""
        self._hf_cache = hf_caches.to_hf_cache(cache, self.config)
        self._mask = cache.attention_mask.to(self._device)
        self._positions = cache.positions.to(self._device).view(-1, 1)
        self._ones = torch.ones_like(self._mask[:, :1])

    @torch.inference_mode()
    def decode_step(self, tokens: torch.Tensor) -> torch.Tensor:
        self._mask = torch.cat([self._mask, self._ones], dim=1)
        mask = self._mask if self.arch.mask_during_decode else None
        out = self._forward(tokens.view(-1, 1), mask, self._positions, self._hf_cache)
        self._positions = self._positions + 1
        return out.logits[:, -1]

    def synchronize(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    def reset_peak_memory(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self._device)
        else:
            from portable.environment import reset_peak_rss

            reset_peak_rss()

    def peak_memory_bytes(self) -> int:
        if self._device.type == "cuda":
            return torch.cuda.max_memory_allocated(self._device)
        from portable.environment import peak_rss_bytes

        return peak_rss_bytes()


def _pad_id(config, tokenizer) -> int:
    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(config, "pad_token_id", None),
                      getattr(tokenizer, "eos_token_id", None), getattr(config, "eos_token_id", None)):
        if isinstance(candidate, list):
            candidate = candidate[0] if candidate else None
        if candidate is not None:
            return int(candidate)
    return 0


def timed(fn, sync):
    """Run fn() between two synchronisations; returns (result, seconds)."""
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return result, time.perf_counter() - start
