"""The runner of our Llama-family decode step (`backends.llama_fast.FastDecoder`): Hugging Face prefill, the step
captured as one CUDA graph per (batch, slots) on GPUs, and the compiled Triton kernels saved as an artifact and
reused, keyed like the ONNX artifact cache (`timing.compile_s` / `save_s` / `load_s`).
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from backends.hf_torch import HFRunner
from backends.llama_fast import FastDecoder
from caches import PromptCache
from portable.models import LoadedModel


@contextmanager
def triton_cache(folder: Path):
    """Compile into / load Triton kernels from `folder` instead of the default cache."""
    import triton

    old = triton.knobs.cache.dir
    triton.knobs.cache.dir = str(folder)
    try:
        yield
    finally:
        triton.knobs.cache.dir = old


def pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch: Hopper (sm_90) or newer NVIDIA GPUs, compiled Triton kernels."""
    from backends.kernels import interpreting

    return (device.type == "cuda" and not interpreting() and torch.version.hip is None
            and torch.cuda.get_device_capability(device)[0] >= 9)


class FastRunner:
    """A runner whose decode step is `FastDecoder`, captured as one CUDA graph per (batch, slots) on GPUs."""

    def __init__(self, loaded: LoadedModel, backend: str, config, device: torch.device, graphs: bool | None = None,
                 pdl: bool | None = None, int8: dict | None = None):
        self.run_config = config
        self.hf = HFRunner(loaded, backend=backend, precision=config.precision, device=device)
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.config = loaded.config
        self._device = torch.device(device)
        self.decoder = FastDecoder(loaded.model, kernels=config.kernels, pdl=pdl_supported(self._device)
                                   if pdl is None else pdl, int8=int8)
        self._int8 = int8
        self.graphs = self._device.type == "cuda" if graphs is None else graphs
        self._graph = self._greedy_graph = None
        self._graph_shape = None
        self._slot = 0
        self.info = self.hf.info
        self.info.details = {"path": "fast", "kernels": config.kernels, "cuda_graph": self.graphs,
                             "pdl": self.decoder.pdl, "gemv": self.decoder.gemv_impl,
                             "attn": "portable decode attention",
                             "weights": self.decoder.weights}

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.dtype

    def prefill(self, input_ids, attention_mask) -> PromptCache:
        return self.hf.prefill(input_ids, attention_mask)

    def start(self, cache: PromptCache, max_new_tokens: int) -> None:
        self.decoder.load_cache(cache, max_new_tokens)
        self._slot = cache.seen_tokens  # the slot the next step writes (the decoder's `slot`, known on the host)
        if self.graphs and self._graph_shape != self.decoder.shape:
            if self._graph_shape is None:
                self._capture_with_artifact()
            else:  # another shape in the same process: the kernels are compiled, only the graph is new
                start = time.perf_counter()
                self._capture()
                self.info.details["recapture_s"] = time.perf_counter() - start
            self.info.details["graph_captures"] = self.info.details.get("graph_captures", 0) + 1

    def artifact_key(self) -> dict:
        """What the compiled kernels depend on: shapes, dtype, kernel options, GPU, versions and kernel sources."""
        import triton

        from portable import __version__

        d, c = self.decoder, self.config
        sources = hashlib.sha256()
        kernels = Path(__file__).parent / "kernels"
        for path in sorted([*kernels.glob("*.py"), *kernels.glob("*.cu")]):
            sources.update(path.read_bytes())
        return {"kind": "llama-fast-decode", "model_type": c.model_type, "hidden": c.hidden_size,
                "layers": len(d.layers), "heads": [d.hq, d.hk, d.d], "mlp": d.intermediate,
                "vocab": d.vocab, "windows": sorted({layer.window for layer in d.layers}),
                "dtype": str(d.dtype), "batch": d.shape[0], "chunks_p2": d.attention.chunks_p2,
                "kernels": d.kernels, "gemv": d.gemv_impl, "pdl": d.pdl, "weights": d.weights,
                "gpu": torch.cuda.get_device_name(self._device),
                "capability": list(torch.cuda.get_device_capability(self._device)), "triton": triton.__version__,
                "torch": torch.__version__, "portable": __version__, "kernel_sources": sources.hexdigest()[:16]}

    def _capture_with_artifact(self) -> None:
        """First capture in this process: compile the kernels into a fresh Triton cache and save them as an artifact,
        or load a saved artifact's kernels and only capture the graph. Times: compile_s (JIT compilation + capture),
        save_s (copying the compiled kernels into the artifact store), load_s (capture from saved kernels)."""
        from portable.artifacts import ArtifactStore

        built = {}

        def compile_():
            tmp = Path(tempfile.mkdtemp(prefix="portable-triton-"))
            with triton_cache(tmp):
                self._capture()
            built["graph"] = True
            return tmp

        def save(tmp: Path, folder: Path) -> dict:
            shutil.copytree(tmp, folder / "triton")
            shutil.rmtree(tmp, ignore_errors=True)
            return {"kernels": sum(1 for _ in (folder / "triton").rglob("*.cubin")) or
                    sum(1 for _ in (folder / "triton").rglob("*.hsaco"))}

        def load(folder: Path, manifest: dict):
            if not built:  # a saved artifact: its kernels load from disk, only the graph is captured
                with triton_cache(folder / "triton"):
                    self._capture()

        store = ArtifactStore(root=self.run_config.artifact_dir)
        art = store.get("cuda-decode", self.artifact_key(), compile=compile_, save=save, load=load,
                        rebuild=self.run_config.rebuild, label="CUDA decode kernels")
        self.info.compile_s = art.compile_s
        self.info.save_s = art.save_s
        self.info.load_s = art.load_s if art.reused else None
        self.info.artifact_reused = art.reused
        self.info.details["artifact"] = str(art.path)
        if art.theirs:
            self.info.details["artifact_saved_first_by_another_run"] = True

    def _capture(self) -> None:
        """Warm up (compiles every kernel) on a side stream, then capture one step as two graphs: the plain step
        (`decode_step`) and the greedy one (`greedy_steps`). The warm-up steps write into the slot the first real step
        overwrites; positions, slot and input tokens are restored."""
        d = self.decoder
        saved = (d.positions.clone(), d.slot.clone(), d.tokens.clone())

        def restore():
            d.positions.copy_(saved[0])
            d.slot.copy_(saved[1])
            d.tokens.copy_(saved[2])

        stream = torch.cuda.Stream(self._device)
        stream.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(stream):
            for greedy in (False, True, False, True):
                d.step(greedy)
                restore()
        torch.cuda.current_stream(self._device).wait_stream(stream)
        graph, greedy_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            d.step()
        with torch.cuda.graph(greedy_graph, pool=graph.pool()):
            d.step(greedy=True)
        restore()
        torch.cuda.synchronize(self._device)
        self._graph, self._greedy_graph, self._graph_shape = graph, greedy_graph, d.shape

    def _feed(self, tokens: torch.Tensor, steps: int) -> None:
        d = self.decoder
        if self._slot + steps > d.shape[1]:
            raise ValueError(f"the static cache has {d.shape[1]} slots; {self._slot + steps} needed "
                             "(start() sizes it for max_new_tokens)")
        if tokens.data_ptr() != d.tokens.data_ptr():
            d.tokens.copy_(tokens, non_blocking=True)
        self._slot += steps

    def decode_step(self, tokens: torch.Tensor) -> torch.Tensor:
        d = self.decoder
        self._feed(tokens, 1)
        if self._graph is not None:
            self._graph.replay()
            return d.logits
        return d.step()

    def greedy_steps(self, tokens: torch.Tensor, count: int) -> torch.Tensor:
        """`count` greedy steps from input `tokens`, each feeding its argmax to the next on the device (one graph
        replay per step, nothing from the host between them): the picked ids [batch, count] on the device."""
        d = self.decoder
        first = self._slot
        self._feed(tokens, count)
        for _ in range(count):
            if self._graph is not None:
                self._greedy_graph.replay()
            else:
                d.step(greedy=True)
        return d.history[:, first:first + count].clone()

    def weight_bytes(self, batch: int) -> int:
        """Bytes of weights one step of `batch` sequences reads (the bench's cost model): the model's, with every
        linear weight counted as the int8 rows and scales the step reads instead where it has them (at every batch:
        the GEMVs at batch 1, `int8_mm` above; a lean model holds only those, a head tied to the embedding is dense
        in the model but streamed as int8 rows)."""
        from torch.nn.utils import parametrize

        from backends import quantize
        from portable.bench import roofline

        total = roofline.weight_bytes(self.model)
        for module, rows in (self._int8 or {}).items():
            if not parametrize.is_parametrized(module, "weight"):  # counted dense by the roofline
                total += quantize.nbytes([rows]) - module.weight.numel() * module.weight.element_size()
        return total

    def synchronize(self) -> None:
        self.hf.synchronize()

    def reset_peak_memory(self) -> None:
        self.hf.reset_peak_memory()

    def peak_memory_bytes(self) -> int:
        return self.hf.peak_memory_bytes()
