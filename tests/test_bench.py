"""`portable bench`: sweep parsing, run plans, the cost model, the sinks (pure units); then the harness on the embedded
model on CPU with tiny settings (timed regions, samples and environment in every record, OOM rows, peers, depth
caches, traces, suites); then `bench kernels` through Triton's interpreter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from caches import AttentionLayer, PromptCache, RecurrentLayer, SlidingWindowLayer
from portable.bench import device as dev
from portable.bench import roofline, run, sinks
from portable.bench.plan import plan
from portable.bench.result import Result
from portable.bench.spec import SweepSpec, parse_ints, parse_names, parse_tests
from portable.bench.suites import CONFIGS, TIERS, suite
from portable.cli import app
from portable.errors import PortableError
from portable.models import ModelSource
from tests.conftest import run_cli

cli = CliRunner()
FAST = ("--threads", "1", "--warmup", "1")  # one thread: the 2-core test machine is shared


def invoke(*args):
    return cli.invoke(app, ["bench", *map(str, args)])


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """Each test remembers peak bandwidths in its own folder, never in the user's."""
    monkeypatch.setenv("PORTABLE_CACHE_DIR", str(tmp_path / "user-cache"))
    return tmp_path / "user-cache"


# ---- sweep spec -------------------------------------------------------------------------------------------------

def test_int_lists_and_ranges():
    assert parse_ints("1,8,64", "batch") == (1, 8, 64)
    assert parse_ints("1-4096*2", "batch") == tuple(2 ** i for i in range(13))
    assert parse_ints("128-512+128", "batch") == (128, 256, 384, 512)
    assert parse_ints(["1-3", "8", "2"], "batch") == (1, 2, 3, 8)  # repeated options, duplicates dropped


@pytest.mark.parametrize("bad", ["0", "4-1", "1-8*1", "x", "1-", ""])
def test_bad_int_lists_are_one_line_errors(bad):
    with pytest.raises(PortableError):
        parse_ints(bad, "batch")


def test_tests_by_their_llama_bench_names():
    tests = parse_tests("pp512,tg128,pg512,128,tg128@d4096")
    assert [t.name for t in tests] == ["pp512", "tg128", "pg512,128", "tg128@d4096"]
    pp, tg, pg, deep = tests
    assert (pp.kind, pp.n_prompt, pp.counted_tokens(4)) == ("pp", 512, 2048)
    assert (tg.start_tokens, tg.decode_steps, tg.counted_tokens(2)) == (1, 128, 256)
    assert (pg.n_prompt, pg.n_gen, pg.decode_steps, pg.counted_tokens(1)) == (512, 128, 127, 640)
    assert (deep.depth, deep.start_tokens) == (4096, 4096)


@pytest.mark.parametrize("bad", ["pp", "tg0", "pg512", "pp64,128", "pp64@d8", "xx12"])
def test_bad_tests_are_refused(bad):
    with pytest.raises(PortableError):
        parse_tests(bad)


def test_names_are_checked_against_their_choices():
    assert parse_names(["fp16,bf16", "fp16"], "precision", ("fp16", "bf16")) == ("fp16", "bf16")
    with pytest.raises(PortableError, match="unknown precision 'fp8'"):
        parse_names("fp8", "precision", ("fp16", "bf16"))


def test_suites_hold_seed_003s_configurations():
    assert [(t.config, t.n_prompt, t.n_gen) for t in suite("quick")] == [("short", 64, 64), ("medium", 256, 256)]
    assert len(suite("full")) == 7 and set(TIERS["standard"]) < set(TIERS["full"])
    assert CONFIGS["full-pipe"].sampling.repetition_penalty == 1.1 and not CONFIGS["sampled"].sampling.greedy
    with pytest.raises(PortableError):
        suite("huge")
    assert [t.config for t in suite("medium,sampled")] == ["medium", "sampled"]
    with pytest.raises(PortableError, match="configurations"):
        suite("medium,huge")


def test_plan_loads_each_model_configuration_once_and_sorts_batches():
    spec = SweepSpec(models=("a", "b"), precisions=("fp16", "bf16"), batches=(64, 1, 8),
                     tests=parse_tests("tg8,pp8"))
    groups = plan(spec)
    keys = [key for key, _ in groups]
    assert len(keys) == len(set(keys)) == 4
    assert [(k.model, k.precision) for k in keys] == [("a", "fp16"), ("a", "bf16"), ("b", "fp16"), ("b", "bf16")]
    points = groups[0][1]
    assert [(p.test.name, p.batch) for p in points] == [("tg8", 1), ("tg8", 8), ("tg8", 64), ("pp8", 1),
                                                          ("pp8", 8), ("pp8", 64)]


def test_decode_read_back_defaults_to_16_steps_on_gpus_and_every_step_elsewhere():
    spec = SweepSpec(backends=("cpu", "cuda", "rocm"), tests=parse_tests("tg8"))
    assert {key.backend: [p.sync_every for p in points] for key, points in plan(spec)} == {
        "cpu": [1], "cuda": [16], "rocm": [16]}
    assert [p.sync_every for _, points in plan(spec.replace(sync_every=(4, 8))) for p in points] == [4, 8] * 3


# ---- cost model, results, sinks -----------------------------------------------------------------------------------

def _cache(layers):
    ids = torch.ones(2, 4, dtype=torch.long)
    return PromptCache(input_ids=ids, attention_mask=ids, next_token_logits=torch.zeros(2, 8), layers=layers,
                       model={})


def test_cost_model_reads_weights_and_the_growing_kv_cache():
    full = AttentionLayer(keys=torch.zeros(2, 1, 4, 8), values=torch.zeros(2, 1, 4, 8))  # 2*2*8*4 B per position
    window = SlidingWindowLayer(keys=torch.zeros(2, 1, 3, 8), values=torch.zeros(2, 1, 3, 8), window=3,
                                cumulative_length=4)
    state = RecurrentLayer(conv_state=torch.zeros(2, 4, 2), recurrent_state=torch.zeros(2, 4, 2))  # 128 B
    cost = roofline.CostModel.of(1000, _cache([full, window, state]))
    per = 2 * 2 * 8 * 4
    assert cost.kv_bytes(10) == per * 10 + per * 2 + 128  # a sliding layer keeps window - 1 positions
    # two steps after 4 positions see contexts 5 and 6 (the window caps at 3)
    assert cost.read_bytes(4, 2) == 2 * 1000 + per * (5 + 6) + per * 3 * 2 + 2 * 128
    assert roofline.CostModel.of(None, _cache([full])).read_bytes(4, 2) is None


def test_weight_bytes_count_tied_embeddings_once(tiny_model):
    from portable import models

    loaded = models.load(models.resolve(str(tiny_model("llama"))))
    model = loaded.model
    unique = {p.data_ptr(): p.numel() * 4 for p in model.parameters()}
    embed = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight.data_ptr() == embed.data_ptr()
    expected = sum(unique.values()) - (0 if tied else embed.numel() * 4)
    assert roofline.weight_bytes(model) == expected


def test_weight_bytes_leave_out_a_learned_position_table(tiny_model):
    """GPTBigCode's position table (wpe) is an embedding: a step reads one row of it, as of the untied input
    embedding, so neither counts; the tied token embedding (the head) counts once."""
    from portable import models

    model = models.load(models.resolve(str(tiny_model("gpt_bigcode")))).model
    wte, wpe = model.transformer.wte.weight, model.transformer.wpe.weight
    assert model.get_output_embeddings().weight.data_ptr() == wte.data_ptr()
    unique = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    assert roofline.weight_bytes(model) == sum(unique.values()) - wpe.numel() * wpe.element_size()


def test_peak_bandwidth_is_remembered_per_device(cache_dir):
    assert roofline.remembered_peak("cpu:X") is None
    roofline.remember_peak("cpu:X", 12.5, "test")
    roofline.remember_peak("cuda:Y", 3000.0, "test")
    assert roofline.remembered_peak("cpu:X") == 12.5 and roofline.remembered_peak("cuda:Y") == 3000.0
    assert (cache_dir / roofline.PEAK_FILE).exists()


def test_copy_bandwidth_is_a_positive_rate():
    assert dev.copy_bandwidth(torch.device("cpu"), nbytes=1 << 20, copies=2, rounds=2) > 0


@pytest.mark.parametrize("error, oom", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (MemoryError(), True),
    (RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory"), True),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                  "tried to allocate 70368744177664 bytes. Error code 12 (Cannot allocate memory)"), True),
    (RuntimeError("shape mismatch"), False),
    (ValueError("out of memory"), False),
])
def test_out_of_memory_is_recognised(error, oom):
    assert dev.is_out_of_memory(error) is oom


def test_result_statistics_keep_every_sample():
    r = Result(test="tg4", tokens=8)
    r.set_samples([0.1, 0.2, 0.4])
    assert r.samples_s == [0.1, 0.2, 0.4] and r.reps == 3
    assert r.median_s == 0.2 and r.tps_median == pytest.approx(40.0)
    assert r.mean_s == pytest.approx(0.7 / 3) and r.stdev_s > 0
    assert r.tps_mean == pytest.approx((80 + 40 + 20) / 3)


def test_per_repetition_figures_agree_with_the_median_for_an_even_count():
    """With two repetitions (1 s and 2 s for 4 steps) the median time is 1.5 s: BPS, decode t/s, E2E t/s and GB/s
    must come from it, as median t/s does, not from the faster repetition."""
    tg = parse_tests("tg4")[0]
    reps = [run.Rep(sample_s=t, step_s=[t / 4] * 4, step_tokens=[1] * 4, generated=4) for t in (2.0, 1.0)]
    cost = roofline.CostModel(weights=100, attention=[(10.0, 0)])
    r = Result(test="tg4")
    run.summarize(r, reps, tg, 1, cost, 1.0)
    assert r.tps_median == pytest.approx(4 / 1.5)
    assert r.bps == pytest.approx(4 / 1.5) and r.decode_tps == pytest.approx(4 / 1.5)
    assert r.gbps == pytest.approx(cost.read_bytes(1, 4) / 1.5 / 1e9)
    pg = parse_tests("pg4,5")[0]
    reps = [run.Rep(sample_s=t, prefill_s=t / 2, step_s=[t / 8] * 4, step_tokens=[1] * 4, generated=5)
            for t in (2.0, 1.0)]
    r = Result(test="pg4,5")
    run.summarize(r, reps, pg, 1, None, None)
    assert r.e2e_tps == pytest.approx(5 / 1.5) and r.decode_tps == pytest.approx(4 / 0.75)
    assert r.ttft_ms == pytest.approx(750.0)
    pp = parse_tests("pp8")[0]
    r = Result(test="pp8")
    run.summarize(r, [run.Rep(sample_s=t, prefill_s=t) for t in (2.0, 1.0)], pp, 1, None, None)
    assert r.bps == pytest.approx(1 / 1.5) and r.tps_median == pytest.approx(8 / 1.5)


def test_sinks_take_their_columns_from_the_result_dataclass():
    rows = [Result(test="pp8", batch=b, model="m", tps_mean=10.0 * b, tps_stdev=1.0, environment={"commit": "abc"})
            for b in (1, 2)]
    csv_text = sinks.render(rows, "csv")
    header = csv_text.splitlines()[0].split(",")
    from dataclasses import fields

    assert header[:len(fields(Result)) - 1] == [f.name for f in fields(Result) if f.name != "environment"]
    assert "env.commit" in header
    assert [json.loads(line)["batch"] for line in sinks.render(rows, "jsonl").splitlines()] == [1, 2]
    assert json.loads(sinks.render(rows, "json"))[1]["environment"] == {"commit": "abc"}
    md = sinks.render(rows, "md")
    assert "model: m" in md.splitlines()[0]  # constant identifying column above the table
    assert "| pp8 | 2 | 20.00 ± 1.00 |" in md
    with pytest.raises(PortableError):
        sinks.render(rows, "xml")
    assert not any("noisy" in n for n in sinks.notes(rows))
    rows[1].tps_stdev = 5.0  # 25% of 20 t/s
    assert any("noisy" in n and "pp8 b2 (25%)" in n for n in sinks.notes(rows))
    rows[0].model = "other"  # several models: the noisy row names its model
    assert any("noisy" in n and " m pp8 b2 (25%)" in n for n in sinks.notes(rows))
    assert any("try --threads 1" in n for n in sinks.notes(rows))
    rows[1].threads = 1  # already on one thread: no advice to do so
    (noisy,) = [n for n in sinks.notes(rows) if "noisy" in n]
    assert "--threads" not in noisy


def test_parity_is_meaningless_on_random_weight_presets():
    assert "meaningless" in run.parity_note(ModelSource("preset:llama-3.2-1b", "preset"))
    assert "meaningless" not in run.parity_note(ModelSource("default", "embedded"))


def test_unknown_peer_is_refused():
    from portable.bench.peers import Peers

    with pytest.raises(PortableError, match="unknown peer"):
        Peers(("vllm",))
    assert Peers(("hf",)).engines("cpu") == ["hf-dynamic"]
    assert Peers(("hf",)).engines("cuda") == ["hf-dynamic", "hf-static-compile"]
    assert Peers(("hf-dynamic",)).engines("cuda") == ["hf-dynamic"]
    assert Peers(("hf-static-compile",)).engines("cuda") == ["hf-static-compile"]
    assert Peers(("hf-static-compile",)).engines("cpu") == []


# ---- the harness on the embedded model ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def done_when_json():
    """The issue's command: two tests, two batches, three repetitions, JSON on stdout."""
    torch_threads = torch.get_num_threads()
    result = cli.invoke(app, ["bench", "-m", "default", "--tests", "pp64,tg32", "--batch", "1,4", "-r", "3",
                              "-o", "json", "--threads", "1"])
    assert torch.get_num_threads() == torch_threads  # restored after the sweep
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_json_holds_every_sample_and_the_environment(done_when_json):
    rows = done_when_json
    assert [(r["test"], r["batch"]) for r in rows] == [("pp64", 1), ("pp64", 4), ("tg32", 1), ("tg32", 4)]
    for r in rows:
        assert r["status"] == "ok" and r["reps"] == 3 and len(r["samples_s"]) == 3
        assert all(s > 0 for s in r["samples_s"])
        assert r["tps_median"] == pytest.approx(r["tokens"] / r["median_s"])
        env = r["environment"]
        for key in ("commit", "torch", "transformers", "cpu", "backend", "runner"):
            assert key in env, key
        assert env["backend"]["backend"] == "cpu"
        assert r["peak_memory_mb"] > 0 and r["kv_cache_mb"] > 0 and "not checked" in r["parity"]


def test_tg_samples_are_the_decode_steps_and_pp_has_no_steps(done_when_json):
    pp1, pp4, tg1, tg4 = done_when_json
    assert pp1["step_ms"] is None and pp4["tokens"] == 4 * 64 and pp1["ttft_ms"] > 0
    for r, batch in ((tg1, 1), (tg4, 4)):
        assert r["tokens"] == batch * 32
        assert [len(s) for s in r["step_ms"]] == [32, 32, 32]
        for sample, steps in zip(r["samples_s"], r["step_ms"]):
            assert sample == pytest.approx(sum(steps) / 1e3)
        assert r["step_p50_ms"] <= r["step_p95_ms"] and r["bps"] > 0 and r["sps"] == pytest.approx(batch * r["bps"])
        assert r["gbps"] > 0 and r["read_per_step_mb"] > r["weights_mb"] > 0
    assert tg4["kv_cache_mb"] == pytest.approx(4 * tg1["kv_cache_mb"])


def test_kv_cache_size_is_that_of_the_final_length():
    """pgP,G ends with P + G - 1 cached positions (the last token is never fed), tgN with 1 + N, ppN with N: three
    tests ending at 16 positions report one size, the size of the cache the runner actually holds."""
    result = invoke("-t", "pg8,9,tg15,pp16", "-r", "1", "-o", "json", *FAST)
    assert result.exit_code == 0, result.output
    sizes = {r["test"]: r["kv_cache_mb"] for r in json.loads(result.stdout)}
    assert sizes["pg8,9"] == pytest.approx(sizes["pp16"]) and sizes["tg15"] == pytest.approx(sizes["pp16"])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux only: resetting the peak RSS")
def test_a_cpu_points_peak_memory_is_its_own_not_an_earlier_points():
    """The CPU peak (RSS) is reset after each point's warm-up: a tg2 at batch 1 after a pp256 at batch 32 reports
    about what the pp256 at batch 1 did, not the batch-32 prefill's peak."""
    result = invoke("-t", "pp256,tg2", "--batch", "1,32", "-r", "1", "-o", "json", *FAST)
    assert result.exit_code == 0, result.output
    peak = {(r["test"], r["batch"]): r["peak_memory_mb"] for r in json.loads(result.stdout)}
    assert peak["pp256", 32] > peak["pp256", 1] + 100
    assert peak["tg2", 1] < peak["pp256", 32] - 100


def test_the_harness_passes_sync_every_to_the_decode_loop(monkeypatch):
    seen = []
    real = run.run_decode

    def spy(*args, **kwargs):
        seen.append(kwargs.get("sync_every"))
        return real(*args, **kwargs)

    monkeypatch.setattr(run, "run_decode", spy)
    result = invoke("-t", "tg4", "-r", "1", "--sync-every", "2,16", *FAST)
    assert result.exit_code == 0, result.output
    assert seen == [2, 2, 16, 16]  # warm-up and timed repetition of each point


def test_an_out_of_memory_point_becomes_a_row_and_the_sweep_goes_on(monkeypatch):
    from backends.hf_torch import HFRunner

    real = HFRunner.prefill

    def prefill(self, input_ids, attention_mask):
        if input_ids.shape[0] >= 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")
        return real(self, input_ids, attention_mask)

    monkeypatch.setattr(HFRunner, "prefill", prefill)
    loads = []
    real_load = run.load_runner
    monkeypatch.setattr(run, "load_runner", lambda key, spec: loads.append(key) or real_load(key, spec))
    result = invoke("-t", "pp8,tg4", "--batch", "1,4,8", "-r", "2", "-o", "json", *FAST)
    assert result.exit_code == 0, result.output
    assert len(loads) == 2  # loaded afresh after pp8's out-of-memory point (tg4's is the last point that runs)
    rows = {(r["test"], r["batch"]): r for r in json.loads(result.stdout)}
    for test in ("pp8", "tg4"):
        assert rows[test, 1]["status"] == "ok" and len(rows[test, 1]["samples_s"]) == 2
        assert rows[test, 4]["status"] == "oom" and "injected" in rows[test, 4]["error"]
        assert rows[test, 8]["status"] == "skipped" and "batch 4" in rows[test, 8]["error"]
        assert rows[test, 4]["environment"]["commit"] == rows[test, 1]["environment"]["commit"]


def test_a_real_cpu_allocation_failure_is_an_oom_row():
    """Batches whose prompt ids alone exceed any address space: torch's CPU allocator refuses them at once."""
    huge = 2 ** 55
    result = invoke("-t", "pp8,tg2", "--batch", f"1,{huge},{2 * huge}", "-r", "1", "--warmup", "0", "--threads", "1",
                    "-o", "jsonl")
    assert result.exit_code == 0, result.output
    rows = {(r["test"], r["batch"]): r for r in map(json.loads, result.stdout.splitlines())}
    for test in ("pp8", "tg2"):
        assert rows[test, 1]["status"] == "ok"
        assert rows[test, huge]["status"] == "oom" and "allocate" in rows[test, huge]["error"]
        assert rows[test, 2 * huge]["status"] == "skipped"


def test_an_unexpected_exception_is_an_error_row_and_the_run_exits_1(monkeypatch):
    from backends.hf_torch import HFRunner

    real = HFRunner.prefill

    def prefill(self, input_ids, attention_mask):
        if input_ids.shape[0] == 4:
            raise ValueError("injected bug\nsecond line")
        return real(self, input_ids, attention_mask)

    monkeypatch.setattr(HFRunner, "prefill", prefill)
    loads = []
    real_load = run.load_runner
    monkeypatch.setattr(run, "load_runner", lambda key, spec: loads.append(key) or real_load(key, spec))
    result = invoke("-t", "pp8,tg2", "--batch", "1,4,8", "-r", "1", "-o", "jsonl", "--debug", *FAST)
    assert result.exit_code == 1 and "2 point(s) failed unexpectedly" in result.output
    assert "Traceback" in result.output and "injected bug" in result.output  # --debug: each failure's traceback
    rows = {(r["test"], r["batch"]): r for r in map(json.loads, result.stdout.splitlines())}
    assert len(rows) == 6  # every measured row is kept
    for test in ("pp8", "tg2"):
        assert rows[test, 1]["status"] == rows[test, 8]["status"] == "ok"
        assert rows[test, 4]["status"] == "error"
        assert rows[test, 4]["error"] == "unexpected ValueError: injected bug"
    assert len(loads) == 3  # loaded afresh after each failed point


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where cuda cannot run")
def test_an_unavailable_backend_gives_error_rows_and_the_rest_runs():
    result = invoke("-b", "cpu,cuda", "-t", "pp8", "-r", "1", "-o", "jsonl", *FAST)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    status = {r["backend"]: r["status"] for r in rows}
    assert status == {"cpu": "ok", "cuda": "error"}
    assert "not available" in next(r["error"] for r in rows if r["backend"] == "cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where cuda cannot run")
def test_a_sweep_where_nothing_runs_still_reports_and_exits_non_zero():
    result = invoke("-b", "cuda", "-t", "pp8", "-r", "1", "-o", "jsonl", *FAST)
    assert result.exit_code == 2 and "no point could be measured" in result.output
    (row,) = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert row["status"] == "error" and row["environment"]["torch"]


def test_depth_test_reloads_its_cache_file_for_every_repetition(monkeypatch):
    loads, earlier_files_left = [], []
    real = run.load_cache

    def counting(path, *args, **kwargs):
        earlier_files_left.extend(p for p in set(loads) if p != path and p.exists())
        loads.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(run, "load_cache", counting)
    result = invoke("-t", "tg4@d48", "--batch", "1,2", "-r", "2", "-o", "json", *FAST)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    # one file per point, reloaded for the warm-up and both repetitions; a point's file is gone before the next
    assert len(loads) == 6 and len(set(loads[:3])) == 1 and len(set(loads)) == 2
    assert earlier_files_left == []
    for row in rows:
        assert row["test"] == "tg4@d48" and row["depth_cache_load_s"] > 0 and len(row["step_ms"][0]) == 4
    shallow = json.loads(invoke("-t", "tg4", "-r", "1", "-o", "json", *FAST).stdout)[0]
    assert rows[0]["read_per_step_mb"] > shallow["read_per_step_mb"]  # the deeper cache is read every step


def test_quick_suite_with_hf_peer_prints_ratios_and_writes_the_file(tmp_path):
    out = tmp_path / "suite.json"
    result = invoke("--suite", "quick", "--compare", "hf", "-r", "2", "-o", out, *FAST)
    assert result.exit_code == 0, result.output
    assert "ours/hf-dynamic" in result.stdout and "| default | cpu | fp32 | medium | 1 |" in result.stdout
    rows = json.loads(out.read_text())
    assert [(r["config"], r["engine"]) for r in rows] == [("short", "portable"), ("short", "hf-dynamic"),
                                                           ("medium", "portable"), ("medium", "hf-dynamic")]
    ours, peer = rows[2], rows[3]
    assert ours["test"] == "pg256,256" and ours["ttft_ms"] > 0 and ours["e2e_tps"] > 0 and ours["decode_tps"] > 0
    assert ours["step_p50_ms"] > 0 and ours["kv_cache_mb"] > 0
    assert ours["vs_peer"]["hf-dynamic"] == pytest.approx(ours["tps_median"] / peer["tps_median"])
    assert peer["status"] == "ok" and len(peer["samples_s"]) == 2 and peer["environment"]


def test_tests_and_suite_together_are_refused():
    result = invoke("--suite", "quick", "-t", "pp8")
    assert result.exit_code == 2 and "not both" in result.output


def test_measure_peak_remembers_the_device_and_runs_report_percent_of_it(monkeypatch, cache_dir):
    real = dev.copy_bandwidth
    monkeypatch.setattr(dev, "copy_bandwidth", lambda device: real(device, nbytes=1 << 20, copies=2, rounds=2))
    result = invoke("--measure-peak")
    assert result.exit_code == 0, result.output
    stored = json.loads((cache_dir / roofline.PEAK_FILE).read_text())
    (key,) = stored
    assert key.startswith("cpu:") and stored[key]["gbps"] > 0
    row = json.loads(invoke("-t", "tg4", "-r", "1", "-o", "json", *FAST).stdout)[0]
    assert row["peak_gbps"] == stored[key]["gbps"]
    assert row["pct_peak"] == pytest.approx(100 * row["gbps"] / row["peak_gbps"])


def test_profile_writes_a_chrome_trace_per_point(tmp_path):
    result = invoke("-t", "tg4", "-r", "1", "--attn", "sdpa,eager", "--sync-every", "1,2", "--profile",
                    tmp_path / "traces", "-o", "json", *FAST)
    assert result.exit_code == 0, result.output
    traces = [r["trace"] for r in json.loads(result.stdout)]
    assert len(set(traces)) == 4 and sorted(map(str, (tmp_path / "traces").iterdir())) == sorted(traces)
    assert "eager" in traces[-1] and "sync2" in traces[-1]
    for trace in traces:
        events = json.loads(open(trace).read())["traceEvents"]
        assert any("aten::" in e.get("name", "") for e in events)


def test_output_file_format_comes_from_its_suffix(tmp_path):
    result = invoke("-t", "pp8", "-r", "1", "-o", tmp_path / "r.csv", *FAST)
    assert result.exit_code == 0, result.output
    text = (tmp_path / "r.csv").read_text().splitlines()
    assert text[0].startswith("test,config,engine") and len(text) == 2
    assert "| pp8 |" in result.stdout  # the md table is still shown
    bad = invoke("-t", "pp8", "-o", tmp_path / "r.xml")
    assert bad.exit_code == 2 and "--format" in bad.output


# ---- kernel micro-benchmarks -------------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_kernels_need_a_gpu_or_the_interpreter_flag(tmp_path):
    result = invoke("kernels", "-o", tmp_path)
    assert result.exit_code == 2 and "needs a GPU" in result.output and "--interpret" in result.output


def test_kernels_in_the_interpreter_write_tables_and_plots(tmp_path):
    """In a fresh process without TRITON_INTERPRET, as a user runs it (also on a GPU machine)."""
    result = run_cli("-m", "portable", "bench", "kernels", "--interpret", "-k",
                     "rmsnorm,gemv,attention,attention_oproj", "--dtype", "fp32", "-o", str(tmp_path),
                     unset=("TRITON_INTERPRET",))
    for name in ("rmsnorm", "gemv", "attention", "attention_oproj"):
        png = tmp_path / f"{name}-fp32.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        rows = (tmp_path / f"{name}-fp32.csv").read_text().splitlines()
        assert len(rows) == 3 and "Triton GB/s" in rows[0]
    assert "speed-up" in result.stdout


def test_kernels_help_lists_every_kernel():
    """`bench kernels --help` names every kernel that `-k` accepts (docs/benchmarks.md lists them too)."""
    from portable.bench import kernels as bench_kernels

    result = cli.invoke(app, ["bench", "kernels", "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0
    listed = result.output.split("Kernels to time (default all):")[1].split(".")[0]
    assert [name.strip() for name in listed.split(",")] == list(bench_kernels.KERNELS)

@pytest.mark.interpreter
def test_the_attention_oproj_case_does_the_same_job_on_both_sides():
    """The micro-benchmark compares like with like: the fused kernels and the PyTorch reference leave the same
    residual (both start from the same caches, each adds W_o . attention once)."""
    from backends import kernels as k
    from backends.kernels import activation, attention, gemv, norms, rope  # noqa: F401  (as _kernel_modules does)
    from portable.bench import kernels as bench_kernels

    fns, nbytes = bench_kernels._case_attention_oproj(k, bench_kernels.TINY, 16, torch.float32, torch.device("cpu"))
    h_fused = fns["triton"]().clone()
    h_both = fns["torch"]()  # the same residual tensor: now holds both additions
    assert nbytes > 0 and h_fused.abs().sum() > 0
    assert torch.allclose(h_both, 2 * h_fused, rtol=1e-4, atol=1e-5)


def test_unusable_output_paths_fail_before_the_sweep_runs(tmp_path, monkeypatch):
    def no_run(*a, **k):
        raise AssertionError("the sweep ran before the output path was checked")

    monkeypatch.setattr(run, "run_sweep", no_run)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for args, message in ((("-o", tmp_path, "--format", "json"), "is a directory"),
                          (("-o", blocker / "r.json"), "is not a directory"),
                          (("--profile", blocker), "is not a directory")):
        result = invoke("-t", "pp8", "-r", "1", *args)
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, args
    result = invoke("kernels", "--interpret", "-k", "rmsnorm", "-o", blocker)
    assert result.exit_code == 2 and "is not a directory" in result.output


def test_a_format_that_is_unknown_or_contradicts_the_output_is_refused(tmp_path):
    bad = invoke("-t", "pp8", "-o", tmp_path / "r.json", "--format", "xml")  # said "cannot tell the format"
    assert bad.exit_code == 2 and "unknown output format 'xml'" in bad.output
    bad = invoke("-t", "pp8", "-o", "json", "--format", "csv")  # printed JSON, --format ignored
    assert bad.exit_code == 2 and "leave one out" in bad.output
