"""Each Triton kernel against its PyTorch reference, on fresh random data of several shapes and dtypes.

On a machine without a GPU these run through Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py); on a
GPU they run compiled, and the tests marked `gpu` add the sizes of real models.
"""

from __future__ import annotations

import pytest
import torch

from backends import quantize
from backends.kernels import activation, attention, gemv, int8_mm, norms, rope, step

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("cols", [64, 200])
def test_rmsnorm(dtype, offset, cols):
    x, w = rand(3, cols, dtype=dtype, seed=1), rand(cols, dtype=dtype, seed=2)
    y = norms.rmsnorm(x, w, 1e-6, offset)
    assert y.dtype == dtype
    assert rel_err(y, norms.rmsnorm_torch(x, w, 1e-6, offset)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rmsnorm_updates_residual_in_place(dtype):
    x, w = rand(2, 96, dtype=dtype, seed=3), rand(96, dtype=dtype, seed=4)
    r1 = rand(2, 96, seed=5)  # fp32 residual stream
    r2 = r1.clone()
    y1 = norms.add_rmsnorm_(x, r1, w, 1e-5, out_dtype=dtype)
    y2 = norms.add_rmsnorm_torch_(x, r2, w, 1e-5, out_dtype=dtype)
    assert rel_err(r1, r2) < 1e-6 and rel_err(y1, y2) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm_then_add(dtype):
    x, w = rand(2, 96, dtype=dtype, seed=30), rand(96, dtype=dtype, seed=31)
    r1 = rand(2, 96, seed=32)
    r2 = r1.clone()
    norms.rmsnorm_add_(x, r1, w, 1e-6, 1.0)
    norms.rmsnorm_add_torch_(x, r2, w, 1e-6, 1.0)
    assert rel_err(r1, r2) < TOL[dtype] and not torch.equal(r1, rand(2, 96, seed=32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_gated_activation(dtype, act):
    g, u = rand(5, 300, dtype=dtype, seed=6), rand(5, 300, dtype=dtype, seed=7)
    assert rel_err(activation.gated(g, u, act), activation.gated_torch(g, u, act)) < TOL[dtype]


def inv_freq(d, base=10000.0):
    return (1.0 / base ** (torch.arange(0, d, 2).float() / d)).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_rotates_q_and_k_in_one_kernel(dtype):
    q, k = rand(3, 4, 32, dtype=dtype, seed=8), rand(3, 2, 32, dtype=dtype, seed=9)
    pos = torch.tensor([0, 7, 130], device=DEVICE)
    qo, ko = rope.rope_qk(q, k, pos, inv_freq(32), 1.0)
    qr, kr = rope.rope_qk_torch(q, k, pos, inv_freq(32), 1.0)
    assert rel_err(qo, qr) < TOL[dtype] and rel_err(ko, kr) < TOL[dtype]
    assert torch.equal(qo[0], q[0]) or dtype != torch.float32  # position 0 is the identity


def test_rope_matches_transformers_llama():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = LlamaConfig(hidden_size=64, num_attention_heads=2, head_dim=32,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    emb = LlamaRotaryEmbedding(config).to(DEVICE)
    q, k = rand(1, 2, 5, 32, seed=10), rand(1, 2, 5, 32, seed=11)
    pos = torch.arange(5, device=DEVICE)[None] + 100
    cos, sin = emb(q, pos)
    qh, kh = apply_rotary_pos_emb(q, k, cos, sin)
    ours = rope.rope_torch(q[0].transpose(0, 1), pos[0], emb.inv_freq, emb.attention_scaling)
    assert rel_err(ours, qh[0].transpose(0, 1)) < 1e-5
    ours_k, _ = rope.rope_qk(k[0].transpose(0, 1).contiguous(), k[0].transpose(0, 1).contiguous(), pos[0],
                             emb.inv_freq, emb.attention_scaling)
    assert rel_err(ours_k, kh[0].transpose(0, 1)) < 1e-5


@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("cur", [33, 20, 8])
def test_rope_attention_with_several_blocks_per_chunk(window, cur):
    """`blocks_per_chunk` (a tuning knob: each pass-1 program walks that many blocks of slots) changes the split of
    the work, not the result: the new slot in the first block of a chunk (cur 8: block 0-15 of chunk 0-31), in a
    later one (20: block 16-31), and past the first chunk (33). Blocks of 16 slots, the fewest a compiled run's
    tensor-core dots take (this test runs compiled on a GPU)."""
    b, hk, group, d, s = 2, 2, 2, 32, 40
    hq = hk * group
    qkv = rand(b, (hq + 2 * hk) * d, seed=50)
    start = torch.tensor([0, 3], dtype=torch.int32, device=DEVICE)
    pos = torch.tensor([cur, cur - 3], device=DEVICE)
    slot = torch.tensor([cur], dtype=torch.int32, device=DEVICE)
    old_k, old_v = rand(b, hk, s, d, seed=51), rand(b, hk, s, d, seed=52)
    kc1, vc1, kc2, vc2 = old_k.clone(), old_v.clone(), old_k.clone(), old_v.clone()
    attn = attention.RopeAttention(b, hq, hk, d, s, DEVICE, block_s=16, blocks_per_chunk=2)
    assert attn.n_chunks == 2
    for ws in (attn.m, attn.l, attn.acc):
        ws.fill_(float("nan"))
    attn.rope_attention(qkv, pos, inv_freq(d), 1.0, kc1, vc1, start, slot, d ** -0.5, window, None, None, 1e-6, 0.0)
    out1 = attn.combine(torch.empty(b, hq, d, device=DEVICE))
    q = torch.empty(b, hq, d, device=DEVICE)
    rope.qkv_rope_cache_torch_(qkv, pos, inv_freq(d), 1.0, q, kc2, vc2, slot, None, None, 1e-6, 0.0)
    out2 = attention.decode_attention_torch(q, kc2, vc2, start, slot, d ** -0.5, window)
    assert rel_err(out1, out2) < 1e-5
    assert rel_err(kc1, kc2) < 1e-5 and torch.equal(vc1, vc2)


def test_compiled_attention_refuses_blocks_its_dots_cannot_take(monkeypatch):
    """Compiled (tensor-core dots, faked here: the interpreter takes any size), Triton 3.6 on NVIDIA needs K >= 16 in
    tl.dot: pass 1's p . v has K = block_s and q . k^T has K = head_dim / 2. A smaller one is refused where it is
    set, not left to fail as a CompilationError in graph capture (block_s=8 did, in the test above, on a GPU)."""
    monkeypatch.setattr(attention, "interpreting", lambda: False)
    assert attention.RopeAttention(1, 4, 2, 64, 40, "cpu", block_s=16).use_dot
    with pytest.raises(ValueError, match="at least 16 slots"):
        attention.RopeAttention(1, 4, 2, 64, 40, "cpu", block_s=8, blocks_per_chunk=2)
    with pytest.raises(ValueError, match="head_dim >= 32"):
        attention.RopeAttention(1, 4, 2, 16, 40, "cpu", block_s=32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("group,qk_norm,d", [(1, False, 32), (4, True, 32), (2, False, 64)])
@pytest.mark.parametrize("cur", [33, 8])
def test_rope_attention_matches_rope_then_attention(dtype, window, group, qk_norm, d, cur):
    b, hk, s = 2, 2, 40
    hq = hk * group
    qkv = rand(b, (hq + 2 * hk) * d, dtype=dtype, seed=40)
    start = torch.tensor([0, 3], dtype=torch.int32, device=DEVICE)  # sequence 1 has 3 pad slots
    pos = torch.tensor([cur, cur - 3], device=DEVICE)
    slot = torch.tensor([cur], dtype=torch.int32, device=DEVICE)
    qn = rand(d, dtype=dtype, seed=41) if qk_norm else None
    kn = rand(d, dtype=dtype, seed=42) if qk_norm else None
    old_k, old_v = rand(b, hk, s, d, dtype=dtype, seed=43), rand(b, hk, s, d, dtype=dtype, seed=44)
    kc1, vc1, kc2, vc2 = old_k.clone(), old_v.clone(), old_k.clone(), old_v.clone()
    attn = attention.RopeAttention(b, hq, hk, d, s, DEVICE, block_s=16)
    for ws in (attn.m, attn.l, attn.acc):  # chunks past the new slot write nothing: what is there must not count
        ws.fill_(float("nan"))
    attn.rope_attention(qkv, pos, inv_freq(d), 1.0, kc1, vc1, start, slot, d ** -0.5, window, qn, kn, 1e-6, 0.0)
    out1 = attn.combine(torch.empty(b, hq, d, dtype=dtype, device=DEVICE))
    q = torch.empty(b, hq, d, dtype=dtype, device=DEVICE)
    rope.qkv_rope_cache_torch_(qkv, pos, inv_freq(d), 1.0, q, kc2, vc2, slot, qn, kn, 1e-6, 0.0)
    out2 = attention.decode_attention_torch(q, kc2, vc2, start, slot, d ** -0.5, window)
    assert rel_err(out1, out2) < TOL[dtype] * 2
    assert rel_err(kc1, kc2) < TOL[dtype] and torch.equal(vc1, vc2)
    # Slots outside the valid range (padding, beyond the new slot) must not matter.
    kc1[1, :, 1] = 1e3
    vc1[:, :, cur + 1:] = 1e3
    attn.rope_attention(qkv, pos, inv_freq(d), 1.0, kc1, vc1, start, slot, d ** -0.5, window, qn, kn, 1e-6, 0.0)
    assert rel_err(attn.combine(torch.empty_like(out1)), out1) < 1e-6

    # batch 1: the combine folded into the output projection, accumulated into an fp32 residual
    attn1 = attention.RopeAttention(1, hq, hk, d, s, DEVICE, block_s=16)
    for ws in (attn1.m, attn1.l, attn1.acc):
        ws.fill_(float("nan"))
    kc3, vc3 = old_k[:1].clone(), old_v[:1].clone()
    attn1.rope_attention(qkv[:1], pos[:1], inv_freq(d), 1.0, kc3, vc3, start[:1], slot, d ** -0.5, window, qn, kn,
                         1e-6, 0.0)
    wo = (rand(48, hq * d, dtype=dtype, seed=45) / (hq * d) ** 0.5).contiguous()
    h1 = rand(48, seed=46)
    h2 = h1.clone()
    h2 += torch.nn.functional.linear(out2[:1].reshape(1, -1).float(), wo.float())[0]
    for heads in (1, 2, 4):  # query heads per program (4 is halved to 2 where there are only 2 heads)
        h3 = h1.clone()
        attn1.combine_oproj_(wo, h3, block_n=16, heads=heads)
        assert rel_err(h3, h2) < TOL[dtype] * 3
    # a chunk axis longer than the chunks (min_chunks_p2): the lanes past them are masked, in both combines
    wide = attention.RopeAttention(1, hq, hk, d, s, DEVICE, block_s=16, min_chunks_p2=16)
    assert (attn1.chunks_p2, wide.chunks_p2) == (4, 16)
    wide.m, wide.l, wide.acc, wide.slot = attn1.m, attn1.l, attn1.acc, attn1.slot
    h6 = h1.clone()
    wide.combine_oproj_(wo, h6, block_n=16, heads=2)
    assert rel_err(h6, h2) < TOL[dtype] * 3
    assert torch.equal(wide.combine(torch.empty_like(out1[:1])), attn1.combine(torch.empty_like(out1[:1])))
    # int8 W_o rows with their scales: as the dequantized weights (o still rounded to the model's dtype)
    q8, s8 = quantize.quantize_rows(wo)
    h4, h5 = h1.clone(), h1.clone()
    attn1.combine_oproj_(q8, h4, block_n=16, heads=2, scale=s8, o_like=out1)
    attn1.combine_oproj_(quantize.dequantize_rows(q8, s8, torch.float32), h5, block_n=16, heads=2)
    assert rel_err(h4, h5) < (1e-5 if dtype == torch.float32 else TOL[dtype])
    with pytest.raises(ValueError, match="row scales"):
        attn1.combine_oproj_(q8, h4, block_n=16)


def test_embed_and_advance():
    emb = rand(50, 24, dtype=torch.bfloat16, seed=45)
    tokens = torch.tensor([3, 49], device=DEVICE)
    h1, h2 = torch.zeros(2, 24, device=DEVICE), torch.zeros(2, 24, device=DEVICE)
    step.embed_(tokens, emb, h1, 2.5)
    step.embed_torch_(tokens, emb, h2, 2.5)
    assert torch.equal(h1, h2)
    pos, slot = torch.tensor([4, 9], device=DEVICE), torch.tensor([9], dtype=torch.int32, device=DEVICE)
    step.advance_(pos, slot)
    assert pos.tolist() == [5, 10] and slot.tolist() == [10]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["plain", "norm", "gated", "accumulate", "ragged", "norm_split", "gated_norm"])
@pytest.mark.parametrize("preload", [False, True])
def test_gemv(dtype, case, preload):
    n, k = (40, 200) if case == "ragged" else (64, 512)
    x = rand(k, dtype=torch.float32 if case in ("norm", "accumulate") else dtype, seed=18)
    w = (rand(n, k, dtype=dtype, seed=19) / k ** 0.5).contiguous()
    kwargs = {}
    if case in ("norm", "norm_split", "gated_norm"):
        kwargs = dict(norm_w=rand(k, dtype=dtype, seed=20), eps=1e-5, norm_offset=1.0 if case == "gated_norm" else 0.0)
    if case in ("gated", "gated_norm"):
        kwargs["up"] = (rand(n, k, dtype=dtype, seed=21) / k ** 0.5).contiguous()
        kwargs["act"] = "gelu_tanh" if case == "gated_norm" else "silu"
    accumulate = case in ("accumulate", "norm_split")
    out_dtype = torch.float32 if accumulate else dtype
    base = rand(n, seed=22) if accumulate else torch.zeros(n, device=DEVICE)
    o1, o2 = base.clone().to(out_dtype), base.clone().to(out_dtype)
    config = gemv.GemvConfig(block_n=16, block_k=128, split_k=2 if accumulate else 1)
    gemv.gemv(x, w, o1, accumulate=accumulate, config=config, preload=preload, **kwargs)
    gemv.gemv_torch(x, w, o2, accumulate=accumulate, **kwargs)
    # The reference rounds the (normalised) input to the weight dtype as a matmul does; the kernel keeps fp32.
    assert rel_err(o1, o2) < TOL[dtype] * (3 if dtype != torch.float32 else 1)


@pytest.mark.parametrize("n", [200, 1000])
def test_gemv_argmax_then_advance_picks_the_first_maximal_row(n):
    """The head GEMV's per-block (max, first row) pairs, reduced by the advance kernel, give torch.argmax of the
    logits, ties included (the first maximal id), and feed it to the next step and the history."""
    k = 64
    x = rand(k, seed=30)
    w = (rand(n, k, dtype=torch.bfloat16, seed=31) / k ** 0.5).contiguous()
    w[n // 2] = w[n - 3] = w[7] = w.abs().sum(0) * x.sign().to(w.dtype)  # three equal largest rows
    config = gemv.GemvConfig(block_n=16, block_k=64)
    blocks = gemv.argmax_blocks(n, k, config)
    amax = torch.zeros(blocks, device=DEVICE)
    aidx = torch.zeros(blocks, dtype=torch.int32, device=DEVICE)
    logits = torch.zeros(n, device=DEVICE)
    gemv.gemv(x, w, logits, config=config, argmax=(amax, aidx))
    tokens = torch.zeros(1, dtype=torch.long, device=DEVICE)
    history = torch.full((40,), -1, dtype=torch.long, device=DEVICE)
    pos, slot = torch.tensor([5], device=DEVICE), torch.tensor([9], dtype=torch.int32, device=DEVICE)
    step.advance_(pos, slot, pick=(amax, aidx, tokens, history))
    assert int(logits.argmax()) == 7 and tokens.tolist() == [7] and int(history[9]) == 7
    assert pos.tolist() == [6] and slot.tolist() == [10] and int((history >= 0).sum()) == 1
    w[n - 3, 0] = float("nan")  # as torch.argmax: a NaN logit counts as the largest
    gemv.gemv(x, w, logits, config=config, argmax=(amax, aidx))
    step.advance_(pos, slot, pick=(amax, aidx, tokens, history))
    assert int(logits.argmax()) == n - 3 and tokens.tolist() == [n - 3] and int(history[10]) == n - 3
    for size in (1, blocks + 1):  # too few pairs, or more (stale entries the pick would read)
        with pytest.raises(ValueError, match="one entry per row block"):
            gemv.gemv(x, w, logits, config=config, argmax=(torch.zeros(size, device=DEVICE),
                                                           torch.zeros(size, dtype=torch.int32, device=DEVICE)))


def test_quantize_rows_round_trip():
    w = rand(24, 100, seed=50)
    w[3] = 0.0
    w[5, 7] = 40.0  # one large entry sets its row's scale
    q, s = quantize.quantize_rows(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (24,)
    assert int(q.abs().max()) == quantize.QMAX and int(q.min()) >= -quantize.QMAX
    assert torch.equal(q[3], torch.zeros_like(q[3])) and float(s[3]) == 1.0
    err = (quantize.dequantize_rows(q, s, torch.float32) - w).abs()
    assert bool((err <= s[:, None] / 2 + 1e-6).all())  # rounding to the nearest step of each row
    assert float(s[5]) == pytest.approx(40.0 / 127)
    with pytest.raises(ValueError, match="matrix"):
        quantize.quantize_rows(w[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["plain", "norm", "gated_norm", "accumulate", "ragged", "norm_split"])
def test_gemv_int8_rows_match_the_dequantized_weights(dtype, case):
    """int8 weights with row scales: the kernel (int8 tiles, scaled sums) as the reference on q * s."""
    n, k = (40, 200) if case == "ragged" else (64, 512)
    x = rand(k, dtype=torch.float32 if case in ("norm", "accumulate") else dtype, seed=51)
    q, s = quantize.quantize_rows(rand(n, k, seed=52) / k ** 0.5)
    kwargs, ref = {}, {}
    if case in ("norm", "gated_norm", "norm_split"):
        kwargs = dict(norm_w=rand(k, dtype=dtype, seed=53), eps=1e-5, norm_offset=1.0 if case == "gated_norm" else 0.0)
    ref = dict(kwargs)
    if case == "gated_norm":
        qu, su = quantize.quantize_rows(rand(n, k, seed=54) / k ** 0.5)
        kwargs.update(up=qu, up_scale=su, act="gelu_tanh")
        ref.update(up=quantize.dequantize_rows(qu, su, dtype), act="gelu_tanh")
    accumulate = case in ("accumulate", "norm_split")
    base = rand(n, seed=55) if accumulate else torch.zeros(n, device=DEVICE)
    out_dtype = torch.float32 if accumulate else dtype
    o1, o2 = base.clone().to(out_dtype), base.clone().to(out_dtype)
    config = gemv.GemvConfig(block_n=16, block_k=128, split_k=2 if accumulate else 1)
    gemv.gemv(x, q, o1, accumulate=accumulate, config=config, scale=s, **kwargs)
    gemv.gemv_torch(x, quantize.dequantize_rows(q, s, dtype), o2, accumulate=accumulate, **ref)
    assert rel_err(o1, o2) < (1e-5 if dtype == torch.float32 else TOL[dtype] * 3)
    default = gemv.gemv(x, q, torch.zeros_like(o1), accumulate=accumulate, scale=s, **kwargs)  # int8 default tiles
    assert rel_err(default, o2 - base.to(out_dtype)) < (1e-5 if dtype == torch.float32 else TOL[dtype] * 3)


def test_gemv_int8_widens_every_byte_exactly():
    """Every int8 value in every byte lane of a 32-bit word comes out as itself (on an NVIDIA GPU the kernel widens
    int8 through byte permutes, gemv.widen): x = e_j reads column j of q back, times its row scale."""
    g = torch.Generator().manual_seed(58)
    q = torch.stack([torch.arange(-128, 128, dtype=torch.int16)[torch.randperm(256, generator=g)]
                     for _ in range(64)], 1).to(torch.int8).to(DEVICE)  # [256, 64]: each column holds every value
    s = torch.rand(256, generator=g).to(DEVICE) + 0.5
    for j in (0, 1, 2, 3, 6, 63):
        x = torch.zeros(64, device=DEVICE)
        x[j] = 1.0
        out = gemv.gemv(x, q, torch.zeros(256, device=DEVICE), scale=s,
                        config=gemv.GemvConfig(block_n=16, block_k=64))
        assert torch.equal(out, q[:, j].float() * s), j


def test_gemv_int8_needs_its_scales():
    x, (q, s) = rand(64, seed=56), quantize.quantize_rows(rand(32, 64, seed=57))
    out = torch.zeros(32, device=DEVICE)
    with pytest.raises(ValueError, match="row scales"):
        gemv.gemv(x, q, out)
    with pytest.raises(ValueError, match="row scales"):
        gemv.gemv(x, q.float(), out, scale=s)
    with pytest.raises(ValueError, match="row scales"):
        gemv.gemv(x, q, out, scale=s[:16])


def test_int8_default_tiles_hold_the_bytes_of_the_dense_ones():
    for n, k, gated, acc in [(3072, 2048, False, False), (8192, 2048, True, False), (2048, 8192, False, True),
                             (128256, 2048, False, False)]:
        dense, int8 = gemv.default_config(n, k, gated, acc), gemv.default_config(n, k, gated, acc, itemsize=1)
        assert int8.block_k == 2 * dense.block_k and int8.split_k == dense.split_k and int8.block_n == dense.block_n


# bf16 only where the kernel is compiled: Triton's interpreter computes bf16 `tl.dot` wrongly (kernels/__init__.py)
MM_DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("dtype", MM_DTYPES)
@pytest.mark.parametrize("m,n,k", [(2, 64, 128), (5, 100, 300), (16, 256, 512), (20, 96, 256), (3, 48, 1024)])
@pytest.mark.parametrize("split", [None, 1, 4])
def test_int8_mm_matches_the_dequantized_product(dtype, m, n, k, split):
    """Batches > 1 with int8 weights: ragged sizes, rows past one 16-row block, split-K partial sums added
    atomically into a zeroed output (None: the default config, which splits K for (3, 48, 1024))."""
    x = rand(m, k, dtype=dtype, seed=31)
    q, s = quantize.quantize_rows(rand(n, k, seed=32))
    config = None if split is None else int8_mm.MmConfig(block_n=32, block_k=64, split_k=split)
    out = torch.full((m, n), 7.0, device=DEVICE)  # a split must not add to what was there
    y = int8_mm.int8_mm(x, q, s, out=out, config=config)
    assert y is out and y.dtype == torch.float32
    reference = x.float() @ quantize.dequantize_rows(q, s, torch.float32).t()
    assert rel_err(y, reference) < TOL[dtype] and rel_err(int8_mm.int8_mm_torch(x, q, s), reference) < 1e-6


def test_int8_mm_default_configs_follow_the_sweep():
    assert int8_mm.default_config(16, 2048, 8192).split_k == 4  # down projections: K split four ways
    assert int8_mm.default_config(16, 2048, 6144).split_k == 4
    for n, k in [(3072, 2048), (2048, 2048), (8192, 2048), (2048, 200)]:  # the others: none (atomics cost)
        assert int8_mm.default_config(16, n, k) == int8_mm.MmConfig(block_n=32, block_k=256)
    head = int8_mm.default_config(16, 128256, 2048)
    assert (head.block_n, head.split_k, head.num_stages) == (64, 1, 3)
    assert int8_mm.default_config(17, 2048, 2048).block_m == 32


def test_int8_mm_refuses_what_it_cannot_multiply():
    x = rand(2, 64)
    q, s = quantize.quantize_rows(rand(32, 64, seed=1))
    for args, match in [((x, q.float(), s), "int8 weights"), ((x, q, s.double()), "fp32 scales"),
                        ((x, q[:, :32], s), "int8 weights"), ((x.t().contiguous().t(), q, s), "contiguous")]:
        with pytest.raises(ValueError, match=match):
            int8_mm.int8_mm(*args)
    with pytest.raises(ValueError, match="fp32 \\[2, 32\\]"):
        int8_mm.int8_mm(x, q, s, out=torch.zeros(2, 32, dtype=torch.bfloat16, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(3072, 2048), (2048, 8192), (8192, 2048), (128256, 2048)])
def test_int8_mm_real_shapes_on_gpu(n, k):
    x = rand(16, k, dtype=torch.bfloat16, seed=33)
    q, s = quantize.quantize_rows(rand(n, k, seed=34) / k ** 0.5)
    reference = x.float() @ quantize.dequantize_rows(q, s, torch.float32).t()
    assert rel_err(int8_mm.int8_mm(x, q, s), reference) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(3072, 2048), (2048, 8192), (128256, 2048)])
def test_gemv_real_shapes_on_gpu(n, k):
    x = rand(k, seed=23)
    w = (rand(n, k, dtype=torch.bfloat16, seed=24) / k ** 0.5).contiguous()
    o1 = torch.zeros(n, device=DEVICE)
    o2 = torch.zeros(n, device=DEVICE)
    gemv.gemv(x, w, o1, accumulate=True)
    gemv.gemv_torch(x, w, o2, accumulate=True)
    assert rel_err(o1, o2) < 1e-2
