"""Decoding through the cache file changes nothing, and a cache is refused for a model with another tokenizer."""

from __future__ import annotations

import json
import shutil

import pytest

import backends
from caches import load_cache, save_cache
from caches import hf as hf_caches
from portable import models, pipeline
from portable.config import RunConfig
from portable.errors import CacheFileError
from portable.generation import run_decode
from portable.models import DEFAULT_MODEL_DIR
from portable.sampling import Sampler
from tests.conftest import run_cli
from tests.models import PROMPTS

NEW = 16


def test_decode_from_the_file_equals_decode_from_the_in_memory_cache(tmp_path):
    """Greedy, batch 2 with unequal prompts: the same tokens, whether the cache went through a file or not."""
    config = RunConfig(prompts=PROMPTS, cache_path=tmp_path / "c.safetensors", max_new_tokens=NEW, ignore_eos=True,
                       parity=False)
    runner = backends.resolve("cpu").load(config, models.resolve(config.model))
    ids, mask = pipeline.tokenize(runner.tokenizer, list(PROMPTS), pipeline._pad_id(runner))
    assert len(set(mask.sum(-1).tolist())) == 2
    cache = runner.prefill(ids, mask)
    cache.model = runner.info.identity
    save_cache(cache.to("cpu"), config.cache_path)  # before decoding: nothing may touch it first

    stopper = pipeline.make_stopper(runner, config)
    in_memory = run_decode(runner, cache, Sampler(config.sampling, cache.batch), NEW, stopper)

    from_file = load_cache(config.cache_path)
    hf_caches.check_compatible(from_file, runner.config)
    again = run_decode(runner, from_file, Sampler(config.sampling, from_file.batch), NEW, stopper)
    assert again.tokens == in_memory.tokens and all(len(t) == NEW for t in in_memory.tokens)

    report = pipeline.decode(config, runner=runner)  # the user's path: read, check, place, decode
    assert report.tokens == in_memory.tokens


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory):
    """The embedded model with a tokenizer whose files differ (the same vocabulary, written out differently): the
    weights' fingerprint is unchanged, the tokenizer's is not."""
    folder = tmp_path_factory.mktemp("model") / "retokenized"
    shutil.copytree(DEFAULT_MODEL_DIR, folder)
    tokenizer = folder / "tokenizer.json"
    tokenizer.write_text(json.dumps(json.loads(tokenizer.read_text()), indent=4))
    assert models.fingerprint(folder) == models.fingerprint(DEFAULT_MODEL_DIR)
    assert models.tokenizer_fingerprint(folder) != models.tokenizer_fingerprint(DEFAULT_MODEL_DIR)
    return folder


def test_a_tokenizer_fingerprint_mismatch_is_refused_unless_forced(tmp_path, other_tokenizer):
    path = tmp_path / "c.safetensors"
    pipeline.prefill(RunConfig(cache_path=path))
    config = RunConfig(model=str(other_tokenizer), cache_path=path, max_new_tokens=4, parity=False)
    with pytest.raises(CacheFileError, match="different tokenizer .*pass --force"):
        pipeline.decode(config)
    report = pipeline.decode(config.replace(force=True))
    assert len(report.cache["warnings"]) == 1 and "different tokenizer" in report.cache["warnings"][0]

    proc = run_cli("decode.py", "--cache", str(path), "--model", str(other_tokenizer), "-n", "2", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        line for line in proc.stderr.splitlines() if "different tokenizer" in line]


class _ColdFirstCall:
    """A runner whose first prefill and first decode step pay a one-time cost (lazy initialisation, allocator growth,
    kernel loading: what a first call pays on every backend). The cost is added to the clock the timings read
    (`cold_first_calls` patches time.perf_counter), not slept: a loaded CI machine cannot blur it."""

    COST_S = 1000.0  # far above any real run's time
    clock_offset = 0.0

    def __init__(self, runner):
        self._runner = runner
        self._cold = {"prefill", "decode_step"}

    def __getattr__(self, name):
        return getattr(self._runner, name)

    def _first(self, what):
        if what in self._cold:
            self._cold.discard(what)
            _ColdFirstCall.clock_offset += self.COST_S

    def prefill(self, ids, mask):
        self._first("prefill")
        return self._runner.prefill(ids, mask)

    def decode_step(self, tokens):
        self._first("decode_step")
        return self._runner.decode_step(tokens)


@pytest.fixture
def cold_first_calls(monkeypatch):
    """Every runner the pipeline loads pays a one-time cost on its first prefill and its first decode step."""
    import time

    real, clock = backends.require, time.perf_counter
    monkeypatch.setattr(_ColdFirstCall, "clock_offset", 0.0)
    monkeypatch.setattr(time, "perf_counter", lambda: clock() + _ColdFirstCall.clock_offset)

    class Backend:
        def __init__(self, backend):
            self._backend = backend

        def load(self, config, source):
            return _ColdFirstCall(self._backend.load(config, source))

    monkeypatch.setattr(pipeline.backends, "require", lambda *a, **k: Backend(real(*a, **k)))


def test_a_first_call_cost_stays_out_of_the_prefill_timing(tmp_path, cold_first_calls):
    """`portable prefill` times a warm forward on every backend (the CPU included), as bench does."""
    config = RunConfig(prompts=PROMPTS[:1], cache_path=tmp_path / "c.safetensors")
    assert pipeline.prefill(config).timing.prefill.time_per_batch_s < _ColdFirstCall.COST_S


def test_a_first_call_cost_stays_out_of_the_decode_timing(tmp_path, cold_first_calls):
    """`portable decode` times warm steps: one untimed step first, and the timed run still starts from the cache."""
    config = RunConfig(prompts=PROMPTS[:1], cache_path=tmp_path / "c.safetensors", max_new_tokens=8,
                       ignore_eos=True, parity=False)
    pipeline.prefill(config)
    report = pipeline.decode(config)
    assert report.new_tokens == [8] and report.timing.decode.calls == 7
    assert report.timing.decode.time_per_batch_s * 7 < _ColdFirstCall.COST_S
