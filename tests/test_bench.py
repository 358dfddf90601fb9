"""`portable bench`: the harness on the embedded model on CPU with tiny settings (timed regions, samples and
environment in every record, OOM rows, peers, depth caches, traces, suites, output files). The pure units are in
test_bench_units.py, `bench kernels` in test_bench_kernels.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from portable.bench import device as dev
from portable.bench import roofline, run
from portable.cli import app

cli = CliRunner()
FAST = ("--threads", "1", "--warmup", "1")  # one thread: the 2-core test machine is shared

pytestmark = pytest.mark.usefixtures("bench_cache_dir")  # peak bandwidths remembered per test, never the user's


def invoke(*args):
    return cli.invoke(app, ["bench", *map(str, args)])



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


def test_ad_hoc_tests_take_the_sampling_options_as_seed_003s_runs_do(monkeypatch):
    """Seed 003's ad-hoc run (--prompt-tokens 256 --max-new-tokens 256 --temperature 0.8 --seed 42) is pg256,256
    with sampling: bench had no sampling options, only the fixed `sampled` and `full-pipe` suite configurations."""
    used = []
    real = run.Sampler
    monkeypatch.setattr(run, "Sampler", lambda config, batch: used.append(config) or real(config, batch))
    result = invoke("-m", "default", "-t", "pg8,4,tg4", "--temperature", "0.8", "--top-k", "50", "--top-p", "0.9",
                    "--seed", "42", "-r", "1", "-o", "json", *FAST)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["sampling"] for r in rows] == ["temp=0.8 top_k=50 top_p=0.9 seed=42"] * 2
    assert used and all(c.temperature == 0.8 and c.top_k == 50 and c.top_p == 0.9 and c.seed == 42 for c in used)
    result = invoke("--suite", "quick", "--temperature", "0.8")
    assert result.exit_code == 2 and "their own sampling" in result.output


def test_tests_and_suite_together_are_refused():
    result = invoke("--suite", "quick", "-t", "pp8")
    assert result.exit_code == 2 and "not both" in result.output


def test_measure_peak_remembers_the_device_and_runs_report_percent_of_it(monkeypatch, bench_cache_dir):
    real = dev.copy_bandwidth
    monkeypatch.setattr(dev, "copy_bandwidth", lambda device: real(device, nbytes=1 << 20, copies=2, rounds=2))
    result = invoke("--measure-peak")
    assert result.exit_code == 0, result.output
    stored = json.loads((bench_cache_dir / roofline.PEAK_FILE).read_text())
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
