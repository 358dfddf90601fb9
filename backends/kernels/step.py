"""The two bookkeeping launches of a decode step: embedding lookup into the fp32 residual stream, and advancing
every sequence's position and the cache slot once the step is done (for greedy batch-1 steps, after finishing the
argmax of the logits and feeding the picked token to the next step)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from backends.kernels.gemv import launch_options, pdl_prologue, pdl_wait


@triton.jit
def _embed_kernel(tok_ptr, emb_ptr, h_ptr, scale, hidden, stride_e, stride_h, BLOCK: tl.constexpr,
                  USE_PDL: tl.constexpr):
    b = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    pdl_prologue(USE_PDL)
    pdl_wait(USE_PDL)
    tok = tl.load(tok_ptr + b)
    row = tl.load(emb_ptr + tok * stride_e + cols, mask=cols < hidden, other=0.0).to(tl.float32)
    tl.store(h_ptr + b * stride_h + cols, row * scale, mask=cols < hidden)


def embed_(tokens: torch.Tensor, embed: torch.Tensor, h: torch.Tensor, scale: float, pdl: bool = False) -> None:
    """h[b] = embed[tokens[b]] * scale (h: fp32 [B, hidden])."""
    b, hidden = h.shape
    _embed_kernel[(b, triton.cdiv(hidden, 1024))](tokens, embed, h, scale, hidden, embed.stride(0), h.stride(0),
                                                  BLOCK=1024, USE_PDL=pdl, **launch_options(pdl))


def embed_torch_(tokens, embed, h, scale, pdl=False):
    h.copy_(embed.index_select(0, tokens).float() * scale)


@triton.jit
def _advance_kernel(pos_ptr, slot_ptr, batch, amax_ptr, aidx_ptr, n_part, tok_ptr, hist_ptr, BLOCK: tl.constexpr,
                    PICK: tl.constexpr, BLOCK_P: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_prologue(USE_PDL)
    pdl_wait(USE_PDL)
    cur = tl.load(slot_ptr)
    if PICK:  # batch 1: the argmax of the logits from the head GEMV's per-block (max, first row) pairs
        best = tl.full([BLOCK_P], float("-inf"), tl.float32)
        best_i = tl.full([BLOCK_P], 2147483647, tl.int32)
        for p0 in range(0, n_part, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            v = tl.load(amax_ptr + p, mask=p < n_part, other=float("-inf"))
            ix = tl.load(aidx_ptr + p, mask=p < n_part, other=2147483647)
            better = (v > best) | ((v == best) & (ix < best_i))
            best = tl.where(better, v, best)
            best_i = tl.where(better, ix, best_i)
        token = tl.min(tl.where(best == tl.max(best, axis=0), best_i, 2147483647), axis=0).to(tl.int64)
        tl.store(tok_ptr, token)
        tl.store(hist_ptr + cur, token)
    r = tl.arange(0, BLOCK)
    tl.store(pos_ptr + r, tl.load(pos_ptr + r, mask=r < batch) + 1, mask=r < batch)
    tl.store(slot_ptr, cur + 1)


def advance_(positions: torch.Tensor, slot: torch.Tensor, pdl: bool = False, pick=None) -> None:
    """positions += 1; slot += 1. With `pick` = (amax, aidx, tokens, history), batch 1: first the greedy pick,
    tokens[0] = argmax of the logits (from the head GEMV's `argmax` pairs), also written to history[slot]."""
    amax, aidx, tokens, history = pick if pick is not None else (positions, positions, positions, positions)
    _advance_kernel[(1,)](positions, slot, positions.shape[0], amax, aidx, amax.numel(), tokens, history,
                          BLOCK=triton.next_power_of_2(positions.shape[0]), PICK=pick is not None, BLOCK_P=1024,
                          USE_PDL=pdl, **launch_options(pdl))


def advance_torch_(positions, slot, pdl=False):
    positions.add_(1)
    slot.add_(1)
