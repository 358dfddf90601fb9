"""Throughput and latency, with the definitions of the original prefill/decode tool (seed 002).

For one phase (prefill, or the decode steps):
    time per batch   seconds of one forward call (prefill: the whole prompt; decode: one step)
    time per token   time per batch / tokens each sequence advances in that call (prefill: prompt length; decode: 1)
    BPS              forward calls per second (batches per second)
    SPS              sequences per second = batch x BPS
    TPS              real tokens processed per second: padding and finished sequences are never counted
Decode adds the per-step latency percentiles P50 / P95 (milliseconds).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class PhaseMetrics:
    time_per_batch_s: float
    time_per_token_s: float
    bps: float
    sps: float
    tps: float
    calls: int = 1
    tokens: int = 0
    step_p50_ms: float | None = None
    step_p95_ms: float | None = None

    def line(self) -> str:
        text = (f"time per batch {self.time_per_batch_s * 1e3:.2f} ms | time per token "
                f"{self.time_per_token_s * 1e3:.2f} ms | BPS {self.bps:.1f} | SPS {self.sps:.1f} | TPS {self.tps:.1f}")
        if self.step_p50_ms is not None:
            text += f" | step P50 {self.step_p50_ms:.2f} ms P95 {self.step_p95_ms:.2f} ms"
        return text


def prefill_metrics(seconds: float, batch: int, seq_len: int, real_tokens: int) -> PhaseMetrics:
    seconds = max(seconds, 1e-9)
    return PhaseMetrics(time_per_batch_s=seconds, time_per_token_s=seconds / max(seq_len, 1), bps=1 / seconds,
                        sps=batch / seconds, tps=real_tokens / seconds, calls=1, tokens=real_tokens)


def decode_metrics(step_times_s: list[float], batch: int, step_tokens: list[int]) -> PhaseMetrics | None:
    """Metrics of the decode steps; `step_tokens[i]` is the number of real tokens step i produced."""
    if not step_times_s:
        return None
    total = max(sum(step_times_s), 1e-9)
    steps = len(step_times_s)
    per_step = total / steps
    ms = np.asarray(step_times_s) * 1e3
    return PhaseMetrics(time_per_batch_s=per_step, time_per_token_s=per_step, bps=steps / total,
                        sps=batch * steps / total, tps=sum(step_tokens) / total, calls=steps, tokens=sum(step_tokens),
                        step_p50_ms=float(np.percentile(ms, 50)), step_p95_ms=float(np.percentile(ms, 95)))


def end_to_end_metrics(prefill: PhaseMetrics, step_times_s: list[float], batch: int,
                       new_tokens: list[int]) -> PhaseMetrics:
    """Prompt to last token as one run with no file in between: the timed prefill (whose logits give each sequence's
    first new token) plus every decode step. Per token: over the longest sequence's new tokens; TPS: every sequence's
    new tokens over the whole time."""
    total = max(prefill.time_per_batch_s + sum(step_times_s), 1e-9)
    generated = sum(new_tokens)
    return PhaseMetrics(time_per_batch_s=total, time_per_token_s=total / max(max(new_tokens, default=0), 1),
                        bps=1 / total, sps=batch / total, tps=generated / total, calls=1, tokens=generated)


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values), q)) if values else None
