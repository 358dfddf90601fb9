"""Attention of one new token per sequence over a static KV cache (split-sequence "flash decoding").

    qkv:      [B, (Hq + 2 Hk) D]  the new token's packed projections (before norms and RoPE)
    caches:   [B, Hk, S, D]       slot s of sequence b is valid if start[b] <= s <= slot and, with a sliding window W,
                                  s > slot - W   (left padding: start[b] is the number of pad slots of sequence b)
    out:      [B, Hq, D]          (or, batch 1: added through W_o into the fp32 residual)

Grouped-query attention: the program for kv head h serves its Hq/Hk query heads, so each key and value is read once.
Pass 1 (program per sequence, kv head and chunk of slots) applies the q/k norms and RoPE itself, writes the new k and v
into the cache, and writes each chunk's running max, sum and weighted values; pass 2 combines the chunks, or for
batch 1 combines them inside the output projection. Slots outside a sequence's valid range are masked (their loads
fetch nothing); programs whose chunk starts past the new slot exit at once, and the combine skips their chunks.
Every program loads the new key and value with its query, so the one that holds the new slot (the one the next
kernel waits for) has one memory round trip after its wait, not two. Measured on an H100: a single program per kv
head looping over the whole cache was slower (too few programs), and folding RoPE and the combine into neighbouring
launches cost the same as separate launches under programmatic dependent launch, but leaves fewer kernels to
maintain. On an H200 (commit 09c79ff), one launch per layer doing RoPE, cache write, attention and W_o (every row
block of W_o attending over the whole cache) was no faster than these two launches with one slot in use (841.8 vs
840.4 us per Llama-3.2-1B step) and slower with more (904.5 vs 826.2 us at 64 slots): the step is bound by its chain
of dependent memory round trips, not by launches.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from backends.kernels import fast_int8, interpreting
from backends.kernels.gemv import launch_options, pdl_prologue, pdl_wait, widen


def group_rows(group: int, use_dot: bool) -> int:
    """Rows of the query tile: the group padded to a power of two, and to 16 for tensor-core dots."""
    return max(16, triton.next_power_of_2(group)) if use_dot else triton.next_power_of_2(group)


@triton.jit
def _qk(q, k, USE_DOT: tl.constexpr, IEEE: tl.constexpr):
    """scores [G, S] = q [G, D] . k [S, D]^T: tensor cores when compiled, broadcast-and-sum in the interpreter."""
    if USE_DOT:
        if IEEE:
            return tl.dot(q, tl.trans(k), input_precision="ieee")
        return tl.dot(q, tl.trans(k))
    return tl.sum(q.to(tl.float32)[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)


@triton.jit
def _pv(p, v, USE_DOT: tl.constexpr, IEEE: tl.constexpr):
    """[G, D] = p [G, S] . v [S, D] (p is fp32; rounded to v's dtype for the tensor cores)."""
    if USE_DOT:
        if IEEE:
            return tl.dot(p, v.to(tl.float32), input_precision="ieee")
        return tl.dot(p.to(v.dtype), v)
    return tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)


@triton.jit
def _attn_combine_kernel(m_ptr, l_ptr, acc_ptr, o_ptr, slot_ptr, n_chunks, stride_ob, stride_oh, n_heads,
                         D: tl.constexpr, CHUNKS_P2: tl.constexpr, CHUNK: tl.constexpr, USE_PDL: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    pdl_prologue(USE_PDL)
    c = tl.arange(0, CHUNKS_P2)
    cmask = (c < n_chunks) & (c * CHUNK <= tl.load(slot_ptr))  # chunks past the new slot wrote nothing
    pdl_wait(USE_PDL)
    d = tl.arange(0, D)
    row = (b * n_heads + h) * n_chunks + c
    m = tl.load(m_ptr + row, mask=cmask, other=float("-inf"))
    l = tl.load(l_ptr + row, mask=cmask, other=0.0)
    live = cmask & (l > 0)
    m_max = tl.max(tl.where(live, m, float("-inf")), axis=0)
    w = tl.where(live, tl.exp(tl.where(live, m, m_max) - m_max), 0.0)
    acc = tl.load(acc_ptr + row[:, None] * D + d[None, :], mask=cmask[:, None], other=0.0)
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(o_ptr + b * stride_ob + h * stride_oh + d, out.to(o_ptr.dtype.element_ty))


class DecodeAttention:
    """Preallocated workspace (partial max, sum and values per chunk) for one cache shape, so that the launches can
    be captured in a CUDA graph. `RopeAttention` below adds the launches."""

    def __init__(self, batch: int, q_heads: int, kv_heads: int, head_dim: int, max_slots: int, device,
                 block_s: int | None = None, blocks_per_chunk: int = 1, min_chunks_p2: int = 1):
        self.group = q_heads // kv_heads
        self.use_dot = not interpreting()
        self.group_p2 = group_rows(self.group, self.use_dot)
        self.block_s = block_s or (64 if self.use_dot else
                                   max(16, min(64, 16384 // (self.group_p2 * head_dim))))
        if self.use_dot and (self.block_s < 16 or head_dim < 32):  # Triton's tl.dot on NVIDIA: K >= 16 (the
            # interpreter takes any size, so only a compiled run would fail, deep in graph capture)
            raise ValueError(f"compiled attention needs blocks of at least 16 slots and head_dim >= 32 (tensor-core "
                             f"dots over 16 values or more), not block_s={self.block_s}, head_dim={head_dim}")
        self.blocks_per_chunk = blocks_per_chunk
        self.n_chunks = math.ceil(max_slots / (self.block_s * blocks_per_chunk))
        # the combines' chunk axis (a power of two, at least min_chunks_p2; chunks past n_chunks are masked)
        self.chunks_p2 = max(triton.next_power_of_2(self.n_chunks), triton.next_power_of_2(min_chunks_p2))
        self.m = torch.empty(batch * q_heads * self.n_chunks, dtype=torch.float32, device=device)
        self.l = torch.empty_like(self.m)
        self.acc = torch.empty(batch * q_heads * self.n_chunks * head_dim, dtype=torch.float32, device=device)
        self.slot = None  # the cache slot of the last pass 1 (`rope_attention`): the chunks past it wrote nothing
        self.shape = (batch, q_heads, kv_heads, head_dim)


def decode_attention_torch(q, k_cache, v_cache, start, slot, scale, window=0, out=None):
    """Reference: masked softmax attention in fp32."""
    b, hq, d = q.shape
    hk, s = k_cache.shape[1], k_cache.shape[2]
    cur = slot.reshape(-1)[:1].long()  # a device tensor, so that this reference can be captured in a CUDA graph
    idx = torch.arange(s, device=q.device)
    valid = (idx[None, :] >= start.long()[:, None]) & (idx[None, :] <= cur)
    if window > 0:
        valid &= idx[None, :] > cur - window
    k = k_cache.float().repeat_interleave(hq // hk, dim=1)
    v = v_cache.float().repeat_interleave(hq // hk, dim=1)
    scores = torch.einsum("bhd,bhsd->bhs", q.float() * scale, k).masked_fill(~valid[:, None, :], float("-inf"))
    res = torch.einsum("bhs,bhsd->bhd", torch.softmax(scores, dim=-1), v).to(q.dtype)
    if out is not None:
        out.copy_(res)
        return out
    return res


@triton.jit
def _kv_block(kc_ptr, vc_ptr, base, sl, smask, stride_cs, HALF: tl.constexpr):
    """The cached keys and values of slots `sl` (masked by `smask`) as first and second halves of the head dim."""
    i = tl.arange(0, HALF)
    kp = kc_ptr + base + sl[:, None] * stride_cs + i[None, :]
    vp = vc_ptr + base + sl[:, None] * stride_cs + i[None, :]
    return (tl.load(kp, mask=smask[:, None], other=0.0), tl.load(kp + HALF, mask=smask[:, None], other=0.0),
            tl.load(vp, mask=smask[:, None], other=0.0), tl.load(vp + HALF, mask=smask[:, None], other=0.0))


@triton.jit
def _rope_query(row, heads, gmask, qn_ptr, eps, norm_offset, c, s, scale, kc_ptr, HAS_QK_NORM: tl.constexpr,
                HALF: tl.constexpr):
    """The new token's query heads `heads` from its packed projections `row`: q norm (Qwen3, Gemma3), RoPE and the
    softmax scale, rounded to the cache dtype; returned as the two halves of the head dim."""
    D: tl.constexpr = 2 * HALF
    i = tl.arange(0, HALF)
    q1 = tl.load(row + heads[:, None] * D + i[None, :], mask=gmask[:, None], other=0.0).to(tl.float32)
    q2 = tl.load(row + heads[:, None] * D + HALF + i[None, :], mask=gmask[:, None], other=0.0).to(tl.float32)
    if HAS_QK_NORM:
        qr = tl.rsqrt((tl.sum(q1 * q1, axis=1) + tl.sum(q2 * q2, axis=1)) / D + eps)
        q1 = q1 * qr[:, None] * (tl.load(qn_ptr + i).to(tl.float32) + norm_offset)[None, :]
        q2 = q2 * qr[:, None] * (tl.load(qn_ptr + HALF + i).to(tl.float32) + norm_offset)[None, :]
    cache_ty = kc_ptr.dtype.element_ty
    q1, q2 = (q1 * c[None, :] - q2 * s[None, :]) * scale, (q2 * c[None, :] + q1 * s[None, :]) * scale
    return q1.to(cache_ty), q2.to(cache_ty)


@triton.jit
def _rope_new_kv(row, kvh, HQ, HK, kn_ptr, eps, norm_offset, c, s, kc_ptr, HAS_QK_NORM: tl.constexpr,
                 HALF: tl.constexpr):
    """The new token's key (k norm, RoPE) and value of kv head `kvh`, in the cache dtype, as halves."""
    D: tl.constexpr = 2 * HALF
    i = tl.arange(0, HALF)
    cache_ty = kc_ptr.dtype.element_ty
    k1 = tl.load(row + (HQ + kvh) * D + i).to(tl.float32)
    k2 = tl.load(row + (HQ + kvh) * D + HALF + i).to(tl.float32)
    if HAS_QK_NORM:
        kr = tl.rsqrt((tl.sum(k1 * k1, axis=0) + tl.sum(k2 * k2, axis=0)) / D + eps)
        k1 = k1 * kr * (tl.load(kn_ptr + i).to(tl.float32) + norm_offset)
        k2 = k2 * kr * (tl.load(kn_ptr + HALF + i).to(tl.float32) + norm_offset)
    k1, k2 = (k1 * c - k2 * s).to(cache_ty), (k2 * c + k1 * s).to(cache_ty)
    v1 = tl.load(row + (HQ + HK + kvh) * D + i).to(cache_ty)
    v2 = tl.load(row + (HQ + HK + kvh) * D + HALF + i).to(cache_ty)
    return k1, k2, v1, v2


@triton.jit
def _store_new_kv(kc_ptr, vc_ptr, off, k1, k2, v1, v2, HALF: tl.constexpr):
    i = tl.arange(0, HALF)
    tl.store(kc_ptr + off + i, k1)
    tl.store(kc_ptr + off + HALF + i, k2)
    tl.store(vc_ptr + off + i, v1)
    tl.store(vc_ptr + off + HALF + i, v2)


@triton.jit
def _attend_block(q1, q2, ka, kb, va, vb, smask, m_i, l_i, acc1, acc2, USE_DOT: tl.constexpr, IEEE: tl.constexpr):
    """Online-softmax update of (max, sum, weighted values) with a block of cached slots (`smask`: which count)."""
    scores = _qk(q1, ka, USE_DOT, IEEE) + _qk(q2, kb, USE_DOT, IEEE)
    scores = tl.where(smask[None, :], scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(scores - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc1 = acc1 * alpha[:, None] + _pv(p, va, USE_DOT, IEEE)
    acc2 = acc2 * alpha[:, None] + _pv(p, vb, USE_DOT, IEEE)
    return m_new, l_i, acc1, acc2


@triton.jit
def _attend_new(q1, q2, k1, k2, v1, v2, m_i, l_i, acc1, acc2):
    """The same update with the new token's key and value, from registers."""
    s_new = tl.sum(q1.to(tl.float32) * k1.to(tl.float32)[None, :], axis=1) + \
        tl.sum(q2.to(tl.float32) * k2.to(tl.float32)[None, :], axis=1)
    m_new = tl.maximum(m_i, s_new)
    alpha = tl.exp(m_i - m_new)
    p_new = tl.exp(s_new - m_new)
    l_i = l_i * alpha + p_new
    acc1 = acc1 * alpha[:, None] + p_new[:, None] * v1.to(tl.float32)[None, :]
    acc2 = acc2 * alpha[:, None] + p_new[:, None] * v2.to(tl.float32)[None, :]
    return m_new, l_i, acc1, acc2


@triton.jit
def _rope_attn_partial_kernel(
        qkv_ptr, pos_ptr, inv_freq_ptr, rope_scaling, qn_ptr, kn_ptr, eps, norm_offset,
        kc_ptr, vc_ptr, start_ptr, slot_ptr, m_ptr, l_ptr, acc_ptr, window, scale,
        HQ, HK, stride_qkv, stride_cb, stride_ch, stride_cs, n_chunks,
        GROUP: tl.constexpr, GROUP_P2: tl.constexpr, HALF: tl.constexpr, BLOCK_S: tl.constexpr,
        BLOCKS_PER_CHUNK: tl.constexpr, HAS_QK_NORM: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr,
        USE_PDL: tl.constexpr):
    """Pass 1 with RoPE folded in. Program (b, kv head, chunk) rotates its query group itself (a few hundred
    values, cheaper than a launch); the program whose chunk holds the new slot also normalises and rotates the new
    key, writes k and v into the cache and counts the new token from registers."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    chunk = tl.program_id(2)
    D: tl.constexpr = 2 * HALF
    CHUNK: tl.constexpr = BLOCK_S * BLOCKS_PER_CHUNK
    pdl_prologue(USE_PDL)
    # Before waiting for the predecessor (the GEMV that writes qkv): everything that does not depend on it. The slot,
    # positions and the cached keys and values were written one step or more ago, by kernels that completed before
    # the predecessor passed its own wait (it lets us launch only after that, `gemv(trigger="end")`), so they are
    # final; loading them here takes their memory latency off the dependent path.
    g = tl.arange(0, GROUP_P2)
    gmask = g < GROUP
    i = tl.arange(0, HALF)
    heads = kvh * GROUP + g
    cur = tl.load(slot_ptr)
    if chunk * CHUNK > cur:  # no valid slot: nothing to write (the combine skips these chunks)
        return
    lo = tl.load(start_ptr + b)
    if window > 0:
        lo = tl.maximum(lo, cur - window + 1)
    angle = tl.load(pos_ptr + b).to(tl.float32) * tl.load(inv_freq_ptr + i)
    c = tl.cos(angle) * rope_scaling
    s = tl.sin(angle) * rope_scaling
    base = b * stride_cb + kvh * stride_ch
    sl0 = chunk * CHUNK + tl.arange(0, BLOCK_S)
    smask0 = (sl0 >= lo) & (sl0 < cur)  # the new slot is counted from registers below
    k0a, k0b, v0a, v0b = _kv_block(kc_ptr, vc_ptr, base, sl0, smask0, stride_cs, HALF)
    pdl_wait(USE_PDL)
    row = qkv_ptr + b * stride_qkv
    q1, q2 = _rope_query(row, heads, gmask, qn_ptr, eps, norm_offset, c, s, scale, kc_ptr, HAS_QK_NORM, HALF)
    # the new key and value in every program, loaded with the query (one round trip after the wait, not two in the
    # program that holds the new slot, the one the next kernel waits for)
    k1, k2, v1, v2 = _rope_new_kv(row, kvh, HQ, HK, kn_ptr, eps, norm_offset, c, s, kc_ptr, HAS_QK_NORM, HALF)
    m_i = tl.full([GROUP_P2], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_P2], tl.float32)
    acc1 = tl.zeros([GROUP_P2, HALF], tl.float32)
    acc2 = tl.zeros([GROUP_P2, HALF], tl.float32)
    for blk in tl.static_range(BLOCKS_PER_CHUNK):
        if blk == 0:
            smask, ka, kb, va, vb = smask0, k0a, k0b, v0a, v0b
        else:
            sl = chunk * CHUNK + blk * BLOCK_S + tl.arange(0, BLOCK_S)
            smask = (sl >= lo) & (sl < cur)
            ka, kb, va, vb = _kv_block(kc_ptr, vc_ptr, base, sl, smask, stride_cs, HALF)
        m_i, l_i, acc1, acc2 = _attend_block(q1, q2, ka, kb, va, vb, smask, m_i, l_i, acc1, acc2, USE_DOT, IEEE)
    if (cur >= chunk * CHUNK) & (cur < (chunk + 1) * CHUNK):
        _store_new_kv(kc_ptr, vc_ptr, base + cur * stride_cs, k1, k2, v1, v2, HALF)
        m_i, l_i, acc1, acc2 = _attend_new(q1, q2, k1, k2, v1, v2, m_i, l_i, acc1, acc2)
    out = (b * HQ + heads) * n_chunks + chunk
    tl.store(m_ptr + out, m_i, mask=gmask)
    tl.store(l_ptr + out, l_i, mask=gmask)
    tl.store(acc_ptr + out[:, None] * D + i[None, :], acc1, mask=gmask[:, None])
    tl.store(acc_ptr + out[:, None] * D + HALF + i[None, :], acc2, mask=gmask[:, None])


@triton.jit
def _combine_oproj_kernel(m_ptr, l_ptr, acc_ptr, w_ptr, ws_ptr, o_like_ptr, h_ptr, slot_ptr, N, n_chunks, stride_w,
                          D: tl.constexpr, CHUNKS_P2: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr,
                          HEADS: tl.constexpr, SCALED: tl.constexpr, FAST_I8: tl.constexpr, USE_PDL: tl.constexpr):
    """Batch 1: pass 2 fused with the output projection. Program (row block, group of HEADS heads) combines each
    head's chunks into o_h and adds W_o[rows, the group's columns] . o to the fp32 residual atomically (split-K over
    head groups: HEADS > 1 means fewer atomic additions to the same address). SCALED: W_o is int8 rows with fp32
    scales `ws_ptr`. o is rounded to `o_like_ptr`'s dtype (the model's), as the unfused path rounds it."""
    pid_n = tl.program_id(0)
    head0 = tl.program_id(1) * HEADS
    pdl_prologue(USE_PDL)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    hh = tl.arange(0, HEADS)
    d = tl.arange(0, D)
    # w: [BLOCK_N, HEADS, D], the weights never depend on the previous kernel: in flight while it finishes
    w = tl.load(w_ptr + rn[:, None, None] * stride_w + (head0 + hh)[None, :, None] * D + d[None, None, :],
                mask=(rn < N)[:, None, None], other=0.0)
    c = tl.arange(0, CHUNKS_P2)
    cmask = ((c < n_chunks) & (c * CHUNK <= tl.load(slot_ptr)))[None, :]  # chunks past the new slot wrote nothing
    pdl_wait(USE_PDL)
    row = (head0 + hh)[:, None] * n_chunks + c[None, :]  # [HEADS, CHUNKS_P2]
    m = tl.load(m_ptr + row, mask=cmask, other=float("-inf"))
    l = tl.load(l_ptr + row, mask=cmask, other=0.0)
    live = cmask & (l > 0)
    m_max = tl.max(tl.where(live, m, float("-inf")), axis=1)
    wgt = tl.where(live, tl.exp(tl.where(live, m, m_max[:, None]) - m_max[:, None]), 0.0)
    acc = tl.load(acc_ptr + row[:, :, None] * D + d[None, None, :], mask=cmask[:, :, None], other=0.0)
    o = tl.sum(acc * wgt[:, :, None], axis=1) / tl.sum(l * wgt, axis=1)[:, None]  # [HEADS, D]
    o = o.to(o_like_ptr.dtype.element_ty).to(tl.float32)  # as the unfused path rounds o to the model's dtype
    y = tl.sum(tl.sum(widen(w, FAST_I8) * o[None, :, :], axis=2), axis=1)
    if SCALED:
        y = y * tl.load(ws_ptr + rn, mask=rn < N, other=0.0)
    tl.atomic_add(h_ptr + rn, y, mask=rn < N)


class RopeAttention(DecodeAttention):
    """RoPE + cache write + attention in two launches (`rope_attention`), and for batch 1 optionally the output
    projection folded into the second (`rope_attention_oproj_`)."""

    num_warps = 4

    def rope_attention(self, qkv, positions, inv_freq, rope_scaling, k_cache, v_cache, start, slot, scale, window,
                       q_norm, k_norm, eps, norm_offset, pdl=False):
        b, hq, hk, d = self.shape
        has_norm = q_norm is not None
        self.slot = slot  # the combine reads it too: which chunks wrote partials
        _rope_attn_partial_kernel[(b, hk, self.n_chunks)](
            qkv, positions, inv_freq, rope_scaling, q_norm if has_norm else qkv, k_norm if has_norm else qkv, eps,
            norm_offset, k_cache, v_cache, start, slot, self.m, self.l, self.acc, window, scale, hq, hk,
            qkv.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), self.n_chunks,
            GROUP=self.group, GROUP_P2=self.group_p2, HALF=d // 2, BLOCK_S=self.block_s,
            BLOCKS_PER_CHUNK=self.blocks_per_chunk, HAS_QK_NORM=has_norm, USE_DOT=self.use_dot,
            IEEE=k_cache.dtype == torch.float32, USE_PDL=pdl, num_warps=self.num_warps, **launch_options(pdl))

    def combine(self, out, pdl=False):
        b, hq, _, d = self.shape
        _attn_combine_kernel[(b, hq)](self.m, self.l, self.acc, out, self.slot, self.n_chunks, out.stride(0),
                                      out.stride(1), hq, D=d, CHUNKS_P2=self.chunks_p2,
                                      CHUNK=self.block_s * self.blocks_per_chunk, USE_PDL=pdl, num_warps=4,
                                      **launch_options(pdl))
        return out

    def combine_oproj_(self, wo, h, pdl=False, block_n=64, num_warps=4, heads=1, scale=None, o_like=None):
        """h (fp32 [hidden]) += W_o . attention output (batch 1); `heads` query heads per program (a power of two;
        halved until it divides the head count). int8 `wo` takes its fp32 row `scale`s and `o_like`, a tensor of
        the model's dtype (the attention output is rounded to it before the projection)."""
        _, hq, _, d = self.shape
        n = wo.shape[0]
        if (scale is not None) != (wo.dtype == torch.int8) or (scale is not None and o_like is None):
            raise ValueError("an int8 W_o needs its row scales and o_like (a tensor of the model's dtype)")
        while hq % heads:
            heads //= 2
        _combine_oproj_kernel[(triton.cdiv(n, block_n), hq // heads)](
            self.m, self.l, self.acc, wo, scale if scale is not None else h, wo if o_like is None else o_like, h,
            self.slot, n, self.n_chunks, wo.stride(0), D=d, CHUNKS_P2=self.chunks_p2,
            CHUNK=self.block_s * self.blocks_per_chunk, BLOCK_N=block_n,
            HEADS=heads, SCALED=scale is not None, FAST_I8=scale is not None and fast_int8(wo.device), USE_PDL=pdl,
            num_warps=num_warps, **launch_options(pdl))
