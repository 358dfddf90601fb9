"""int8 storage of keys and values with one scale per token and head (symmetric, round to nearest).

    q[b, h, t, :] = round(x[b, h, t, :] / s[b, h, t]),   s[b, h, t] = max|x[b, h, t, :]| / 127

Per-token scales follow the outlier structure of keys better than per-channel ones across a growing sequence, and
they let a cache be cut or extended a token at a time. The error is at most s/2 per element.
"""

from __future__ import annotations

import torch


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [..., head_dim] float -> (int8 [..., head_dim], float32 scale [..., 1])."""
    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True) / 127.0
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.round(x / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_per_token(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.to(torch.float32) * scale.to(torch.float32)
