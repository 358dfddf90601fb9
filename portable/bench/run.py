"""Executing a sweep: load each runner once, measure every point with warm-up and repetitions, keep every sample.

For each point: `warmup` untimed repetitions, then `repetitions` timed ones, each exactly as follows.

    ppN      prompt ids ready on the host -> [sync] prefill forward [sync]                       sample = that
    tgN      1-token prompt prefilled (or, for tgN@dD, the D-token cache file reloaded and placed on the device:
             untimed) -> decode loop: N steps, each forward + greedy argmax on the device, tokens read back every
             `sync_every` steps with a synchronisation before each chunk (generation.run_decode)
                                                                                                 sample = N steps
    pgP,G    [sync] prefill forward [sync] -> decode loop (cache hand-over to the runner, G - 1 steps) [sync]
                                                                                                 sample = all of it

Not timed: building prompt ids, loading the model, graph capture and kernel compilation (the warm-up pays them),
reloading a depth cache, host bookkeeping between decode chunks. EOS is ignored so every repetition has its full
length. Peak memory is reset after the warm-up; on CPU it is the process's peak RSS from then on (Linux; elsewhere
the peak of the whole process, which cannot be reset).

A point that runs out of memory (GPU or CPU) becomes a row with status "oom"; larger batches of the same test are
then "skipped" (they would run out too) and the sweep goes on. A user error (e.g. a backend not available here)
makes its rows "error". Any other exception is likely a bug: its point becomes an "error" row whose reason starts
"unexpected" (`failed_unexpectedly`), the sweep goes on, and the CLI exits 1 after reporting every row.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

import backends
from caches import load_cache, save_cache
from portable import models
from portable.bench import device as dev
from portable.bench import roofline
from portable.bench.plan import GPU_BACKENDS, LoadKey, RunPoint, plan
from portable.bench.result import Result
from portable.bench.spec import SweepSpec, TestSpec
from portable.config import RunConfig
from portable.environment import environment
from portable.errors import PortableError
from portable.generation import Stopper, run_decode
from portable.metrics import decode_metrics, percentile, prefill_metrics
from portable.sampling import Sampler

# Fixed-length runs: no EOS, no stop strings, no text.
STOPPER = Stopper(tokenizer=None)
PROFILE_STEPS = 8  # decode steps in a --profile trace

Progress = Callable[[str, int], None]  # (label, repetitions done)


@dataclass
class Rep:
    """One repetition's measurements."""

    sample_s: float  # the test's timed region
    prefill_s: float | None = None
    step_s: list[float] = field(default_factory=list)
    step_tokens: list[int] = field(default_factory=list)
    generated: int = 0  # new tokens of the whole batch
    cache_load_s: float | None = None


def prompt(config, batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random token ids [batch, length] and an all-ones mask; a 1-token prompt is the BOS token (seed 000).
    Every engine of a point gets the same ids."""
    text = config.get_text_config(decoder=True)
    bos = getattr(text, "bos_token_id", None)
    if length == 1 and isinstance(bos, int):
        ids = torch.full((batch, 1), bos, dtype=torch.long)
    else:
        vocab = text.vocab_size
        low = min(10, vocab - 1)
        ids = torch.randint(low, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
    return ids, torch.ones_like(ids)


def planned_repetitions(spec: SweepSpec, peers=None) -> int:
    """The progress bar's total: every warm-up and timed repetition of ours and of each peer."""
    return sum(len(points) * (spec.warmup + spec.repetitions) *
               (1 + (peers.count_for(key.backend, key.precision) if peers else 0)) for key, points in plan(spec))


class PointMeasure:
    """The repetitions of one point on one loaded runner."""

    def __init__(self, runner, point: RunPoint, seed: int, workdir: Path):
        self.runner = runner
        self.point = point
        self.test = point.test
        self.batch = point.batch
        self.seed = seed
        self.cost: roofline.CostModel | None = None
        # a runner that streams other bytes than its module's parameters says so (the int8 CUDA fast path)
        self.weights = (runner.weight_bytes(self.batch) if hasattr(runner, "weight_bytes") else
                        roofline.weight_bytes(getattr(runner, "model", None)))
        self.depth_file: Path | None = None
        if self.test.kind == "tg" and self.test.depth:
            self.depth_file = workdir / f"depth-{self.test.depth}-b{self.batch}.safetensors"
            cache, _ = self._prefill(*prompt(runner.config, self.batch, self.test.depth, seed))
            save_cache(cache.to("cpu"), self.depth_file)  # prefilled once, reloaded for each repetition
            del cache

    def _prefill(self, ids, mask):
        self.runner.synchronize()
        start = time.perf_counter()
        cache = self.runner.prefill(ids, mask)
        self.runner.synchronize()
        return cache, time.perf_counter() - start

    def _note_cost(self, cache) -> None:
        """The cost model, read off the first cache this point makes (outside any timed region)."""
        if self.cost is None:
            self.cost = roofline.CostModel.of(self.weights, cache)

    def _decode(self, cache, test: TestSpec):
        new_tokens = test.n_gen + 1 if test.kind == "tg" else test.n_gen
        return run_decode(self.runner, cache, Sampler(test.sampling, self.batch), new_tokens, STOPPER,
                          sync_every=self.point.sync_every)

    def _start_cache(self):
        """The cache a tg test decodes from, and the seconds spent reloading it (None without a depth)."""
        if self.depth_file is None:
            cache, _ = self._prefill(*prompt(self.runner.config, self.batch, 1, self.seed))
            return cache, None
        start = time.perf_counter()
        cpu = load_cache(self.depth_file)
        cache = (self.runner.place_cache(cpu) if hasattr(self.runner, "place_cache")
                 else cpu.to(self.runner.device, self.runner.dtype))
        self.runner.synchronize()
        return cache, time.perf_counter() - start

    def once(self, test: TestSpec | None = None) -> Rep:
        test = test or self.test
        if test.kind == "pp":
            ids, mask = prompt(self.runner.config, self.batch, test.n_prompt, self.seed)
            cache, seconds = self._prefill(ids, mask)
            self._note_cost(cache)
            return Rep(sample_s=seconds, prefill_s=seconds)
        if test.kind == "tg":
            cache, load_s = self._start_cache()
            self._note_cost(cache)
            result = self._decode(cache, test)
            if len(result.step_times_s) != test.n_gen:
                raise RuntimeError(f"{test.name}: the decode loop ran {len(result.step_times_s)} steps")
            return Rep(sample_s=sum(result.step_times_s), step_s=result.step_times_s,
                       step_tokens=result.step_tokens, generated=sum(result.step_tokens), cache_load_s=load_s)
        ids, mask = prompt(self.runner.config, self.batch, test.n_prompt, self.seed)
        self.runner.synchronize()
        start = time.perf_counter()
        cache, prefill_s = self._prefill(ids, mask)
        result = self._decode(cache, test)
        self.runner.synchronize()
        seconds = time.perf_counter() - start
        self._note_cost(cache)
        return Rep(sample_s=seconds, prefill_s=prefill_s, step_s=result.step_times_s,
                   step_tokens=result.step_tokens, generated=sum(result.new_tokens))


def _median_rep(reps: list[Rep]) -> Rep:
    """The repetition of median time; for an even count, the mean of the two middle ones (as `statistics.median`
    takes for median t/s), so that a row's BPS, decode t/s, E2E t/s and GB/s agree with its median t/s."""
    ordered = sorted(reps, key=lambda r: r.sample_s)
    mid = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[mid]
    a, b = ordered[mid - 1], ordered[mid]

    def mean(x, y):
        return None if x is None or y is None else (x + y) / 2

    return Rep(sample_s=(a.sample_s + b.sample_s) / 2, prefill_s=mean(a.prefill_s, b.prefill_s),
               step_s=[(x + y) / 2 for x, y in zip(a.step_s, b.step_s)], step_tokens=a.step_tokens,
               generated=a.generated, cache_load_s=mean(a.cache_load_s, b.cache_load_s))


def summarize(result: Result, reps: list[Rep], test: TestSpec, batch: int, cost, peak_gbps: float | None) -> None:
    """Fill a result's statistics from its timed repetitions."""
    result.tokens = test.counted_tokens(batch)
    result.set_samples([r.sample_s for r in reps])
    mid = _median_rep(reps)
    if test.kind == "pp":
        m = prefill_metrics(mid.sample_s, batch, test.n_prompt, batch * test.n_prompt)
        result.bps, result.sps = m.bps, m.sps
    prefills = [r.prefill_s for r in reps if r.prefill_s is not None]
    if prefills and test.kind != "tg":
        result.ttft_ms = statistics.median(prefills) * 1e3
    steps = [s for r in reps for s in r.step_s]
    if steps:
        result.step_ms = [[s * 1e3 for s in r.step_s] for r in reps]
        result.step_p50_ms = percentile([s * 1e3 for s in steps], 50)
        result.step_p95_ms = percentile([s * 1e3 for s in steps], 95)
        d = decode_metrics(mid.step_s, batch, mid.step_tokens)
        result.decode_tps = d.tps
        if test.kind == "tg":
            result.bps, result.sps = d.bps, d.sps
    if test.kind == "pg":
        result.e2e_tps = mid.generated / max(mid.sample_s, 1e-12)
    loads = [r.cache_load_s for r in reps if r.cache_load_s is not None]
    if loads:
        result.depth_cache_load_s = statistics.median(loads)
    if cost is not None:
        result.kv_cache_mb = cost.kv_bytes(test.final_positions) / 1e6
        if cost.weights is not None:
            result.weights_mb = cost.weights / 1e6
        read = cost.read_bytes(test.start_tokens, test.decode_steps)
        if read is not None and mid.step_s:
            result.read_per_step_mb = read / test.decode_steps / 1e6
            result.gbps = read / max(sum(mid.step_s), 1e-12) / 1e9
            if peak_gbps:
                result.peak_gbps = peak_gbps
                result.pct_peak = 100 * result.gbps / peak_gbps


def base_result(point: RunPoint, spec: SweepSpec, engine: str = "portable") -> Result:
    t, k = point.test, point.key
    return Result(test=t.name, config=t.config, engine=engine, model=k.model, backend=k.backend,
                  precision=k.precision, attn=k.attn,
                  kernels=k.kernels if k.backend in GPU_BACKENDS else None, batch=point.batch, threads=point.threads,
                  n_prompt=t.n_prompt, n_gen=t.n_gen, depth=t.depth, sampling=t.sampling.describe(),
                  sync_every=point.sync_every, warmup=spec.warmup)


def parity_note(source: models.ModelSource) -> str:
    if source.kind == "preset":
        return f"meaningless: {source.spec} has random weights (no verdict)"
    return "not checked by bench (portable decode gives the verdict)"


UNEXPECTED = "unexpected "  # how the reason of an error row that is not a user error begins


def _fail(result: Result, error: Exception) -> Result:
    """Mark a result "oom" or "error" with a one-line reason."""
    oom = dev.is_out_of_memory(error)
    result.status = "oom" if oom else "error"
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if not (oom or isinstance(error, PortableError)):
        reason = f"{UNEXPECTED}{type(error).__name__}: {reason}"
    result.error = reason[:300]
    return result


def failed_unexpectedly(result: Result) -> bool:
    """One of our points failed with an exception that is neither a user error nor out of memory (likely a bug)."""
    return result.engine == "portable" and result.status == "error" and (result.error or "").startswith(UNEXPECTED)


def measure(runner, point: RunPoint, spec: SweepSpec, workdir: Path, peak_gbps: float | None,
            progress: Progress) -> Result:
    """One point on a loaded runner: warm-up, timed repetitions, statistics, and the --profile trace."""
    result = base_result(point, spec)
    m = PointMeasure(runner, point, spec.seed, workdir)
    try:
        _repeat(m, runner, point, spec, result, peak_gbps, progress)
    finally:
        if m.depth_file is not None:
            m.depth_file.unlink(missing_ok=True)  # a depth cache of a large batch is large: one at a time on disk
    return result


def _repeat(m: PointMeasure, runner, point: RunPoint, spec: SweepSpec, result: Result, peak_gbps: float | None,
            progress: Progress) -> None:
    for _ in range(spec.warmup):
        m.once()
        progress(point.label, 1)
    runner.synchronize()
    runner.reset_peak_memory()
    reps = []
    for _ in range(spec.repetitions):
        reps.append(m.once())
        progress(point.label, 1)
    runner.synchronize()
    result.peak_memory_mb = runner.peak_memory_bytes() / 1e6
    summarize(result, reps, point.test, point.batch, m.cost, peak_gbps)
    if spec.profile_dir is not None:
        from portable.bench.profiling import trace

        short = point.test
        if short.kind != "pp":
            short = replace(short, n_gen=min(short.n_gen, PROFILE_STEPS))
            m.once(short)  # its own shape: graph capture happens here, not in the trace
        result.trace = str(trace(runner.device, lambda: m.once(short), spec.profile_dir, point))


def load_runner(key: LoadKey, spec: SweepSpec):
    source = models.resolve(key.model)
    backend = backends.require(key.backend, key.precision)
    config = RunConfig(model=key.model, backend=key.backend, precision=key.precision, device=spec.device,
                       attn=key.attn, kernels=key.kernels, compile=key.compile, ignore_eos=True, parity=False)
    return source, backend, backend.load(config, source)


def run_sweep(spec: SweepSpec, progress: Progress | None = None, peers=None, debug: bool = False) -> list[Result]:
    """Every point of the sweep, in plan order. `peers` (peers.Peers) adds peer rows after each of our points and
    our/peer ratios to ours. `debug` prints the traceback of each point that fails unexpectedly."""
    progress = progress or (lambda label, n: None)
    results: list[Result] = []
    threads_before = torch.get_num_threads()
    try:
        with tempfile.TemporaryDirectory(prefix="portable-bench-") as tmp:
            for key, points in plan(spec):
                results += _run_group(key, points, spec, Path(tmp), peers, progress, debug)
    finally:
        torch.set_num_threads(threads_before)
    return results


def _failed(result: Result, error: Exception, debug: bool) -> Result:
    _fail(result, error)
    if debug and failed_unexpectedly(result):
        traceback.print_exception(error)
    return result


def _run_group(key: LoadKey, points: list[RunPoint], spec: SweepSpec, workdir: Path, peers,
               progress: Progress, debug: bool) -> list[Result]:
    """The points of one loaded runner. After a failed point the runner is loaded afresh for the next point that
    runs: a failed allocation or a crash can leave it half-prepared (a static cache, a graph capture)."""
    results: list[Result] = []
    ours = spec.warmup + spec.repetitions
    theirs = ours * (peers.count_for(key.backend, key.precision) if peers else 0)
    runner = info = source = env = peak = None
    out_of_memory_at: dict[tuple, int] = {}
    for i, point in enumerate(points):
        family = (point.test, point.threads, point.sync_every)
        skip = family in out_of_memory_at
        if runner is None and not skip:
            try:
                source, backend, runner = load_runner(key, spec)
            except Exception as e:
                for rest in points[i:]:
                    result = _failed(base_result(rest, spec), e, debug and rest is point)
                    result.environment = environment()
                    results.append(result)
                    progress(rest.label, ours + theirs)
                return results
            info = runner.info
            env = {**environment(), "backend": backend.describe(), "runner": dict(info.details)}
            peak = roofline.remembered_peak(roofline.device_key(runner.device.type, info.device_name))
        if point.threads:
            torch.set_num_threads(point.threads)
        done = 0

        def counted(label: str, n: int) -> None:
            nonlocal done
            done += n
            progress(label, n)

        if skip:
            result = base_result(point, spec)
            result.status = "skipped"
            result.error = f"batch {out_of_memory_at[family]} already ran out of memory"
        else:
            try:
                result = measure(runner, point, spec, workdir, peak, counted)
            except Exception as e:
                result = _failed(base_result(point, spec), e, debug)
        progress(point.label, ours - done)
        _finish(result, info, source, env)
        results.append(result)
        if peers and result.ok:
            for peer in peers.measure(runner, point, spec, progress):
                _finish(peer, info, source, env)
                results.append(peer)
                if peer.ok and peer.tps_median:
                    result.vs_peer[peer.engine] = result.tps_median / peer.tps_median
        elif peers:
            progress(point.label, theirs)
        if runner is None:
            continue
        device = runner.device
        if result.status in ("oom", "error"):
            if result.status == "oom":
                out_of_memory_at[family] = point.batch
            runner = None  # loaded afresh for the next point that runs
            if peers:
                peers.release()
        dev.release_memory(device)
    if runner is not None:
        device, runner = runner.device, None
        if peers:
            peers.release()
        dev.release_memory(device)
    return results


def _finish(result: Result, info, source, env: dict) -> None:
    result.device = info.device_name
    if result.engine == "portable":
        result.model_load_s = info.model_load_s
        result.compile_s = info.compile_s
    result.parity = parity_note(source)
    result.environment = env
