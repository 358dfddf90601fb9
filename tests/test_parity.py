"""Parity verdicts and the `portable parity` matrix on the embedded model (CPU, few tokens).

fp32 with eager attention is exact against the sdpa-made reference; bf16 is exact or within-precision on every test
prompt; a candidate with one layer's weights zeroed (a backend bug, registered as a backend of its own) is diverged
at fp32 and at bf16; a seeded sampled run gives the same tokens on cpu and onnxruntime and an exact verdict; the
matrix prints one row per combination, writes a plot per row that ran, decodes the reference once per cache file,
turns an impossible combination into a row with the reason, and fails in one line on bad input.
"""

from __future__ import annotations

import contextlib
import json
import struct
from pathlib import Path

import pytest
import torch

import backends
from backends.cpu import CpuBackend
from portable import pipeline
from portable.config import DEFAULT_PROMPT, RunConfig, SamplingConfig
from tests.conftest import invoke, one_line_error
from tests.models import PROMPTS

NEW = 16
TEST_PROMPTS = (*PROMPTS, DEFAULT_PROMPT)


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> list[Path]:
    """One CPU FP32 cache file per test prompt, and a last one holding the two PROMPTS as a batch."""
    root = tmp_path_factory.mktemp("parity")
    paths = []
    for i, prompts in enumerate([(p,) for p in TEST_PROMPTS] + [PROMPTS]):
        paths.append(root / f"c{i}.safetensors")
        pipeline.prefill(RunConfig(prompts=prompts, cache_path=paths[-1], quiet=True))
    return paths


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    """The embedded model's fp32 ONNX export, in a folder of this module's own (not the user cache)."""
    folder = tmp_path_factory.mktemp("parity-artifacts")
    result = invoke("export", "--artifact-dir", folder, "-q")
    assert result.exit_code == 0, result.output
    return folder


class BrokenBackend(CpuBackend):
    """The CPU backend with one bug: layer 2's attention output projection is zeroed in the candidate only (the
    reference and the tolerance's calibration load the pristine model through the real CPU backend)."""

    name = "broken"

    def load(self, config, source):
        runner = super().load(config, source)
        with torch.no_grad():
            runner.model.model.layers[2].self_attn.o_proj.weight.zero_()
        return runner


class CrashingBackend(CpuBackend):
    """A backend with a bug that raises (not a user error): its rows say so and fail the matrix."""

    name = "crashing"

    def load(self, config, source):
        raise RuntimeError("kernel exploded")


@pytest.fixture
def broken(monkeypatch):
    monkeypatch.setitem(backends.BACKENDS, "broken", f"{__name__}:BrokenBackend")
    monkeypatch.setitem(backends.BACKENDS, "crashing", f"{__name__}:CrashingBackend")
    return "broken"


def decode(cache: Path, **changes):
    return pipeline.decode(RunConfig(cache_path=cache, max_new_tokens=NEW, ignore_eos=True, quiet=True, **changes))


def test_fp32_eager_attention_is_exact_against_the_sdpa_reference(caches, monkeypatch):
    loaded = []
    real_load = CpuBackend.load

    def spy(self, config, source):
        loaded.append(config.attn)
        return real_load(self, config, source)

    monkeypatch.setattr(CpuBackend, "load", spy)
    report = decode(caches[0], attn="eager")
    assert loaded == ["eager", "sdpa"]  # the candidate, then the reference
    assert report.backend_details["attn"] == "eager"
    p = report.parity
    assert p.verdict == "exact", p.line()
    assert p.matched_tokens == p.compared_tokens == NEW and p.top1_agreement == 100.0


def test_a_broken_candidate_is_diverged_at_fp32(caches, broken):
    p = decode(caches[0], backend=broken).parity
    assert p.verdict == "diverged" and "fp32 must be token-exact" in p.reason, p.line()
    assert p.first_divergence[0] is not None and p.top1_agreement < 100


def test_a_broken_candidate_is_diverged_at_bf16_beyond_the_pristine_tolerance(caches, broken):
    p = decode(caches[0], backend=broken, precision="bf16").parity
    assert p.verdict == "diverged" and "reference was confident" in p.reason, p.line()
    # the tolerance comes from the pristine model at bf16: a near-tie scale, far below the broken candidate's errors
    assert p.tolerance is not None and 0 < p.tolerance < p.max_abs_logit_diff
    assert max(m.reference_margin for m in p.mismatches) >= p.tolerance


def test_seeded_sampling_gives_the_same_tokens_on_cpu_and_onnxruntime(caches, artifacts):
    batch = caches[-1]
    sampling = SamplingConfig(temperature=0.9, top_k=50, top_p=0.95, repetition_penalty=1.1, seed=11)
    cpu = decode(batch, sampling=sampling, parity=False)
    ort = decode(batch, sampling=sampling, backend="onnxruntime", artifact_dir=artifacts)
    assert ort.backend == "onnxruntime" and ort.batch == 2
    assert ort.tokens == cpu.tokens and all(len(t) == NEW for t in cpu.tokens)
    assert ort.parity.verdict == "exact", ort.parity.line()
    assert ort.parity.matched_tokens == ort.parity.compared_tokens == 2 * NEW
    # it really sampled: greedy and another seed give other tokens
    assert decode(batch, parity=False).tokens != cpu.tokens
    other = SamplingConfig(**{**sampling.__dict__, "seed": 12})
    assert decode(batch, sampling=other, parity=False).tokens != cpu.tokens


def png_size(path: Path) -> tuple[int, int]:
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    assert len(data) > 10_000, (path, len(data))  # axes, lines and text, not an empty canvas
    return struct.unpack(">II", data[16:24])


def test_matrix_rows_plots_and_an_impossible_combination(caches, artifacts, tmp_path, monkeypatch):
    references = []
    real = pipeline.reference_decode

    def counting(*args, **kwargs):
        references.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "reference_decode", counting)
    plots, report = tmp_path / "plots", tmp_path / "m.json"
    result = invoke("parity", "--cache", f"{caches[0]},{caches[1]}", "-b", "cpu,onnxruntime", "-p", "fp32,bf16,fp16",
                    "-n", 8, "--ignore-eos", "--artifact-dir", artifacts, "--out", plots, "--json", report)
    assert result.exit_code == 0, result.output
    assert len(references) == 2  # once per cache file, shared by the six combinations
    lines = result.stdout.splitlines()
    table = [line for line in lines if line.startswith("| ") and not line.startswith("| backend")]
    assert len(table) == 12, result.stdout
    rows = json.loads(report.read_text())["rows"]
    assert [(r["backend"], r["precision"], r["cache"]) for r in rows] == [
        (b, p, c) for b in ("cpu", "onnxruntime") for p in ("fp32", "bf16", "fp16") for c in ("c0.safetensors",
                                                                                           "c1.safetensors")]
    for r, line in zip(rows, table):
        assert f"| {r['backend']} | {r['precision']} | {r['cache']} | {r['verdict']} |" in line
        if (r["backend"], r["precision"]) == ("onnxruntime", "bf16"):
            assert r["verdict"] == "not run" and "bf16" in r["reason"] and "CPU provider" in r["reason"]
            assert r["plot"] is None and r["reason"] in line
            continue
        expected = ("exact",) if r["precision"] == "fp32" else ("exact", "within-precision")
        assert r["verdict"] in expected, r
        assert r["matched"] == "8/8" or r["verdict"] != "exact"
        assert len(r["parity"]["per_step"][0]["kl"]) == 8
        width, height = png_size(r["plot"])
        assert Path(r["plot"]).parent == plots and width > 300 and height > 200
    assert len(list(plots.glob("*.png"))) == 10
    assert "2 not run" in result.stdout and "Plots: 10 PNG files" in result.stdout


@pytest.mark.parametrize("kl", [[0.0, 0.0], [0.0, 3e-6], [2e-12, 3e-6]], ids=["all-zero", "some-zero", "none-zero"])
def test_a_plot_says_where_it_draws_a_kl_of_zero(kl, tmp_path, monkeypatch):
    """A KL of exactly 0 cannot sit on the log axis and is drawn at a floor (1e-12, or a tenth of the smallest KL):
    the axis says so, or an exact fp32 row reads as KL 1e-12, like another kernel's real rounding."""
    from matplotlib.figure import Figure

    from portable.parity import ParityResult
    from portable.parity_plot import plot

    drawn = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *args, **kwargs: drawn.append(fig))
    result = ParityResult(verdict="exact", matched_tokens=2, compared_tokens=2, top1_agreement=100.0,
                          per_step=[{"kl": kl, "margin": [1.0, 2.0]}])
    plot(result, "test", tmp_path / "p.png")
    label = drawn[0].axes[0].get_ylabel()
    floor = "1e-12" if kl == [0.0, 0.0] else "3e-07"
    assert (f"KL 0 drawn at {floor}" in label) == (0.0 in kl), label


def test_an_interrupted_plot_leaves_the_old_png_whole(tmp_path, monkeypatch):
    """Ctrl-C (or a kill) while `parity` draws a PNG: the previous PNG stays, not the first half of the new one."""
    from matplotlib.figure import Figure

    from portable.parity import ParityResult
    from portable.parity_plot import plot

    def half_then_interrupted(fig, target, *args, **kwargs):
        with open(target, "wb") if isinstance(target, (str, Path)) else contextlib.nullcontext(target) as f:
            f.write(b"\x89PNG half")
        raise KeyboardInterrupt
    (tmp_path / "p.png").write_bytes(b"the old plot")
    monkeypatch.setattr(Figure, "savefig", half_then_interrupted)
    result = ParityResult(verdict="exact", matched_tokens=2, compared_tokens=2, top1_agreement=100.0,
                          per_step=[{"kl": [0.0, 0.0], "margin": [1.0, 2.0]}])
    with pytest.raises(KeyboardInterrupt):
        plot(result, "test", tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes() == b"the old plot"
    assert [p.name for p in tmp_path.iterdir()] == ["p.png"]  # no temporary file left


@pytest.mark.parametrize("batch", [3, 16])
def test_a_batchs_plot_keeps_its_legend_off_the_lines_and_tells_the_sequences_apart(batch, tmp_path, monkeypatch):
    """At batch 16 the legend (a line and a divergence entry per sequence) covered the margin panel and its axis,
    and named sequences 0 and 10 in the same colour (matplotlib's cycle has 10)."""
    from matplotlib.figure import Figure

    from portable.parity import Mismatch, ParityResult
    from portable.parity_plot import plot

    drawn = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *args, **kwargs: drawn.append(fig))
    firsts = [b % 4 if b % 2 else None for b in range(batch)]
    result = ParityResult(verdict="within-precision", matched_tokens=1, compared_tokens=2, top1_agreement=90.0,
                          first_divergence=firsts, tolerance=0.5,
                          mismatches=[Mismatch(sequence=b, step=f, reference_margin=0.1, reference_token=1,
                                               candidate_token=2) for b, f in enumerate(firsts) if f is not None],
                          per_step=[{"kl": [1e-4] * 6, "margin": [1.0 + b] * 6} for b in range(batch)])
    plot(result, "test", tmp_path / "p.png")
    fig = drawn[0]
    fig.canvas.draw()
    ax_kl, ax_margin = fig.axes
    legend = ax_margin.get_legend()
    labels = [t.get_text() for t in legend.get_texts()]
    assert legend.get_window_extent().x0 >= ax_margin.get_window_extent().x1, "the legend covers the plot"
    colours = [line.get_color() for line in ax_margin.get_lines() if line.get_label().startswith("sequence ")]
    assert len(set(colours)) == len(colours) and len(labels) <= 10 + 5, labels
    if batch > 10:  # no colour per sequence: the divergence lines carry the sequences' numbers
        assert [t.get_text() for t in ax_kl.texts] == ["1, 5, 9, 13", "3, 7, 11, 15"]
    else:
        assert "sequence 2" in labels and "first divergence (sequence 1)" in labels


def test_matrix_over_prompts_bf16_is_exact_or_within_precision_on_every_test_prompt(tmp_path):
    args = [x for p in TEST_PROMPTS for x in ("--prompt", p)]
    result = invoke("parity", *args, "-p", "bf16", "-n", NEW, "--ignore-eos", "--no-plots", "--json",
                    tmp_path / "m.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "m.json").read_text())
    rows = report["rows"]
    assert [r["cache"] for r in rows] == [f"prompt {i}" for i in (1, 2, 3)]
    assert list(report["caches"].values()) == list(TEST_PROMPTS)
    for r in rows:
        assert r["verdict"] in ("exact", "within-precision"), r
        assert r["parity"]["compared_tokens"] == NEW and r["plot"] is None
        assert r["kl_mean"] > 0  # bf16 really ran: its distributions differ from fp32's
    assert "prompt 1: 'import os" in result.stdout
    assert not (tmp_path / "parity-plots").exists()


def test_matrix_exits_1_when_a_row_diverges(caches, broken, tmp_path):
    result = invoke("parity", "--cache", caches[0], "-b", f"cpu,{broken}", "-p", "fp32", "-n", NEW, "--ignore-eos",
                    "--no-plots")
    assert result.exit_code == 1, result.output
    assert "| cpu | fp32 | c0.safetensors | exact |" in result.stdout
    assert f"| {broken} | fp32 | c0.safetensors | diverged |" in result.stdout
    assert "1 exact, 1 diverged" in result.stdout


def test_matrix_notes_state_the_tolerance_rule_that_was_applied():
    """The note under the table said "3 x p95" alone, but tau is the larger of that and the largest error."""
    from portable import parity, parity_matrix

    rows = [parity_matrix.Row(backend="cpu", precision="bf16", cache="c", verdict="within-precision", tolerance=0.2)]
    report = parity_matrix.MatrixReport(model=None, sampling={"mode": "greedy"}, max_new_tokens=4, caches={"c": "c"},
                                        rows=rows, environment={})
    note = next(line for line in parity_matrix.notes(report) if line.startswith("tolerance: "))
    assert note.startswith("tolerance: max(3 x p95, max) of the pristine model's decision-margin error"), note
    assert parity.tolerance_from([0.01] * 99 + [1.0]) == 1.0  # the rule the note states: the max can decide


def test_matrix_exits_1_when_a_row_hits_an_unexpected_error(caches, broken):
    result = invoke("parity", "--cache", caches[0], "-b", "crashing,cpu", "-p", "fp32", "-n", 4, "--no-plots")
    assert result.exit_code == 1, result.output
    assert "| crashing | fp32 | c0.safetensors | error |" in result.stdout
    assert "unexpected RuntimeError: kernel exploded" in result.stdout
    assert "| cpu | fp32 | c0.safetensors | exact |" in result.stdout  # the matrix went on


def test_matrix_bad_input_is_a_one_line_error(caches, tmp_path):
    line = one_line_error(invoke("parity", "--cache", caches[0], "-b", "cpu,tpu"))
    assert "unknown backend 'tpu'" in line and "onnxruntime" in line
    line = one_line_error(invoke("parity", "--cache", caches[0], "-p", "fp32,fp8"))
    assert "unknown precision 'fp8'" in line and "bf16" in line
    line = one_line_error(invoke("parity", "--cache", caches[0], "--prompt", "x"))
    assert "not both" in line
    line = one_line_error(invoke("parity", "--cache", tmp_path / "none.safetensors"))
    assert "does not exist" in line


def test_matrix_where_nothing_can_run_still_prints_why(caches):
    result = invoke("parity", "--cache", caches[0], "-p", "int8", "-n", 2, "--no-plots")
    line = one_line_error(result)
    assert "no combination could be checked" in line
    assert "| cpu | int8 | c0.safetensors | not run |" in result.stdout and "does not run precision" in result.stdout


@pytest.fixture(scope="module")
def sampled_cache(tmp_path_factory) -> Path:
    """The audit's batch, where a sampled bf16 run of the untouched model was once called `diverged`."""
    path = tmp_path_factory.mktemp("sampled") / "b2.safetensors"
    pipeline.prefill(RunConfig(prompts=("def add(a, b):", "import os\n"), cache_path=path, quiet=True))
    return path


def test_the_untouched_model_sampled_at_bf16_is_never_diverged(sampled_cache):
    verdicts = []
    for sampling in (SamplingConfig(temperature=1.0, seed=1), SamplingConfig(temperature=1.0, seed=2),
                     SamplingConfig(temperature=1.0, seed=3),
                     SamplingConfig(temperature=0.8, top_k=50, top_p=0.9, repetition_penalty=1.1, seed=4)):
        p = pipeline.decode(RunConfig(cache_path=sampled_cache, max_new_tokens=64, ignore_eos=True, quiet=True,
                                      precision="bf16", sampling=sampling)).parity
        assert p.verdict in ("exact", "within-precision"), (sampling, p.line())
        verdicts.append(p.verdict)
    assert "within-precision" in verdicts  # the tolerance was really exercised


def test_a_broken_candidate_sampled_at_bf16_is_diverged(caches, broken):
    p = decode(caches[0], backend=broken, precision="bf16", sampling=SamplingConfig(temperature=1.0, seed=1)).parity
    assert p.verdict == "diverged" and "reference was confident" in p.reason, p.line()
    assert p.tolerance is not None and max(m.reference_margin for m in p.mismatches) >= p.tolerance


def test_a_reference_file_must_match_the_run_stop_conditions_and_model(caches, tmp_path):
    from portable.parity import Reference

    cache, ref = caches[0], tmp_path / "ref.safetensors"
    result = invoke("reference", "--cache", cache, "--out", ref, "-n", 8, "--stop", "(")
    assert result.exit_code == 0, result.output
    result = invoke("decode", "--cache", cache, "--reference", ref, "-n", 8, "--stop", "(", "-q")
    assert result.exit_code == 0, result.output
    assert "Parity vs CPU FP32: exact" in result.stdout
    result = invoke("decode", "--cache", cache, "--reference", ref, "-n", 8, "--stop", "(", "--seed", 7, "-q")
    assert result.exit_code == 0, result.output  # greedy draws nothing: its seed does not tell the runs apart
    line = one_line_error(invoke("decode", "--cache", cache, "--reference", ref, "-n", 8, "--stop", "(",
                                 "--temperature", 1, "--seed", 7))
    assert "sampling" in line
    line = one_line_error(invoke("decode", "--cache", cache, "--reference", ref, "-n", 8))
    assert "--stop '('" in line and "no --stop" in line
    line = one_line_error(invoke("decode", "--cache", cache, "--reference", ref, "-n", 8, "--stop", "(",
                                 "--ignore-eos"))
    assert "EOS stopping" in line and "--ignore-eos" in line
    stored = Reference.load(ref)
    assert stored.stopping == {"stop": ["("], "ignore_eos": False} and stored.model_fingerprint
    other = stored.model_fingerprint.split(":")[0] + ":0000"
    stored.model_fingerprint = other
    stored.save(tmp_path / "other-model.safetensors")
    line = one_line_error(invoke("decode", "--cache", cache, "--reference", tmp_path / "other-model.safetensors",
                                 "-n", 8, "--stop", "("))
    assert f"other model weights ({other})" in line
    stored.model_fingerprint, stored.stopping = None, None  # a file from before the stop conditions were recorded
    stored.save(tmp_path / "old.safetensors")
    line = one_line_error(invoke("decode", "--cache", cache, "--reference", tmp_path / "old.safetensors", "-n", 8))
    assert "does not record its stop conditions" in line


def test_int8_cache_storage_is_checked_against_an_fp32_prefill_not_against_itself(tmp_path):
    """The reference of an int8-stored cache prefills the prompt again in FP32: the storage's cost shows in the
    teacher-forced comparison (a reference decoded from the same dequantized file would differ by exactly 0)."""
    path = tmp_path / "q.safetensors"
    assert invoke("prefill", "--cache-storage", "int8", "--out", path, "-q").exit_code == 0
    result = invoke("decode", "--cache", path, "-n", 16, "-q", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["cache"]["storage"] == "int8-per-token"
    p = report["parity"]
    assert p["verdict"] in ("exact", "within-precision"), p["reason"]
    assert p["max_abs_logit_diff"] > 1e-4 and p["kl_mean"] > 0
    native = tmp_path / "n.safetensors"
    assert invoke("prefill", "--out", native, "-q").exit_code == 0
    assert invoke("decode", "--cache", native, "-n", 16, "-q", "--json", tmp_path / "n.json").exit_code == 0
    assert json.loads((tmp_path / "n.json").read_text())["parity"]["max_abs_logit_diff"] == 0.0


def test_a_cache_prefilled_below_fp32_says_its_rounding_is_not_judged(tmp_path):
    """The reference decodes from the same file, so a bf16 prefill's rounding is shared by both sides: the report says
    so (an FP32 prefill, or a run without parity, has nothing to say)."""
    path = tmp_path / "b.safetensors"
    assert invoke("prefill", "--precision", "bf16", "--out", path, "-q").exit_code == 0
    for extra, expected in (([], 1), (["--no-parity"], 0)):
        result = invoke("decode", "--cache", path, "-n", 4, "-q", "--json", tmp_path / "r.json", *extra)
        assert result.exit_code == 0, result.output
        warnings = json.loads((tmp_path / "r.json").read_text())["cache"]["warnings"]
        assert len([w for w in warnings if "prefilled at bf16" in w]) == expected, warnings
        assert ("prefilled at bf16" in result.output) == bool(expected)
