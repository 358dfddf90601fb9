"""CPU backend: Hugging Face modeling code through PyTorch on the host, in fp32, fp16 or bf16.

CPU FP32 is also the parity reference every other backend is compared with.
"""

from __future__ import annotations

import torch

from backends.base import Availability
from backends.hf_torch import HFRunner
from portable import models


class CpuBackend:
    name = "cpu"
    precisions = ("fp32", "fp16", "bf16")

    def is_available(self) -> Availability:
        return Availability(True)

    def load(self, config, source) -> HFRunner:
        loaded = models.load(source, precision=config.precision, device="cpu", attn=config.attn)
        return HFRunner(loaded, backend=self.name, precision=config.precision, device=torch.device("cpu"))

    def describe(self) -> dict:
        from portable.environment import cpu_name

        return {"backend": self.name, "device": cpu_name(), "threads": torch.get_num_threads()}
