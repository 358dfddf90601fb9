"""Which saved compiled decode step loads faster and more robustly: an AOTInductor `.pt2` package or the torch.compile
cache artifacts ("mega-cache")? Issue 7 asks for the measurement; our own decode path saves its compiled Triton
kernels instead (`backends/fast_runner.py`, `timing.compile_s / save_s / load_s`), timed by `decode.py` itself.

    python benchmarks/compile_artifacts.py --model default --device cuda --precision bf16 --out artifacts.json

The step compiled, the same for both: the ONNX backend's decoder graph (`backends/onnx_export.DecoderGraph`: the HF
model over flat tensors, past keys/values in, present ones out, dynamic batch and past length, one new token), which torch.export takes
(transformers' own static-cache export recipe, `TorchExportableModuleWithStaticCache`, failed to export on 5.17 and
5.24 with torch 2.13: "mutating a non-functional tensor"). For each method, two fresh processes, each with empty
Inductor and Triton caches of its own:

    build   export / compile, save the artifact                      -> compile_s, save_s, artifact bytes
    load    load the artifact, first step (for torch.compile: the     -> load_s, first_step_s, step_ms, parity
            re-trace that the cache artifacts shortcut), then steps

`parity`: the largest logit difference from the eager module over the same steps, and whether the greedy tokens agree.
A method that fails reports its error instead of numbers (robustness is part of the question).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STEPS = 8
METHODS = ("aoti", "compile-cache")


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _graph(args):
    """(eager module, device, prefilled pasts): the ONNX backend's decoder graph (backends/onnx_export.py: one
    forward over flat tensors, past keys/values in and present ones out, dynamic batch and lengths) on `--device`,
    and the cache of a 6-token prompt (two sequences: torch.export specialises sizes 0 and 1)."""
    import torch
    from transformers import DynamicCache

    from backends import onnx_export
    from portable import architectures, models

    loaded = models.load(models.resolve(args.model), precision=args.precision, device=args.device)
    model = loaded.model.eval()
    model.set_attn_implementation(onnx_export.ATTENTION)  # SDPA, registered so that torch.export can take it
    layers = onnx_export._example_cache(model, 2, 6,
                                        **{architectures.cache_keyword(model): DynamicCache(config=model.config)})
    return (onnx_export.DecoderGraph(model, onnx_export.layer_plan(model.config)), torch.device(args.device),
            [(layer.keys, layer.values) for layer in layers])


def _inputs(token, pasts, device):
    import torch

    past = pasts[0][0].shape[2]
    return (torch.full((2, 1), token, device=device), torch.ones(2, past + 1, dtype=torch.long, device=device),
            torch.full((2, 1), past, device=device), pasts)


def _dynamic():
    import torch

    dyn = torch.export.Dim.DYNAMIC  # named dimensions fail on these models (see backends/onnx_export.py); one new
    # token per step (a dynamic sequence would be specialised to 1 anyway)
    return dyn, lambda layers: {"input_ids": {0: dyn}, "attention_mask": {0: dyn, 1: dyn}, "position_ids": {0: dyn},
                                "past": [({0: dyn, 2: dyn}, {0: dyn, 2: dyn}) for _ in range(layers)]}


def _run_steps(fn, device, pasts, steps=STEPS):
    """Greedy steps from token 1 (sequence 0's pick feeds both): (logits of sequence 0 per step, tokens, seconds of
    the first step, median ms of the others)."""
    import torch

    token, logits, tokens, times = 1, [], [], []
    with torch.no_grad():
        for _ in range(steps):
            _sync(device)
            t = time.perf_counter()
            out = fn(*_inputs(token, pasts, device))
            _sync(device)
            stage(f"step {len(times) + 1} done")
            times.append(time.perf_counter() - t)
            pasts = list(zip(out[1::2], out[2::2]))
            logits.append(out[0][0, -1].float().cpu())
            token = int(out[0][0, -1].argmax())
            tokens.append(token)
    rest = sorted(times[1:])
    return logits, tokens, times[0], rest[len(rest) // 2] * 1e3


def _parity(module, device, pasts, logits, tokens) -> dict:
    ref_logits, ref_tokens, _, eager_ms = _run_steps(module, device, pasts)
    diff = max(float((a - b).abs().max()) for a, b in zip(logits, ref_logits))
    return {"max_abs_logit_diff": diff, "greedy_tokens_equal": tokens == ref_tokens, "eager_step_ms": eager_ms}


def build(args) -> dict:
    import torch

    module, device, pasts = _graph(args)
    stage("model loaded")
    art = Path(args.dir)
    if args.method == "aoti":
        t = time.perf_counter()
        with torch.no_grad():
            exported = torch.export.export(module, _inputs(1, pasts, device), dynamic_shapes=_dynamic()[1](len(pasts)),
                                           strict=False)
        export_s = time.perf_counter() - t
        t = time.perf_counter()
        path = torch._inductor.aoti_compile_and_package(exported, package_path=str(art / "step.pt2"))
        compile_s = time.perf_counter() - t
        return {"export_s": export_s, "compile_s": export_s + compile_s, "save_s": 0.0,
                "save_note": "aoti_compile_and_package writes the package as it compiles (included in compile_s)",
                "artifact_bytes": Path(path).stat().st_size}
    compiled = torch.compile(module, dynamic=True)
    t = time.perf_counter()
    _run_steps(compiled, device, pasts, steps=2)
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    blob, _info = torch.compiler.save_cache_artifacts()
    (art / "cache.bin").write_bytes(blob)
    save_s = time.perf_counter() - t
    return {"compile_s": compile_s, "save_s": save_s, "artifact_bytes": len(blob),
            "compile_note": "the first two steps through torch.compile(dynamic=True): tracing, Inductor, Triton"}


def load(args) -> dict:
    import torch

    art = Path(args.dir)
    module, device, pasts = _graph(args)  # the eager reference (and, for torch.compile, the code to trace again)
    stage("model loaded")
    if args.method == "aoti":
        t = time.perf_counter()
        fn = torch._inductor.aoti_load_package(str(art / "step.pt2"))
        load_s = time.perf_counter() - t
        stage("package loaded")
    else:
        t = time.perf_counter()
        torch.compiler.load_cache_artifacts((art / "cache.bin").read_bytes())
        load_s = time.perf_counter() - t
        fn = torch.compile(module, dynamic=True)
    logits, tokens, first_s, step_ms = _run_steps(fn, device, pasts)
    return {"load_s": load_s, "first_step_s": first_s, "load_to_first_step_s": load_s + first_s, "step_ms": step_ms,
            **_parity(module, device, pasts, logits, tokens)}


def stage(name: str) -> None:
    """Progress on stderr, so that a crash (a segfault leaves no RESULT line) shows how far the child got."""
    print(f"STAGE {name}", file=sys.stderr, flush=True)


def child(args) -> None:
    import faulthandler

    faulthandler.enable()  # a native crash prints the Python stack to stderr
    try:
        result = (build if args.phase == "build" else load)(args)
    except Exception as e:  # robustness is measured: the failure is the result
        result = {"error": f"{type(e).__name__}: {e}"[:600]}
    print("RESULT " + json.dumps(result), flush=True)


def _tail(stderr: str, lines: int = 12) -> list[str]:
    """The last progress marker and the last lines of a failed child's stderr, warnings left out."""
    kept = [x for x in stderr.splitlines() if x.strip() and "Warning" not in x and not x.startswith("  warnings.")]
    stages = [x for x in kept if x.startswith("STAGE ")]
    return stages[-1:] + [x for x in kept if not x.startswith("STAGE ")][-lines:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated: " + ", ".join(METHODS))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per phase")
    parser.add_argument("--phase", choices=["build", "load"], help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        return child(args)
    unknown = sorted(set(args.methods.split(",")) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}: choose from {', '.join(METHODS)}")
    import torch
    import transformers

    rows = []
    for method in args.methods.split(","):
        row = {"method": method, "model": args.model, "precision": args.precision, "device": args.device,
               "torch": torch.__version__, "transformers": transformers.__version__}
        with tempfile.TemporaryDirectory(prefix="portable-artifact-") as art:
            for phase in ("build", "load"):
                with tempfile.TemporaryDirectory(prefix="portable-caches-") as caches:
                    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=f"{caches}/inductor",
                               TRITON_CACHE_DIR=f"{caches}/triton", PYTHONPATH=str(ROOT))
                    cmd = [sys.executable, __file__, "--phase", phase, "--method", method, "--dir", art,
                           "--model", args.model, "--precision", args.precision, "--device", args.device]
                    try:
                        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
                        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                        result = json.loads(lines[-1][7:]) if lines else {
                            "error": f"exit {proc.returncode}", "stderr_tail": _tail(proc.stderr)}
                    except subprocess.TimeoutExpired:
                        result = {"error": f"timed out after {args.timeout} s"}
                row[phase] = result
                print(method, phase, json.dumps(result), flush=True)
                if "error" in result:
                    break
        rows.append(row)
        if args.out:  # after each method, so that a run cut short keeps what it measured
            args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
