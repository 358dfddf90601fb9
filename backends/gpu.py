"""What the CUDA and ROCm backends share: PyTorch reports both kinds of GPU as "cuda" devices.

`cuda` and `rocm` differ only where they must: which PyTorch build they accept (`torch.version.cuda` vs
`torch.version.hip`) and which attention kernels exist there. Everything else (model loading, the static-cache fast
path for the Llama family, graph capture, artifacts) is this module's.
"""

from __future__ import annotations

import torch

from backends.base import Availability
from backends.hf_torch import HFRunner
from portable import models
from portable.errors import PortableError


class TorchGpuBackend:
    name = "gpu"
    # int8: weight-only (int8 rows with fp32 scales, backends/quantize.py) with bf16 activations and KV cache; the
    # Llama-family fast path's steps read the int8 rows, and the model keeps no dense copy of them (`lean`)
    precisions = ("fp32", "fp16", "bf16", "int8")
    int8_scheme = "weight-only"  # what parity's calibration mirrors (portable/pipeline.py)
    platform = ""  # "cuda" or "rocm"

    def build_matches(self) -> str | None:
        """None if this PyTorch build is this backend's; otherwise why not."""
        raise NotImplementedError

    def is_available(self) -> Availability:
        why = self.build_matches()
        if why:
            return Availability(False, why)
        if not torch.cuda.is_available():
            return Availability(False, f"no {self.platform.upper()} GPU is visible to PyTorch")
        return Availability(True)

    def attention_available(self, attn: str) -> str | None:
        if attn == "flash_attention_2":
            try:
                import flash_attn  # noqa: F401
            except ImportError:
                return "the flash_attn package is not installed; use --attn sdpa or eager"
        return None

    def device(self, config) -> torch.device:
        device = torch.device(config.device or "cuda")
        if device.type != "cuda":
            raise PortableError(f"--device {config.device} is not a GPU device for backend {self.name}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise PortableError(f"--device {config.device}: only {torch.cuda.device_count()} GPU(s) visible")
        return torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)

    def load(self, config, source):
        why = self.attention_available(config.attn)
        if why:
            raise PortableError(why)
        device = self.device(config)
        torch.cuda.set_device(device)
        int8 = config.precision == "int8"
        loaded = models.load(source, precision="bf16" if int8 else config.precision, device=str(device),
                             attn=config.attn)
        from backends import fast_runner, llama_fast

        why_not = llama_fast.supports(loaded.model)  # None when our decode step covers the model
        if int8:
            if why_not or config.attn == "eager":
                raise PortableError(f"--precision int8 on {self.name} needs the Llama-family decode step "
                                    f"({why_not or 'not with --attn eager'}); use bf16")
            from backends import quantize

            return fast_runner.FastRunner(loaded, backend=self.name, config=config, device=device,
                                          graphs=None if config.compile else False,
                                          int8=quantize.quantize_linears_(loaded.model, lean=True))
        if config.compile and config.attn != "eager" and why_not is None:
            return fast_runner.FastRunner(loaded, backend=self.name, config=config, device=device)
        return HFRunner(loaded, backend=self.name, precision=config.precision, device=device)

    def describe(self) -> dict:
        info = {"backend": self.name, "torch": torch.__version__, "cuda": torch.version.cuda,
                "hip": getattr(torch.version, "hip", None)}
        if torch.cuda.is_available():
            info["device"] = torch.cuda.get_device_name()
            info["devices"] = torch.cuda.device_count()
        return info
