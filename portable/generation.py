"""The decode loop, the same for every backend.

    token 0      picked from the cache file's `next_token_logits` (the prefill's output; no forward here)
    token i > 0  runner.decode_step(token i-1) -> logits -> pick

Timed region: each `decode_step` plus the pick, bracketed by host clocks; when the pick happens on the device
(greedy) and tokens are read back every `sync_every` steps, a chunk's time is shared evenly by its steps (a runner
with `greedy_steps` runs such a chunk with the pick inside its step).
Not timed: detokenization, stop-string checks and streaming (`on_tokens`), which run between steps.

A sequence finishes at EOS (unless `ignore_eos`) or when its text contains a stop string; finished sequences keep
being fed (the batch runs until all are done) but their later tokens are dropped and not counted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from caches import PromptCache
from portable.sampling import Sampler


@dataclass
class Stopper:
    """Decides when a sequence is finished and what text it produced."""

    tokenizer: object | None
    eos_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()

    def text(self, tokens: list[int]) -> str:
        if self.tokenizer is None:
            return " ".join(str(t) for t in tokens)
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def check(self, tokens: list[int]) -> str | None:
        if tokens and tokens[-1] in self.eos_ids:
            return "eos"
        if self.stop_strings and self.tokenizer is not None:
            text = self.text(tokens)
            if any(s in text for s in self.stop_strings):
                return "stop"
        return None

    def final_text(self, tokens: list[int]) -> str:
        """The generated text, cut before the first stop string."""
        text = self.text(tokens)
        cut = min((i for i in (text.find(s) for s in self.stop_strings) if i >= 0), default=len(text))
        return text[:cut]


@dataclass
class DecodeResult:
    tokens: list[list[int]]  # per sequence: generated ids, up to and including the one that finished it
    finish_reasons: list[str]  # "length" | "eos" | "stop"
    step_times_s: list[float] = field(default_factory=list)  # one per decode forward (timed region)
    step_tokens: list[int] = field(default_factory=list)  # real (counted) tokens each step produced
    first_pick_s: float = 0.0  # picking token 0 from the cache's logits
    logits: torch.Tensor | None = None  # [batch, n, vocab] float32 on the host, when collected
    picks: list[list[int]] | None = None  # teacher-forced runs: the candidate's own pick at each position

    @property
    def new_tokens(self) -> list[int]:
        return [len(t) for t in self.tokens]


def run_decode(runner, cache: PromptCache, sampler: Sampler, max_new_tokens: int, stopper: Stopper,
               forced: list[list[int]] | None = None, collect_logits: bool = False,
               on_tokens: Callable[[int, list[int | None]], None] | None = None,
               sync_every: int = 1) -> DecodeResult:
    """Decode up to `max_new_tokens` per sequence from `cache` (already on the runner's device and dtype).

    With `forced`, the input at each step is the forced token (teacher forcing) instead of the runner's own pick;
    its picks are still recorded (`picks`) and its logits collected for comparison.
    """
    batch = cache.batch
    history = [cache.prompt_tokens(b) for b in range(batch)] if sampler.config.repetition_penalty != 1.0 else []
    tokens: list[list[int]] = [[] for _ in range(batch)]
    picks: list[list[int]] = [[] for _ in range(batch)]
    reasons: list[str | None] = [None] * batch
    collected: list[torch.Tensor] = []
    result = DecodeResult(tokens=tokens, finish_reasons=[])
    limit = max_new_tokens if forced is None else min(max_new_tokens, max(len(f) for f in forced))

    def record(new: list[int]) -> list[int]:
        """Append one token per sequence; return the tokens to feed next. Not timed."""
        emitted: list[int | None] = []
        for b, tok in enumerate(new):
            picks[b].append(tok)
            if reasons[b] is not None:
                emitted.append(None)
                continue
            token = forced[b][len(tokens[b])] if forced is not None else tok
            tokens[b].append(token)
            emitted.append(token)
            if forced is not None:
                if len(tokens[b]) >= len(forced[b]):
                    reasons[b] = "length"
            else:
                reasons[b] = stopper.check(tokens[b])
        if on_tokens is not None:
            on_tokens(len(picks[0]) - 1, emitted)
        return [tokens[b][-1] if tokens[b] else cache.pad_token_id for b in range(batch)]

    def active() -> int:
        return sum(r is None for r in reasons)

    start = time.perf_counter()
    first = sampler.pick(cache.next_token_logits, history)
    result.first_pick_s = time.perf_counter() - start
    if collect_logits:
        collected.append(cache.next_token_logits.detach().to("cpu", torch.float32))
    feed = record(first)
    if history:
        for b in range(batch):
            history[b].append(feed[b])

    runner.start(cache, max_new_tokens)
    device = runner.device
    current = torch.tensor(feed, dtype=torch.long, device=device)
    on_device = sampler.on_device and forced is None and not collect_logits
    greedy_steps = getattr(runner, "greedy_steps", None) if on_device else None  # optional: see backends/base.py
    n = 1
    while n < limit and active():
        if on_device:
            chunk = min(sync_every, limit - n)
            live = active()
            runner.synchronize()
            t0 = time.perf_counter()
            if greedy_steps is not None:  # the runner feeds each pick to the next step itself
                picked = greedy_steps(current, chunk)
            else:
                pending = []
                for _ in range(chunk):
                    current = sampler.pick_on_device(runner.decode_step(current))
                    pending.append(current)
                picked = torch.stack(pending, dim=1)
            current = picked[:, -1]
            host = picked.tolist()  # one transfer, one synchronisation per chunk
            dt = (time.perf_counter() - t0) / chunk
            for j in range(chunk):
                before = active() if j else live
                record([row[j] for row in host])
                result.step_times_s.append(dt)
                result.step_tokens.append(before)
            n += chunk
        else:
            live = active()
            t0 = time.perf_counter()
            logits = runner.decode_step(current)
            new = sampler.pick(logits, history)
            if collect_logits:
                collected.append(logits.detach().to("cpu", torch.float32))
            dt = time.perf_counter() - t0
            result.step_times_s.append(dt)
            result.step_tokens.append(live)
            feed = record(new)
            if history:
                for b in range(batch):
                    history[b].append(feed[b])
            current = torch.tensor(feed, dtype=torch.long, device=device)
            n += 1
    result.finish_reasons = [r or "length" for r in reasons]
    if collect_logits:
        result.logits = torch.stack(collected, dim=1)
    if forced is not None:
        result.picks = picks
    return result
