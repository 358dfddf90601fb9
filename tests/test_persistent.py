"""The persistent decode step (one kernel per step, backends/kernels/persistent.py) against the separate-kernel step,
run by one program under Triton's interpreter on CPU (compiled with one program per SM on a GPU)."""

from __future__ import annotations

import pytest
import torch

from backends.fast_runner import FastRunner
from backends.hf_torch import HFRunner
from portable import models
from portable.config import RunConfig
from portable.pipeline import tokenize
from tests.models import PROMPTS


@pytest.mark.parametrize("name,options", [("llama", {}), ("qwen3", {"tile_bytes": 512, "depth": 3}),
                                          ("mistral", {"tile_bytes": 1024, "depth": 1})])
def test_persistent_step_matches_the_separate_kernels(tiny_model, name, options):
    """Logits of each step and greedy picks; 8-slot attention blocks, several per chunk and several chunks (the combine runs), and
    small tiles (qwen3, mistral) so that stage E walks several chunks of the intermediate size."""
    loaded = models.load(models.resolve(str(tiny_model(name))), "fp32", "cpu")
    hf = HFRunner(loaded, "cpu", "fp32", torch.device("cpu"))
    ids, mask = tokenize(hf.tokenizer, list(PROMPTS), 0)
    cache = hf.prefill(ids, mask).select([0])
    ref = FastRunner(loaded, "cpu", RunConfig(kernels="triton"), torch.device("cpu"), graphs=False)
    ref.decoder.persistent = False
    run = FastRunner(loaded, "cpu", RunConfig(kernels="triton"), torch.device("cpu"), graphs=False)
    run.decoder.persistent, run.decoder.attention_block_s = True, 8
    run.decoder.persistent_options = dict(options, chunks=2)
    ref.start(cache, 8)
    run.start(cache, 8)
    step = run.decoder.persistent_step
    assert step is not None and step.n_chunks > 1 and step.blocks > 1
    token = cache.next_token_logits.argmax(-1)
    for _ in range(3):
        a, b = ref.decode_step(token), run.decode_step(token)
        assert float((a - b).norm() / a.norm()) < 1e-5
        token = a.argmax(-1)
    assert run.greedy_steps(token, 3).tolist() == ref.greedy_steps(token, 3).tolist()
    assert step.counters.abs().sum() == 0 and int(step.error) == 0  # the last program zeroed the counters
