"""Rotary position embedding (the "rotate half" convention of Hugging Face's Llama family).

For a head vector x of size D, halves x1 = x[:D/2], x2 = x[D/2:], angles a_i = position * inv_freq[i]:
    out1 = x1 cos a - x2 sin a,   out2 = x2 cos a + x1 sin a      (cos and sin scaled by `scaling`)
`inv_freq` comes from the model's own rotary module, so every RoPE variant (Llama 3 scaling, Gemma's local and
global bases) is honoured. Angles are computed in fp32 from each sequence's own position (left padding).

`rope_qk` rotates q and k in one kernel. `qkv_rope_cache_` is the decode step's fused version: it reads the packed
q|k|v projection of one token per sequence, applies the optional per-head q/k RMSNorm (Qwen3, Gemma3), rotates,
writes q to `q_out` and k, v into the static cache at slot `slot[0]`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate(x1, x2, pos, inv_freq_ptr, scaling, HALF: tl.constexpr):
    i = tl.arange(0, HALF)
    angle = pos * tl.load(inv_freq_ptr + i)
    c = tl.cos(angle) * scaling
    s = tl.sin(angle) * scaling
    return x1 * c - x2 * s, x2 * c + x1 * s


@triton.jit
def _rope_qk_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, pos_ptr, inv_freq_ptr, scaling, HQ, stride_q, stride_k,
                    HALF: tl.constexpr):
    row = tl.program_id(0)
    head = tl.program_id(1)
    pos = tl.load(pos_ptr + row).to(tl.float32)
    i = tl.arange(0, HALF)
    if head < HQ:
        src = q_ptr + row * stride_q + head * 2 * HALF
        dst = qo_ptr + row * stride_q + head * 2 * HALF
    else:
        src = k_ptr + row * stride_k + (head - HQ) * 2 * HALF
        dst = ko_ptr + row * stride_k + (head - HQ) * 2 * HALF
    x1 = tl.load(src + i).to(tl.float32)
    x2 = tl.load(src + HALF + i).to(tl.float32)
    o1, o2 = _rotate(x1, x2, pos, inv_freq_ptr, scaling, HALF)
    tl.store(dst + i, o1.to(dst.dtype.element_ty))
    tl.store(dst + HALF + i, o2.to(dst.dtype.element_ty))


def rope_qk(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
            scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [M, Hq, D], k: [M, Hk, D], positions: [M] -> rotated (q, k), one launch for both."""
    q, k = q.contiguous(), k.contiguous()
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    m, hq, d = q.shape
    _rope_qk_kernel[(m, hq + k.shape[1])](q, k, qo, ko, positions, inv_freq.float().contiguous(), scaling, hq,
                                          q.stride(0), k.stride(0), HALF=d // 2)
    return qo, ko


def rope_torch(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float = 1.0):
    """x: [M, H, D] rotated at positions [M] (fp32 angles, result in x's dtype)."""
    angle = positions.float()[:, None] * inv_freq.float()[None, :]  # [M, D/2]
    c, s = (angle.cos() * scaling)[:, None, :], (angle.sin() * scaling)[:, None, :]
    xf = x.float()
    x1, x2 = xf[..., : x.shape[-1] // 2], xf[..., x.shape[-1] // 2:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def rope_qk_torch(q, k, positions, inv_freq, scaling=1.0):
    return rope_torch(q, positions, inv_freq, scaling), rope_torch(k, positions, inv_freq, scaling)


@triton.jit
def _head_norm(x1, x2, w_ptr, eps, offset, HALF: tl.constexpr):
    i = tl.arange(0, HALF)
    var = (tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / (2 * HALF)
    r = tl.rsqrt(var + eps)
    w1 = tl.load(w_ptr + i).to(tl.float32) + offset
    w2 = tl.load(w_ptr + HALF + i).to(tl.float32) + offset
    return x1 * r * w1, x2 * r * w2


@triton.jit
def _qkv_rope_cache_kernel(qkv_ptr, pos_ptr, inv_freq_ptr, scaling, qo_ptr, kc_ptr, vc_ptr, slot_ptr,
                           qn_ptr, kn_ptr, eps, norm_offset, HQ, HK, stride_qkv, stride_qo,
                           stride_cb, stride_ch, stride_cs,
                           HALF: tl.constexpr, HAS_QK_NORM: tl.constexpr):
    row = tl.program_id(0)
    head = tl.program_id(1)
    D: tl.constexpr = 2 * HALF
    i = tl.arange(0, HALF)
    pos = tl.load(pos_ptr + row).to(tl.float32)
    base = qkv_ptr + row * stride_qkv
    if head < HQ:
        x1 = tl.load(base + head * D + i).to(tl.float32)
        x2 = tl.load(base + head * D + HALF + i).to(tl.float32)
        if HAS_QK_NORM:
            x1, x2 = _head_norm(x1, x2, qn_ptr, eps, norm_offset, HALF)
        o1, o2 = _rotate(x1, x2, pos, inv_freq_ptr, scaling, HALF)
        dst = qo_ptr + row * stride_qo + head * D
        tl.store(dst + i, o1.to(qo_ptr.dtype.element_ty))
        tl.store(dst + HALF + i, o2.to(qo_ptr.dtype.element_ty))
    else:
        j = head - HQ
        slot = tl.load(slot_ptr)
        x1 = tl.load(base + (HQ + j) * D + i).to(tl.float32)
        x2 = tl.load(base + (HQ + j) * D + HALF + i).to(tl.float32)
        if HAS_QK_NORM:
            x1, x2 = _head_norm(x1, x2, kn_ptr, eps, norm_offset, HALF)
        o1, o2 = _rotate(x1, x2, pos, inv_freq_ptr, scaling, HALF)
        off = row * stride_cb + j * stride_ch + slot * stride_cs
        tl.store(kc_ptr + off + i, o1.to(kc_ptr.dtype.element_ty))
        tl.store(kc_ptr + off + HALF + i, o2.to(kc_ptr.dtype.element_ty))
        v1 = tl.load(base + (HQ + HK + j) * D + i)
        v2 = tl.load(base + (HQ + HK + j) * D + HALF + i)
        tl.store(vc_ptr + off + i, v1.to(vc_ptr.dtype.element_ty))
        tl.store(vc_ptr + off + HALF + i, v2.to(vc_ptr.dtype.element_ty))


def qkv_rope_cache_(qkv, positions, inv_freq, scaling, q_out, k_cache, v_cache, slot, q_norm=None, k_norm=None,
                    eps=1e-6, norm_offset=0.0):
    """qkv: [M, (Hq + 2 Hk) * D]; q_out: [M, Hq, D]; caches: [M, Hk, S, D]; slot: int32 [1] on the device."""
    m, hq, d = q_out.shape
    hk = k_cache.shape[1]
    has_norm = q_norm is not None
    _qkv_rope_cache_kernel[(m, hq + hk)](
        qkv, positions, inv_freq, scaling, q_out, k_cache, v_cache, slot,
        q_norm if has_norm else qkv, k_norm if has_norm else qkv, eps, norm_offset, hq, hk,
        qkv.stride(0), q_out.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        HALF=d // 2, HAS_QK_NORM=has_norm)


def qkv_rope_cache_torch_(qkv, positions, inv_freq, scaling, q_out, k_cache, v_cache, slot, q_norm=None,
                          k_norm=None, eps=1e-6, norm_offset=0.0):
    from backends.kernels.norms import rmsnorm_torch

    m, hq, d = q_out.shape
    hk = k_cache.shape[1]
    q = qkv[:, : hq * d].view(m, hq, d)
    k = qkv[:, hq * d: (hq + hk) * d].view(m, hk, d)
    v = qkv[:, (hq + hk) * d:].view(m, hk, d)
    if q_norm is not None:
        q = rmsnorm_torch(q, q_norm, eps, norm_offset, out_dtype=torch.float32)
        k = rmsnorm_torch(k, k_norm, eps, norm_offset, out_dtype=torch.float32)
    q_out.copy_(rope_torch(q, positions, inv_freq, scaling))
    index = slot.long().view(1, 1, 1, 1).expand(m, hk, 1, d)
    k_cache.scatter_(2, index, rope_torch(k, positions, inv_freq, scaling).to(k_cache.dtype)[:, :, None, :])
    v_cache.scatter_(2, index, v.to(v_cache.dtype)[:, :, None, :])
