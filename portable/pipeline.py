"""The two jobs: `prefill` (prompts -> cache file) and `decode` (cache file -> tokens, parity verdict, metrics).

Each takes one `RunConfig` and returns a report; printing is the CLI's business. Order of work in decode: check the
cache file's header (cheap, fails fast), load the model, read and verify the cache (checksum, structure, model
fingerprint), one warm-up step (untimed), decode (timed), then the parity comparison (untimed).
The prefill is timed after one untimed warm-up pass on every backend.
"""

from __future__ import annotations

import time
from warnings import catch_warnings, simplefilter
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

import backends
from caches import PromptCache, check_writable, load_cache, read_metadata, save_cache
from caches import hf as hf_caches
from portable import models, parity
from portable.config import RunConfig
from portable.environment import environment
from portable.errors import CacheFileError, PortableError
from portable.generation import Stopper, run_decode
from portable.metrics import PhaseMetrics, decode_metrics, end_to_end_metrics, prefill_metrics
from portable.report import DecodeReport, PrefillReport, Timing
from portable.sampling import Sampler


def tokenize(tokenizer, prompts: list[str], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded token ids and attention mask [batch, seq]."""
    if tokenizer is None:
        from portable.presets import ByteTokenizer

        tokenizer = ByteTokenizer()
    rows = [tokenizer(p)["input_ids"] for p in prompts]  # with the special tokens the model expects (BOS)
    if any(not r for r in rows):
        raise PortableError("a prompt is empty (it has no tokens); give some text with --prompt")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[b, width - len(r):] = 1
    return ids, mask


def check_context(model_config, prompt_tokens: int, max_new_tokens: int = 0) -> None:
    """Refuse to run past the model's context (`max_position_embeddings`): a learned position table (GPTBigCode) fails
    there with an IndexError, rotary models go on in silence at positions they never saw. Decoding n tokens after p
    feeds positions up to p + n - 2 (the first new token comes from the prefill's logits)."""
    limit = getattr(model_config, "max_position_embeddings", None)
    if not isinstance(limit, int):  # no position limit (Mamba)
        return
    if prompt_tokens > limit:
        raise PortableError(f"the prompt is {prompt_tokens} tokens, more than the model's context of {limit} "
                            f"(max_position_embeddings); give a shorter prompt")
    if max_new_tokens and prompt_tokens + max_new_tokens - 1 > limit:
        raise PortableError(f"{max_new_tokens} new tokens after a {prompt_tokens}-token prompt run past the model's "
                            f"context of {limit} (max_position_embeddings); at most {limit - prompt_tokens + 1} fit")


def batch_prompts(prompts: tuple[str, ...], batch: int) -> list[str]:
    """One prompt repeated `batch` times, or several prompts (then batch must be 1 or their number)."""
    if len(prompts) == 1:
        return list(prompts) * batch
    if batch not in (1, len(prompts)):
        raise PortableError(f"{len(prompts)} prompts were given but --batch is {batch}; give one prompt to repeat, "
                            f"or as many prompts as the batch")
    return list(prompts)


def _sync(runner) -> Callable[[], None]:
    return runner.synchronize


def prefill(config: RunConfig) -> PrefillReport:
    check_writable(config.cache_path)
    source = models.resolve(config.model)
    backend = backends.require(config.backend, config.precision)
    runner = backend.load(config, source)
    prompts = batch_prompts(config.prompts, config.batch)
    pad_id = _pad_id(runner)
    ids, mask = tokenize(runner.tokenizer, prompts, pad_id)
    check_context(runner.config, ids.shape[1])
    # warm-up on every backend: kernel selection, lazy initialisation and allocator growth stay out of the timing (a
    # first CPU forward of the default model took ~1.7x a warm one; an ONNX Runtime runner says "cpu" on any provider)
    runner.prefill(ids, mask)
    runner.synchronize()
    runner.reset_peak_memory()
    start = time.perf_counter()
    cache = runner.prefill(ids, mask)
    runner.synchronize()
    seconds = time.perf_counter() - start
    metrics = prefill_metrics(seconds, ids.shape[0], ids.shape[1], int(mask.sum()))
    cache.model = runner.info.identity
    cache.pad_token_id = pad_id
    cache.prefill = {"backend": runner.info.backend, "precision": config.precision, "device": runner.info.device,
                     "device_name": runner.info.device_name, "attn": config.attn, "timing": asdict(metrics),
                     "environment": {k: v for k, v in environment().items() if k in ("portable", "torch", "commit")}}
    cpu_cache = cache.to("cpu")
    saved = save_cache(cpu_cache, config.cache_path, storage=config.cache_storage)
    return PrefillReport(
        model=source.spec, backend=runner.info.backend, precision=config.precision, device=runner.info.device,
        batch=ids.shape[0], prompt_tokens=mask.sum(-1).tolist(),
        cache={"path": str(config.cache_path), "bytes": saved["bytes"], "kv_cache_bytes": cpu_cache.kv_nbytes,
               "seq_len": cpu_cache.seen_tokens, "layers": len(cpu_cache.layers),
               "kinds": sorted(set(cpu_cache.kinds())), "dtype": str(cpu_cache.dtype).removeprefix("torch."),
               "storage": config.cache_storage},
        next_tokens=cpu_cache.next_token_logits.argmax(-1).tolist(),
        timing=Timing(prefill=metrics, model_load_s=runner.info.model_load_s, cache_save_s=saved["seconds"],
                      compile_s=runner.info.compile_s, save_s=runner.info.save_s, load_s=runner.info.load_s,
                      artifact_reused=runner.info.artifact_reused),
        peak_memory_bytes=runner.peak_memory_bytes(), environment=environment(),
        warnings=[] if runner.tokenizer is not None else [
            f"{source.display} has no tokenizer files: the prompt went in as byte values (ids 0-255), not as the "
            f"model's tokens"])


def _pad_id(runner) -> int:
    from backends.hf_torch import _pad_id as pad_id

    return pad_id(runner.config, runner.tokenizer)


def check_identity(cache: PromptCache, loaded: dict, force: bool) -> list[str]:
    """Refuse a cache from another model or tokenizer unless forced; returns warnings for forced mismatches."""
    warnings = []
    recorded = cache.model
    for key, what in (("fingerprint", "model weights"), ("tokenizer_fingerprint", "tokenizer")):
        a, b = recorded.get(key), loaded.get(key)
        if a and b and a != b:
            message = (f"the cache was made with different {what} ({recorded.get('source')}: {a}) than the loaded "
                       f"model ({loaded.get('source')}: {b})")
            if key == "fingerprint" and models.older_fingerprint(a) and not models.older_fingerprint(b):
                message = (f"the cache's model fingerprint {a} is of the sampled kind older versions wrote, which "
                           f"cannot be compared with this version's full one ({b}); prefill it again to have it "
                           f"checked")
            if not force:
                raise CacheFileError(message + "; pass --force to decode it anyway")
            warnings.append(message)
    return warnings


def _eos_ids(runner) -> frozenset[int]:
    ids = set()
    generation = getattr(runner.model, "generation_config", None) if hasattr(runner, "model") else None
    for holder in (runner.config, generation or getattr(runner, "generation_config", None), runner.tokenizer):
        value = getattr(holder, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)


def make_stopper(runner, config: RunConfig) -> Stopper:
    """Stop strings are found in the decoded text: without a tokenizer there is none, so they are refused rather than
    ignored (the report's text, ids joined by spaces, would still be cut at them)."""
    if config.stop and runner.tokenizer is None:
        raise PortableError("--stop needs the model's tokenizer to read the generated text, and the model has no "
                            "tokenizer files; leave --stop out or give a model folder with its tokenizer")
    return Stopper(tokenizer=runner.tokenizer, eos_ids=frozenset() if config.ignore_eos else _eos_ids(runner),
                   stop_strings=config.stop)


def reference_decode(cache_cpu: PromptCache, source: models.ModelSource, config: RunConfig,
                     cache_checksum: str | None) -> parity.Reference:
    """CPU FP32 decoding of `cache_cpu` with the run's sampling: the parity reference. A cache stored lossily (int8
    keys/values) is not its own reference: the prompt is prefilled again here in FP32 from the file's token ids, so
    that the verdict shows what the storage cost, like any other precision choice."""
    ref_config = config.replace(backend="cpu", precision="fp32", attn="sdpa")
    runner = backends.resolve("cpu").load(ref_config, source)
    cache = cache_cpu.to("cpu", torch.float32)
    hf_caches.check_compatible(cache, runner.config)
    check_context(runner.config, cache.seen_tokens, config.max_new_tokens)
    check_identity(cache_cpu, runner.info.identity, config.force)  # a reference from other weights is no reference
    if lossy_storage(cache_cpu):
        cache = runner.prefill(cache_cpu.input_ids, cache_cpu.attention_mask)
    result = run_decode(runner, cache, Sampler(config.sampling, cache.batch), config.max_new_tokens,
                        make_stopper(runner, config), collect_logits=True)
    return parity.reference_from(result, config, cache_checksum, runner.info.identity.get("fingerprint"))


def lossy_storage(cache: PromptCache) -> str | None:
    """The storage of a cache file whose keys/values are not kept as computed (int8), else None."""
    storage = cache.file_info.get("storage", "native")
    return None if storage == "native" else storage


def int8_scheme(backend: str) -> str:
    """What `--precision int8` means on `backend`: "weight-only" (the GPU backends: int8 weight rows, bf16
    activations) or "dynamic" (ONNX Runtime: int8 weights, activations quantized per call)."""
    return getattr(backends.resolve(backend), "int8_scheme", "dynamic")


def _calibrate(cache_cpu: PromptCache, source, config: RunConfig, reference: parity.Reference,
               scheme: str = "dynamic") -> torch.Tensor:
    """Teacher-forced logits of the pristine model on CPU at the candidate's precision (parity's tolerance); for
    int8 the CPU model is quantized by the candidate's `scheme`."""
    weight_only = config.precision == "int8" and scheme == "weight-only"
    precision = "bf16" if weight_only else config.precision if config.precision in ("fp16", "bf16") else "fp32"
    runner = backends.resolve("cpu").load(config.replace(backend="cpu", precision=precision, attn="sdpa"), source)
    if weight_only:  # the same int8 rows as the GPU fast path, dequantized into the bf16 weights
        from backends import quantize

        quantize.quantize_linears_(runner.model)
    elif config.precision == "int8":  # per output channel, as ONNX Runtime's int8 weights (backends/onnxruntime.py)
        qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
        with catch_warnings():  # torch.ao announces its move to torchao on every call: not the user's concern
            simplefilter("ignore")
            torch.ao.quantization.quantize_dynamic(runner.model, {torch.nn.Linear: qconfig}, dtype=torch.qint8,
                                                   inplace=True)
    cache = cache_cpu.to("cpu", runner.dtype)
    out = run_decode(runner, cache, Sampler(config.sampling, cache.batch), config.max_new_tokens,
                     make_stopper(runner, config), forced=reference.tokens, collect_logits=True)
    return out.logits


@dataclass
class Baseline:
    """The CPU side of parity for one cache file, shared by every candidate decoded from it: the FP32 reference, and
    per candidate precision the pristine model's teacher-forced logits (the tolerance), each computed at most once.

    `config` holds what the candidates share with the reference: sampling, max_new_tokens, stop conditions.
    """

    cache_cpu: PromptCache
    source: models.ModelSource
    config: RunConfig
    reference: parity.Reference
    _calibrated: dict = field(default_factory=dict, repr=False)

    def calibration(self, precision: str, backend: str = "cpu") -> Callable[[], torch.Tensor]:
        """A function returning the calibration logits for `precision` on `backend` (int8 differs by backend);
        parity calls it only when it needs them."""
        scheme = int8_scheme(backend) if precision == "int8" else ""
        key = (precision, scheme)

        def get() -> torch.Tensor:
            if key not in self._calibrated:
                self._calibrated[key] = _calibrate(self.cache_cpu, self.source, self.config.replace(
                    precision=precision), self.reference, scheme or "dynamic")
            return self._calibrated[key]
        return get


def make_baseline(cache_cpu: PromptCache, source: models.ModelSource, config: RunConfig,
                  model_fingerprint: str | None = None) -> Baseline:
    """The reference from `config.reference_path` when given (checked against this run: cache file, the loaded
    model's `model_fingerprint`, sampling, stop conditions), else CPU FP32 decoding here."""
    checksum = cache_cpu.file_info.get("payload_crc32")
    if config.reference_path is not None:
        reference = parity.Reference.load(config.reference_path)
        reference.check_matches(checksum, config, model_fingerprint)
        reference = _trim(reference, config.max_new_tokens)
    else:
        reference = reference_decode(cache_cpu, source, config, checksum)
    return Baseline(cache_cpu, source, config, reference)


def decode(config: RunConfig, on_tokens: Callable[[int, list[int | None]], None] | None = None,
           on_ready: Callable[[object], None] | None = None, runner=None,
           baseline: Baseline | None = None) -> DecodeReport:
    """Decode `config.cache_path` on `config.backend`. `runner`: one already loaded for this backend and precision;
    `baseline`: the CPU side of parity for this cache file, already computed (`portable parity` passes both to
    reuse them across its matrix)."""
    meta = read_metadata(config.cache_path)
    source = models.resolve(config.model or meta["model"].get("source"))
    if runner is None:
        runner = backends.require(config.backend, config.precision).load(config, source)
    if on_ready is not None:
        on_ready(runner)

    start = time.perf_counter()
    cache_cpu = load_cache(config.cache_path)
    hf_caches.check_compatible(cache_cpu, runner.config)
    check_context(runner.config, cache_cpu.seen_tokens, config.max_new_tokens)
    warnings = check_identity(cache_cpu, runner.info.identity, config.force) + _parity_scope(cache_cpu, config)
    cache = runner.place_cache(cache_cpu) if hasattr(runner, "place_cache") else cache_cpu.to(runner.device,
                                                                                                runner.dtype)
    runner.synchronize()
    cache_load_s = time.perf_counter() - start
    cast = cache_cpu.file_info["cast"] or (
        f"{cache_cpu.file_info['stored_dtype']} -> {str(runner.dtype).removeprefix('torch.')}"
        if cache_cpu.dtype != runner.dtype else None)

    stopper = make_stopper(runner, config)
    _warm_up_step(runner, cache, config.max_new_tokens)
    runner.reset_peak_memory()
    result = run_decode(runner, cache, Sampler(config.sampling, cache.batch), config.max_new_tokens, stopper,
                        on_tokens=on_tokens, sync_every=config.sync_every)
    runner.synchronize()
    peak = runner.peak_memory_bytes()
    decode_phase = decode_metrics(result.step_times_s, cache.batch, result.step_tokens)

    parity_start = time.perf_counter()
    verdict = _parity(config, source, runner, cache, cache_cpu, result, stopper, baseline)
    parity_s = time.perf_counter() - parity_start if verdict.verdict != "skipped" else None

    prefill_timing = cache_cpu.prefill.get("timing")
    prefill_phase = PhaseMetrics(**prefill_timing) if prefill_timing else None
    info = runner.info
    return DecodeReport(
        model=source.spec, backend=info.backend, precision=config.precision, device=info.device, batch=cache.batch,
        prompt_tokens=cache_cpu.prompt_lengths, new_tokens=result.new_tokens, tokens=result.tokens,
        text=[stopper.final_text(t) for t in result.tokens], finish_reasons=result.finish_reasons,
        timing=Timing(prefill=prefill_phase, decode=decode_phase, decode_step_ms=[s * 1e3 for s in result.step_times_s],
                      end_to_end=end_to_end_metrics(prefill_phase, result.step_times_s, cache.batch, result.new_tokens)
                      if prefill_phase and any(result.new_tokens) else None,
                      model_load_s=info.model_load_s, cache_load_s=cache_load_s, compile_s=info.compile_s,
                      save_s=info.save_s, load_s=info.load_s, artifact_reused=info.artifact_reused,
                      parity_s=parity_s),
        kv_cache_bytes=cache_cpu.kv_nbytes, peak_memory_bytes=peak, parity=verdict,
        sampling={**asdict(config.sampling), "mode": config.sampling.describe()},
        cache={**{k: v for k, v in cache_cpu.file_info.items() if k not in ("read_s", "load_s")}, "cast": cast,
               "made_by": {k: cache_cpu.prefill.get(k) for k in ("backend", "precision", "device", "device_name")},
               "warnings": warnings},
        backend_details={"device_name": info.device_name, "sync_every": config.sync_every, **info.details,
                         **({"int8_scheme": int8_scheme(config.backend)} if config.precision == "int8" else {})},
        environment=environment())


def _parity_scope(cache: PromptCache, config: RunConfig) -> list[str]:
    """A cache prefilled below FP32 is the reference's starting point too (only int8 storage is prefilled again): say
    that the verdict then leaves the prefill's rounding out."""
    made = cache.prefill.get("precision")
    if not config.parity or made in (None, "fp32") or lossy_storage(cache):
        return []
    return [f"the cache was prefilled at {made}: parity compares this decode with CPU FP32 decoding from the same "
            f"file, so the prefill's own rounding is not judged (prefill at fp32 to include it)"]


def _warm_up_step(runner, cache: PromptCache, max_new_tokens: int) -> None:
    """One untimed decode step, so that the timed steps do not include a first call's one-time costs (lazy
    initialisation, kernel loading, allocator growth: on CPU the first step of the default model took ~2x a later
    one). `start` and `decode_step` leave `cache` as it was (the parity run after the timed one relies on that too),
    so the timed run starts from the same state."""
    if max_new_tokens < 2:  # no decode step is timed
        return
    runner.start(cache, max_new_tokens)
    runner.decode_step(cache.next_token_logits.argmax(-1).to(runner.device))
    runner.synchronize()


def _parity(config: RunConfig, source, runner, cache, cache_cpu: PromptCache, result, stopper,
            baseline: Baseline | None) -> parity.ParityResult:
    if not config.parity:
        return parity.skipped("disabled with --no-parity")
    if source.kind == "preset":
        return parity.skipped("random weights (preset model): parity is meaningless")
    fingerprint = runner.info.identity.get("fingerprint")
    if baseline is None:
        baseline = make_baseline(cache_cpu, source, config, fingerprint)
    else:
        baseline.reference.check_matches(cache_cpu.file_info.get("payload_crc32"), config, fingerprint)
    reference = baseline.reference
    teacher = run_decode(runner, cache, Sampler(config.sampling, cache.batch), config.max_new_tokens, stopper,
                         forced=reference.tokens, collect_logits=True)
    histories = [cache_cpu.prompt_tokens(b) for b in range(cache_cpu.batch)]
    decode_text = (lambda ids: runner.tokenizer.decode(ids)) if runner.tokenizer is not None else None
    return parity.compare(reference, result, teacher, config.precision, histories,
                          calibrate=baseline.calibration(config.precision, config.backend), decode_text=decode_text,
                          storage=lossy_storage(cache_cpu) or "native")


def _trim(reference: parity.Reference, max_new_tokens: int) -> parity.Reference:
    tokens = [t[:max_new_tokens] for t in reference.tokens]
    return parity.Reference(tokens=tokens, finish_reasons=reference.finish_reasons,
                            logits=reference.logits[:, :max_new_tokens], sampling=reference.sampling,
                            max_new_tokens=max_new_tokens, cache_checksum=reference.cache_checksum,
                            model_fingerprint=reference.model_fingerprint, stopping=reference.stopping)
