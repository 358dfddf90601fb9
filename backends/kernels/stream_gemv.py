"""Batch-1 GEMVs whose weights stream into shared memory by Hopper's bulk copies (`stream_gemv.cu`), for NVIDIA
sm_90+ GPUs: the same products and epilogues as `gemv.gemv` for 2-byte weights (RMSNorm folded in, gated
SwiGLU/GeGLU, accumulation into the fp32 residual, per-program argmax), in a kernel whose producer warp keeps
copying weights while the previous kernel still runs (see the source's header).

Triton cannot express this kernel (a warp that only copies, the others waiting on shared-memory barriers), so it is
CUDA C++ compiled at run time by NVRTC, the runtime compiler PyTorch's CUDA wheels ship (no build step, no nvcc),
and launched through the driver API with programmatic dependent launch. It has no CPU interpreter: the GPU-marked
tests compare it with `gemv.gemv_torch`; on CPU the tests check the work split (`plan`) it is launched with.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("stream_gemv.cu")
CONSUMERS = 8  # consumer warps per program (plus one producer warp)
CHUNK_BYTES = 16 * 1024  # at least this many bytes of weights per chunk the producer copies (W and U together)
# shared memory for chunks in flight. On an H200 (benchmarks/gemv_tune.py --stream, gpu_profile.py "stream ringN"):
# 144 KiB gave the fastest step for both real-shape presets; 96-112 KiB (two GEMVs' programs on one SM) and
# 160-220 KiB were slower
RING_BYTES = 144 * 1024
# the gate/up GEMV's ring (`FastDecoder._ring`): as deep as leaves room on the SM for the attention and combine + W_o
# programs that run beside it while its ring fills. H200 (gpu_profile.py, 2026-12-04 late; BENCHMARKS.md): 208 KiB
# took 8-16 us off both presets' greedy step against 144; 176 and 192 KiB gained less or nothing
GATE_UP_RING_BYTES = 208 * 1024
PART_BYTES = 16 * 1024  # at most this much shared memory for a program's partial sums
MAX_VECTORS = 8  # 16-byte weight vectors per lane per row: a consumer holds 8 * MAX_VECTORS floats of x'
OUT_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
X_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
ACTS = {"silu": 0, "gelu_tanh": 1}


@dataclass(frozen=True)
class Plan:
    """How one [n, k] GEMV is split: `rows` rows per chunk, each row's K in `split` parts (one consumer warp each),
    `stages` chunks in flight, `rows_per_cta` rows per program, `grid` programs."""
    rows: int
    split: int
    stages: int
    rows_per_cta: int
    grid: int

    def shared_bytes(self, k: int, gated: bool) -> int:
        mats = 2 if gated else 1
        return (self.stages * self.rows * k * 2 * mats + 2 * self.stages * 8 + 3 * 32 * 4
                + self.rows_per_cta * self.split * mats * 4)


def plan(n: int, k: int, gated: bool, sms: int, chunk_bytes: int = CHUNK_BYTES,
         ring_bytes: int = RING_BYTES) -> Plan | None:
    """The work split for an [n, k] weight on a GPU with `sms` SMs, or None where the kernel does not apply (each
    consumer warp keeps K/split columns of x in registers: K must be a multiple of 256 * split, and K/split at most
    256 * MAX_VECTORS)."""
    mats = 2 if gated else 1
    row_bytes = 2 * k * mats
    rows = 1  # a chunk: whole rows, at least chunk_bytes (12 KiB chunks streamed at 87% of 24 KiB ones on an H200)
    while rows < CONSUMERS and rows * row_bytes < chunk_bytes:
        rows *= 2
    while rows <= CONSUMERS:
        split = CONSUMERS // rows
        if k % (256 * split) == 0:
            break
        rows *= 2
    else:
        return None
    if k // split > 256 * MAX_VECTORS:  # x' would not fit in a consumer's registers
        return None
    groups = -(-n // rows)
    rows_per_cta = rows * -(-groups // sms)
    # each program keeps its rows' partial sums in shared memory: past PART_BYTES of them, more programs than SMs
    rows_per_cta = min(rows_per_cta, max(rows, PART_BYTES // (4 * split * mats) // rows * rows))
    # no more stages than a program has chunks: what it does not need stays free for the kernels around it
    stages = max(1, min(32, ring_bytes // (rows * row_bytes), rows_per_cta // rows))
    return Plan(rows=rows, split=split, stages=stages, rows_per_cta=rows_per_cta, grid=-(-n // rows_per_cta))


def available(device: torch.device) -> str | None:
    """None if the kernel can run on `device`; otherwise why not."""
    if device.type != "cuda" or torch.version.hip is not None:
        return "needs an NVIDIA GPU"
    if torch.cuda.get_device_capability(device)[0] < 9:
        return "needs bulk copies (sm_90 or newer)"
    try:
        _nvrtc()
    except OSError as e:
        return f"NVRTC not found ({e})"
    return None


def stream_gemv(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, *, norm_w: torch.Tensor | None = None,
                eps: float = 1e-6, norm_offset: float = 0.0, up: torch.Tensor | None = None, act: str = "silu",
                accumulate: bool = False, argmax: tuple[torch.Tensor, torch.Tensor] | None = None,
                pdl: bool = False, chunk_bytes: int = CHUNK_BYTES, ring_bytes: int = RING_BYTES,
                stamps: torch.Tensor | None = None) -> torch.Tensor:
    """As `gemv.gemv` (x: [K] or [1, K]; w, up: [N, K] bf16/fp16 contiguous; out: [N]), on NVIDIA sm_90+.

    `argmax`: fp32 and int32 buffers of `plan(...).grid` entries (one per program). `stamps` (a measurement): int64,
    64 per program; each program writes the GPU's global timer (ns) at the points `stream_gemv.cu` lists."""
    n, k = w.shape
    gated = up is not None
    if w.dtype not in (torch.bfloat16, torch.float16) or not w.is_contiguous() or (gated and (
            up.shape != w.shape or up.dtype != w.dtype or not up.is_contiguous())):
        raise ValueError("stream_gemv needs contiguous bf16/fp16 weights (and `up` like `w`)")
    if accumulate and out.dtype != torch.float32:
        raise ValueError("accumulate=True needs an fp32 output")
    x = x.reshape(-1)
    if x.numel() != k or not x.is_contiguous() or x.dtype not in X_KINDS:
        raise ValueError(f"x must be {k} contiguous fp32/bf16/fp16 values")
    if norm_w is not None and (norm_w.dtype != w.dtype or norm_w.numel() != k or not norm_w.is_contiguous()):
        raise ValueError(f"norm_w must be {k} contiguous values of the weights' dtype")
    if out.numel() != n or not out.is_contiguous() or out.dtype not in OUT_KINDS:
        raise ValueError(f"out must be {n} contiguous fp32/bf16/fp16 values")
    if any(t.data_ptr() % 16 for t in (w, up, x, norm_w) if t is not None):  # bulk copies and vector loads
        raise ValueError("stream_gemv needs 16-byte aligned weights, x and norm_w")
    reason = available(w.device)
    if reason is not None:
        raise ValueError(f"stream_gemv {reason}")
    p = plan(n, k, gated, sms(w.device), chunk_bytes, min(ring_bytes, ring_limit(w.device)))
    if p is None:
        raise ValueError(f"stream_gemv does not take K = {k}")
    if argmax is not None and (accumulate or argmax[0].numel() != p.grid or argmax[1].numel() != p.grid):
        raise ValueError(f"argmax needs a non-accumulating GEMV and {p.grid} entries")
    if stamps is not None and (stamps.dtype != torch.int64 or stamps.numel() < 64 * p.grid
                               or not stamps.is_contiguous()):
        raise ValueError(f"stamps needs {64 * p.grid} contiguous int64 entries")
    defines = {"K": k, "WT_BF16": int(w.dtype == torch.bfloat16), "X_KIND": X_KINDS[x.dtype],
               "HAS_NORM": int(norm_w is not None), "GATED": int(gated), "ACT": ACTS[act],
               "OUT_KIND": 3 if accumulate else OUT_KINDS[out.dtype], "ARGMAX": int(argmax is not None),
               "ROWS": p.rows, "SPLIT": p.split, "STAGES": p.stages, **({"STAMPS": 1} if stamps is not None else {})}
    kernel = _kernel(tuple(sorted(defines.items())), torch.cuda.get_device_capability(w.device), w.device.index or 0)
    shared = p.shared_bytes(k, gated)
    kernel.ensure_shared(shared)
    amax, aidx = argmax if argmax is not None else (out, out)
    args = [ctypes.c_void_p(w.data_ptr()), ctypes.c_void_p((up if gated else w).data_ptr()),
            ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p((norm_w if norm_w is not None else w).data_ptr()),
            ctypes.c_void_p(out.data_ptr()), ctypes.c_void_p(amax.data_ptr()), ctypes.c_void_p(aidx.data_ptr()),
            ctypes.c_int(n), ctypes.c_int(p.rows_per_cta), ctypes.c_float(eps), ctypes.c_float(norm_offset),
            ctypes.c_void_p(stamps.data_ptr() if stamps is not None else 0)]
    kernel.launch(p.grid, (CONSUMERS + 1) * 32, shared, torch.cuda.current_stream(w.device).cuda_stream, args, pdl)
    return out


@functools.lru_cache(maxsize=None)
def sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=None)
def ring_limit(device: torch.device) -> int:
    """The deepest ring one program's shared memory holds on `device` beside its barriers and partial sums (a
    larger `ring_bytes` is cut to it; the ring sets only how many chunks are in flight). RING_BYTES where PyTorch
    does not report the limit."""
    optin = getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 0)
    return optin - PART_BYTES - 1024 if optin else RING_BYTES


# ---- NVRTC and the driver API, through ctypes ----

@functools.lru_cache(maxsize=None)
def _nvrtc() -> ctypes.CDLL:
    try:
        from torch.cuda._utils import _get_gpu_rtc_library  # the library PyTorch's own runtime compilation loads
        return _get_gpu_rtc_library()
    except (ImportError, OSError):
        pass
    import importlib.util

    spec = importlib.util.find_spec("nvidia")  # the pip packages of the CUDA libraries PyTorch's wheels depend on
    found = [str(p) for d in (spec.submodule_search_locations or []) for p in sorted(Path(d).glob("*/lib/libnvrtc.so*"))
             if "builtins" not in p.name] if spec else []
    for name in ("libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so", *found):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise OSError("libnvrtc not found")


@functools.lru_cache(maxsize=None)
def _libcuda() -> ctypes.CDLL:
    return ctypes.CDLL("libcuda.so.1")


def _check(result: int, what: str) -> None:
    if result != 0:
        msg = ctypes.c_char_p()
        _libcuda().cuGetErrorString(result, ctypes.byref(msg))
        raise RuntimeError(f"{what} failed: {msg.value.decode() if msg.value else result}")


def compile_cubin(defines: dict, capability: tuple[int, int]) -> bytes:
    """The kernel compiled by NVRTC for `capability` with -D`defines`: cubin bytes (raises with NVRTC's log)."""
    lib = _nvrtc()
    src = SOURCE.read_bytes()
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), src, b"stream_gemv.cu", 0, None, None) != 0:
        raise RuntimeError("nvrtcCreateProgram failed")
    opts = [f"--gpu-architecture=sm_{capability[0]}{capability[1]}".encode(), b"-std=c++17",
            *(f"-D{k}={v}".encode() for k, v in sorted(defines.items()))]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    try:
        if lib.nvrtcCompileProgram(prog, len(opts), arr) != 0:
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log)
            raise RuntimeError(f"stream_gemv.cu did not compile:\n{log.value.decode(errors='replace')}")
        size = ctypes.c_size_t()
        lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
        cubin = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetCUBIN(prog, cubin)
        return cubin.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def _cached_cubin(defines: dict, capability: tuple[int, int]) -> bytes:
    """From the Triton cache folder in use (the decode artifact's, while it is built or loaded), else compiled."""
    import triton

    key = hashlib.sha256(SOURCE.read_bytes() + repr((sorted(defines.items()), capability)).encode()).hexdigest()
    folder = Path(triton.knobs.cache.dir) / "stream_gemv" if triton.knobs.cache.dir else None
    path = folder / f"{key[:32]}.cubin" if folder else None
    if path is not None and path.is_file():
        return path.read_bytes()
    cubin = compile_cubin(defines, capability)
    if path is not None:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(cubin)
        tmp.replace(path)
    return cubin


class _LaunchAttr(ctypes.Structure):
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_char * 64)]


class _LaunchConfig(ctypes.Structure):
    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_LaunchAttr)), ("numAttrs", ctypes.c_uint)]


_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
_MAX_DYNAMIC_SHARED = 8  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES


class _Kernel:
    def __init__(self, cubin: bytes):
        cuda = _libcuda()
        self._module = ctypes.c_void_p()
        _check(cuda.cuModuleLoadData(ctypes.byref(self._module), cubin), "cuModuleLoadData")
        self._func = ctypes.c_void_p()
        _check(cuda.cuModuleGetFunction(ctypes.byref(self._func), self._module, b"stream_gemv"),
               "cuModuleGetFunction")
        self._shared = 0
        self._pdl_attr = _LaunchAttr(id=_PROGRAMMATIC_STREAM_SERIALIZATION)
        ctypes.memmove(ctypes.addressof(self._pdl_attr) + _LaunchAttr.value.offset, ctypes.byref(ctypes.c_int(1)), 4)

    def ensure_shared(self, nbytes: int) -> None:
        if nbytes > self._shared:
            _check(_libcuda().cuFuncSetAttribute(self._func, _MAX_DYNAMIC_SHARED, nbytes), "cuFuncSetAttribute")
            self._shared = nbytes

    def launch(self, grid: int, block: int, shared: int, stream: int, args: list, pdl: bool) -> None:
        params = (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.pointer(a), ctypes.c_void_p) for a in args])
        cfg = _LaunchConfig(grid, 1, 1, block, 1, 1, shared, ctypes.c_void_p(stream),
                            ctypes.pointer(self._pdl_attr) if pdl else None, 1 if pdl else 0)
        _check(_libcuda().cuLaunchKernelEx(ctypes.byref(cfg), self._func, params, None), "cuLaunchKernelEx")


@functools.lru_cache(maxsize=None)
def _kernel(defines: tuple, capability: tuple[int, int], device_index: int) -> _Kernel:
    with torch.cuda.device(device_index):
        return _Kernel(_cached_cubin(dict(defines), capability))
