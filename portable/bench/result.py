"""The one result record: every output format (md, csv, json, jsonl) takes its columns from `Result`'s fields.

A field's metadata says how the md table shows it: `md` is the column header (no `md`: JSON/CSV only), `pm` names a
field printed after it as "± value", `ident` marks a column that identifies the point (shown in the table only when
it varies; a constant one goes to the line above the table). Times are seconds unless the name says ms.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field


def col(md: str | None = None, default=None, pm: str | None = None, ident: bool = False, digits: int = 2):
    return field(default=default, metadata={"md": md, "pm": pm, "ident": ident, "digits": digits})


@dataclass
class Result:
    # --- what ran
    test: str = col("test")  # pp512 | tg128 | pg512,128 | tg128@d4096
    config: str | None = col("config")  # the suite configuration (short, medium, ...), if any
    engine: str = col("engine", "portable", ident=True)  # "portable", or a peer: hf-dynamic, hf-static-compile
    model: str = col("model", "", ident=True)
    backend: str = col("backend", "", ident=True)
    precision: str = col("precision", "", ident=True)
    attn: str = col("attn", "", ident=True)
    kernels: str | None = col("kernels", "", ident=True)
    device: str = col("device", "", ident=True)  # the device's name (GPU model or CPU model)
    batch: int = col("batch", 1)
    threads: int | None = col("threads", ident=True)
    n_prompt: int = col(None, 0)  # prefill tokens per sequence (pp, pg)
    n_gen: int = col(None, 0)  # generated tokens per sequence (tg, pg)
    depth: int = col(None, 0)  # tokens in the cache a tg test starts from
    sampling: str = col("sampling", "greedy", ident=True)
    sync_every: int | None = col("sync", 1, ident=True)  # None for peers (they sync as generate does)
    status: str = col("status", "ok", ident=True)  # ok | oom | error | skipped
    error: str | None = col()
    # --- the test's own throughput, over `reps` repetitions after `warmup` untimed ones
    warmup: int = col(None, 0)
    reps: int = col(None, 0)
    samples_s: list[float] = col(default=None)  # the timed region of each repetition
    tokens: int = col(None, 0)  # tokens counted per repetition (pg: prompt + generated, as llama-bench)
    mean_s: float | None = col()
    stdev_s: float | None = col()
    median_s: float | None = col()
    tps_mean: float | None = col("t/s", pm="tps_stdev")  # per-repetition tokens/s: mean ± stdev
    tps_stdev: float | None = col()
    tps_median: float | None = col("median t/s")  # tokens / median time
    # --- seed 002 (prefill: one forward per batch; decode: one step per batch), at the median repetition
    bps: float | None = col("BPS")
    sps: float | None = col("SPS")
    # --- seed 003 (tests with a prefill and a generation: pg and the suites)
    ttft_ms: float | None = col("TTFT ms")  # median prefill time (the first token's logits)
    e2e_tps: float | None = col("E2E t/s")  # generated tokens / (prefill + generation), median repetition
    decode_tps: float | None = col("decode t/s")  # decode-step tokens / decode-step time, median repetition
    step_p50_ms: float | None = col("P50 ms")  # per decode step, over every step of every repetition
    step_p95_ms: float | None = col("P95 ms")
    step_ms: list[list[float]] | None = col()  # every decode step of every repetition
    kv_cache_mb: float | None = col("KV MB", digits=1)  # the KV cache at the final length
    peak_memory_mb: float | None = col("peak MB", digits=0)  # after the warm-up; GPU: peak allocated; CPU: peak RSS
    # --- bandwidth: bytes read per decode step (weights + KV) against the device's measured copy bandwidth
    weights_mb: float | None = col()
    read_per_step_mb: float | None = col()
    gbps: float | None = col("GB/s", digits=1)
    peak_gbps: float | None = col()
    pct_peak: float | None = col("% peak", digits=1)
    # --- getting ready (never part of a timed region)
    model_load_s: float | None = col()
    compile_s: float | None = col()
    depth_cache_load_s: float | None = col()  # median reload of the tg@d cache file
    parity: str = col(None, "")  # a note: bench gives no verdict
    vs_peer: dict[str, float] = col(default=None)  # our t/s / the peer's t/s, per peer engine
    trace: str | None = col()  # --profile: the Chrome trace of this point
    environment: dict = col(default=None)

    def __post_init__(self):
        if self.samples_s is None:
            self.samples_s = []
        if self.vs_peer is None:
            self.vs_peer = {}
        if self.environment is None:
            self.environment = {}

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def set_samples(self, samples: list[float]) -> None:
        """Record the repetitions' timed regions and their statistics (mean ± stdev, median) in seconds and t/s."""
        self.samples_s = list(samples)
        self.reps = len(samples)
        if not samples:
            return
        self.mean_s = statistics.fmean(samples)
        self.stdev_s = statistics.stdev(samples) if len(samples) > 1 else None  # one sample: spread unknown, not 0
        self.median_s = statistics.median(samples)
        rates = [self.tokens / max(s, 1e-12) for s in samples]
        self.tps_mean = statistics.fmean(rates)
        self.tps_stdev = statistics.stdev(rates) if len(rates) > 1 else None
        self.tps_median = self.tokens / max(self.median_s, 1e-12)
