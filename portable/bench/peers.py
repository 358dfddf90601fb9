"""Peers timed in the same run: `--compare hf` times Hugging Face `generate` on the same model, prompt ids, batch
and lengths as each of our points, and our rows get our/peer ratios of the test's tokens/s.

Engines: `hf-dynamic` (generate's default DynamicCache, eager PyTorch) everywhere; `hf-static-compile`
(`cache_implementation="static"`, which makes generate compile the decode forward with torch.compile) on GPUs only —
generate compiles only on accelerators, and on a CPU it would time the same eager code again.

Timed region: one whole `generate` call between two synchronisations (its tokenizer-free input is the same ids
tensor our point used; EOS is held off with `min_new_tokens`). Each test maps onto generate as:

    ppN      generate(N-token prompt, max_new_tokens=1): the prefill and one pick
    tgN      generate(start prompt, N + 1) - generate(start prompt, 1), per repetition: N decode forwards, the
             start prompt's prefill subtracted (a 1-token BOS prompt, or the depth's D tokens)
    pgP,G    generate(P-token prompt, G)

The peer uses the model our runner loaded when it has one (same weights, no second copy in memory), else loads it.
"""

from __future__ import annotations

import time

import torch

from portable import models
from portable.bench import device as dev
from portable.bench.plan import GPU_BACKENDS, RunPoint
from portable.bench.result import Result
from portable.bench.run import Rep, _fail, base_result, prompt, summarize
from portable.bench.spec import SweepSpec, TestSpec
from portable.errors import PortableError

PEERS = ("hf", "hf-dynamic", "hf-static-compile")  # "hf": both engines (the second on GPUs only)


class Peers:
    def __init__(self, names: tuple[str, ...]):
        for name in names:
            if name not in PEERS:
                raise PortableError(f"unknown peer {name!r} for --compare; peers: {', '.join(PEERS)}")
        self.names = names
        self._loaded: tuple[object, object] | None = None  # (runner, HF model) of the current group

    def engines(self, backend: str, precision: str = "fp32") -> list[str]:
        """The engines timed next to our points of this backend and precision. None for int8: generate has no
        int8 weight-only path without extra packages, and timing the dense model under an int8 label would mislead
        (compare an int8 row with the bf16 rows' peers)."""
        if precision == "int8":
            return []
        gpu = backend in GPU_BACKENDS
        return [engine for engine, wanted in (("hf-dynamic", {"hf", "hf-dynamic"}),
                                             ("hf-static-compile", {"hf", "hf-static-compile"} if gpu else set()))
                if wanted & set(self.names)]

    def release(self) -> None:
        """Forget the model loaded for a runner (at the end of its group, or when it is reloaded)."""
        self._loaded = None

    def count_for(self, backend: str, precision: str = "fp32") -> int:
        return len(self.engines(backend, precision))

    def _model(self, runner, point: RunPoint):
        model = getattr(runner, "model", None)
        if isinstance(model, torch.nn.Module) and hasattr(model, "generate"):
            return model
        if self._loaded is None or self._loaded[0] is not runner:
            key = point.key
            loaded = models.load(models.resolve(key.model), precision=key.precision, device=str(runner.device),
                                 attn=key.attn)
            self._loaded = (runner, loaded.model)
        return self._loaded[1]

    def measure(self, runner, point: RunPoint, spec: SweepSpec, progress) -> list[Result]:
        out = []
        for engine in self.engines(point.key.backend, point.key.precision):
            result = base_result(point, spec, engine=engine)
            result.kernels = None
            result.sync_every = None
            done = 0

            def counted(label: str, n: int) -> None:
                nonlocal done
                done += n
                progress(label, n)

            try:
                measure_generate(self._model(runner, point), runner.device, point, spec, engine, result, counted)
            except Exception as e:  # a peer's failure (unsupported cache, out of memory) is its row, not ours
                if isinstance(e, KeyboardInterrupt):
                    raise
                _fail(result, e)
                dev.release_memory(runner.device)
            progress(f"{point.label} {engine}", max(spec.warmup + spec.repetitions - done, 0))
            out.append(result)
        return out


def _generate_kwargs(test: TestSpec, new_tokens: int, pad_id: int, static: bool) -> dict:
    s = test.sampling
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad_id,
                  do_sample=not s.greedy, repetition_penalty=s.repetition_penalty)
    if s.greedy:
        kwargs.update(temperature=None, top_k=None, top_p=None)
    else:
        kwargs.update(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
    if static:
        kwargs["cache_implementation"] = "static"
    return kwargs


@torch.inference_mode()
def measure_generate(model, device: torch.device, point: RunPoint, spec: SweepSpec, engine: str, result: Result,
                     progress) -> None:
    models.quiet_transformers()
    test, batch = point.test, point.batch
    static = engine == "hf-static-compile"
    if static:
        # One compilation per point: without a reset, a sweep's shapes pile up recompilations until dynamo's
        # cache limit silently falls back to eager code.
        torch._dynamo.reset()
    config = model.config
    pad_id = next((v for v in (getattr(config, "pad_token_id", None), getattr(config, "eos_token_id", None), 0)
                   if isinstance(v, int)), 0)
    length = test.start_tokens if test.kind == "tg" else test.n_prompt
    ids, mask = (t.to(device) for t in prompt(config, batch, length, spec.seed))

    def generate(new_tokens: int) -> float:
        torch.manual_seed(test.sampling.seed)
        kwargs = _generate_kwargs(test, new_tokens, pad_id, static)
        dev.synchronize(device)
        start = time.perf_counter()
        model.generate(ids, attention_mask=mask, **kwargs)
        dev.synchronize(device)
        return time.perf_counter() - start

    def once() -> float:
        if test.kind == "pp":
            return generate(1)
        if test.kind == "tg":
            return generate(test.n_gen + 1) - generate(1)
        return generate(test.n_gen)

    warmup = max(spec.warmup, 1) if static else spec.warmup  # the compilation must not land in a timed repetition
    label = f"{point.label} {engine}"
    for _ in range(warmup):
        once()
        progress(label, 1)
    reps = []
    for _ in range(spec.repetitions):
        reps.append(Rep(sample_s=once(), generated=batch * test.n_gen if test.kind == "pg" else 0))
        progress(label, 1)
    result.warmup = warmup
    summarize(result, reps, test, batch, None, None)
