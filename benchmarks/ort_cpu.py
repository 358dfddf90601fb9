"""ONNX Runtime (CPU provider) against PyTorch eager on the CPU, on the embedded model: issue 5's numbers, one run.

    .venv/bin/python benchmarks/ort_cpu.py --out benchmarks/results/onnxruntime_cpu.md

In one process:
1. Artifacts: `OrtBackend.load` into an empty artifact folder, `--exports` times (compile = export + optimisation,
   then save, then load); then session creation from the saved file `--loads` times. Medians.
2. Per-step decode latency, for every thread count of `--threads` (ONNX Runtime's intra-op threads follow
   torch.get_num_threads()): for each prompt, a CPU fp32 prefill -> cache file, then `--new` tokens (EOS ignored)
   decoded with --backend cpu and --backend onnxruntime in turn, `--reps` times, interleaved. The number per backend
   is the median over prompts and repetitions of each run's step P50 (the decode report's; timed region: the
   forward + the token pick, see portable/generation.py). Parity off while timing.
3. Parity: the ONNX Runtime fp32 verdict vs CPU FP32 on every prompt (the pipeline's own comparison).
4. fp16 on the CPU provider, both ways (ONNX Runtime's float16 conversion keeping fp32 I/O, and a native fp16
   export), and int8: step P50 and verdict on the first prompt.

The machine's load average is recorded before and after: other processes on a shared machine slow PyTorch's
multi-threaded steps far more than ONNX Runtime's, so a run under load is flagged in the report.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backends import onnxruntime as ort_backend  # noqa: E402
from portable import models, pipeline  # noqa: E402
from portable.config import DEFAULT_PROMPT, RunConfig  # noqa: E402
from portable.environment import environment  # noqa: E402

PROMPTS = (
    DEFAULT_PROMPT,
    "import os\nimport sys\n\n\ndef main(argv):\n    parser = ",
    "class Stack:\n    def push(self, item):\n",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "for i, line in enumerate(lines):\n    if line.startswith('#'):",
)


def median(values):
    return statistics.median(values) if values else float("nan")


def artifact_times(exports: int, loads: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    source = models.resolve("default")
    rows = []
    with tempfile.TemporaryDirectory(prefix="ort-bench-") as tmp:
        for i in range(exports):
            config = RunConfig(artifact_dir=Path(tmp) / f"a{i}", quiet=True)
            info = ort_backend.OrtBackend().load(config, source).info
            rows.append({"compile": info.compile_s, "export": info.details["stages_s"]["export"],
                         "save": info.save_s, "load": info.load_s})
        config = RunConfig(artifact_dir=Path(tmp) / "a0", quiet=True)
        reloads = [ort_backend.OrtBackend().load(config, source).info.load_s for _ in range(loads)]
        size = sum(p.stat().st_size for p in (Path(tmp) / "a0").rglob("*") if p.is_file())
    return {"compile": median([r["compile"] for r in rows]), "export": median([r["export"] for r in rows]),
            "save": median([r["save"] for r in rows]), "load": median(reloads), "exports": rows,
            "reloads": reloads, "bytes": size}


def decode_times(caches: list[Path], artifacts: Path, threads: int, new: int, reps: int) -> dict:
    torch.set_num_threads(threads)
    steps = {"cpu": [], "onnxruntime": []}
    for _ in range(reps):
        for cache in caches:
            for backend in steps:
                report = pipeline.decode(RunConfig(cache_path=cache, backend=backend, artifact_dir=artifacts,
                                                   max_new_tokens=new, ignore_eos=True, parity=False, quiet=True))
                assert report.new_tokens == [new], report.new_tokens
                steps[backend].append(report.timing.decode.step_p50_ms)
    return {backend: median(values) for backend, values in steps.items()} | {"samples": steps}


def verdicts(caches: list[Path], artifacts: Path, new: int) -> list:
    return [pipeline.decode(RunConfig(cache_path=cache, backend="onnxruntime", artifact_dir=artifacts,
                                      max_new_tokens=new, ignore_eos=True, quiet=True)).parity for cache in caches]


def reduced_precision(cache: Path, artifacts: Path, threads: int, new: int, reps: int) -> list[dict]:
    """fp16 both ways and int8 on the first prompt: step P50 (median of reps) and the parity verdict."""
    torch.set_num_threads(threads)
    source = models.resolve("default")
    rows = []
    from caches import load_cache
    from portable.generation import run_decode
    from portable.sampling import Sampler

    loaded = load_cache(cache)
    for precision, mode in (("fp16", "convert"), ("fp16", "native"), ("int8", None)):
        folder = artifacts / f"{precision}-{mode}"
        config = RunConfig(cache_path=cache, backend="onnxruntime", precision=precision, artifact_dir=folder,
                           max_new_tokens=new, ignore_eos=True, quiet=True)
        runner = ort_backend.OrtBackend().load(config, source, fp16=mode)
        p50 = []
        for _ in range(reps):
            result = run_decode(runner, loaded.to("cpu", runner.dtype), Sampler(config.sampling, 1), new,
                                pipeline.make_stopper(runner, config))
            p50.append(median(result.step_times_s) * 1e3)
        report = _decode_with_mode(config, mode)  # the pipeline's verdict, on the artifact just built
        rows.append({"precision": precision, "mode": mode, "p50": median(p50), "cache_dtype": runner.spec.cache_dtype,
                     "verdict": report.parity})
    return rows


def _decode_with_mode(config: RunConfig, mode: str | None):
    """pipeline.decode with the ONNX Runtime backend's fp16 mode forced (RunConfig has no such option: the backend
    picks it per provider; this benchmark is what the choice rests on)."""
    from unittest import mock

    original = ort_backend.OrtBackend.load
    with mock.patch.object(ort_backend.OrtBackend, "load",
                           lambda self, cfg, source, **kw: original(self, cfg, source, fp16=mode, **kw)):
        return pipeline.decode(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write the markdown report here")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--exports", type=int, default=3)
    parser.add_argument("--loads", type=int, default=5)
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    load_before = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")

    with tempfile.TemporaryDirectory(prefix="ort-bench-") as tmp:
        tmp = Path(tmp)
        artifacts = artifact_times(args.exports, args.loads, threads[-1])
        caches = []
        for i, prompt in enumerate(PROMPTS):
            caches.append(tmp / f"p{i}.safetensors")
            pipeline.prefill(RunConfig(prompts=(prompt,), cache_path=caches[-1], quiet=True))
        shared = tmp / "artifacts"
        ort_backend.OrtBackend().load(RunConfig(artifact_dir=shared, quiet=True), models.resolve("default"))
        decode = {t: decode_times(caches, shared, t, args.new, args.reps) for t in threads}
        torch.set_num_threads(threads[-1])
        parity = verdicts(caches, shared, args.new)
        reduced = reduced_precision(caches[0], tmp / "reduced", threads[-1], args.new, args.reps)
    load_after = os.getloadavg()
    text = report(command, started, load_before, load_after, artifacts, decode, parity, reduced, args)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


def report(command, started, load_before, load_after, artifacts, decode, parity, reduced, args) -> str:
    env = environment()
    lines = [
        "# ONNX Runtime backend on the CPU provider vs PyTorch eager (CPU)",
        "",
        f"- date: {started}",
        f"- machine: {env['cpu']}, {os.cpu_count()} logical CPUs; load average before {load_before[0]:.2f}, "
        f"after {load_after[0]:.2f}",
        f"- versions: python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, "
        f"onnxruntime {env['onnxruntime']}, onnx {_v('onnx')}, onnxscript {_v('onnxscript')}; commit {env['commit']}",
        f"- model: the embedded default model (Llama, 6 layers, hidden 256, GQA 4/2 heads, vocab 4096, "
        f"{artifacts['bytes'] / 1e6:.1f} MB ONNX artifact), batch 1, {len(PROMPTS)} prompts of 17-30 tokens, "
        f"{args.new} new tokens each (EOS ignored)",
        f"- command: `{command}`",
        "",
        "## Per-step decode latency, fp32 (median of each run's step P50 over prompts x repetitions)",
        "",
        "| threads | ONNX Runtime CPU (ms) | PyTorch eager CPU (ms) | speed-up |",
        "|---:|---:|---:|---:|",
    ]
    for t, row in decode.items():
        lines.append(f"| {t} | {row['onnxruntime']:.3f} | {row['cpu']:.3f} | {row['cpu'] / row['onnxruntime']:.2f}x |")
    exact = sum(p.verdict == "exact" for p in parity)
    lines += [
        "",
        f"Parity of ONNX Runtime fp32 vs CPU FP32: {exact}/{len(parity)} prompts `exact` "
        f"({', '.join(f'{p.verdict} {p.matched_tokens}/{p.compared_tokens}' for p in parity)})",
        "",
        f"## Export, save, load (threads {args.threads.split(',')[-1]}; medians of {args.exports} exports and "
        f"{args.loads} loads)",
        "",
        "| stage | seconds |",
        "|---|---:|",
        f"| compile = export + optimisation | {artifacts['compile']:.2f} |",
        f"| of which torch.onnx export | {artifacts['export']:.2f} |",
        f"| save (write the artifact) | {artifacts['save']:.3f} |",
        f"| load (session from the saved file) | {artifacts['load']:.3f} |",
        "",
        f"- load is {artifacts['compile'] / artifacts['load']:.0f}x faster than compiling afresh "
        f"(export alone: {artifacts['export'] / artifacts['load']:.0f}x); target >= 10x",
        f"- save takes {artifacts['save'] / artifacts['export']:.3f}x the export time; target <= 2x",
        f"- raw: exports {[round(r['compile'], 2) for r in artifacts['exports']]} s, loads "
        f"{[round(x, 3) for x in artifacts['reloads']]} s",
        "",
        f"## Reduced precision on the CPU provider (first prompt; step P50, median of {args.reps})",
        "",
        "| precision | how | cache dtype | step P50 (ms) | verdict |",
        "|---|---|---|---:|---|",
    ]
    for row in reduced:
        how = {"convert": "fp32 export + float16 conversion, fp32 I/O", "native": "native fp16 export, fp16 I/O",
               None: "dynamic quantization, int8 weights"}[row["mode"]]
        lines.append(f"| {row['precision']} | {how} | {row['cache_dtype']} | {row['p50']:.3f} | "
                     f"{row['verdict'].line().removeprefix('Parity vs CPU FP32: ')} |")
    lines.append("")
    return "\n".join(lines)


def _v(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "-"


if __name__ == "__main__":
    main()
