"""`portable bench [OPTIONS]` and `portable bench kernels`: parse the sweep, run it, print or write the results.

Every sweep option takes a comma list, a range (`1-4096*2`, `128-512+128`) or repeats. `-o` takes a format (md,
csv, json, jsonl: printed on stdout) or a file (format from its suffix or --format; the md table still goes to
stdout). The progress bar and anything that is not the chosen format go to stderr, so `-o json` prints pure JSON.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from portable.bench.plan import GPU_SYNC_EVERY
from portable.bench.spec import SweepSpec
from portable.cli_options import BACKEND_NAMES, Debug, check_output, command, fail, sampling
from portable.config import ALL_PRECISIONS, ATTENTION, KERNELS, user_cache_dir

DEFAULTS = SweepSpec()

bench_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                        help="Benchmark sweeps (pp512, tg128, pg512,128, tg128@d4096), suites, peers, kernels.")

ListOpt = Optional[list[str]]


@bench_app.callback(invoke_without_command=True)
@command
def bench(
    ctx: typer.Context,
    model: Annotated[ListOpt, typer.Option("--model", "-m", help=(
        "Models: 'default', a folder, a hub id or preset:NAME (llama-3.2-1b, qwen3-1.7b, gemma3-1b, santacoder-1b, "
        "mistral-7b, mamba-1.4b); a comma list."))] = None,
    backend: Annotated[ListOpt, typer.Option("--backend", "-b", help=f"Backends: {', '.join(BACKEND_NAMES)}.")] = None,
    precision: Annotated[ListOpt, typer.Option(
        "--precision", "-p", help="fp32, fp16, bf16 (int8: onnxruntime, cuda, rocm).")] = None,
    attn: Annotated[ListOpt, typer.Option("--attn", help=f"Attention: {', '.join(ATTENTION)}.")] = None,
    kernels: Annotated[ListOpt, typer.Option("--kernels", help="GPU backends: triton or torch.")] = None,
    batch: Annotated[ListOpt, typer.Option("--batch", help="Batch sizes: 1,8,64 or 1-4096*2.")] = None,
    tests: Annotated[ListOpt, typer.Option("--tests", "-t", help=(
        "Tests: ppN (prefill), tgN (decode), pgP,G (both), tgN@dD (decode after a D-token cache). "
        f"Default {','.join(t.name for t in DEFAULTS.tests)}."))] = None,
    suite: Annotated[Optional[str], typer.Option("--suite", help=(
        "Seed-003 suite instead of --tests: quick (short, medium), standard (+ prefill, decode, sampled), full "
        "(+ long, full-pipe); or a comma list of those configurations, e.g. medium,sampled."))] = None,
    repetitions: Annotated[Optional[int], typer.Option(
        "--repetitions", "-r", min=1, help=f"Timed repetitions ({DEFAULTS.repetitions}).")
                           ] = None,
    warmup: Annotated[Optional[int], typer.Option(
        "--warmup", min=0, help=f"Untimed repetitions first ({DEFAULTS.warmup}).")] = None,
    sync_every: Annotated[ListOpt, typer.Option("--sync-every", help=(
        f"Read generated tokens back every N decode steps (default {GPU_SYNC_EVERY} on GPUs, 1 elsewhere)."))] = None,
    threads: Annotated[ListOpt, typer.Option("--threads", help="CPU threads (torch.set_num_threads).")] = None,
    compile: Annotated[bool, typer.Option("--compile/--no-compile", help="GPU backends: capture the decode step.")
                       ] = True,
    device: Annotated[Optional[str], typer.Option("--device", help="Device, e.g. cuda:1.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help=(
        "Seed of the random prompt token ids (and of the sampler, with --temperature)."))] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", min=0.0, help=(
        "Sample the --tests' tokens (0 = greedy, the default), as seed 003's ad-hoc runs; with --top-k, --top-p "
        "and --repetition-penalty."))] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", min=0, help="Keep the k most likely tokens.")] = None,
    top_p: Annotated[Optional[float], typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling.")] = None,
    repetition_penalty: Annotated[Optional[float], typer.Option(
        "--repetition-penalty", min=0.0, help="1 = off.")] = None,
    compare: Annotated[ListOpt, typer.Option("--compare", help=(
        "Also time a peer on every point: hf (generate with a dynamic cache; on GPUs also static cache + compile), "
        "or one of those alone: hf-dynamic, hf-static-compile."
    ))] = None,
    profile: Annotated[Optional[Path], typer.Option("--profile", help=(
        "Write a PyTorch profiler Chrome trace of a few steps of every point to this folder."))] = None,
    measure_peak: Annotated[bool, typer.Option("--measure-peak", help=(
        "Measure the device's copy bandwidth and remember it (for % of peak); runs the benchmark too only when "
        "--tests or --suite is given."))] = False,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help=(
        "md (default), csv, json or jsonl on stdout; or a file to write (.md, .csv, .json, .jsonl)."))] = None,
    fmt: Annotated[Optional[str], typer.Option("--format", help="The format of the -o file.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    debug: Debug = False,
):
    """Time tests over a sweep of models, backends, precisions and batches; report t/s, latency, memory, bandwidth.

    Timed regions: ppN one prefill forward; tgN N decode steps after a 1-token prompt (or a reloaded D-token cache
    for tgN@dD); pgP,G and suite configs prefill + generation end to end. Never timed: prompt building, model
    loading, graph capture (the warm-up pays it), depth-cache reloads.
    """
    if ctx.invoked_subcommand is not None:
        return
    from dataclasses import replace

    from portable.bench import sinks
    from portable.bench.spec import parse_ints, parse_names, parse_tests
    from portable.bench.suites import suite as suite_tests
    from portable.errors import PortableError

    if tests and suite:
        raise PortableError("give --tests or --suite, not both")
    sampled = [v for v in (temperature, top_k, top_p, repetition_penalty) if v is not None]
    if sampled and suite:
        raise PortableError("a suite's configurations carry their own sampling (sampled, full-pipe); give the "
                            "sampling options with --tests")
    base = DEFAULTS
    spec = SweepSpec(
        models=parse_names(model, "model") if model else base.models,
        backends=parse_names(backend, "backend", BACKEND_NAMES) if backend else base.backends,
        precisions=parse_names(precision, "precision", ALL_PRECISIONS) if precision else base.precisions,
        attns=parse_names(attn, "attention", ATTENTION) if attn else base.attns,
        kernels=parse_names(kernels, "kernels", KERNELS) if kernels else base.kernels,
        batches=parse_ints(batch, "batch") if batch else base.batches,
        threads=parse_ints(threads, "threads") if threads else base.threads,
        sync_every=parse_ints(sync_every, "sync-every") if sync_every else base.sync_every,
        tests=suite_tests(suite) if suite else parse_tests(tests) if tests else base.tests,
        repetitions=base.repetitions if repetitions is None else repetitions,
        warmup=base.warmup if warmup is None else warmup,
        compile=compile, device=device, seed=base.seed if seed is None else seed,
        compare=parse_names(compare, "compare") if compare else (), profile_dir=profile)
    if sampled:
        chosen = sampling(temperature or 0.0, top_k or 0, 1.0 if top_p is None else top_p,
                          1.0 if repetition_penalty is None else repetition_penalty, spec.seed)
        spec = spec.replace(tests=tuple(replace(t, sampling=chosen) for t in spec.tests))
    out_format, out_file = _output(output, fmt)
    check_output("--output", out_file, what="results")
    check_output("--profile", profile, what="profiler traces", folder=True)

    if measure_peak:
        _measure_peaks(spec)
        if not (tests or suite):
            return

    peers = None
    if spec.compare:
        from portable.bench.peers import Peers

        peers = Peers(spec.compare)
    results = _run(spec, peers, quiet, debug)
    text = sinks.render(results, out_format)
    if out_file is not None:
        sinks.write(text, out_file)
        typer.echo(sinks.markdown(results), nl=False)
        typer.echo(f"wrote {len(results)} results to {out_file}", err=True)
    else:
        typer.echo(text, nl=False)
        ratios = sinks.ratio_table(results)
        if out_format != "md" and ratios:
            typer.echo(ratios, err=True, nl=False)  # stdout stays pure JSON / CSV
    from portable.bench.run import failed_unexpectedly

    unexpected = sum(map(failed_unexpectedly, results))
    if unexpected:  # likely a bug: fails the run (exit 1), as an unexpected error always does, after every row
        fail(f"{unexpected} point(s) failed unexpectedly (see their rows; --debug prints the tracebacks)", 1)
    if not any(r.ok for r in results):
        raise PortableError("no point could be measured (see the status of each row)")


def _output(output: str | None, fmt: str | None) -> tuple[str, Path | None]:
    from portable.bench.sinks import FORMATS, format_for
    from portable.errors import PortableError

    if fmt is not None and fmt not in FORMATS:
        raise PortableError(f"unknown output format {fmt!r}; choose from {', '.join(FORMATS)}")
    if output is None:
        return fmt or "md", None
    if output in FORMATS:
        if fmt is not None and fmt != output:
            raise PortableError(f"-o {output} prints {output} on stdout and --format {fmt} names another format; "
                                f"leave one out")
        return output, None
    return format_for(Path(output), fmt), Path(output)


def _measure_peaks(spec) -> None:
    import torch

    import backends
    from portable.bench import roofline

    for name in spec.backends:
        backends.require(name)
        device = torch.device(spec.device or "cuda") if name in ("cuda", "rocm") else torch.device("cpu")
        key, gbps = roofline.measure_peak(device)
        typer.echo(f"peak bandwidth of {key}: {gbps:.1f} GB/s (copy benchmark), remembered in "
                   f"{user_cache_dir() / roofline.PEAK_FILE}", err=True)


def _run(spec, peers, quiet: bool, debug: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from portable.bench.run import planned_repetitions, run_sweep

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True, disable=quiet) as bar:
        task = bar.add_task("bench", total=planned_repetitions(spec, peers))

        def progress(label: str, n: int) -> None:
            bar.update(task, advance=max(n, 0), description=label)

        return run_sweep(spec, progress, peers, debug)


@bench_app.command("kernels")
@command
def kernels_cmd(
    names: Annotated[ListOpt, typer.Option("--kernel", "-k", help=(
        "Kernels to time (default all): rmsnorm, add_rmsnorm, gated, rope_qk, gemv, attention, "
        "attention_oproj."))] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="fp32, fp16 or bf16.")] = "bf16",
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the PNG plots and CSV tables.")] = Path(
        "bench-kernels"),
    interpret: Annotated[bool, typer.Option("--interpret", help=(
        "Run in Triton's CPU interpreter with tiny sizes (slow; for testing the harness, not for timings)."))] = False,
    debug: Debug = False,
):
    """Time each Triton kernel against its PyTorch reference over a range of sizes (triton.testing, perf_report
    style) and plot GB/s per size as PNG files."""
    from portable.bench import kernels as kb
    from portable.bench.spec import parse_names

    selected = parse_names(names, "kernel", tuple(kb.KERNELS)) if names else tuple(kb.KERNELS)
    check_output("--out", out, what="plots and tables", folder=True)
    for table, png in kb.run(selected, dtype=dtype, out=out, interpret=interpret):
        typer.echo(table)
        typer.echo(f"plot: {png}")
