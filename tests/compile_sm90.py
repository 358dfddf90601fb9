"""Compile every Triton kernel of the fast decode step for an sm_90 GPU (H100/H200) with the installed Triton, on a
machine without a GPU: `python tests/compile_sm90.py default:fp32 preset:qwen3-1.7b:bf16 preset:llama-3.2-1b:int8`.

Triton's interpreter, which runs the kernels on CPU tensors in CI, accepts what the GPU compiler refuses (a `tl.dot`
over fewer than 16 values, too much shared memory), and the GPU machine is lent rarely. Here a stand-in driver reports
an sm_90 target and each launch becomes a compile-only warm-up (Triton's own `warmup=True`) through ptxas, which the
Triton wheel ships; nothing runs. Preset shapes get 2 layers of uninitialised weights (compiling needs only shapes).

Prints one JSON line per compiled kernel variant and per failure, then a summary line; exit status 0 when everything
compiled, 1 when something failed, 3 when this Triton lacks the hooks used here (its internals changed). Before our
kernels it compiles a kernel that must fail (a bf16 dot over 8 values): if that compiles, the harness is not really
compiling, and it exits 1.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # read when the kernel modules are imported
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

SHARED_BYTES = 232_448  # the most shared memory one sm_90 block may opt into (H100, H200: 227 KiB)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.bfloat16}
compiled: dict[tuple, bool] = {}
errors: list[dict] = []


def emit(**record) -> None:
    print(json.dumps(record, default=str), flush=True)


def install_hooks() -> None:
    """Route every launch of every Triton kernel into a compile for sm_90, recording what compiled and what failed."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.runtime import driver
        from triton.runtime.jit import JITFunction
    except ImportError as e:
        emit(event="unsupported", reason=f"this Triton lacks the hooks: {e}")
        sys.exit(3)

    class Sm90:  # the few questions JITFunction.run asks of the active driver
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_device_interface(self):
            return torch.cuda

        def is_active(self):
            return True

    driver.set_active(Sm90())
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup=False, **kwargs):
        constants = {k: v for k, v in kwargs.items() if k.isupper()}
        key = (self.fn.__name__, tuple(sorted(constants.items())))
        if key in compiled:
            return None
        try:
            kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        except Exception as e:  # noqa: BLE001 - a compile error of any kind is the finding
            errors.append({"kernel": self.fn.__name__, "constants": constants,
                           "error": f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else e}"})
            emit(event="failed", **errors[-1])
            compiled[key] = False
            return None
        cubin = "cubin" in getattr(kernel, "asm", {})
        shared = getattr(getattr(kernel, "metadata", None), "shared", 0) or 0
        compiled[key] = cubin and shared <= SHARED_BYTES
        problem = ("no cubin was produced" if not cubin else  # the launch, not the compile, checks shared memory
                   f"needs {shared} bytes of shared memory, more than sm_90's {SHARED_BYTES}"
                   if shared > SHARED_BYTES else None)
        if problem:
            errors.append({"kernel": self.fn.__name__, "constants": constants, "error": problem})
        emit(event="failed" if problem else "compiled", kernel=self.fn.__name__, constants=constants, shared=shared,
             **({"error": problem} if problem else {}))
        return None

    JITFunction.run = compile_only


def check_the_harness() -> None:
    """A dot over 8 values, which Triton refuses on NVIDIA: it must show up as a failure."""
    import triton
    import triton.language as tl

    @triton.jit
    def _dot_k8(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
        m, n, k = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
        a = tl.load(a_ptr + m[:, None] * K + k[None, :])
        b = tl.load(b_ptr + k[:, None] * N + n[None, :])
        tl.store(c_ptr + m[:, None] * N + n[None, :], tl.dot(a, b))

    a, b, c = torch.zeros(16, 8, dtype=torch.bfloat16), torch.zeros(8, 16, dtype=torch.bfloat16), torch.zeros(16, 16)
    _dot_k8[(1,)](a, b, c, M=16, N=16, K=8)
    if not errors or errors[-1]["kernel"] != "_dot_k8":
        emit(event="harness", error="a dot over 8 values compiled: the launches are not being compiled for sm_90")
        sys.exit(1)
    errors.clear()


def model_for(spec: str):
    """(model, int8 rows or None) for `default:PRECISION` or `preset:NAME:PRECISION`."""
    name, precision = spec.rsplit(":", 1)
    dtype = DTYPES[precision]
    if name == "default":
        from portable import models

        model = models.load(models.resolve("default"), "bf16" if precision == "int8" else precision, "cpu").model
    else:
        from transformers import AutoModelForCausalLM

        from portable import presets

        config = presets.get(name.removeprefix("preset:"))
        config.num_hidden_layers = 2
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:2]
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model = model.to_empty(device="cpu").eval().requires_grad_(False)
        for p in model.parameters():  # uninitialised bits may hold NaNs; quantizing them would only warn
            p.zero_()
    if precision != "int8":
        return model, None
    from backends import quantize

    return model, quantize.quantize_linears_(model, lean=True)  # as the GPU backends do


def main(specs: list[str]) -> None:
    install_hooks()
    check_the_harness()
    import backends.kernels.attention as attention
    import backends.kernels.gemv as gemv
    from backends.llama_fast import FastDecoder

    gemv.fast_int8 = attention.fast_int8 = lambda device: True  # compiled on NVIDIA: the byte-permute int8 path
    for spec in specs:
        model, int8 = model_for(spec)
        for batch in (1, 2):
            emit(event="model", spec=spec, batch=batch)
            decoder = FastDecoder(model, kernels="triton", pdl=True, int8=int8)
            decoder.allocate(batch, 130)
            for greedy in (False, True):
                decoder.step(greedy)
    emit(event="summary", compiled=sum(compiled.values()), failed=len(errors))
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main(sys.argv[1:])
