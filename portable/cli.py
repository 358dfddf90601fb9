"""The command line: `portable prefill | decode | reference | parity | export | bench | cache inspect`.

`python prefill.py` and `python decode.py` are this app's `prefill` and `decode` commands. Options shared by several
commands are defined once below as `Annotated` aliases; every command builds one `RunConfig` and hands it to the
core. User errors (`PortableError`) print one line and exit 2; anything else prints one line and exits 1; `--debug`
shows the traceback instead.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from portable.cli_options import (ArtifactDir, Attn, Backend, CachePath, Debug, Device, Force, IgnoreEos, JsonOut,
                                  Kernels, MaxNew, Model, OrtProvider, Precision, Quiet, Rebuild, RepPenalty, Seed,
                                  Stop, Temperature, Threads, TopK, TopP, artifact_times, artifacts_for,
                                  check_choice, check_output, command, device_for, ort_only, read_prompts, sampling,
                                  split_list, stop_strings, use_threads)
from portable.config import ALL_PRECISIONS, ATTENTION, CACHE_STORAGE, DEFAULT_CACHE, KERNELS, PRECISIONS, RunConfig

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Prefill once, decode anywhere: KV-cache files, parity verdicts, honest benchmarks.")
cache_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                        help="Look inside cache files.")
app.add_typer(cache_app, name="cache")

@app.command()
@command
def prefill(
    model: Model = None,
    prompt: Annotated[Optional[list[str]], typer.Option(
        "--prompt", help="Prompt text ('-' reads stdin; '\\n' is a newline); repeat for a batch of prompts.")] = None,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Repeat the prompt this many times.")] = 1,
    out: Annotated[Path, typer.Option("--out", "-o", help="The cache file to write.")] = DEFAULT_CACHE,
    backend: Backend = "cpu",
    precision: Precision = "fp32",
    device: Device = None,
    attn: Attn = "sdpa",
    cache_storage: Annotated[str, typer.Option(
        "--cache-storage",
        help="native, or int8 (keys/values with per-token scales: ~4x smaller than fp32).")] = "native",
    ort_provider: OrtProvider = None,
    rebuild: Rebuild = False,
    artifact_dir: ArtifactDir = None,
    threads: Threads = None,
    json_path: JsonOut = None,
    quiet: Quiet = False,
    debug: Debug = False,
):
    """Run the prompt through the model once and save its KV cache to a file.

    Timed region: the forward pass over the padded batch, after one untimed warm-up pass (tokenization and saving
    excluded).
    """
    from portable import pipeline
    from portable.report import megabytes, write_json

    check_output("--json", json_path, ("--out", out))
    artifacts_for(backend, rebuild, artifact_dir)
    use_threads(threads)
    config = RunConfig(model=model, prompts=read_prompts(prompt), batch=batch, cache_path=out, backend=backend,
                       precision=precision, device=device_for(backend, device),
                       attn=check_choice(attn, ATTENTION, "attention"),
                       cache_storage=check_choice(cache_storage, CACHE_STORAGE, "cache storage"),
                       ort_provider=ort_only(backend, ort_provider), rebuild=rebuild, artifact_dir=artifact_dir,
                       quiet=quiet)
    report = pipeline.prefill(config)
    for warning in report.warnings:
        typer.echo(f"warning: {warning}", err=True)
    c = report.cache
    typer.echo(f"Saved KV cache to {c['path']} ({report.batch} x {c['seq_len']} tokens, {c['layers']} layers "
               f"{'+'.join(c['kinds'])}, {c['dtype']}{', int8 storage' if c['storage'] == 'int8' else ''}, "
               f"{megabytes(c['bytes'])}) in {report.timing.cache_save_s:.2f} s")
    if not quiet:
        typer.echo(f"Prefill ({report.backend} {report.precision}): {report.timing.prefill.line()}")
        t = report.timing
        times = artifact_times(t.compile_s, t.save_s, t.load_s, t.artifact_reused)
        if times:
            typer.echo(f"Compiled artifact: {times}")
    if json_path:
        write_json(report, json_path)


@app.command()
@command
def decode(
    cache: CachePath = DEFAULT_CACHE,
    model: Model = None,
    backend: Backend = "cpu",
    precision: Precision = "fp32",
    device: Device = None,
    attn: Attn = "sdpa",
    kernels: Kernels = RunConfig.kernels,
    max_new_tokens: MaxNew = 64,
    stop: Stop = None,
    ignore_eos: IgnoreEos = False,
    temperature: Temperature = 0.0,
    top_k: TopK = 0,
    top_p: TopP = 1.0,
    repetition_penalty: RepPenalty = 1.0,
    seed: Seed = 0,
    parity: Annotated[bool, typer.Option(
        "--parity/--no-parity", help="Compare with CPU FP32 decoding of the same cache file.")] = True,
    reference: Annotated[Optional[Path], typer.Option(
        "--reference", help="A reference file from `portable reference` instead of decoding on CPU here.")] = None,
    force: Force = False,
    compile: Annotated[bool, typer.Option(
        "--compile/--no-compile", help="GPU backends: capture the decode step as a graph.")] = True,
    sync_every: Annotated[int, typer.Option(
        "--sync-every", min=1, help="GPU backends: read tokens back to the host every N steps.")] = 1,
    ort_provider: OrtProvider = None,
    rebuild: Rebuild = False,
    artifact_dir: ArtifactDir = None,
    threads: Threads = None,
    json_path: JsonOut = None,
    quiet: Quiet = False,
    debug: Debug = False,
):
    """Load a cache file, decode token by token on a backend, print the parity verdict and the metrics.

    Timed region: each decode step (forward + token choice), after one untimed warm-up step; tokenization, text
    streaming and the parity comparison are excluded.
    """
    from portable import pipeline
    from portable.errors import PortableError
    from portable.report import megabytes, write_json
    from portable.streaming import TextStreamer

    if reference is not None and not parity:
        raise PortableError("--reference is the parity check's reference, and --no-parity turns the check off; leave "
                            "one of them out")
    check_output("--json", json_path, ("--cache", cache), ("--reference", reference))
    artifacts_for(backend, rebuild, artifact_dir)
    use_threads(threads)
    config = RunConfig(
        model=model, cache_path=cache, backend=backend, precision=precision, device=device_for(backend, device),
        attn=check_choice(attn, ATTENTION, "attention"), kernels=check_choice(kernels, KERNELS, "kernels"),
        max_new_tokens=max_new_tokens, stop=stop_strings(stop), ignore_eos=ignore_eos,
        sampling=sampling(temperature, top_k, top_p, repetition_penalty, seed),
        parity=parity, reference_path=reference, force=force, compile=compile, sync_every=sync_every,
        ort_provider=ort_only(backend, ort_provider), rebuild=rebuild, artifact_dir=artifact_dir, json_path=json_path,
        quiet=quiet)

    streamer = None

    def on_ready(runner):
        nonlocal streamer
        if not quiet and runner.tokenizer is not None:
            streamer = TextStreamer(lambda ids: runner.tokenizer.decode(ids, skip_special_tokens=True),
                                    config.stop)

    def on_tokens(step, tokens):
        if streamer is not None and len(tokens) == 1:
            streamer.push(tokens[0])

    report = pipeline.decode(config, on_tokens=on_tokens, on_ready=on_ready)
    if streamer is not None:
        if report.batch == 1:
            streamer.end()
        else:
            for b, text in enumerate(report.text):
                typer.echo(f"--- sequence {b} ({report.new_tokens[b]} tokens, {report.finish_reasons[b]})")
                typer.echo(text)
    for warning in report.cache.get("warnings", []):
        typer.echo(f"warning: {warning}", err=True)
    t = report.timing
    typer.echo(report.parity.line())
    if t.decode is not None:
        typer.echo(f"Decode ({report.backend} {report.precision}, {report.backend_details.get('device_name')}): "
                   f"{t.decode.line()}")
    if not quiet:
        if t.prefill is not None:
            made = report.cache["made_by"]
            typer.echo(f"Prefill (from the cache file; {made.get('backend')} {made.get('precision')}): "
                       f"{t.prefill.line()}")
        if t.end_to_end is not None:
            made = report.cache["made_by"]
            typer.echo(f"End to end ({made.get('backend')} {made.get('precision')} prefill + {report.backend} "
                       f"{report.precision} decode): TTFT {t.prefill.time_per_batch_s * 1e3:.2f} ms | "
                       f"{t.end_to_end.line()}")
        extra = "".join(f" | {name} {value:.2f} s" for name, value in (
            ("compile", t.compile_s), ("artifact save", t.save_s), ("artifact load", t.load_s)) if value is not None)
        cast = f" (cast {report.cache['cast']})" if report.cache.get("cast") else ""
        typer.echo(f"KV cache {megabytes(report.kv_cache_bytes)}{cast} | peak memory "
                   f"{megabytes(report.peak_memory_bytes)} | model load {t.model_load_s:.2f} s | cache load "
                   f"{t.cache_load_s:.3f} s{extra}")
        _print_parity_details(report.parity)
    if json_path:
        write_json(report, json_path)


def _print_parity_details(result) -> None:
    if result.verdict in ("skipped",) or result.top1_agreement is None:
        return
    typer.echo(f"Teacher-forced: top-1 agreement {result.top1_agreement:.1f}% | KL mean {result.kl_mean:.3g} "
               f"p95 {result.kl_p95:.3g} max {result.kl_max:.3g} | max |dlogit| {result.max_abs_logit_diff:.3g}"
               + (f" | tolerance {result.tolerance:.3g}" if result.tolerance is not None else ""))
    for m in result.mismatches[:10]:
        typer.echo(f"  mismatch seq {m.sequence} step {m.step}: reference {m.reference_token} {m.reference_text!r} "
                   f"vs {m.candidate_token} {m.candidate_text!r} at reference margin {m.reference_margin:.4g}")
    if len(result.mismatches) > 10:
        typer.echo(f"  ... {len(result.mismatches) - 10} more mismatches in the JSON report")


@app.command()
@command
def reference(
    cache: CachePath = DEFAULT_CACHE,
    out: Annotated[Path, typer.Option("--out", "-o", help="The reference file to write.")] = Path(
        "reference.safetensors"),
    model: Model = None,
    max_new_tokens: MaxNew = 64,
    stop: Stop = None,
    ignore_eos: IgnoreEos = False,
    temperature: Temperature = 0.0,
    top_k: TopK = 0,
    top_p: TopP = 1.0,
    repetition_penalty: RepPenalty = 1.0,
    seed: Seed = 0,
    force: Force = False,
    debug: Debug = False,
):
    """Decode a cache file once on CPU in FP32 and save the tokens and logits as a parity reference.

    `portable decode --reference FILE` then compares against it without decoding on the CPU again. The file records
    the sampling, --stop and --ignore-eos settings and the model: decode them the same way (a differing run is
    refused in one line, since its tokens would end or be drawn differently for reasons that are no bug).
    """
    from caches import load_cache
    from portable import models, pipeline
    from portable.report import megabytes

    config = RunConfig(model=model, cache_path=cache, max_new_tokens=max_new_tokens, stop=stop_strings(stop),
                       ignore_eos=ignore_eos, sampling=sampling(temperature, top_k, top_p, repetition_penalty, seed),
                       force=force)
    check_output("--out", out, ("--cache", cache), what="reference")
    cache_cpu = load_cache(cache)
    source = models.resolve(model or cache_cpu.model.get("source"))
    ref = pipeline.reference_decode(cache_cpu, source, config, cache_cpu.file_info.get("payload_crc32"))
    ref.save(out)
    typer.echo(f"Saved CPU FP32 reference to {out} ({cache_cpu.batch} sequences, "
               f"{sum(len(t) for t in ref.tokens)} tokens, {megabytes(out.stat().st_size)})")


@app.command("parity")
@command
def parity_matrix(
    backend: Annotated[Optional[list[str]], typer.Option(
        "--backend", "-b", help="Backends, comma-separated or repeated, e.g. cpu,onnxruntime (default cpu).")] = None,
    precision: Annotated[Optional[list[str]], typer.Option(
        "--precision", "-p", help=f"Precisions, comma-separated or repeated (default {','.join(PRECISIONS)}).")] = None,
    cache: Annotated[Optional[list[str]], typer.Option(
        "--cache", "-c", help=f"Cache files, comma-separated or repeated (default {DEFAULT_CACHE}).")] = None,
    prompt: Annotated[Optional[list[str]], typer.Option(
        "--prompt", help="Prompts instead of cache files (repeatable): each is prefilled on CPU FP32 into a "
                         "temporary cache file.")] = None,
    model: Model = None,
    attn: Attn = "sdpa",
    kernels: Kernels = RunConfig.kernels,
    max_new_tokens: MaxNew = 64,
    stop: Stop = None,
    ignore_eos: IgnoreEos = False,
    temperature: Temperature = 0.0,
    top_k: TopK = 0,
    top_p: TopP = 1.0,
    repetition_penalty: RepPenalty = 1.0,
    seed: Seed = 0,
    device: Device = None,
    ort_provider: OrtProvider = None,
    artifact_dir: ArtifactDir = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the plots (one PNG per row).")] = Path(
        "parity-plots"),
    plots: Annotated[bool, typer.Option("--plots/--no-plots", help="Write the plots.")] = True,
    json_path: JsonOut = None,
    force: Force = False,
    debug: Debug = False,
):
    """Check backends x precisions against CPU FP32 on cache files or prompts: one row and one plot per combination.

    The CPU FP32 reference is decoded once per cache file and shared by every combination. A combination that cannot
    run here (an absent backend, a precision the backend lacks) is a row that says why, and the others still run.

    Exit status (a CI gate): 0 when no row is `diverged`; 1 when any row is `diverged` or hit an unexpected `error`
    (likely bugs); 2 on bad input or when no combination could be checked at all. Rows that could not run here
    (`not run`, with the reason) do not fail the run on their own: read the table.
    """
    from contextlib import nullcontext

    import backends
    from portable import parity_matrix as matrix
    from portable.errors import PortableError
    from portable.report import write_json

    names = split_list(backend or ["cpu"], backends.names(), "backend")
    precisions = split_list(precision or list(PRECISIONS), ALL_PRECISIONS, "precision")
    if cache and prompt:
        raise PortableError("give cache files (--cache) or prompts (--prompt), not both")
    paths = [Path(c) for c in split_list(cache, what="cache")] if cache else [DEFAULT_CACHE]
    check_output("--json", json_path, *(("--cache", p) for p in paths))
    if plots:
        check_output("--out", out, what="plots", folder=True)
    if ort_provider is not None and "onnxruntime" not in names:
        raise PortableError("--ort-provider applies to the onnxruntime backend, which is not among --backend "
                            f"{','.join(names)}")
    config = RunConfig(model=model, attn=check_choice(attn, ATTENTION, "attention"),
                       kernels=check_choice(kernels, KERNELS, "kernels"), max_new_tokens=max_new_tokens,
                       stop=stop_strings(stop), ignore_eos=ignore_eos,
                       sampling=sampling(temperature, top_k, top_p, repetition_penalty, seed),
                       device=device, ort_provider=ort_provider, artifact_dir=artifact_dir, force=force, quiet=True)
    prompts = read_prompts(prompt) if prompt else ()
    with matrix.prefilled(config, prompts) if prompts else nullcontext(matrix.cache_labels(paths)) as caches:
        report = matrix.run(config, names, precisions, caches, plot_dir=out if plots else None, debug=debug)
    if prompts:
        report.caches = dict(zip(caches, prompts))
    for warning in report.warnings:
        typer.echo(f"warning: {warning}", err=True)
    typer.echo(matrix.markdown(report.rows), nl=False)
    for line in matrix.notes(report):
        typer.echo(line)
    if json_path:
        write_json(report, json_path)
    counts = report.counts()
    if not any(counts.get(v) for v in ("exact", "within-precision", "diverged")):
        raise PortableError("no combination could be checked here (see the table)")
    if counts.get("diverged") or counts.get(matrix.ERROR):
        raise typer.Exit(1)


@cache_app.command("inspect")
@command
def cache_inspect(
    path: Annotated[Path, typer.Argument(help="A cache file.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print the metadata as JSON.")] = False,
    debug: Debug = False,
):
    """Print a readable summary of a cache file (the header and payload checksums are verified too). A file that would
    not load is still summarised as far as it can be read, after a warning line, and the exit status is 2."""
    from caches.inspect import inspect_file
    from portable.errors import CacheFileError

    text, problem = inspect_file(path, as_json=json_out)
    typer.echo(text)
    if problem:
        raise typer.Exit(CacheFileError.exit_code)


def main(argv: list[str] | None = None, prog_name: str = "portable", command: str | None = None) -> None:
    """The `portable` program; with `command`, that one command alone as its own program (`python prefill.py`, whose
    usage line then reads `prefill.py [OPTIONS]`)."""
    try:  # the click that typer runs on: its own copy since typer 0.2x, the click package before
        from typer._click import exceptions as click_errors
    except ImportError:
        from click import exceptions as click_errors

    program = typer.main.get_command(app)
    if command is not None:
        program = program.commands[command]
    try:
        code = program.main(args=argv, prog_name=prog_name, standalone_mode=False)
    except click_errors.UsageError as e:  # an unknown option, a value out of range: one line, as other bad input
        if type(e).__name__ != "NoArgsIsHelpError":  # (a bare group, whose help is already shown)
            hint = f" (see {e.ctx.command_path} --help)" if e.ctx is not None else ""
            typer.echo(f"error: {e.format_message()}{hint}", err=True)
        sys.exit(e.exit_code)
    except click_errors.ClickException as e:
        typer.echo(f"error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except typer.Abort:
        typer.echo("error: interrupted", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


from portable.bench.cli import bench_app  # noqa: E402  (registered last: the bench group lives in its own package)

app.add_typer(bench_app, name="bench")


@app.command("export")
@command
def export_artifact(
    model: Model = None,
    backend: Backend = "onnxruntime",
    precision: Precision = "fp32",
    ort_provider: OrtProvider = None,
    device: Device = None,
    rebuild: Rebuild = False,
    artifact_dir: ArtifactDir = None,
    json_path: JsonOut = None,
    quiet: Quiet = False,
    debug: Debug = False,
):
    """Build and save a backend's compiled artifact (the ONNX graph) without decoding, for machines that only load.

    Prints where it went and the compile (export + optimisation), save and load times. An existing artifact is
    reused unless --rebuild.
    """
    from portable import export as export_job
    from portable.report import megabytes, write_json

    check_output("--json", json_path)
    config = RunConfig(model=model, backend=backend, precision=precision, device=device,
                       ort_provider=ort_only(backend, ort_provider), rebuild=rebuild, artifact_dir=artifact_dir,
                       quiet=quiet)
    report = export_job.export(config)
    what = f"{report.backend} {report.precision} artifact of {report.model}"
    if report.details.get("artifact_saved_first_by_another_run"):
        done = f"Built the {what}, but another run saved it first: kept that copy,"
    else:
        done = f"{'Reused the saved' if report.reused else 'Saved'} {what}"
    typer.echo(f"{done} in {report.artifact} ({', '.join(report.files)}; {megabytes(report.bytes)})")
    typer.echo(artifact_times(report.compile_s, report.save_s, report.load_s, report.reused))
    if json_path:
        write_json(report, json_path)
