"""Every default of a run, in one frozen dataclass.

The CLI builds one `RunConfig` from its options and passes it down; nothing below the CLI invents a default of its
own. Fields that only some commands use keep their defaults when the others build a config.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

# The default prompt: the start of a function the embedded model (trained on Python's standard library) completes.
# It ends at the end of a line's text, not after the newline: the tokenizer merges a newline with the indentation
# that follows, so a prompt ending in a bare newline sends the model to a new top-level block.
DEFAULT_PROMPT = 'def read_lines(path):\n    """Return the lines of the file at *path*."""\n    with open(path) as f:'
DEFAULT_CACHE = Path("kv_cache.safetensors")
DEFAULT_MODEL = "default"  # the embedded model shipped in portable/data/default_model


def user_cache_dir() -> Path:
    """Where portable keeps what outlives a run (compiled artifacts, measured peak bandwidths): $PORTABLE_CACHE_DIR,
    else $XDG_CACHE_HOME/portable, else ~/.cache/portable."""
    base = os.environ.get("PORTABLE_CACHE_DIR")
    if base:
        return Path(base).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "portable"


PRECISIONS = ("fp32", "fp16", "bf16")
# int8: dynamic quantization on ONNX Runtime, weight-only on the GPU backends (backends/quantize.py); backends say
# which precisions they take.
ALL_PRECISIONS = PRECISIONS + ("int8",)
ATTENTION = ("sdpa", "eager", "flash_attention_2")
KERNELS = ("torch", "triton")
CACHE_STORAGE = ("native", "int8")


@dataclass(frozen=True)
class SamplingConfig:
    """Greedy when `temperature == 0`; otherwise temperature, top-k (0 = off), top-p (1 = off) sampling with a seed.

    The repetition penalty follows Hugging Face's definition (divide positive logits, multiply negative ones, for every
    token already in the sequence) and applies to greedy decoding too.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def describe(self) -> str:
        if self.greedy and self.repetition_penalty == 1.0:
            return "greedy"
        parts = ["greedy" if self.greedy else f"temp={self.temperature:g}"]
        if not self.greedy and self.top_k:
            parts.append(f"top_k={self.top_k}")
        if not self.greedy and self.top_p < 1.0:
            parts.append(f"top_p={self.top_p:g}")
        if self.repetition_penalty != 1.0:
            parts.append(f"rep={self.repetition_penalty:g}")
        if not self.greedy:
            parts.append(f"seed={self.seed}")
        return " ".join(parts)


@dataclass(frozen=True)
class RunConfig:
    """One run of prefill, decode, parity or bench. Built once by the CLI, passed down unchanged."""

    model: str = DEFAULT_MODEL
    prompts: tuple[str, ...] = (DEFAULT_PROMPT,)
    batch: int = 1
    cache_path: Path = DEFAULT_CACHE
    backend: str = "cpu"
    precision: str = "fp32"
    device: str | None = None  # e.g. "cuda:1"; None lets the backend choose
    attn: str = "sdpa"
    kernels: str = "triton"  # GPU backends: the fused Triton kernels (and stream GEMVs); "torch": PyTorch ops
    cache_storage: str = "native"  # "int8": keys/values stored as int8 with per-token scales
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    parity: bool = True  # compare with CPU FP32 decoding from the same cache file
    reference_path: Path | None = None  # a file written by `portable reference`
    force: bool = False  # decode a cache whose model fingerprint differs from the loaded model
    compile: bool = True  # GPU backends: capture the decode step (CUDA graphs / compile)
    ort_provider: str | None = None
    rebuild: bool = False  # ignore saved compiled artifacts and build them again
    artifact_dir: Path | None = None  # where compiled artifacts are kept; None = the user cache folder
    sync_every: int = 1  # GPU backends: read generated tokens back to the host every N steps
    json_path: Path | None = None
    quiet: bool = False

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)
