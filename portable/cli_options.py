"""Command-line building blocks shared by every command: option aliases (defined once) and the error wrapper.

Commands live in `portable/cli.py` and, for the larger ones, in their own modules (`portable/bench/cli.py`, ...),
all registered on the one typer app in `portable/cli.py`.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Optional

import typer

from portable.config import ATTENTION, DEFAULT_PROMPT, KERNELS, SamplingConfig
from portable.errors import PortableError

BACKEND_NAMES = ("cpu", "cuda", "rocm", "onnxruntime")  # backends.BACKENDS, without importing torch for --help

Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")]
Model = Annotated[Optional[str], typer.Option(
    "--model", "-m", help="'default' (the embedded model), a local Hugging Face folder, a hub id, or preset:NAME.")]
Backend = Annotated[str, typer.Option("--backend", "-b", help=f"One of: {', '.join(BACKEND_NAMES)}.")]
Precision = Annotated[str, typer.Option(
    "--precision", "-p", help="fp32, fp16 or bf16; int8 on onnxruntime (dynamic) and cuda/rocm (weight-only).")]
Device = Annotated[Optional[str], typer.Option("--device", help="Device index or name, e.g. cuda:1.")]
Attn = Annotated[str, typer.Option("--attn", help=f"Attention implementation: {', '.join(ATTENTION)}.")]
CachePath = Annotated[Path, typer.Option("--cache", "-c", help="The cache file written by prefill.")]
MaxNew = Annotated[int, typer.Option("--max-new-tokens", "-n", min=1, help="New tokens per sequence.")]
Stop = Annotated[Optional[list[str]], typer.Option(
    "--stop", help="A string that ends a sequence (repeatable; '\\n' is a newline, as in --prompt).")]
JsonOut = Annotated[Optional[Path], typer.Option("--json", help="Write the full report as JSON to this file.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print only the result lines, no streamed text.")]
Temperature = Annotated[float, typer.Option("--temperature", min=0.0, help="0 = greedy.")]
TopK = Annotated[int, typer.Option("--top-k", min=0, help="Keep the k most likely tokens (0 = off).")]
TopP = Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling (1 = off).")]
RepPenalty = Annotated[float, typer.Option("--repetition-penalty", min=0.0, help="1 = off.")]
Seed = Annotated[int, typer.Option("--seed", min=0, help="Seed of the host-side sampler.")]
Threads = Annotated[Optional[int], typer.Option(
    "--threads", min=1, help="CPU threads of PyTorch and ONNX Runtime's CPU provider (default: PyTorch's choice, one "
                             "per core; fewer on a shared machine).")]
Force = Annotated[bool, typer.Option(
    "--force", help="Use a cache made with different weights or tokenizer than the loaded model.")]
IgnoreEos = Annotated[bool, typer.Option("--ignore-eos", help="Do not stop at the end-of-sequence token.")]
Kernels = Annotated[str, typer.Option("--kernels", help=f"GPU backends: {' or '.join(KERNELS)} fused kernels.")]
OrtProvider = Annotated[Optional[str], typer.Option(
    "--ort-provider", help="onnxruntime: execution provider, e.g. CPU, CUDA, ROCm, MIGraphX.")]
Rebuild = Annotated[bool, typer.Option("--rebuild", help="Build compiled artifacts again instead of reusing them.")]
ArtifactDir = Annotated[Optional[Path], typer.Option(
    "--artifact-dir", help="Where compiled artifacts are kept (default: artifacts/ in $PORTABLE_CACHE_DIR, else in "
                           "~/.cache/portable).")]


def fail(message: str, code: int) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def command(fn):
    """Turn exceptions into one-line errors (with the traceback under --debug)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = kwargs.get("debug", False)
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except PortableError as e:
            if debug:
                traceback.print_exc()
            fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except BrokenPipeError:  # stdout's reader went away (`decode | head`): stop quietly, as other Unix tools do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit would fail again
            raise typer.Exit(141)  # 128 + SIGPIPE, the status a shell shows for a tool killed by the closed pipe
        except Exception as e:  # a bug or an unforeseen environment problem: still one line without --debug
            if debug:
                traceback.print_exc()
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            fail(f"unexpected {type(e).__name__}: {first} (run with --debug for the traceback)", 1)
    return wrapper


def check_choice(value: str, choices, what: str) -> str:
    if value not in choices:
        raise PortableError(f"unknown {what} {value!r}; choose from {', '.join(choices)}")
    return value


def ort_only(backend: str, ort_provider: str | None) -> str | None:
    """--ort-provider means nothing to the other backends: refuse it rather than ignore it."""
    if ort_provider is not None and backend != "onnxruntime":
        raise PortableError(f"--ort-provider applies to --backend onnxruntime only, not {backend!r}; leave it out "
                            f"or add --backend onnxruntime")
    return ort_provider


def artifacts_for(backend: str, rebuild: bool, artifact_dir: Path | None) -> None:
    """--rebuild and --artifact-dir are about compiled artifacts, which the CPU backend has none of: refuse them there
    rather than ignore them."""
    if backend == "cpu" and (rebuild or artifact_dir is not None):
        option = "--rebuild" if rebuild else "--artifact-dir"
        raise PortableError(f"{option} applies to backends with compiled artifacts (cuda, rocm, onnxruntime), not "
                            f"--backend cpu; leave it out")


def use_threads(threads: int | None) -> None:
    """--threads: PyTorch's intra-op pool, which ONNX Runtime's CPU sessions take their size from too."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def device_for(backend: str, device: str | None) -> str | None:
    """--device names a device of the chosen backend; the CPU backend has only the host, so another is refused."""
    if device is not None and backend == "cpu" and device != "cpu":
        raise PortableError(f"--device {device} does not fit --backend cpu (it runs on the host); leave it out or "
                            f"pick the backend of that device (e.g. --backend cuda)")
    return device


def check_output(option: str, path: Path | None, *inputs: tuple[str, Path | str | None], what: str = "JSON report",
                 folder: bool = False) -> None:
    """Before any work: the output `path` (a file, or with `folder` a folder) can be written, and is none of the
    command's other files `inputs` ((option, path) pairs), which writing it would replace."""
    if path is None:
        return
    from caches import check_writable

    for other, value in inputs:
        if value is not None and Path(value).resolve() == Path(path).resolve():
            raise PortableError(f"{option} {path} is also the {other} file, which writing it would replace; give "
                                f"another path")
    check_writable(path, what, folder=folder)


def artifact_times(compile_s: float | None, save_s: float | None, load_s: float | None,
                   reused: bool | None) -> str | None:
    """"compile X s | save Y s | load Z s" for a compiled artifact; a reused one says that it skipped the first two."""
    if reused and compile_s is None and load_s is not None:
        return f"load {load_s:.2f} s | compile and save not run (saved artifact reused; --rebuild builds it again)"
    times = [(name, value) for name, value in (("compile", compile_s), ("save", save_s), ("load", load_s))
             if value is not None]
    return " | ".join(f"{name} {value:.2f} s" for name, value in times) or None


def sampling(temperature: float, top_k: int, top_p: float, repetition_penalty: float, seed: int) -> SamplingConfig:
    """The sampling options as one config; a value that would be meaningless or take no effect is refused."""
    if repetition_penalty <= 0:
        raise PortableError(f"--repetition-penalty must be above 0 (1 = off), not {repetition_penalty:g}")
    if temperature == 0 and (top_k or top_p < 1.0):
        raise PortableError("--top-k and --top-p apply to sampling only, and --temperature 0 is greedy; give a "
                            "--temperature above 0 or leave them out")
    return SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                          seed=seed)


def unescape(text: str) -> str:
    """'\\n' and '\\t' typed on the command line as the newline and tab they stand for."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def stop_strings(stop: list[str] | None) -> tuple[str, ...]:
    """--stop values, with the escapes of --prompt (a newline is the usual stop); an empty one would match any text
    and end every sequence at its first token."""
    if any(s == "" for s in stop or ()):
        raise PortableError("--stop '' is empty: it would end every sequence at its first token; give some text")
    return tuple(unescape(s) for s in stop or ())


def read_prompts(prompts: list[str] | None) -> tuple[str, ...]:
    if not prompts:
        return (DEFAULT_PROMPT,)
    if prompts.count("-") > 1:
        raise PortableError("--prompt - reads stdin to its end, so it can be given once")
    out = []
    for p in prompts:
        where = "the prompt on stdin" if p == "-" else "a --prompt value"
        try:  # undecodable bytes (from stdin, or from argv as surrogates) would fail deep in the tokenizer
            text = sys.stdin.read() if p == "-" else unescape(p)
            text.encode("utf-8")
        except UnicodeError as e:
            raise PortableError(f"{where} is not valid UTF-8 text") from e
        out.append(text)
    return tuple(out)


def split_list(values: list[str] | None, choices=None, what: str = "") -> list[str]:
    """Comma-separated and/or repeated option values (checked against `choices` when given), duplicates dropped,
    order kept."""
    items = [v.strip() for value in values or () for v in str(value).split(",") if v.strip()]
    if values and not items:  # e.g. --backend ',': nothing to run, which is not what was asked for
        raise PortableError(f"--{what}: no values given")
    if choices is not None:
        for item in items:
            check_choice(item, choices, what)
    return list(dict.fromkeys(items))
