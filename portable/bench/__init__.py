"""`portable bench`: how users compare devices, precisions and backends, and how we prove our speed.

Three levels, as llama-bench has them:

    spec.py     a sweep spec whose every field is a list (`--batch 1-4096*2`, `--precision fp16,bf16`) and the tests
                users know by name: pp512, tg128, pg512,128, tg128@d4096; suites.py adds seed 003's named configs
    plan.py     the run points, grouped so that each (model, backend, precision, attention, kernels) loads once
    run.py      warm-up, repetitions, synchronisation, one `Result` per point (result.py) with every sample and the
                environment; out-of-memory points become rows marked "oom" and the sweep goes on
    sinks.py    md (default), csv, json, jsonl from the one `Result` dataclass

Around them: roofline.py (bytes read per decode step, achieved GB/s, % of the device's measured copy bandwidth),
peers.py (`--compare hf`: Hugging Face `generate` on the same model, prompt and lengths), profiling.py (`--profile`
Chrome traces), kernels.py (`portable bench kernels`: each Triton kernel against its PyTorch reference), device.py
(the only place this package calls `torch.cuda`).

Timed regions (what each test's samples measure; run.py documents the details):
    ppN        one prefill forward of N tokens per sequence, between two device synchronisations
    tgN        N decode steps (forward + on-device greedy pick; tokens read back every `--sync-every` steps) after a
               1-token prompt, or after a cache of D tokens reloaded from a cache file for `tgN@dD`
    pgP,G      prefill of P tokens + G new tokens, end to end (the cache hand-over to the decode loop included)
Never timed: making the prompt, loading the model, graph capture (done by the warm-up), reloading a depth cache,
detokenization (there is none: prompts are token ids and EOS is ignored so every run has its full length).
"""
