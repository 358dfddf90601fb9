"""CUDA and ROCm backends. On CPU: the build checks with simulated HIP and CUDA builds of PyTorch, and the fast decode
step against Hugging Face. On a GPU (marked `gpu`): exactness, precisions, graph capture and the compiled artifact."""

from __future__ import annotations


import pytest
import torch

import backends
from backends.cuda import CudaBackend
from backends.gpu import TorchGpuBackend
from backends.hf_torch import HFRunner
from backends.fast_runner import FastRunner, pdl_supported
from backends.llama_fast import supports
from backends.rocm import RocmBackend
from portable import models
from portable.config import RunConfig
from portable.errors import PortableError
from portable.pipeline import tokenize
from tests.conftest import read_json, run_cli
from tests.models import PROMPTS

# the fast step's kernel choices on CPU tensors: the Triton kernels there need Triton's interpreter
KERNELS_ON_CPU = ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]


def simulate(monkeypatch, hip: str | None, cuda: str | None, gpus: int = 1):
    monkeypatch.setattr(torch.version, "hip", hip, raising=False)
    monkeypatch.setattr(torch.version, "cuda", cuda, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)


def test_rocm_build_is_rocm_not_cuda(monkeypatch):
    simulate(monkeypatch, hip="6.2.41133", cuda=None)
    assert RocmBackend().is_available().ok
    why = CudaBackend().is_available()
    assert not why.ok and "ROCm" in why.reason and "--backend rocm" in why.reason


def test_cuda_build_is_cuda_not_rocm(monkeypatch):
    simulate(monkeypatch, hip=None, cuda="13.0")
    assert CudaBackend().is_available().ok
    why = RocmBackend().is_available()
    assert not why.ok and "CUDA build" in why.reason and "--backend cuda" in why.reason


def test_build_without_visible_gpu(monkeypatch):
    simulate(monkeypatch, hip="6.2", cuda=None, gpus=0)
    why = RocmBackend().is_available()
    assert not why.ok and "no ROCM GPU is visible" in why.reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only build")
def test_cpu_only_build_refuses_both_with_one_line(monkeypatch):
    for name in ("cuda", "rocm"):
        with pytest.raises(PortableError, match="CPU-only build.*available: cpu"):
            backends.require(name)


def test_no_programmatic_dependent_launch_on_rocm(monkeypatch):
    """Compiled kernels on a GPU that reports sm_90 (faked): PDL on a CUDA build, not on a ROCm build (the
    interpreter, which conftest.py turns on here, would refuse PDL before the build is looked at)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    assert pdl_supported(torch.device("cuda"))
    monkeypatch.setattr(torch.version, "hip", "6.2", raising=False)
    assert not pdl_supported(torch.device("cuda"))
    assert not pdl_supported(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    assert not pdl_supported(torch.device("cuda"))


def test_flash_attention_needs_its_package():
    try:
        import flash_attn  # noqa: F401
        pytest.skip("flash_attn is installed")
    except ImportError:
        pass
    assert "flash_attn package is not installed" in TorchGpuBackend().attention_available("flash_attention_2")
    assert TorchGpuBackend().attention_available("sdpa") is None


@pytest.mark.parametrize("name", ["llama", "qwen3", "mistral", "gemma3"])
@pytest.mark.parametrize("kernels", KERNELS_ON_CPU)
def test_fast_decode_step_matches_hugging_face(tiny_model, name, kernels):
    """The fused decode step (no graphs: it runs on CPU too) against the HF reference, at batch 2 with left padding
    and prompts longer than the sliding window, and at batch 1 (the GEMV path)."""
    loaded = models.load(models.resolve(str(tiny_model(name))), "fp32", "cpu")
    assert supports(loaded.model) is None
    hf = HFRunner(loaded, "cpu", "fp32", torch.device("cpu"))
    ids, mask = tokenize(hf.tokenizer, list(PROMPTS), 0)
    cache = hf.prefill(ids, mask)
    for c in (cache, cache.select([1])):
        fast = FastRunner(loaded, "cpu", RunConfig(kernels=kernels), torch.device("cpu"), graphs=False)
        hf.start(c, 6)
        fast.start(c, 6)
        token = c.next_token_logits.argmax(-1)
        for _ in range(6):
            a, b = hf.decode_step(token), fast.decode_step(token)
            assert float((a - b).norm() / a.norm()) < 1e-5
            token = a.argmax(-1)


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_the_fast_step_shares_the_models_qkv_weights(tiny_model, name):
    """One copy of the q, k and v weights: the HF model's projections view the fused W_qkv the step streams (a second
    copy cost 201 MB on Llama-3.2-1B in bf16), and the model's weights and its prefill are unchanged by it."""
    loaded = models.load(models.resolve(str(tiny_model(name))), "fp32", "cpu")
    hf = HFRunner(loaded, "cpu", "fp32", torch.device("cpu"))
    ids, mask = tokenize(hf.tokenizer, list(PROMPTS), 0)
    before = hf.prefill(ids, mask).next_token_logits
    weights = {n: p.clone() for n, p in loaded.model.named_parameters()}
    fast = FastRunner(loaded, "cpu", RunConfig(kernels="torch"), torch.device("cpu"), graphs=False)
    for layer, block in zip(fast.decoder.layers, loaded.model.model.layers):
        fused = layer.wqkv.untyped_storage().data_ptr()
        attn = block.self_attn
        assert [lin.weight.untyped_storage().data_ptr() for lin in (attn.q_proj, attn.k_proj, attn.v_proj)] == \
            [fused] * 3
    assert all(torch.equal(p, weights[n]) for n, p in loaded.model.named_parameters())
    assert torch.equal(hf.prefill(ids, mask).next_token_logits, before)


@pytest.mark.parametrize("kernels", KERNELS_ON_CPU)
def test_greedy_steps_pick_on_the_device_as_the_host_loop(tiny_model, kernels):
    """`greedy_steps` (the pick inside the step, fed to the next) gives the tokens of decode_step + argmax, at batch 1
    (the GEMV path: argmax finished by the advance kernel) and batch 2, and refuses to run past the static cache."""
    loaded = models.load(models.resolve(str(tiny_model("qwen3"))), "fp32", "cpu")
    hf = HFRunner(loaded, "cpu", "fp32", torch.device("cpu"))
    ids, mask = tokenize(hf.tokenizer, list(PROMPTS), 0)
    cache = hf.prefill(ids, mask)
    for c in (cache.select([0]), cache):
        fast = FastRunner(loaded, "cpu", RunConfig(kernels=kernels), torch.device("cpu"), graphs=False)
        fast.start(c, 7)
        first = c.next_token_logits.argmax(-1)
        token, expected = first, []
        for _ in range(6):
            token = fast.decode_step(token).argmax(-1)
            expected.append(token)
        fast.start(c, 7)
        picked = torch.cat([fast.greedy_steps(first, 4), fast.greedy_steps(fast.decoder.tokens.clone(), 2)], dim=1)
        assert picked.tolist() == torch.stack(expected, dim=1).tolist()
        with pytest.raises(ValueError, match="slots"):
            fast.greedy_steps(picked[:, -1], 2)


@pytest.mark.interpreter
def test_decode_loop_uses_greedy_steps_in_chunks(tiny_model, monkeypatch):
    """run_decode with a runner that has `greedy_steps`: the same tokens and finish reasons as the host loop (HF), in
    chunks of `sync_every` steps, with a sequence finishing at EOS inside a chunk."""
    from portable.config import SamplingConfig
    from portable.generation import Stopper, run_decode
    from portable.sampling import Sampler

    loaded = models.load(models.resolve(str(tiny_model("llama"))), "fp32", "cpu")
    hf = HFRunner(loaded, "cpu", "fp32", torch.device("cpu"))
    ids, mask = tokenize(hf.tokenizer, list(PROMPTS), 0)
    cache = hf.prefill(ids, mask)
    reference = run_decode(hf, cache, Sampler(SamplingConfig(), 2), 9, Stopper(None))
    eos = reference.tokens[1][4]  # sequence 1 finishes at its 5th token, in the middle of the second chunk of 3
    stopper = Stopper(None, eos_ids=frozenset({eos}))
    reference = run_decode(hf, cache, Sampler(SamplingConfig(), 2), 9, stopper)
    fast = FastRunner(loaded, "cpu", RunConfig(kernels="triton"), torch.device("cpu"), graphs=False)
    calls = []
    steps = fast.greedy_steps
    monkeypatch.setattr(fast, "greedy_steps", lambda tokens, count: calls.append(count) or steps(tokens, count))
    ours = run_decode(fast, cache, Sampler(SamplingConfig(), 2), 9, stopper, sync_every=3)
    assert ours.tokens == reference.tokens and ours.finish_reasons == reference.finish_reasons
    assert calls and sum(calls) == len(ours.step_times_s) and max(calls) == 3


@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma3"])
@pytest.mark.parametrize("kernels", KERNELS_ON_CPU)
@pytest.mark.parametrize("lean", [False, True])
def test_int8_fast_step_matches_the_dequantized_model(tiny_model, name, kernels, lean, monkeypatch):
    """Weight-only int8: `quantize_linears_` makes the model's weights q * s (written in place, or with `lean`
    computed on access from the int8 rows, the dense weights dropped), so HF prefill and the HF step use them; the
    fast step gives the HF step's logits at batch 1 (GEMVs) and batch 2 (`int8_mm`, or its reference with torch
    kernels). The dense q * s would give the same logits, so the products are watched: every weight they get is
    int8, with its row scales, at every batch."""
    from torch.nn.utils import parametrize

    from backends import quantize
    from backends.kernels import attention, gemv, int8_mm

    streamed = []  # (weight dtype, has row scales) of each batch-1 GEMV and combine + W_o launch; "mm" per int8_mm
    real_gemv, real_oproj = gemv.gemv, attention.RopeAttention.combine_oproj_
    monkeypatch.setattr(gemv, "gemv", lambda x, w, out, **kw: streamed.append(
        (w.dtype, kw.get("scale") is not None)) or real_gemv(x, w, out, **kw))
    monkeypatch.setattr(attention.RopeAttention, "combine_oproj_", lambda self, wo, h, *args, **kw: streamed.append(
        (wo.dtype, kw.get("scale") is not None)) or real_oproj(self, wo, h, *args, **kw))
    for fn in ("int8_mm", "int8_mm_torch"):
        real = getattr(int8_mm, fn)
        monkeypatch.setattr(int8_mm, fn, lambda x, q, s, out=None, real=real, **kw: streamed.append(
            ("mm", q.dtype, s.dtype)) or real(x, q, s, out=out, **kw))
    loaded = models.load(models.resolve(str(tiny_model(name))), "fp32", "cpu")
    dense = {m: m.weight.clone() for m in quantize.linear_modules(loaded.model)}
    dense_bytes = models_weight_bytes(loaded.model)
    int8 = quantize.quantize_linears_(loaded.model, lean=lean)
    assert set(int8) == set(dense)
    embedding = loaded.model.get_input_embeddings().weight
    for m, (q, s) in int8.items():
        weight = m.weight
        assert not torch.equal(weight, dense[m]) and torch.equal(weight, quantize.dequantize_rows(q, s, weight.dtype))
        # lean: no dense weight is held but a head tied to the embedding's
        assert parametrize.is_parametrized(m, "weight") == (lean and m.weight is not embedding)
    hf = HFRunner(loaded, "cpu", "fp32", torch.device("cpu"))
    ids, mask = tokenize(hf.tokenizer, list(PROMPTS), 0)
    cache = hf.prefill(ids, mask)
    for c in (cache.select([0]), cache):
        fast = FastRunner(loaded, "cpu", RunConfig(kernels=kernels), torch.device("cpu"), graphs=False, int8=int8)
        layer = fast.decoder.layers[0]
        assert layer.int8["qkv"][0].dtype == torch.int8 and layer.wqkv is None and fast.decoder.head is None
        fused = layer.int8["qkv"][0].untyped_storage().data_ptr()  # one copy: q, k and v's rows view it
        attn = loaded.model.model.layers[0].self_attn
        assert [int8[m][0].untyped_storage().data_ptr() for m in (attn.q_proj, attn.k_proj, attn.v_proj)] == \
            [fused] * 3
        if lean:  # the model's own copy too
            assert attn.k_proj.parametrizations.weight.original0.untyped_storage().data_ptr() == fused
        assert fast.info.details["weights"] == "int8"
        hf.start(c, 5)
        fast.start(c, 5)
        streamed.clear()
        token = c.next_token_logits.argmax(-1)
        for _ in range(5):
            a, b = hf.decode_step(token), fast.decode_step(token)
            assert float((a - b).norm() / a.norm()) < 1e-5
            token = a.argmax(-1)
        products = 4 * len(fast.decoder.layers) + 1  # per layer qkv, o, gate/up, down; then the head
        if c.batch == 1 and kernels == "triton":
            assert streamed == [(torch.int8, True)] * 5 * products
        else:  # gate and up are two products here
            assert streamed == [("mm", torch.int8, torch.float32)] * 5 * (products + len(fast.decoder.layers))
    # the step reads the int8 rows and scales of every linear weight, at every batch
    linear = sum(w.numel() * w.element_size() for w in dense.values())
    expected = dense_bytes - linear + quantize.nbytes(int8.values())
    assert fast.weight_bytes(1) == fast.weight_bytes(2) == expected < dense_bytes


def models_weight_bytes(model) -> int:
    from portable.bench import roofline

    return roofline.weight_bytes(model)


def test_int8_on_a_gpu_backend_needs_the_fast_path(tiny_model, monkeypatch):
    """`--precision int8` on cuda/rocm loads bf16 weights, quantizes them and takes the fast path; a model outside
    the Llama family is refused in one line (there is no int8 HF path). Run on the CPU with the device faked."""
    monkeypatch.setattr(TorchGpuBackend, "device", lambda self, config: torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    runner = CudaBackend().load(RunConfig(backend="cuda", precision="int8", kernels="triton"),
                                models.resolve(str(tiny_model("llama"))))
    assert isinstance(runner, FastRunner) and runner.dtype == torch.bfloat16 and not runner.graphs
    assert runner.decoder.weights == "int8" and runner.decoder.head_int8[0].dtype == torch.int8
    with pytest.raises(PortableError, match="int8 on cuda needs the Llama-family decode step"):
        CudaBackend().load(RunConfig(backend="cuda", precision="int8"), models.resolve(str(tiny_model("gpt_bigcode"))))
    assert "int8" in CudaBackend.precisions and "int8" in RocmBackend.precisions


def test_int8_means_weight_only_on_gpus_and_dynamic_on_onnxruntime():
    from portable.bench.peers import Peers
    from portable.pipeline import int8_scheme

    assert int8_scheme("cuda") == int8_scheme("rocm") == "weight-only"
    assert int8_scheme("onnxruntime") == "dynamic"
    assert Peers(("hf",)).engines("cuda", "int8") == []  # no HF int8 weight-only engine: no peer row at all
    assert Peers(("hf",)).engines("cuda", "bf16") == ["hf-dynamic", "hf-static-compile"]


def test_models_outside_the_family_keep_the_hugging_face_path(tiny_model):
    loaded = models.load(models.resolve(str(tiny_model("gpt_bigcode"))), "fp32", "cpu")
    assert "not in the Llama family" in supports(loaded.model)


# ---- on a GPU ----

GPU_BACKEND = "rocm" if torch.version.hip else "cuda"  # each refuses the other's build of PyTorch

@pytest.fixture(scope="module")
def cpu_cache(tmp_path_factory):
    """A cache file prefilled on the CPU (the headline use: CPU prefill, GPU decode)."""
    path = tmp_path_factory.mktemp("gpu") / "c.safetensors"
    run_cli("prefill.py", "--out", str(path), "-q")
    return path


@pytest.mark.gpu
def test_cuda_fp32_is_exact_with_cpu_fp32(cpu_cache, tmp_path):
    run_cli("decode.py", "--cache", str(cpu_cache), "--backend", GPU_BACKEND, "--precision", "fp32", "--json",
            str(tmp_path / "r.json"), "-q", "--artifact-dir", str(tmp_path / "art"))
    report = read_json(tmp_path / "r.json")
    assert report["parity"]["verdict"] == "exact", report["parity"]
    assert report["backend_details"]["path"] == "fast" and report["backend_details"]["cuda_graph"]
    assert report["timing"]["compile_s"] > 0


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_reduced_precision_verdicts(cpu_cache, tmp_path, precision):
    run_cli("decode.py", "--cache", str(cpu_cache), "--backend", GPU_BACKEND, "--precision", precision, "--json",
            str(tmp_path / "r.json"), "-q", "--artifact-dir", str(tmp_path / "art"))
    assert read_json(tmp_path / "r.json")["parity"]["verdict"] in ("exact", "within-precision")


@pytest.mark.gpu
def test_cuda_int8_weight_only_verdict(cpu_cache, tmp_path):
    """int8 weight rows on the GPU against CPU FP32: within the tolerance of the same int8 weights on CPU bf16."""
    run_cli("decode.py", "--cache", str(cpu_cache), "--backend", GPU_BACKEND, "--precision", "int8", "--json",
            str(tmp_path / "r.json"), "-q", "--artifact-dir", str(tmp_path / "art"))
    report = read_json(tmp_path / "r.json")
    assert report["backend_details"]["weights"] == "int8" and report["backend_details"]["cuda_graph"]
    assert report["backend_details"]["int8_scheme"] == "weight-only"
    assert report["parity"]["verdict"] in ("exact", "within-precision"), report["parity"]


@pytest.mark.gpu
def test_cuda_artifact_is_saved_then_reused_in_a_fresh_process(cpu_cache, tmp_path):
    args = ["decode.py", "--cache", str(cpu_cache), "--backend", GPU_BACKEND, "--precision", "bf16", "-q",
            "--no-parity", "--artifact-dir", str(tmp_path / "art")]
    run_cli(*args, "--json", str(tmp_path / "a.json"))
    run_cli(*args, "--json", str(tmp_path / "b.json"))
    first, second = read_json(tmp_path / "a.json")["timing"], read_json(tmp_path / "b.json")["timing"]
    assert first["artifact_reused"] is False and first["compile_s"] > 0 and first["save_s"] > 0
    assert second["artifact_reused"] is True and second["compile_s"] is None and second["load_s"] > 0
    assert read_json(tmp_path / "a.json")["tokens"] == read_json(tmp_path / "b.json")["tokens"]
    run_cli(*args, "--rebuild", "--json", str(tmp_path / "c.json"))
    assert read_json(tmp_path / "c.json")["timing"]["artifact_reused"] is False


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_cuda_graph_decode_matches_eager_fast_path(kernels):
    loaded = models.load(models.resolve("default"), "bf16", "cuda")
    hf = HFRunner(loaded, GPU_BACKEND, "bf16", torch.device("cuda"))
    ids, mask = tokenize(hf.tokenizer, list(PROMPTS), 0)
    cache = hf.prefill(ids, mask).select([0])
    config = RunConfig(precision="bf16", kernels=kernels)
    graphed = FastRunner(loaded, GPU_BACKEND, config, torch.device("cuda"))
    eager = FastRunner(loaded, GPU_BACKEND, config, torch.device("cuda"), graphs=False, pdl=False)
    graphed.start(cache, 8)
    eager.start(cache, 8)
    token = cache.next_token_logits.argmax(-1)
    for _ in range(8):
        a = eager.decode_step(token).clone()
        b = graphed.decode_step(token).clone()
        assert float((a - b).norm() / a.norm()) < 1e-2
        token = a.argmax(-1)
    # the greedy graph (argmax inside the step, fed to the next step on the device) picks what the plain graph and a
    # host argmax pick
    first = cache.next_token_logits.argmax(-1)
    graphed.start(cache, 8)
    token, picks = first, []
    for _ in range(7):
        token = graphed.decode_step(token).argmax(-1)
        picks.append(int(token))
    graphed.start(cache, 8)
    assert graphed.greedy_steps(first, 7)[0].tolist() == picks


def test_cuda_pipeline_on_a_stand_in_gpu(cpu_cache, tmp_path, monkeypatch):
    """`decode --backend cuda` end to end on the CPU: a stand-in for the CUDA graph API (capture records the decoder's
    step, replay runs it) lets the real capture, artifact and warm-up code run, as the GPU tests cannot in CI. The
    first run compiles, captures once and saves the artifact; a second load reuses it; both are exact."""
    import contextlib

    from backends import llama_fast
    from portable import pipeline

    replays, capturing = [], []
    step = llama_fast.FastDecoder.step

    class Graph:
        def __init__(self):
            self.steps = []

        def pool(self):
            return None

        def replay(self):
            for decoder, greedy in self.steps:
                replays.append(greedy)
                step(decoder, greedy)

    @contextlib.contextmanager
    def graph(g, pool=None):
        capturing.append(g)
        yield
        capturing.pop()

    def recorded_step(self, greedy=False):  # inside a capture a step is recorded, not run (as on a GPU)
        if capturing:
            capturing[-1].steps.append((self, greedy))
            return self.logits
        return step(self, greedy)

    class Stream:  # a class, as transformers annotates with torch.cuda.Stream | None at import time
        def __init__(self, device=None):
            pass

        def wait_stream(self, other):
            pass

    for name, value in {"CUDAGraph": Graph, "graph": graph, "Stream": Stream,
                        "stream": lambda s: contextlib.nullcontext(), "current_stream": lambda device=None: Stream(),
                        "synchronize": lambda device=None: None, "set_device": lambda device: None,
                        "get_device_name": lambda device=None: "stand-in sm_90",
                        "get_device_capability": lambda device=None: (9, 0)}.items():
        monkeypatch.setattr(torch.cuda, name, value)
    monkeypatch.setattr(llama_fast.FastDecoder, "step", recorded_step)
    monkeypatch.setattr(CudaBackend, "is_available", lambda self: backends.Availability(True))
    monkeypatch.setattr(TorchGpuBackend, "device", lambda self, config: torch.device("cpu"))
    init = FastRunner.__init__
    monkeypatch.setattr(FastRunner, "__init__",
                        lambda self, *a, **k: (init(self, *a, **k), setattr(self, "graphs", True))[0])

    config = RunConfig(cache_path=cpu_cache, backend="cuda", precision="fp32", max_new_tokens=8, kernels="torch",
                       artifact_dir=tmp_path / "art")  # torch kernels: the interpreter's would take minutes
    first = pipeline.decode(config)
    assert first.parity.verdict == "exact" and first.backend_details["graph_captures"] == 1
    assert first.timing.compile_s > 0 and first.timing.artifact_reused is False
    assert replays[0] is False and replays[1:8] == [True] * 7  # the warm-up step, then the timed greedy steps
    assert first.timing.decode.calls == 7
    second = pipeline.decode(config)
    assert second.timing.artifact_reused is True and second.timing.compile_s is None and second.timing.load_s > 0
    assert second.tokens == first.tokens and second.parity.verdict == "exact"
