"""ONNX Runtime backend: the model exported once to an ONNX decoder graph, run on any execution provider.

    load:    provider (--ort-provider, checked against this onnxruntime) -> precision check ->
             artifact (keyed by model fingerprint, precision, opset, graph version, exporter and runtime versions):
             found -> reuse; else export (backends/onnx_export.py) + convert (fp16) / quantize (int8) -> save ->
             session from the saved file
    prefill: one run of the graph with empty pasts
    decode:  one run per token; each step's presents are the next step's pasts

Precisions: fp32; fp16 (ONNX Runtime's float16 conversion keeping fp32 inputs and outputs, or a native fp16 export
with an fp16 cache: `FP16_MODE` says which each provider gets and why); int8 (ONNX Runtime dynamic quantization:
int8 weights, activations quantized per call; CPU provider); bf16 only where a provider has bfloat16 kernels.

On GPU providers the cache stays on the device between steps (IO binding: the presents are bound as device
buffers and passed back as the next pasts); only the token ids go in and the logits come back each step.

This is the only module that imports onnxruntime.
"""

from __future__ import annotations

import logging
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from backends import onnx_export
from backends.base import Availability, RunnerInfo
from backends.onnx_export import GraphSpec
from caches import AttentionLayer, PromptCache, SlidingWindowLayer
from portable import models
from portable.artifacts import ArtifactStore, Stages, read_manifest
from portable.errors import BackendUnavailable, PortableError

CPU = "CPUExecutionProvider"
# Short names users type -> provider names; matching is case-insensitive and also takes the full name.
ALIASES = {"cpu": CPU, "cuda": "CUDAExecutionProvider", "rocm": "ROCMExecutionProvider",
           "migraphx": "MIGraphXExecutionProvider", "tensorrt": "TensorrtExecutionProvider",
           "trt": "TensorrtExecutionProvider", "directml": "DmlExecutionProvider", "dml": "DmlExecutionProvider",
           "openvino": "OpenVINOExecutionProvider", "coreml": "CoreMLExecutionProvider",
           "dnnl": "DnnlExecutionProvider", "xnnpack": "XnnpackExecutionProvider", "qnn": "QNNExecutionProvider",
           "webgpu": "WebGpuExecutionProvider"}
# Without --ort-provider: the first of these that this onnxruntime offers (TensorRT builds engines for minutes).
PREFERRED = ("CUDAExecutionProvider", "ROCMExecutionProvider", "MIGraphXExecutionProvider", "DmlExecutionProvider",
             CPU)
NOT_FOR_MODELS = {"AzureExecutionProvider"}  # a remote-call provider: never a place to run a local graph
# Providers whose memory is a GPU's: the cache is kept there through IO binding. (device type, PCI vendor id)
DEVICE_MEMORY = {"CUDAExecutionProvider": ("cuda", -1), "TensorrtExecutionProvider": ("cuda", -1),
                 "NvTensorRTRTXExecutionProvider": ("cuda", -1), "ROCMExecutionProvider": ("cuda", 0x1002),
                 "MIGraphXExecutionProvider": ("cuda", 0x1002), "DmlExecutionProvider": ("dml", -1)}
BF16_PROVIDERS = ("CUDAExecutionProvider",)  # bfloat16 kernels for the operators our graphs use
INT8_PROVIDERS = (CPU,)  # DynamicQuantizeMatMul / MatMulInteger run on the CPU provider
# fp16: "convert" = fp32 export + ONNX Runtime's float16 conversion keeping fp32 inputs/outputs (the cache stays
# fp32); "native" = the model exported in fp16 (fp16 cache). On the CPU provider native measured 1.021 ms/step vs
# 1.099 for conversion, both `exact` on the embedded model (benchmarks/ort_cpu.py, BENCHMARKS.md); its cost is a
# second export on the first run (conversion starts from the saved fp32 graph). On GPUs "native" halves the cache
# the device holds and reads each step (reasoned, not measured here: no GPU onnxruntime).
FP16_MODE = {CPU: "native"}
FP16_DEFAULT = "native"
MODEL_FILE = "model.onnx"
EXTERNAL_DATA_ABOVE = 1 << 30  # weights of larger graphs go to model.onnx.data (protobuf stops at 2 GiB)


def short(provider: str) -> str:
    return provider.removesuffix("ExecutionProvider")


def available_providers() -> list[str]:
    return [p for p in ort.get_available_providers() if p not in NOT_FOR_MODELS]


def pick_provider(requested: str | None, available: list[str]) -> str:
    """The provider to run on: `requested` (short or full name, any case) if offered, else a one-line error."""
    if requested is None:
        return next(p for p in (*PREFERRED, *available) if p in available)
    wanted = requested.strip().lower()
    wanted = ALIASES.get(wanted, wanted).lower()
    for provider in available:
        if provider.lower() in (wanted, wanted + "executionprovider"):
            return provider
    offered = ", ".join(short(p) for p in available) or "none"
    raise PortableError(f"ONNX Runtime execution provider {requested!r} is not available here; this onnxruntime "
                        f"{ort.__version__} offers: {offered}")


def check_precision(precision: str, provider: str, available: list[str]) -> None:
    """Refuse a precision the provider has no kernels for, saying which providers have them."""
    for name, providers, kernels in (("bf16", BF16_PROVIDERS, "bfloat16 kernels"),
                                     ("int8", INT8_PROVIDERS, "dynamic int8 quantization kernels")):
        if precision != name or provider in providers:
            continue
        where = ", ".join(short(p) for p in providers)
        if not any(p in available for p in providers):
            where += f" (not in this onnxruntime, which offers {', '.join(short(p) for p in available)})"
        raise PortableError(f"precision {name} does not run on ONNX Runtime's {short(provider)} provider (no "
                            f"{kernels}); providers that run it: {where}; use fp32 or fp16 on {short(provider)}")


def fp16_mode(provider: str, override: str | None = None) -> str:
    if override not in (None, "convert", "native"):
        raise PortableError(f"unknown fp16 mode {override!r}; choose convert or native")
    return override or FP16_MODE.get(provider, FP16_DEFAULT)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def artifact_key(identity: dict, precision: str, provider: str, fp16: str | None = None) -> dict:
    """Everything the saved graph depends on. The provider enters only through the fp16 mode (a graph is otherwise
    provider-neutral: ONNX Runtime's own optimisations run at session creation, for the machine at hand)."""
    import transformers

    return {"model": identity.get("fingerprint"), "model_type": identity.get("model_type"), "precision": precision,
            "fp16_mode": fp16_mode(provider, fp16) if precision == "fp16" else None, "opset": onnx_export.OPSET,
            "graph_version": onnx_export.GRAPH_VERSION, "exporter": f"torch.onnx-dynamo {torch.__version__}",
            "onnxscript": _version("onnxscript"), "transformers": transformers.__version__,
            "onnxruntime": ort.__version__}


class OrtBackend:
    name = "onnxruntime"
    precisions = ("fp32", "fp16", "int8", "bf16")
    artifacts = True  # keeps compiled artifacts (`portable export` builds them)

    def is_available(self) -> Availability:
        if not available_providers():
            return Availability(False, f"onnxruntime {ort.__version__} offers no execution provider")
        return Availability(True)

    def load(self, config, source, io_binding: bool | None = None, fp16: str | None = None,
             stages: Stages | None = None) -> "OrtRunner":
        """Overrides for tests and benchmarks: io_binding (None = on GPU providers only; True runs the device path on
        the CPU too), fp16 ("convert" | "native"; None = FP16_MODE's choice for the provider)."""
        available = available_providers()
        provider = pick_provider(config.ort_provider, available)
        check_precision(config.precision, provider, available)
        device_id = _device_id(config.device, provider)
        meta_start = time.perf_counter()
        meta = _ModelMeta.read(source, config.precision)
        model_load_s = time.perf_counter() - meta_start
        stages = stages or Stages(enabled=None if not config.quiet else False)
        store = ArtifactStore(config.artifact_dir, stages)
        key = artifact_key(meta.identity, config.precision, provider, fp16)
        artifact = store.get(
            "onnx", key, rebuild=config.rebuild, label=f"ONNX {config.precision} graph",
            compile=lambda: build_graph(meta, source, config.precision, fp16_mode(provider, fp16), stages,
                                        base=None if config.rebuild or config.precision == "fp32" else
                                        store.find("onnx", artifact_key(meta.identity, "fp32", provider))),
            save=save_graph, load=lambda folder, manifest: open_session(folder, manifest, provider, device_id))
        session, spec = artifact.value
        details = {"path": "onnx", "provider": short(provider), "providers": session.get_providers(),
                   "artifact": str(artifact.path), "opset": onnx_export.OPSET, "prefill_graph": spec.prefill,
                   "cache_dtype": spec.cache_dtype, "intra_op_threads": _threads(provider),
                   "onnxruntime": ort.__version__}
        if config.precision == "fp16":
            details["fp16_mode"] = artifact.manifest.get("key", {}).get("fp16_mode")
        if artifact.theirs:
            details["artifact_saved_first_by_another_run"] = True
        if artifact.compile_s is not None:
            details["stages_s"] = {k: round(v, 3) for k, v in stages.seconds.items()}
        info = RunnerInfo(backend=self.name, device=_device_label(provider, device_id),
                          device_name=_device_name(provider, device_id), precision=config.precision,
                          identity=meta.identity, model_load_s=model_load_s, compile_s=artifact.compile_s,
                          save_s=artifact.save_s, load_s=artifact.load_s, artifact_reused=artifact.reused,
                          details=details)
        use_binding = provider in DEVICE_MEMORY if io_binding is None else io_binding
        memory = DEVICE_MEMORY.get(provider, ("cpu", -1))
        info.details["io_binding"] = use_binding
        return OrtRunner(session, spec, meta, info, device=(memory[0], device_id, memory[1]) if use_binding else None)

    def describe(self) -> dict:
        return {"backend": self.name, "onnxruntime": ort.__version__, "providers": available_providers(),
                "device": ort.get_device()}


def _device_id(device: str | None, provider: str) -> int:
    """The device index from --device ("cuda:1", "1"); host providers take none."""
    if device in (None, "", "cpu") and provider not in DEVICE_MEMORY:
        return 0
    kind, _, index = str(device or "").lower().rpartition(":")
    if provider in DEVICE_MEMORY and (index.isdigit() or index in ("", "cuda", "gpu", "rocm", "dml")):
        return int(index) if index.isdigit() else 0
    raise PortableError(f"--device {device} does not fit ONNX Runtime's {short(provider)} provider; "
                        + ("give a device index such as cuda:1" if provider in DEVICE_MEMORY
                           else "it runs on the host: leave --device out"))


def _threads(provider: str) -> int | None:
    return torch.get_num_threads() if provider == CPU else None


def _device_label(provider: str, device_id: int) -> str:
    if provider not in DEVICE_MEMORY:
        return "cpu"
    return f"{DEVICE_MEMORY[provider][0]}:{device_id}"


def _device_name(provider: str, device_id: int) -> str:
    if provider not in DEVICE_MEMORY:
        from portable.environment import cpu_name

        return cpu_name()
    if torch.cuda.is_available() and device_id < torch.cuda.device_count():
        return torch.cuda.get_device_name(device_id)
    return f"{short(provider)} device {device_id}"


class _ModelMeta:
    """What a run needs of the model without its weights: config, tokenizer, generation config, identity.

    Weights are read only when a graph has to be built (presets are built from their seed in any case)."""

    def __init__(self, config, tokenizer, generation_config, identity, loaded=None):
        self.config, self.tokenizer, self.generation_config = config, tokenizer, generation_config
        self.identity, self.loaded = identity, loaded

    @classmethod
    def read(cls, source, precision: str) -> "_ModelMeta":
        if source.kind == "preset":
            loaded = models.load(source, precision="fp32", device="cpu")
            return cls(loaded.config, loaded.tokenizer, getattr(loaded.model, "generation_config", None),
                       loaded.identity, loaded)
        from transformers import AutoConfig, GenerationConfig

        models.quiet_transformers()
        try:
            config = AutoConfig.from_pretrained(source.path)
        except (OSError, ValueError) as e:
            raise PortableError(f"cannot read the config of {source.display}: {str(e).splitlines()[0]}") from e
        try:
            generation_config = GenerationConfig.from_pretrained(source.path)
        except (OSError, ValueError):
            generation_config = None
        return cls(config, models.load_tokenizer(source), generation_config, models.identity(source, config))


def build_graph(meta: _ModelMeta, source, precision: str, fp16: str, stages: Stages, base: Path | None = None):
    """Export (and convert or quantize) the model: the compile stage. Returns (onnx model, GraphSpec).

    fp16 by conversion and int8 start from the fp32 graph: from the saved fp32 artifact `base` when there is one
    (no second export; not with --rebuild), else from a fresh export.
    """
    import onnx_ir as ir

    mode = fp16 if precision == "fp16" else None
    dtype = "fp16" if mode == "native" else "bf16" if precision == "bf16" else "fp32"
    if base is not None and dtype == "fp32":
        with stages.stage("read", f"Reading the exported fp32 graph from {base}"):
            model, spec = ir.load(base / MODEL_FILE), GraphSpec.from_dict(read_manifest(base)["graph"])
    else:
        loaded = meta.loaded if meta.loaded is not None and dtype == "fp32" else models.load(
            source, precision=dtype, device="cpu", attn="eager")  # the export swaps attention in any case
        with stages.stage("export", f"Exporting {loaded.identity.get('architecture')} to ONNX (torch.onnx, dynamo)"):
            model, spec = onnx_export.export(loaded.model)
        del loaded
        with stages.stage("optimize", "Optimizing the graph (merged matrix products, attention with its cache)"):
            onnx_export.optimize(model)
    if precision == "fp16" and mode == "convert":
        with stages.stage("optimize", "Converting the graph to float16 (fp32 inputs and outputs)"):
            model = _to_float16(model)
    elif precision == "int8":
        with stages.stage("optimize", "Quantizing weights to int8 (dynamic quantization)"):
            model = _quantize_int8(model)
    return model, spec


def _to_float16(model):
    import onnx_ir as ir
    from onnxruntime.transformers.float16 import convert_float_to_float16

    proto = convert_float_to_float16(ir.to_proto(model), keep_io_types=True, disable_shape_infer=False)
    return ir.from_proto(proto)


def _quantize_int8(model):
    import onnx_ir as ir
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="portable-int8-") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        ir.save(model, src)
        # Only MatMuls with a constant weight: the weights become int8 (per output channel), activations are
        # quantized per call. Attention's own products stay in float (they are inside the Attention node).
        logging.disable(logging.WARNING)  # its advice to pre-process goes to the root logger, on every call
        try:
            quantize_dynamic(src, dst, op_types_to_quantize=["MatMul"], per_channel=True,
                             weight_type=QuantType.QInt8, extra_options={"MatMulConstBOnly": True})
        finally:
            logging.disable(logging.NOTSET)
        return ir.load(dst)  # one file: the weights are read into memory here


def save_graph(built, folder: Path) -> dict:
    import onnx_ir as ir

    model, spec = built
    size = sum(t.const_value.nbytes for t in model.graph.initializers.values() if t.const_value is not None)
    external = f"{MODEL_FILE}.data" if size > EXTERNAL_DATA_ABOVE else None
    ir.save(model, folder / MODEL_FILE, external_data=external)
    return {"graph": spec.to_dict(), "files": sorted(p.name for p in folder.iterdir()), "weights_bytes": size}


def open_session(folder: Path, manifest: dict, provider: str, device_id: int):
    """Create the inference session from the saved file: the load stage. Returns (session, GraphSpec)."""
    if "graph" not in manifest:
        raise PortableError(f"the saved ONNX artifact in {folder} is incomplete; run again with --rebuild")
    spec = GraphSpec.from_dict(manifest["graph"])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    if provider == CPU:
        options.intra_op_num_threads = torch.get_num_threads()
    providers = [(provider, {"device_id": device_id} if provider in DEVICE_MEMORY else {})]
    if provider != CPU:
        providers.append((CPU, {}))
    try:
        session = ort.InferenceSession(str(folder / MODEL_FILE), options, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types (Fail, NoSuchFile, NotImplemented, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PortableError(f"ONNX Runtime cannot load {folder / MODEL_FILE} on {short(provider)}: {first[:300]}; "
                            f"run again with --rebuild if the artifact is damaged") from e
    if session.get_providers()[0] != provider:
        raise BackendUnavailable(f"ONNX Runtime's {short(provider)} provider did not start (the session fell back to "
                                 f"{', '.join(short(p) for p in session.get_providers())}); check its libraries")
    return session, spec


_NUMPY = {"float32": np.float32, "float16": np.float16}
_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class OrtRunner:
    """Drives an exported graph (see backends/onnx_export.py for its inputs and outputs).

    The decode state is the last step's presents: numpy arrays on host providers, OrtValues in the provider's
    memory with IO binding (`device` = (device type, index, vendor id)). Token ids, mask and positions live on the
    host; logits come back to the host each step as float32.
    """

    def __init__(self, session, spec: GraphSpec, meta: _ModelMeta, info: RunnerInfo, device=None):
        self.session = session
        self.spec = spec
        self.info = info
        self.tokenizer = meta.tokenizer
        self.config = meta.config
        self.generation_config = meta.generation_config
        self._binding = device  # (device type, device index, vendor id) or None
        self._past_names = spec.past_names()
        self._output_names = spec.output_names()
        self._dims = {i.name: i.shape for i in session.get_inputs()}
        self._past = None
        self._mask = None
        self._positions = None

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return _TORCH[self.spec.cache_dtype]

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> PromptCache:
        """One run of the graph over the left-padded prompts, from empty pasts."""
        if not self.spec.prefill:
            raise PortableError(f"{self.spec.model_type}: only the decode step is exported to ONNX (its prefill "
                                f"loops over the prompt, which torch.export cannot keep dynamic); prefill with "
                                f"--backend cpu and decode the cache file here")
        ids = input_ids.to("cpu", torch.long).numpy()
        mask = attention_mask.to("cpu", torch.long).numpy()
        positions = np.where(mask == 0, 0, mask.cumsum(-1) - 1)
        batch, sequence = ids.shape
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        for name in self._past_names:
            _, heads, _, width = self._dims[name]
            feed[name] = np.zeros((batch, heads, 0, width), dtype=_NUMPY[self.spec.cache_dtype])
        outputs = self.session.run(self._output_names, feed)
        layers = []
        for i, (kind, window) in enumerate(zip(self.spec.kinds, self.spec.windows)):
            keys, values = (torch.from_numpy(outputs[1 + 2 * i]), torch.from_numpy(outputs[2 + 2 * i]))
            layers.append(SlidingWindowLayer(keys=keys, values=values, window=window, cumulative_length=sequence)
                          if kind == SlidingWindowLayer.kind else AttentionLayer(keys=keys, values=values))
        return PromptCache(input_ids=input_ids.cpu(), attention_mask=attention_mask.cpu(),
                           next_token_logits=torch.from_numpy(outputs[0][:, -1]).float(), layers=layers,
                           model=self.info.identity)

    def start(self, cache: PromptCache, max_new_tokens: int) -> None:
        tensors = [layer.tensors()[t].contiguous() for i, layer in enumerate(cache.layers)
                   for t in self.spec.tensors(i)]
        if self._binding is None:
            self._past = [t.numpy() for t in tensors]
        else:
            # Host values bound once: ONNX Runtime copies them to the device in the first step; from then on the
            # pasts are the previous step's presents, which never leave the device.
            self._past = [ort.OrtValue.from_dlpack(t) for t in tensors]
        self._mask = cache.attention_mask.to("cpu", torch.long).numpy()
        self._positions = cache.positions.to("cpu", torch.long).numpy().reshape(-1, 1)

    def decode_step(self, tokens: torch.Tensor) -> torch.Tensor:
        ids = tokens.to("cpu", torch.long).numpy().reshape(-1, 1)
        self._mask = np.concatenate([self._mask, np.ones_like(self._mask[:, :1])], axis=1)
        head = {"input_ids": ids}
        if self.spec.prefill:
            head.update(attention_mask=self._mask, position_ids=self._positions)
        if self._binding is None:
            outputs = self.session.run(self._output_names, {**head, **dict(zip(self._past_names, self._past))})
            logits, self._past = outputs[0], outputs[1:]
        else:
            logits = self._bound_step(head)
        self._positions = self._positions + 1
        return torch.from_numpy(logits[:, -1])

    def _bound_step(self, head: dict) -> np.ndarray:
        kind, index, vendor = self._binding
        binding = self.session.io_binding()
        for name, value in head.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        outputs = []
        for name, past in zip(self._past_names, self._past):
            binding.bind_ortvalue_input(name, past)
        for name, shape, dtype in self._output_shapes(head["input_ids"].shape[0]):
            value = ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, kind, index, vendor)
            binding.bind_ortvalue_output(name, value)
            outputs.append(value)
        self.session.run_with_iobinding(binding)
        self._past = outputs[1:]
        return outputs[0].numpy()  # the one device -> host copy per step

    def _output_shapes(self, batch: int):
        """Shapes of this step's outputs (pre-allocated on the device: ROCm/MIGraphX need explicit vendor ids)."""
        cache = _NUMPY.get(self.spec.cache_dtype, self.spec.cache_dtype)
        yield "logits", (batch, 1, self.spec.vocab_size), np.float32
        for j, (name, past) in enumerate(zip(self._output_names[1:], self._past)):
            shape = list(past.shape())
            kind, window = self.spec.kinds[j // 2], self.spec.windows[j // 2]
            if kind == AttentionLayer.kind:
                shape[2] += 1
            elif kind == SlidingWindowLayer.kind:
                shape[2] = min(shape[2] + 1, window - 1)
            yield name, tuple(shape), cache if self.spec.cache_dtype != "bfloat16" else 16  # TensorProto.BFLOAT16

    def synchronize(self) -> None:
        pass  # session runs return when their outputs are complete

    def reset_peak_memory(self) -> None:
        from portable.environment import reset_peak_rss

        reset_peak_rss()  # the host's peak RSS (a GPU provider's device memory is not seen)

    def peak_memory_bytes(self) -> int:
        from portable.environment import peak_rss_bytes

        return peak_rss_bytes()


__all__ = ["OrtBackend", "OrtRunner", "pick_provider", "check_precision", "artifact_key"]
