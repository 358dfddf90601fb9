"""The command line through typer's CliRunner: the happy path and every bad input's one-line error (non-zero exit,
no traceback unless --debug, nothing overwritten). The decode report's fields: test_decode_report.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from portable.config import DEFAULT_PROMPT
from tests.conftest import ROOT, invoke, one_line_error, read_json, run_cli


def test_prefill_prints_where_the_cache_went(made):
    _, cache, result = made
    assert f"Saved KV cache to {cache}" in result.stdout
    assert "TPS" in result.stdout and cache.exists()
    assert "warning" not in result.stderr


def test_prefill_warns_when_the_model_has_no_tokenizer(made, tmp_path):
    folder, _, _ = made  # the prompt then goes in as byte values, which are not the model's tokens
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(folder / name, bare / name)
    result = invoke("prefill", "--model", bare, "--out", tmp_path / "c.st", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    assert "warning: " in result.stderr and "no tokenizer files" in result.stderr
    assert "byte values" in json.loads((tmp_path / "r.json").read_text())["warnings"][0]


def test_prompt_from_stdin_and_batch(made, tmp_path):
    folder, _, _ = made
    out = tmp_path / "b.safetensors"
    result = invoke("prefill", "--model", folder, "--prompt", "-", "--batch", 3, "--out", out, input="def f(x):\n")
    assert result.exit_code == 0, result.output
    assert "3 x " in result.stdout
    result = invoke("decode", "--cache", out, "-n", 4, "--json", tmp_path / "r.json", "-q")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["batch"] == 3 and len(set(map(tuple, report["tokens"]))) == 1


def test_missing_cache_file(tmp_path):
    line = one_line_error(invoke("decode", "--cache", tmp_path / "none.safetensors"))
    assert "does not exist" in line


def test_unreadable_cache_file(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 3)
    assert "too short" in one_line_error(invoke("decode", "--cache", bad))


def test_unknown_backend_and_precision(made):
    _, cache, _ = made
    line = one_line_error(invoke("decode", "--cache", cache, "--backend", "tpu"))
    assert "cpu" in line and "onnxruntime" in line
    line = one_line_error(invoke("decode", "--cache", cache, "--precision", "fp8"))
    assert "fp32" in line and "bf16" in line


def test_backend_not_present_here(made):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    _, cache, _ = made
    line = one_line_error(invoke("decode", "--cache", cache, "--backend", "cuda"))
    assert "not available here" in line and "available: cpu" in line


def test_cache_from_another_model_is_refused_unless_forced(made, tiny_model, tmp_path):
    _, cache, _ = made
    other = tiny_model("llama", seed=1)  # same architecture and shapes, different weights
    line = one_line_error(invoke("decode", "--cache", cache, "--model", other))
    assert "different model weights" in line and "--force" in line
    result = invoke("decode", "--cache", cache, "--model", other, "--force", "-n", 3, "--no-parity")
    assert result.exit_code == 0, result.output
    assert "warning: the cache was made with different model weights" in result.stderr


def test_cache_from_another_architecture_cannot_be_forced(made, tiny_model):
    _, cache, _ = made
    line = one_line_error(invoke("decode", "--cache", cache, "--model", tiny_model("gemma3"), "--force"))
    assert "layer" in line


def test_debug_shows_the_traceback(tmp_path):
    result = invoke("decode", "--cache", tmp_path / "none.safetensors", "--debug")
    assert result.exit_code == 2 and "Traceback" in result.stderr


def test_hub_id_without_network_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = one_line_error(invoke("prefill", "--model", "no-such-org/no-such-model", "--out", tmp_path / "x"))
    assert "HF_HUB_OFFLINE" in line and "--model PATH" in line
    assert not (tmp_path / "x").exists()


def test_missing_local_model_folder(tmp_path):
    assert "does not exist" in one_line_error(invoke("prefill", "--model", tmp_path / "nothing" / "here"))


def test_an_unwritable_out_path_fails_before_any_work(made, tmp_path, monkeypatch):
    folder, _, _ = made
    from portable import models

    def no_load(*a, **k):
        raise AssertionError("the model was resolved before the output path was checked")

    monkeypatch.setattr(models, "resolve", no_load)
    assert "is a directory" in one_line_error(invoke("prefill", "--model", folder, "--out", tmp_path))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "is not a directory" in one_line_error(invoke("prefill", "--model", folder, "--out", blocker / "c.st"))


def test_prefill_failure_leaves_existing_cache_untouched(made, tmp_path):
    folder, cache, _ = made
    before = cache.read_bytes()
    one_line_error(invoke("prefill", "--model", folder, "--out", cache, "--precision", "fp8"))
    assert cache.read_bytes() == before


def test_cache_inspect(made):
    _, cache, _ = made
    result = invoke("cache", "inspect", cache)
    assert result.exit_code == 0, result.output
    for text in ("format version 1", "LlamaForCausalLM", "full_attention", "left padded", "checksum verified",
                 "made by     cpu fp32"):
        assert text in result.stdout, text
    meta = json.loads(invoke("cache", "inspect", cache, "--json").stdout)
    assert meta["format"] == "portable-kv-cache"


def test_default_prompt_is_code():
    assert DEFAULT_PROMPT.startswith("def ")


def test_prefill_on_onnxruntime_takes_the_artifact_options_and_prints_the_times(made, tmp_path):
    folder, _, _ = made
    args = ("prefill", "--model", folder, "--backend", "onnxruntime", "--ort-provider", "cpu", "--artifact-dir",
            tmp_path / "art")
    built = invoke(*args, "--out", tmp_path / "a.safetensors", "--json", tmp_path / "a.json")
    assert built.exit_code == 0, built.output
    assert "Compiled artifact: compile" in built.stdout and "| save" in built.stdout and "| load" in built.stdout
    timing = json.loads((tmp_path / "a.json").read_text())["timing"]
    assert timing["artifact_reused"] is False and timing["compile_s"] > 0 and timing["load_s"] > 0
    reused = invoke(*args, "--out", tmp_path / "b.safetensors")
    assert reused.exit_code == 0, reused.output
    assert "Compiled artifact: load" in reused.stdout and "compile and save not run" in reused.stdout
    rebuilt = invoke(*args, "--out", tmp_path / "c.safetensors", "--rebuild")
    assert rebuilt.exit_code == 0, rebuilt.output
    assert "Compiled artifact: compile" in rebuilt.stdout
    exported = invoke("export", "--model", folder, "--artifact-dir", tmp_path / "art")
    assert exported.exit_code == 0, exported.output
    assert "Reused the saved" in exported.stdout and "compile and save not run" in exported.stdout
    assert "load" in exported.stdout


@pytest.mark.parametrize("command", ["prefill", "decode", "export"])
def test_ort_provider_without_the_onnxruntime_backend_is_an_error(made, command, tmp_path):
    _, cache, _ = made
    extra = {"prefill": ("--out", tmp_path / "x.safetensors"), "decode": ("--cache", cache),
             "export": ("--backend", "cpu")}[command]
    line = one_line_error(invoke(command, "--ort-provider", "cpu", *extra))
    assert "--ort-provider applies to --backend onnxruntime only" in line
    assert not (tmp_path / "x.safetensors").exists()


def test_cache_with_an_older_fingerprint_says_so(made, tmp_path):
    from caches import load_cache, save_cache

    _, cache, _ = made
    old = load_cache(cache)
    old.model = {**old.model, "fingerprint": "sha256:" + "0" * 32}  # the sampled scheme of earlier versions
    save_cache(old, tmp_path / "old.safetensors")
    line = one_line_error(invoke("decode", "--cache", tmp_path / "old.safetensors"))
    assert "sampled kind older versions wrote" in line and "prefill it again" in line and "--force" in line


@pytest.mark.parametrize("script", ["prefill.py", "decode.py"])
def test_entry_point_usage_names_the_script_alone(script):
    out = run_cli(script, "--help").stdout
    assert f"Usage: {script} [OPTIONS]" in out  # not "prefill.py prefill", which would fail if typed


@pytest.mark.parametrize("args", [("decode.py", "-n", "0"), ("prefill.py", "--bogus"), ("decode.py", "--top-p", "2"),
                                  ("-m", "portable", "nope"), ("-m", "portable", "cache", "inspect"),
                                  ("-m", "portable", "bench", "--batch", "0")])
def test_usage_errors_are_one_line_too(args):
    """Values the option parser refuses (typer's boxed message before) read like every other bad input."""
    proc = run_cli(*args, check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_a_bare_command_group_shows_its_help_once():
    proc = run_cli("-m", "portable", "cache", check=False)
    assert proc.returncode == 2 and proc.stdout.count("Usage: portable cache") == 1 and "inspect" in proc.stdout


def test_options_that_do_not_fit_the_backend_are_refused(made, tmp_path):
    _, cache, _ = made
    assert "does not fit --backend cpu" in one_line_error(invoke("decode", "--cache", cache, "--device", "cuda:0"))
    assert "does not fit --backend cpu" in one_line_error(invoke("prefill", "--device", "cuda:1", "--out",
                                                                 tmp_path / "c.safetensors"))
    assert "not among --backend cpu" in one_line_error(invoke("parity", "--cache", cache, "--ort-provider", "cpu",
                                                              "-n", 2))


def usage_error(result, option):
    """A value typer's range check refuses: exit 2, the option named, no traceback."""
    assert result.exit_code == 2, result.output
    assert option in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("command", ["decode", "reference", "parity"])
def test_sampling_options_that_would_be_meaningless_or_ignored_are_refused(made, tmp_path, command):
    _, cache, _ = made
    base = (command, "--cache", cache, "-n", 2) + (("--out", tmp_path / "r.st") if command == "reference" else ())
    usage_error(invoke(*base, "--temperature", 1, "--seed", -1), "--seed")
    assert "--repetition-penalty must be above 0" in one_line_error(invoke(*base, "--repetition-penalty", 0))
    for option, value in (("--top-k", 5), ("--top-p", 0.5)):
        assert "apply to sampling only" in one_line_error(invoke(*base, option, value))
    assert not (tmp_path / "r.st").exists()


@pytest.mark.parametrize("command", ["decode", "reference", "parity"])
def test_an_empty_stop_string_is_refused(made, tmp_path, command):
    _, cache, _ = made  # '' is in every text: each sequence would end at its first token
    extra = ("--out", tmp_path / "r.st") if command == "reference" else ()
    assert "--stop '' is empty" in one_line_error(invoke(command, "--cache", cache, "-n", 4, "--stop", "", *extra))


def test_a_reference_without_parity_is_refused(made, tmp_path):
    _, cache, _ = made  # it used to be ignored in silence
    line = one_line_error(invoke("decode", "--cache", cache, "--reference", tmp_path / "r.st", "--no-parity"))
    assert "--no-parity" in line


def test_an_output_that_is_also_an_input_is_refused_before_it_is_replaced(made, tmp_path):
    _, cache, _ = made
    before = cache.read_bytes()
    same = tmp_path / ".." / tmp_path.name / "c.safetensors"  # another spelling of one path
    assert "is also the --out file" in one_line_error(invoke("prefill", "--out", same, "--json", same))
    assert "is also the --cache file" in one_line_error(invoke("decode", "--cache", cache, "-n", 2, "--json", cache))
    assert "is also the --cache file" in one_line_error(invoke("reference", "--cache", cache, "-n", 2, "--out", cache))
    assert "is also the --cache file" in one_line_error(invoke("parity", "--cache", cache, "-n", 2, "--json", cache))
    assert cache.read_bytes() == before and not same.exists()


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs /proc, where no file can be created")
def test_outputs_where_no_file_can_be_made_fail_before_any_work(made, tmp_path, monkeypatch):
    """Checked by creating a file, not by os.access, which says yes to root (as on the project's machines) there."""
    folder, cache, _ = made
    from portable import models

    def no_load(*a, **k):
        raise AssertionError("the model was resolved before the output path was checked")

    monkeypatch.setattr(models, "resolve", no_load)
    nowhere = Path("/proc/portable-test")
    for args in (("prefill", "--model", folder, "--out", nowhere / "c.st"),
                 ("prefill", "--model", folder, "--out", tmp_path / "c.st", "--json", nowhere / "r.json"),
                 ("decode", "--cache", cache, "--json", nowhere / "r.json"),
                 ("reference", "--cache", cache, "--out", nowhere / "r.st"),
                 ("parity", "--cache", cache, "--out", nowhere / "plots"),
                 ("export", "--model", folder, "--json", nowhere / "r.json")):
        assert "cannot write /proc/portable-test" in one_line_error(invoke(*args)), args
    assert not (tmp_path / "c.st").exists()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "is a directory" in one_line_error(invoke("decode", "--cache", cache, "--json", tmp_path))
    assert "is a directory" in one_line_error(invoke("reference", "--cache", cache, "--out", tmp_path))
    assert "is not a directory" in one_line_error(invoke("parity", "--cache", cache, "--out", blocker))


def test_prompts_and_decodes_past_the_models_context_are_refused(tiny_model, tmp_path):
    """GPTBigCode's learned positions end at n_positions (256 here): past them it was an unexpected IndexError; a
    rotary model went on in silence."""
    folder = tiny_model("gpt_bigcode")
    line = one_line_error(invoke("prefill", "--model", folder, "--prompt", "-", "--out", tmp_path / "long.st",
                                 input="x = 1\n" * 100))
    assert "more than the model's context of 256" in line and not (tmp_path / "long.st").exists()
    cache = tmp_path / "c.st"
    assert invoke("prefill", "--model", folder, "--prompt", "x = 1", "--out", cache).exit_code == 0
    fits = 256 - json.loads(invoke("cache", "inspect", cache, "--json").stdout)["seq_len"] + 1
    for command, out in (("decode", "--json"), ("reference", "--out")):
        line = one_line_error(invoke(command, "--cache", cache, "-n", fits + 1, out, tmp_path / "r"))
        assert f"run past the model's context of 256 (max_position_embeddings); at most {fits} fit" in line
    result = invoke("decode", "--cache", cache, "-n", fits, "--ignore-eos", "--no-parity", "-q")
    assert result.exit_code == 0, result.output


def test_prompts_that_are_not_text_or_read_stdin_twice_are_refused(made, tmp_path):
    folder, _, _ = made
    out = tmp_path / "c.st"
    line = one_line_error(invoke("prefill", "--model", folder, "--prompt", "-", "--out", out, input=b"def \xff(x):"))
    assert "the prompt on stdin is not valid UTF-8 text" in line
    # undecodable argv bytes reach Python as lone surrogates (and were an unexpected TypeError in the tokenizer)
    line = one_line_error(invoke("prefill", "--model", folder, "--prompt", "def \udcff(x):", "--out", out))
    assert "a --prompt value is not valid UTF-8 text" in line
    line = one_line_error(invoke("prefill", "--model", folder, "--prompt", "-", "--prompt", "-", "--out", out,
                                 input="def f(x):"))
    assert "can be given once" in line and not out.exists()


def test_a_model_folder_with_a_damaged_config_is_a_load_error(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{")
    line = one_line_error(invoke("prefill", "--model", folder, "--out", tmp_path / "c.st"))
    assert f"cannot read {folder / 'config.json'}" in line  # was an unexpected JSONDecodeError
    (folder / "config.json").write_text("[]")
    assert "not a JSON object" in one_line_error(invoke("prefill", "--model", folder, "--out", tmp_path / "c.st"))


def test_reference_refuses_a_cache_from_other_weights_unless_forced(made, tiny_model, tmp_path):
    _, cache, _ = made  # decode refused it, reference wrote a "reference" of the wrong model in silence
    other = tiny_model("llama", seed=1)
    out = tmp_path / "r.st"
    line = one_line_error(invoke("reference", "--cache", cache, "--model", other, "-n", 2, "--out", out))
    assert "different model weights" in line and "--force" in line and not out.exists()
    result = invoke("reference", "--cache", cache, "--model", other, "-n", 2, "--out", out, "--force")
    assert result.exit_code == 0 and out.exists(), result.output


def test_parity_refuses_a_cache_from_other_weights_unless_forced(made, tiny_model, tmp_path):
    _, cache, _ = made  # its error said "pass --force", which parity did not take
    other = tiny_model("llama", seed=1)
    line = one_line_error(invoke("parity", "--cache", cache, "--model", other, "-n", 2, "--no-plots"))
    assert "different model weights" in line and "--force" in line
    result = invoke("parity", "--cache", cache, "--model", other, "-n", 2, "--no-plots", "--force", "--json",
                    tmp_path / "p.json")
    assert result.exit_code == 0, result.output
    report = read_json(tmp_path / "p.json")
    rows = report["rows"]  # forced: the other model decodes as its own reference
    assert {r["precision"]: r["verdict"] for r in rows}["fp32"] == "exact"
    # and says so, as decode does, once per cache file (the matrix dropped decode's warnings)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "c.safetensors: the cache was made with different model weights" in warnings[0]
    assert report["warnings"] == [warnings[0].removeprefix("warning: ")]


@pytest.mark.parametrize("option", ["--backend", "--precision", "--cache"])
def test_parity_lists_that_name_nothing_are_refused(option):
    assert f"{option}: no values given" in one_line_error(invoke("parity", option, ",", "-n", 2))


@pytest.mark.parametrize("option", [("--rebuild",), ("--artifact-dir", "art")])
def test_artifact_options_on_the_cpu_backend_are_refused(made, tmp_path, option):
    _, cache, _ = made  # the CPU backend keeps no compiled artifacts: they were ignored
    assert "not --backend cpu" in one_line_error(invoke("decode", "--cache", cache, *option))
    assert "not --backend cpu" in one_line_error(invoke("prefill", "--out", tmp_path / "c.st", *option))
    assert not (tmp_path / "c.st").exists()


def test_decode_into_a_closed_pipe_stops_quietly(made):
    """`decode | head`: once the reader is gone the streamed text cannot go anywhere; the run stops with the status of
    a tool killed by SIGPIPE and no "unexpected BrokenPipeError" line (the read end here is closed from the start)."""
    _, cache, _ = made
    read, write = os.pipe()
    os.close(read)
    with open(write, "wb") as closed:
        proc = subprocess.run([sys.executable, "decode.py", "--cache", str(cache), "-n", "4", "--no-parity"],
                              cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=closed,
                              stderr=subprocess.PIPE, text=True, timeout=600)
    assert proc.returncode == 141 and proc.stderr == "", proc.stderr


def test_threads_set_the_cpu_pool_of_prefill_and_decode(tmp_path):
    """--threads (as bench's): the report records the pool the run used; ONNX Runtime's CPU sessions take its size."""
    cache = tmp_path / "c.safetensors"
    for threads in (1, 3):
        run_cli("prefill.py", "--out", str(cache), "--threads", str(threads), "--json", str(tmp_path / "p.json"), "-q")
        run_cli("decode.py", "--cache", str(cache), "-n", "3", "--threads", str(threads), "--json",
                str(tmp_path / "d.json"), "-q")
        for name in ("p.json", "d.json"):
            assert read_json(tmp_path / name)["environment"]["cpu_threads"] == threads
    assert run_cli("decode.py", "--cache", str(cache), "--threads", "0", check=False).returncode == 2


INTERRUPT_DURING_IMPORT = """
import os, runpy, signal, sys

class Interrupt:  # Ctrl-C pressed while the command line imports typer (the first ~80 ms of every command)
    def find_spec(self, name, path=None, target=None):
        if name == "typer":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, Interrupt())
sys.argv = [sys.argv[1], "--help"]
if sys.argv[0] == "-m":
    runpy.run_module("portable", run_name="__main__")
else:
    runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("program", ["prefill.py", "decode.py", "-m"])
def test_ctrl_c_while_the_command_line_imports_is_one_line(program):
    proc = run_cli("-c", INTERRUPT_DURING_IMPORT, program, check=False)
    assert (proc.returncode, proc.stderr, proc.stdout) == (130, "error: interrupted\n", "")

