"""The bulk-copy GEMV (backends/kernels/stream_gemv.cu): its work split on any machine; on an NVIDIA sm_90+ GPU
(tests marked `gpu`), every epilogue against `gemv.gemv_torch`, at the real models' shapes and at ragged ones, and
the decode step with it against the step with the Triton GEMVs, graphed, with programmatic dependent launch."""

from __future__ import annotations

import pytest
import torch

from backends.kernels import gemv, stream_gemv

SHAPES = [(3072, 2048, False), (8192, 2048, True), (2048, 8192, False), (128256, 2048, False), (4096, 2048, False),
          (6144, 2048, True), (2048, 6144, False), (151936, 2048, False), (768, 256, False), (512, 256, True),
          (256, 512, False), (4096, 256, False)]


@pytest.mark.parametrize("n,k,gated", SHAPES)
@pytest.mark.parametrize("sms", [132, 114, 7])
def test_plan_covers_every_row_once_within_its_shared_memory(n, k, gated, sms):
    p = stream_gemv.plan(n, k, gated, sms)
    assert p is not None
    assert p.rows * p.split == stream_gemv.CONSUMERS and k % (256 * p.split) == 0
    assert p.rows_per_cta % p.rows == 0
    mats = 2 if gated else 1
    assert p.grid <= sms or p.rows_per_cta * p.split * mats * 4 > stream_gemv.PART_BYTES - 4 * p.rows * p.split * mats
    assert (p.grid - 1) * p.rows_per_cta < n <= p.grid * p.rows_per_cta  # every row owned, no program idle
    row = 2 * k * mats  # a chunk: the fewest whole rows (a power of two) that make CHUNK_BYTES, up to CONSUMERS
    assert p.rows == stream_gemv.CONSUMERS or p.rows * row >= stream_gemv.CHUNK_BYTES
    assert p.rows == 1 or (p.rows // 2) * row < stream_gemv.CHUNK_BYTES
    assert p.shared_bytes(k, gated) <= 227 * 1024
    assert 1 <= p.stages <= p.rows_per_cta // p.rows  # no stage a program cannot fill


def test_plan_refuses_what_the_kernel_cannot_take():
    assert stream_gemv.plan(1024, 200, False, 132) is None  # K not a multiple of 256
    assert stream_gemv.plan(1024, 384, False, 132) is None
    p = stream_gemv.plan(1024, 768, False, 132)  # 768 = 3 * 256: one warp per row, all of K
    assert p is not None and p.split == 1
    # Gemma3-1B's down projection (K = 6912 = 27 * 256): only one warp per row divides it, and 27 vectors of x' per
    # lane would spill registers
    assert stream_gemv.plan(1152, 6912, False, 132) is None
    assert stream_gemv.plan(2048, 16384, False, 132).split == 8  # 8 vectors per lane: the most a consumer holds
    assert stream_gemv.plan(2048, 32768, False, 132) is None


def test_not_available_without_an_nvidia_gpu(monkeypatch):
    assert "NVIDIA" in stream_gemv.available(torch.device("cpu"))
    monkeypatch.setattr(torch.version, "hip", "6.2.0")  # PyTorch on ROCm calls its GPUs "cuda" too
    assert "NVIDIA" in stream_gemv.available(torch.device("cuda"))


def test_ring_limit_follows_the_devices_shared_memory(monkeypatch):
    """A ring deeper than a program's shared memory allows is cut to what fits (H100/H200: 227 KiB opt-in, so the
    gate/up ring of 208 KiB fits whole; a 99 KiB GPU gets an 82 KiB ring); RING_BYTES where the limit is unknown."""
    from types import SimpleNamespace

    limits = ((232448, 232448 - stream_gemv.PART_BYTES - 1024), (101376, 82 * 1024), (0, stream_gemv.RING_BYTES))
    for optin, expected in limits:
        stream_gemv.ring_limit.cache_clear()
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda device, o=optin: SimpleNamespace(shared_memory_per_block_optin=o))
        assert stream_gemv.ring_limit(torch.device("cuda")) == expected
    stream_gemv.ring_limit.cache_clear()
    p = stream_gemv.plan(6144, 2048, True, 132, ring_bytes=stream_gemv.GATE_UP_RING_BYTES)  # Qwen3-1.7B's gate/up
    assert p.stages == 13 and p.shared_bytes(2048, True) <= 232448 - 1024


def test_stream_gemv_refuses_bad_input():
    """Checked before anything runs (so on any machine): the weights' dtype and layout, x, norm_w, out, alignment;
    then the device; on a GPU also K (see test_plan_refuses_what_the_kernel_cannot_take)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 2048, generator=g).to(torch.bfloat16).to(dev)
    x, out = torch.randn(2048, generator=g).to(dev), torch.zeros(64, device=dev)
    with pytest.raises(ValueError, match="bf16/fp16"):
        stream_gemv.stream_gemv(x, w.float(), out)
    with pytest.raises(ValueError, match="bf16/fp16"):
        stream_gemv.stream_gemv(x, w.t(), out)
    with pytest.raises(ValueError, match="fp32 output"):
        stream_gemv.stream_gemv(x, w, out.to(torch.bfloat16), accumulate=True)
    with pytest.raises(ValueError, match="x must be"):
        stream_gemv.stream_gemv(x[:100], w, out)
    with pytest.raises(ValueError, match="norm_w"):
        stream_gemv.stream_gemv(x, w, out, norm_w=x)
    with pytest.raises(ValueError, match="out must be"):
        stream_gemv.stream_gemv(x, w, out[:63])
    with pytest.raises(ValueError, match="aligned"):
        stream_gemv.stream_gemv(torch.zeros(2049, device=dev)[1:], w, out)
    if dev == "cpu":
        with pytest.raises(ValueError, match="NVIDIA"):
            stream_gemv.stream_gemv(x, w, out)


@pytest.mark.parametrize("precision,int8,expected", [("bf16", False, "stream"), ("fp16", False, "stream"),
                                                     ("fp32", False, "triton"), ("bf16", True, "triton")])
def test_decoder_picks_the_stream_gemvs_for_two_byte_weights_where_available(tiny_model, monkeypatch, precision,
                                                                             int8, expected):
    """The default GEMV where the GPU takes the bulk-copy kernel (`available` faked here): bf16/fp16 weights stream,
    fp32 and int8 weights keep the Triton GEMV (which the kernel does not take), and so does a GPU without it."""
    from backends import quantize
    from backends.llama_fast import FastDecoder
    from portable import models

    loaded = models.load(models.resolve(str(tiny_model("llama"))), precision, "cpu")
    q = quantize.quantize_linears_(loaded.model) if int8 else None
    monkeypatch.setattr(stream_gemv, "available", lambda device: None)
    assert FastDecoder(loaded.model, kernels="triton", int8=q).gemv_impl == expected
    assert FastDecoder(loaded.model, kernels="torch", int8=q).gemv_impl == "triton"
    monkeypatch.setattr(stream_gemv, "available", lambda device: "needs an NVIDIA GPU")
    assert FastDecoder(loaded.model, kernels="triton", int8=q).gemv_impl == "triton"


def test_decoder_rings_and_combine_heads(tiny_model, monkeypatch):
    """The qkv GEMV's ring holds half of a program's rows (48 KiB for Llama-3.2-1B's 3072 x 2048 on 132 SMs, 64 KiB
    for Qwen3-1.7B's 4096 x 2048); gate/up's is GATE_UP_RING_BYTES; the others take stream_ring_bytes;
    `stream_rings` overrides all. The combine choices follow head_dim."""
    from backends.llama_fast import FastDecoder
    from portable import models

    loaded = models.load(models.resolve(str(tiny_model("llama"))), "bf16", "cpu")
    d = FastDecoder(loaded.model, kernels="triton")
    monkeypatch.setattr(stream_gemv, "sms", lambda device: 132)
    llama, qwen = torch.empty(3072, 2048, dtype=torch.bfloat16), torch.empty(4096, 2048, dtype=torch.bfloat16)
    assert d._ring("qkv", llama, False) == 48 * 1024
    assert d._ring("qkv", qwen, False) == 64 * 1024
    assert d._ring("gate_up", qwen, True) == stream_gemv.GATE_UP_RING_BYTES == 208 * 1024
    assert d._ring("down", qwen, False) == d._ring("head", qwen, False) == stream_gemv.RING_BYTES
    d.stream_rings = {"qkv": 96 * 1024, "gate_up": 144 * 1024}
    assert d._ring("qkv", llama, False) == 96 * 1024
    assert d._ring("gate_up", qwen, True) == 144 * 1024
    # two heads per combine + W_o program, one where the weight tile would not stay in registers (head_dim > 128)
    assert d.oproj_heads == 2
    loaded.model.config.head_dim = 256
    assert FastDecoder(loaded.model, kernels="triton").oproj_heads == 1
    # the combines' chunk axis: at least 16 long, whatever the head_dim
    assert d.attention_min_chunks_p2 == 16
    assert FastDecoder(loaded.model, kernels="triton").attention_min_chunks_p2 == 16


gpu = pytest.mark.skipif(not torch.cuda.is_available() or stream_gemv.available(torch.device("cuda")) is not None,
                         reason="needs an NVIDIA sm_90+ GPU with NVRTC")


def _rand(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to("cuda")


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("n,k,gated", SHAPES + [(1000, 2048, False), (999, 2048, True), (13, 8192, False)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stream_gemv_matches_the_reference(n, k, gated, dtype):
    w = _rand(n, k, dtype=dtype, seed=1, scale=k ** -0.5)
    up = _rand(n, k, dtype=dtype, seed=2, scale=k ** -0.5) if gated else None
    x = _rand(k, seed=3)
    norm_w = _rand(k, dtype=dtype, seed=4, scale=0.1) + 1
    for kw in ({"norm_w": norm_w, "eps": 1e-5}, {"norm_w": norm_w, "norm_offset": 1.0}, {}):
        for act in (("silu", "gelu_tanh") if gated else ("silu",)):
            a, b = torch.zeros(n, dtype=dtype, device="cuda"), torch.zeros(n, dtype=dtype, device="cuda")
            stream_gemv.stream_gemv(x, w, a, up=up, act=act, **kw)
            gemv.gemv_torch(x, w, b, up=up, act=act, **kw)
            assert _rel(a, b) < 1e-2, (kw, act)
    if not gated:  # bf16/fp16 x, accumulating into an fp32 output (the down projection into the residual)
        xh = x.to(dtype)
        base = _rand(n + 64, seed=5)  # 64 values past the output: no program may add to them
        a, b = base.clone(), base.clone()
        stream_gemv.stream_gemv(xh, w, a[:n], accumulate=True)
        gemv.gemv_torch(xh, w, b[:n], accumulate=True)
        assert _rel(a[:n] - base[:n], b[:n] - base[:n]) < 1e-2
        assert torch.equal(a[n:], base[n:])


@pytest.mark.gpu
@gpu
def test_stream_gemv_cuts_a_ring_deeper_than_shared_memory():
    n, k = 6144, 2048
    w, up = (_rand(n, k, dtype=torch.bfloat16, seed=s, scale=k ** -0.5) for s in (9, 10))
    x = _rand(k, seed=11)
    a, b, c = (torch.zeros(n, dtype=torch.bfloat16, device="cuda") for _ in range(3))
    stream_gemv.stream_gemv(x, w, a, up=up, ring_bytes=4 << 20)  # 4 MiB: more than any SM has
    stream_gemv.stream_gemv(x, w, b, up=up, ring_bytes=stream_gemv.GATE_UP_RING_BYTES)
    gemv.gemv_torch(x, w, c, up=up)
    assert torch.equal(a, b)  # the same rows in the same order: only the chunks in flight differ
    assert _rel(a, c) < 1e-2


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("n,k,gated", [(6144, 2048, True), (2048, 6144, False), (999, 2048, True)])
def test_stream_gemv_stamps_are_ordered_and_change_nothing(n, k, gated):
    w = _rand(n, k, dtype=torch.bfloat16, seed=16, scale=k ** -0.5)
    up = _rand(n, k, dtype=torch.bfloat16, seed=17, scale=k ** -0.5) if gated else None
    x, norm_w = _rand(k, seed=18), _rand(k, dtype=torch.bfloat16, seed=19) + 1
    p = stream_gemv.plan(n, k, gated, stream_gemv.sms(w.device))
    a, b = torch.zeros(n, device="cuda"), torch.zeros(n, device="cuda")
    st = torch.zeros(p.grid, 64, dtype=torch.int64, device="cuda")
    stream_gemv.stream_gemv(x, w, a, up=up, norm_w=norm_w)
    stream_gemv.stream_gemv(x, w, b, up=up, norm_w=norm_w, stamps=st)
    assert torch.equal(a, b)
    st = st.cpu()
    for prog in range(p.grid):
        t = st[prog]
        chunks = -(-min(p.rows_per_cta, n - prog * p.rows_per_cta) // p.rows)
        # in program order: the producer's lane 0 (0, 6), its lane 1 after the consumers' wait (62), consumer thread
        # 0 (1, 2, the chunks, 3 and 4 in either order, 5)
        assert 0 < t[0] <= t[6] <= t[62] and t[1] <= t[2] <= min(t[3], t[4]) and max(t[3], t[4]) <= t[5]
        assert 0 <= int(t[7]) < stream_gemv.sms(w.device)
        arrived = t[8:8 + min(chunks, 54)]
        assert (arrived > 0).all() and (arrived[1:] >= arrived[:-1]).all() and arrived[-1] <= t[5]
    with pytest.raises(ValueError, match="stamps"):
        stream_gemv.stream_gemv(x, w, b, up=up, stamps=st.cuda()[:-1])


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("n", [4096, 128256, 1000])
def test_stream_gemv_argmax_pairs_give_the_first_largest_logit(n):
    k = 2048
    w = _rand(n, k, dtype=torch.bfloat16, seed=6, scale=k ** -0.5)
    x, norm_w = _rand(k, seed=7), _rand(k, dtype=torch.bfloat16, seed=8) + 1
    grid = stream_gemv.plan(n, k, False, stream_gemv.sms(w.device)).grid
    amax = torch.zeros(grid, device="cuda")
    aidx = torch.zeros(grid, dtype=torch.int32, device="cuda")
    logits = torch.zeros(n, device="cuda")
    stream_gemv.stream_gemv(x, w, logits, norm_w=norm_w, argmax=(amax, aidx))
    assert int(aidx[int(amax.argmax())]) == int(logits.argmax())
    x = x.abs()
    w[n // 2] = 0.5  # three equal largest logits (x > 0, norm weights near 1): the first row wins, as in torch.argmax
    w[n // 3] = w[n // 2]
    w[n // 3 + 1] = w[n // 2]
    stream_gemv.stream_gemv(x, w, logits, norm_w=norm_w, argmax=(amax, aidx))
    best = float(amax.max())
    assert int(aidx[amax == best].min()) == int(logits.argmax()) == n // 3
    with pytest.raises(ValueError, match="entries"):
        stream_gemv.stream_gemv(x, w, logits, argmax=(amax[:-1], aidx[:-1]))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("model", ["default", "preset:llama-3.2-1b", "preset:qwen3-1.7b"])
def test_decode_step_with_stream_gemvs_matches_the_triton_gemvs(model):
    """The graphed bf16 step with the bulk-copy GEMVs (and programmatic dependent launch) against the same step with
    the Triton GEMVs: close logits over 8 steps; on the embedded (trained) model also the same greedy picks over 24
    steps (the presets' random weights give near-flat logits, where any change of summation order may flip a pick)."""
    from backends.fast_runner import FastRunner
    from backends.hf_torch import HFRunner
    from portable import models
    from portable.config import RunConfig

    loaded = models.load(models.resolve(model), precision="bf16", device="cuda")
    hf = HFRunner(loaded, backend="cuda", precision="bf16", device=torch.device("cuda"))
    ids = torch.randint(10, 1000, (1, 40), generator=torch.Generator().manual_seed(0))
    cache = hf.prefill(ids, torch.ones_like(ids))
    first = cache.next_token_logits.argmax(-1)
    runs = {}
    for impl in ("triton", "stream"):
        runner = FastRunner(loaded, "cuda", RunConfig(precision="bf16", kernels="triton"), torch.device("cuda"))
        runner.decoder.gemv_impl = impl
        w = runner.decoder.layers[0].wqkv
        assert (runner.decoder._stream_plan(w, False) is not None) == (impl == "stream")  # the path under test runs
        runner.start(cache, 32)
        token, logits = first, []
        for _ in range(8):  # teacher-forced by the Triton run's picks below
            logits.append(runner.decode_step(token).clone())
            token = runs["triton"][0][len(logits) - 1].argmax(-1) if runs else logits[-1].argmax(-1)
        runner.start(cache, 32)
        runs[impl] = logits, runner.greedy_steps(first, 24)[0].tolist()
    for a, b in zip(runs["stream"][0], runs["triton"][0]):
        assert _rel(a, b) < 2e-2
    if model == "default":
        assert runs["stream"][1] == runs["triton"][1]
