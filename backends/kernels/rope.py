"""Rotary position embedding (the "rotate half" convention of Hugging Face's Llama family).

For a head vector x of size D, halves x1 = x[:D/2], x2 = x[D/2:], angles a_i = position * inv_freq[i]:
    out1 = x1 cos a - x2 sin a,   out2 = x2 cos a + x1 sin a      (cos and sin scaled by `scaling`)
`inv_freq` comes from the model's own rotary module, so every RoPE variant (Llama 3 scaling, Gemma's local and
global bases) is honoured. Angles are computed in fp32 from each sequence's own position (left padding).

`rope_qk` rotates q and k in one kernel. The decode step folds RoPE, the Qwen3/Gemma3 q/k norms and the cache write
into its attention kernel (attention.py); `qkv_rope_cache_torch_` is that part's PyTorch reference.
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


def qkv_rope_cache_torch_(qkv, positions, inv_freq, scaling, q_out, k_cache, v_cache, slot, q_norm=None,
                          k_norm=None, eps=1e-6, norm_offset=0.0):
    """qkv: [M, (Hq + 2 Hk) D] -> q_out [M, Hq, D] (normed, rotated); k, v written into the caches at slot[0]."""
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
