"""`portable bench`, the pure units: sweep parsing, run plans, the cost model, results and the sinks (no model is
run)."""

from __future__ import annotations

import json

import pytest
import torch

from caches import AttentionLayer, PromptCache, RecurrentLayer, SlidingWindowLayer
from portable.bench import device as dev
from portable.bench import roofline, run, sinks
from portable.bench.plan import plan
from portable.bench.result import Result
from portable.bench.spec import SweepSpec, parse_ints, parse_names, parse_tests
from portable.bench.suites import CONFIGS, TIERS, suite
from portable.errors import PortableError
from portable.models import ModelSource

pytestmark = pytest.mark.usefixtures("bench_cache_dir")  # peak bandwidths remembered per test, never the user's


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


def test_peak_bandwidth_is_remembered_per_device(bench_cache_dir):
    assert roofline.remembered_peak("cpu:X") is None
    roofline.remember_peak("cpu:X", 12.5, "test")
    roofline.remember_peak("cuda:Y", 3000.0, "test")
    assert roofline.remembered_peak("cpu:X") == 12.5 and roofline.remembered_peak("cuda:Y") == 3000.0
    assert (bench_cache_dir / roofline.PEAK_FILE).exists()


def test_two_runs_remembering_peaks_at_once_both_keep_their_entry(bench_cache_dir, monkeypatch):
    """CI jobs sharing one cache folder: run B measures while run A is between reading the file and replacing it.
    Without a lock A's write drops B's entry; with it B waits for A and then adds its own."""
    import threading

    read = roofline._read
    other = threading.Thread(target=roofline.remember_peak, args=("cuda:B", 2.0, "test"))

    def read_then_let_the_other_run_in():
        data = read()
        if other.ident is None and threading.current_thread() is not other:  # A's read, the first one
            other.start()
            other.join(timeout=1.0)  # done at once without the lock; blocked on it with the lock
        return data
    monkeypatch.setattr(roofline, "_read", read_then_let_the_other_run_in)
    roofline.remember_peak("cpu:A", 1.0, "test")
    other.join()
    assert roofline.remembered_peak("cpu:A") == 1.0 and roofline.remembered_peak("cuda:B") == 2.0


@pytest.mark.parametrize("content", ["[]", '"x"', "{not json", '{"cpu:X": 3}', '{"cpu:X": {"gbps": "fast"}}'])
def test_a_damaged_peak_file_is_as_if_nothing_was_measured(bench_cache_dir, content):
    bench_cache_dir.mkdir(parents=True)
    (bench_cache_dir / roofline.PEAK_FILE).write_text(content)
    assert roofline.remembered_peak("cpu:X") is None
    roofline.remember_peak("cuda:Y", 3000.0, "test")
    assert roofline.remembered_peak("cuda:Y") == 3000.0


def test_peak_bandwidths_and_artifacts_share_one_user_cache_folder(monkeypatch, tmp_path):
    """One default, read the same way: a `~` in $PORTABLE_CACHE_DIR (written where no shell expands it) once put the
    bandwidths in a folder named `~` under the working directory and the artifacts under the home folder."""
    from portable import artifacts

    monkeypatch.setenv("HOME", str(tmp_path))
    for variable, value, folder in (("PORTABLE_CACHE_DIR", "~/pc", tmp_path / "pc"),
                                    ("XDG_CACHE_HOME", "~/xdg", tmp_path / "xdg" / "portable"),
                                    (None, None, tmp_path / ".cache" / "portable")):
        monkeypatch.delenv("PORTABLE_CACHE_DIR", raising=False)
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
        if variable:
            monkeypatch.setenv(variable, value)
        assert roofline.remember_peak("k", 1.0, "test").parent == folder
        assert artifacts.default_root() == folder / "artifacts"


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


def test_one_repetition_claims_no_spread():
    """`-r 1` has no stdev to show: the table prints the t/s alone, not "± 0.00" (a spread of zero, never measured)."""
    r = Result(test="tg4", tokens=8, model="m", backend="cpu", precision="fp32")
    r.set_samples([0.2])
    assert r.stdev_s is None and r.tps_stdev is None and r.tps_mean == pytest.approx(40.0)
    table = sinks.markdown([r])
    assert "40.00" in table and "±" not in table.split("\n\n")[1], table


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


def test_notes_name_their_row_by_every_identifying_column_that_varies():
    """A sweep over backends, precisions or attention gives rows with the same test and batch: a noisy or failed
    row's note must say which one it is (it named only the test and batch, e.g. "portable pp16 b1" twice)."""
    rows = [Result(test="pp16", backend=b, precision=p, attn=a, model="m", tps_mean=10.0, tps_stdev=3.0, threads=1)
            for b, p, a in (("cpu", "fp32", "sdpa"), ("onnxruntime", "fp32", "sdpa"), ("cpu", "bf16", "sdpa"))]
    rows.append(Result(test="pp16", backend="cpu", precision="fp32", attn="eager", model="m", status="error",
                       error="no", threads=1))
    (noisy,) = [n for n in sinks.notes(rows) if "noisy" in n]
    assert "portable cpu fp32 sdpa pp16 b1 (30%)" in noisy and "portable onnxruntime fp32 sdpa pp16 b1" in noisy
    assert "portable cpu bf16 sdpa pp16 b1" in noisy and " m " not in noisy and "t1" not in noisy
    assert "portable pp16 batch 1 cpu fp32 eager: error (no)" in sinks.notes(rows)


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
