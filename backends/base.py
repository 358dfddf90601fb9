"""The backend protocol: what every backend (cpu, cuda, rocm, onnxruntime) provides.

A `Backend` says whether it can run here and loads a model into a `Runner`. A `Runner` holds one loaded model on
one device in one precision and does two things: `prefill` a batch of prompts into a `PromptCache`, and, after
`start(cache)`, `decode_step` one token per sequence. Everything else (sampling, stop conditions, timing, parity)
is the decode loop's business and identical for every backend.

A runner may also offer `greedy_steps(tokens, count) -> [batch, count]` ids on its device: `count` greedy steps
where each step's argmax (the first maximal id) is fed to the next without the host (the CUDA fast path captures the
pick in its graph); the decode loop uses it for greedy decoding without a repetition penalty.

Tensors cross the boundary as torch tensors: token ids [batch] int64 on `runner.device`, logits [batch, vocab] on
`runner.device` (any float dtype; the loop reads them as float32).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from caches import PromptCache
    from portable.config import RunConfig
    from portable.models import ModelSource


@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str = ""  # why not, in one line, with what is available instead


@dataclass
class RunnerInfo:
    """What a runner reports about itself: device, model, and the timings of getting ready."""

    backend: str
    device: str
    device_name: str
    precision: str
    identity: dict
    model_load_s: float = 0.0
    compile_s: float | None = None  # first call including compilation / graph capture, where there is one
    save_s: float | None = None  # saving a compiled artifact
    load_s: float | None = None  # loading a saved compiled artifact
    artifact_reused: bool | None = None
    details: dict = field(default_factory=dict)


class Runner(Protocol):
    info: RunnerInfo
    tokenizer: object | None
    config: object

    @property
    def device(self) -> torch.device: ...

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> "PromptCache": ...

    def start(self, cache: "PromptCache", max_new_tokens: int) -> None: ...

    def decode_step(self, tokens: torch.Tensor) -> torch.Tensor: ...

    def synchronize(self) -> None: ...

    def reset_peak_memory(self) -> None: ...

    def peak_memory_bytes(self) -> int: ...


class Backend(Protocol):
    name: str
    precisions: tuple[str, ...]

    def is_available(self) -> Availability: ...

    def load(self, config: "RunConfig", source: "ModelSource") -> Runner: ...

    def describe(self) -> dict: ...
