"""Stop conditions and batches on the embedded model (CPU, greedy, few tokens).

A `--stop` string or EOS ends one sequence of a batch while the other runs on to the token limit; the finished
sequence's later tokens are neither kept, streamed nor counted; tokens per second counts only real tokens (no padding
in prefill, no finished rows in decode); the device-side greedy path with chunked read-back agrees; parity holds with
the same stop conditions on the reference; a stop string is refused for a model without a tokenizer (no text to
find it in).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from portable import pipeline
from portable.cli import app
from portable.config import RunConfig
from portable.models import DEFAULT_MODEL_DIR
from tests.models import PROMPTS

NEW = 24
# Greedy continuations of PROMPTS (24 tokens): only the second says "self" (around step 7), and token 2837 appears in
# the first only (at step 3); the tests check both facts before relying on them.
STOP = "self"
EOS = 2837
cli = CliRunner()


@pytest.fixture(scope="module")
def batch_cache(tmp_path_factory) -> tuple[Path, object]:
    path = tmp_path_factory.mktemp("stopping") / "batch.safetensors"
    report = pipeline.prefill(RunConfig(prompts=PROMPTS, cache_path=path, quiet=True))
    return path, report


def decode(cache: Path, on_tokens=None, **changes):
    return pipeline.decode(RunConfig(cache_path=cache, max_new_tokens=NEW, quiet=True, **changes), on_tokens=on_tokens)


def check_counts(report) -> None:
    """Decode metrics count a token per live sequence per step: token 0 comes from the cache file (no step)."""
    d = report.timing.decode
    assert d.calls == NEW - 1  # the batch ran until every sequence was done
    assert d.tokens == sum(report.new_tokens) - report.batch
    assert d.tps == pytest.approx(d.tokens / (d.time_per_batch_s * d.calls))
    assert d.sps == pytest.approx(report.batch * d.calls / (d.time_per_batch_s * d.calls))
    assert d.tps < d.sps  # a finished row is not counted


def test_prefill_tokens_per_second_never_counts_padding(batch_cache):
    _, report = batch_cache
    p = report.timing.prefill
    assert report.prompt_tokens[0] != report.prompt_tokens[1]  # left padding in the shorter row
    assert p.tokens == sum(report.prompt_tokens) < report.batch * report.cache["seq_len"]
    assert p.tps == pytest.approx(p.tokens / p.time_per_batch_s)


def test_a_stop_string_ends_one_sequence_of_a_batch(batch_cache):
    cache, _ = batch_cache
    free = decode(cache, parity=False)
    assert STOP not in free.text[0] and STOP in free.text[1]
    emitted = []
    report = decode(cache, stop=(STOP,), on_tokens=lambda step, tokens: emitted.append(tokens))
    assert report.finish_reasons == ["length", "stop"]
    n = report.new_tokens[1]
    assert report.new_tokens[0] == NEW and n < NEW
    assert report.tokens[0] == free.tokens[0] and report.tokens[1] == free.tokens[1][:n]
    assert STOP not in report.text[1] and free.text[1].startswith(report.text[1])
    assert STOP in free.text[1][len(report.text[1]):len(report.text[1]) + len(STOP)]  # cut right before it
    # once finished, the sequence streams nothing more
    assert len(emitted) == NEW and all(row[1] is None for row in emitted[n:])
    assert all(row[1] is not None for row in emitted[:n])
    check_counts(report)
    assert report.parity.verdict == "exact", report.parity.line()  # the reference stops at the same place


def test_eos_ends_one_sequence_of_a_batch_on_both_greedy_paths(batch_cache, monkeypatch):
    cache, _ = batch_cache
    free = decode(cache, parity=False, ignore_eos=True)
    assert EOS in free.tokens[0] and EOS not in free.tokens[1]
    at = free.tokens[0].index(EOS)
    monkeypatch.setattr(pipeline, "_eos_ids", lambda runner: frozenset({EOS}))
    reports = [decode(cache, parity=False, sync_every=k) for k in (1, 5)]  # 5: tokens read back in chunks
    for report in reports:
        assert report.finish_reasons == ["eos", "length"]
        assert report.tokens[0] == free.tokens[0][:at + 1] and report.tokens[1] == free.tokens[1]
        check_counts(report)
    assert reports[0].timing.decode.tokens == reports[1].timing.decode.tokens
    ignored = decode(cache, parity=False, ignore_eos=True)
    assert ignored.finish_reasons == ["length", "length"] and ignored.tokens == free.tokens
    p = decode(cache).parity  # the reference applies the same EOS
    assert p.verdict == "exact" and p.compared_tokens == sum(reports[0].new_tokens), p.line()


def test_decode_stop_on_the_command_line(batch_cache, tmp_path):
    cache, _ = batch_cache
    single = tmp_path / "one.safetensors"
    assert cli.invoke(app, ["prefill", "--prompt", PROMPTS[1], "--out", str(single), "-q"]).exit_code == 0
    result = cli.invoke(app, ["decode", "--cache", str(single), "--stop", STOP, "-n", str(NEW)])
    assert result.exit_code == 0, result.output
    streamed = result.stdout.split("Parity vs CPU FP32")[0]
    assert STOP not in streamed and streamed.strip()
    assert "Parity vs CPU FP32: exact" in result.stdout
    result = cli.invoke(app, ["decode", "--cache", str(cache), "--stop", STOP, "-n", str(NEW)])
    assert result.exit_code == 0, result.output
    assert f"--- sequence 0 ({NEW} tokens, length)" in result.stdout
    assert "--- sequence 1 (" in result.stdout and " tokens, stop)" in result.stdout


def test_a_stop_string_is_refused_for_a_model_without_a_tokenizer(tmp_path):
    """Without a tokenizer there is no text to find a stop string in: it was ignored while the report's text (ids
    joined by spaces) was cut at it, e.g. to '' for --stop 1."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(DEFAULT_MODEL_DIR / name, bare / name)
    cache = tmp_path / "c.safetensors"
    assert cli.invoke(app, ["prefill", "--model", str(bare), "--out", str(cache), "-q"]).exit_code == 0
    result = cli.invoke(app, ["decode", "--model", str(bare), "--cache", str(cache), "-n", "4", "--stop", "1"])
    assert result.exit_code == 2 and "--stop needs the model's tokenizer" in result.stderr, result.output
    report = decode(cache, model=str(bare), parity=False)
    assert report.finish_reasons == ["length"] and report.text[0].split() == [str(t) for t in report.tokens[0]]


def test_a_newline_stop_typed_as_backslash_n_ends_a_sequence_at_its_very_first_token(tmp_path):
    """`--stop '\\n'` is a newline, as in --prompt (it was the two characters backslash and n, which never came). The
    default prompt's first new token is a newline and indentation: the sequence stops there, before any decode
    step, so there are no decode metrics."""
    cache = tmp_path / "c.safetensors"
    assert cli.invoke(app, ["prefill", "--out", str(cache), "-q"]).exit_code == 0
    result = cli.invoke(app, ["decode", "--cache", str(cache), "--stop", "\\n", "-n", "8", "--json",
                              str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["new_tokens"] == [1] and report["finish_reasons"] == ["stop"] and report["text"] == [""]
    assert report["timing"]["decode"] is None and "Decode (" not in result.stdout
    assert result.stdout.startswith("\nParity vs CPU FP32: exact (1/1 tokens)")
