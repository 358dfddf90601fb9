"""Attention of one new token per sequence over a static KV cache (split-sequence "flash decoding").

    q:        [B, Hq, D]        the new token's rotated queries
    caches:   [B, Hk, S, D]     slot s of sequence b is valid if start[b] <= s <= slot and, with a sliding window W,
                                s > slot - W   (left padding: start[b] is the number of pad slots of sequence b)
    out:      [B, Hq, D]

Grouped-query attention: the program for kv head h serves its Hq/Hk query heads, so each key and value is read once.
Pass 1 splits the slots into chunks and writes each chunk's running max, sum and weighted values; pass 2 combines
the chunks. Slots outside a sequence's valid range are masked (their loads fetch nothing).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _attn_partial_kernel(q_ptr, kc_ptr, vc_ptr, start_ptr, slot_ptr, m_ptr, l_ptr, acc_ptr, window, scale,
                         stride_qb, stride_qh, stride_cb, stride_ch, stride_cs, n_chunks,
                         GROUP: tl.constexpr, GROUP_P2: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr,
                         BLOCKS_PER_CHUNK: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    chunk = tl.program_id(2)
    g = tl.arange(0, GROUP_P2)
    gmask = g < GROUP
    d = tl.arange(0, D)
    heads = kvh * GROUP + g
    cur = tl.load(slot_ptr)
    lo = tl.load(start_ptr + b)
    if window > 0:
        lo = tl.maximum(lo, cur - window + 1)
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=gmask[:, None],
                other=0.0).to(tl.float32) * scale
    m_i = tl.full([GROUP_P2], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_P2], tl.float32)
    acc = tl.zeros([GROUP_P2, D], tl.float32)
    base = b * stride_cb + kvh * stride_ch
    # A fixed number of masked blocks per chunk (no loop bounds read from memory: graph- and interpreter-friendly);
    # masked loads of slots outside [lo, cur] fetch nothing.
    for i in range(BLOCKS_PER_CHUNK):
        s = (chunk * BLOCKS_PER_CHUNK + i) * BLOCK_S + tl.arange(0, BLOCK_S)
        smask = (s >= lo) & (s <= cur)
        k = tl.load(kc_ptr + base + s[:, None] * stride_cs + d[None, :], mask=smask[:, None], other=0.0)
        scores = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
        scores = tl.where(smask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far: keep l and acc at 0, no NaN
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(scores - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(vc_ptr + base + s[:, None] * stride_cs + d[None, :], mask=smask[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
        m_i = m_new
    row = (b * (GROUP * tl.num_programs(1)) + heads) * n_chunks + chunk
    tl.store(m_ptr + row, m_i, mask=gmask)
    tl.store(l_ptr + row, l_i, mask=gmask)
    tl.store(acc_ptr + row[:, None] * D + d[None, :], acc, mask=gmask[:, None])


@triton.jit
def _attn_combine_kernel(m_ptr, l_ptr, acc_ptr, o_ptr, n_chunks, stride_ob, stride_oh, n_heads,
                         D: tl.constexpr, CHUNKS_P2: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    c = tl.arange(0, CHUNKS_P2)
    cmask = c < n_chunks
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
    """Preallocated workspace for one cache shape, so that the launches can be captured in a CUDA graph."""

    def __init__(self, batch: int, q_heads: int, kv_heads: int, head_dim: int, max_slots: int, device,
                 block_s: int | None = None, blocks_per_chunk: int = 1):
        self.group = q_heads // kv_heads
        self.block_s = block_s or max(16, min(64, 16384 // (triton.next_power_of_2(self.group) * head_dim)))
        self.blocks_per_chunk = blocks_per_chunk
        self.n_chunks = math.ceil(max_slots / (self.block_s * blocks_per_chunk))
        self.m = torch.empty(batch * q_heads * self.n_chunks, dtype=torch.float32, device=device)
        self.l = torch.empty_like(self.m)
        self.acc = torch.empty(batch * q_heads * self.n_chunks * head_dim, dtype=torch.float32, device=device)
        self.shape = (batch, q_heads, kv_heads, head_dim)

    def __call__(self, q, k_cache, v_cache, start, slot, scale, window=0, out=None):
        b, hq, hk, d = self.shape
        out = torch.empty_like(q) if out is None else out
        _attn_partial_kernel[(b, hk, self.n_chunks)](
            q, k_cache, v_cache, start, slot, self.m, self.l, self.acc, window, scale,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), self.n_chunks,
            GROUP=self.group, GROUP_P2=triton.next_power_of_2(self.group), D=d, BLOCK_S=self.block_s,
            BLOCKS_PER_CHUNK=self.blocks_per_chunk, num_warps=4)
        _attn_combine_kernel[(b, hq)](self.m, self.l, self.acc, out, self.n_chunks, out.stride(0), out.stride(1), hq,
                                      D=d, CHUNKS_P2=triton.next_power_of_2(self.n_chunks), num_warps=4)
        return out


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
