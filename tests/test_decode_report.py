"""What `decode` reports, printed and in its JSON: the verdict, the per-phase figures and the steps they come from,
and the end-to-end figures of the file's prefill plus this decode."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import invoke


def test_decode_prints_verdict_metrics_and_writes_the_report(made, tmp_path):
    _, cache, _ = made
    result = invoke("decode", "--cache", cache, "-n", 10, "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    assert "Parity vs CPU FP32: exact (10/10 tokens)" in result.stdout
    assert "BPS" in result.stdout and "SPS" in result.stdout and "step P50" in result.stdout
    assert "End to end (cpu fp32 prefill + cpu fp32 decode): TTFT " in result.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    for key in ("model", "backend", "precision", "device", "batch", "prompt_tokens", "new_tokens", "tokens", "text",
                "timing", "kv_cache_bytes", "peak_memory_bytes", "parity", "environment"):
        assert key in report, key
    decode = report["timing"]["decode"]
    for key in ("time_per_batch_s", "time_per_token_s", "bps", "sps", "tps", "step_p50_ms", "step_p95_ms"):
        assert decode[key] > 0, key
    assert report["timing"]["prefill"]["tps"] > 0
    assert report["timing"]["model_load_s"] > 0 and report["timing"]["cache_load_s"] > 0
    assert report["parity"]["reference"] == "cpu-fp32" and report["parity"]["verdict"] == "exact"
    assert report["parity"]["first_divergence"] is None and report["parity"]["matched_tokens"] == 10
    assert report["new_tokens"] == [10] and len(report["tokens"][0]) == 10
    assert report["kv_cache_bytes"] > 0 and report["peak_memory_bytes"] > 0
    env = report["environment"]
    assert env["python"] and env["torch"] and env["transformers"] and env["cpu"]


def test_decode_report_keeps_every_step_so_its_figures_can_be_checked_by_hand(made, tmp_path):
    """The decode line's BPS, TPS and P50/P95 come from the timed steps: the JSON keeps them (it had only the
    summaries, while bench's JSON keeps every sample)."""
    _, cache, _ = made
    result = invoke("decode", "--cache", cache, "-n", 8, "--ignore-eos", "--no-parity", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    timing = json.loads((tmp_path / "r.json").read_text())["timing"]
    steps, decode = timing["decode_step_ms"], timing["decode"]
    assert len(steps) == decode["calls"] == 7
    assert decode["bps"] == pytest.approx(len(steps) / (sum(steps) / 1e3))
    assert decode["tps"] == pytest.approx(decode["tokens"] / (sum(steps) / 1e3))
    assert decode["step_p50_ms"] == pytest.approx(float(np.percentile(steps, 50)))
    assert decode["step_p95_ms"] == pytest.approx(float(np.percentile(steps, 95)))
    # end to end: the file's prefill (its logits gave the first token) plus these steps, as one run
    e2e, total_s = timing["end_to_end"], timing["prefill"]["time_per_batch_s"] + sum(steps) / 1e3
    assert e2e["time_per_batch_s"] == pytest.approx(total_s) and e2e["tokens"] == 8
    assert e2e["tps"] == pytest.approx(8 / total_s) and e2e["time_per_token_s"] == pytest.approx(total_s / 8)
    assert e2e["bps"] == pytest.approx(1 / total_s) and e2e["sps"] == pytest.approx(1 / total_s)


def test_decode_of_a_cache_without_prefill_timing_prints_no_end_to_end_figures(made, tmp_path):
    """A cache file saved by other code (the `caches` API) need not record how long its prefill took: decode then
    leaves the end-to-end figures out rather than inventing a prefill time."""
    from caches import load_cache, save_cache

    _, cache, _ = made
    untimed = load_cache(cache)
    untimed.prefill.pop("timing")
    save_cache(untimed, tmp_path / "untimed.safetensors")
    result = invoke("decode", "--cache", tmp_path / "untimed.safetensors", "-n", 4, "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    assert "Decode (cpu fp32" in result.stdout and "End to end" not in result.stdout
    timing = json.loads((tmp_path / "r.json").read_text())["timing"]
    assert timing["prefill"] is None and timing["end_to_end"] is None and timing["decode"]["tps"] > 0
