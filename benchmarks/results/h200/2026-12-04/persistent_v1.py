"""The whole batch-1 decode step of a Llama-family model as ONE persistent kernel (Llama, Qwen3, Mistral).

Why: launched as separate kernels (`backends/llama_fast.py`), each layer is a chain of five dependent launches, and
at every boundary the memory idles while the last programs of one kernel finish and the next kernel's first loads
travel (H200: the GEMVs alone at 81% of copy bandwidth, the step at 69%). Here P programs (about one per SM) run
the whole step; each keeps its next few weight tiles in flight *across* the points where it waits for the other
programs, so the weight stream need not stop at stage boundaries, attention or the argmax.

Work. Every matrix is cut into tiles of R rows x KT columns (R = 8; KT columns of 2 KB: 16 KB of weights).
Program p owns a contiguous range of row blocks of every matrix (balanced: p gets blocks [p B / P, (p + 1) B / P))
and walks its tiles in the order the step needs them:

    per layer:  A  qkv        = W_qkv . rmsnorm(h)           (layer 0 reads h = embed[token]; program 0 writes it)
                B  attention, one task per (kv head, chunk of slots): q/k norms, RoPE and the cache write as in
                   `attention.py`; the last task of a kv head to finish combines its chunks into o
                C  h[rows]   += W_o[rows] . o                (each row of h has one owner: no atomics)
                D  mlp[rows]  = act(W_g . rmsnorm(h)) * (W_u . rmsnorm(h))   (a tile: R/2 rows of each)
                E  h[rows]   += W_d[rows] . mlp
    head:       logits = W_head . rmsnorm(h); greedy: each program keeps its best (logit, first row)
    then the last program to finish: the argmax over the programs' bests, positions += 1, slot += 1, counters zeroed

Synchronisation: a stage's first tile waits until every program has finished the stage before it (one counter per
stage: each program adds 1 with release semantics after its last tile of the stage; the wait is an acquire poll of
the counter reaching P). Only the input vector waits: weight tiles are loaded DEPTH tiles ahead into a ring of
registers, so they are in flight while the program waits. All P programs must be resident at once: P is at most
the number of SMs; a wait gives up after `spin_limit` polls and sets the error flag (the host raises it) rather
than hang the process.

With P = 1 one program walks every tile in order, so the kernel also runs under Triton's interpreter (CPU tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from backends.kernels.activation import ACTIVATIONS, apply_act
from backends.kernels.attention import (_attend_block, _attend_new, _kv_block, _rope_new_kv, _rope_query,
                                        _store_new_kv, group_rows)
from backends.kernels import interpreting

STAGES = 5  # per layer: A qkv, B attention, C o-projection, D gate/up, E down; the head is stage 5 of "layer" L
# Columns of the address table, one row per layer; row L holds the head in WQKV and the final norm in LN1.
WQKV, WO, WG, WU, WD, LN1, LN2, KCACHE, VCACHE, INV_FREQ, QNORM, KNORM = (tl.constexpr(i) for i in range(12))


@triton.jit
def _pick(stage, v0, v1, v2, v3, v4, v5):
    """The value for `stage` (0..5), one value given per stage."""
    return tl.where(stage == 0, v0, tl.where(stage == 1, v1, tl.where(stage == 2, v2, tl.where(
        stage == 3, v3, tl.where(stage == 4, v4, v5)))))


@triton.jit
def _span(blocks, pid, P):
    """This program's row blocks [lo, hi) of a matrix of `blocks` row blocks, and how many it walks: at least one
    (an empty one when hi == lo), so that every program passes through every stage."""
    lo = pid * blocks // P
    hi = (pid + 1) * blocks // P
    return lo, hi, tl.maximum(hi - lo, 1)


@triton.jit
def _address(lp_ptr, layer, column, base_ptr):
    """The tensor at `column` of the table's row `layer`: `base_ptr` + its offset (the table holds offsets from a
    typed base pointer, 16-byte aligned, rather than addresses: a pointer made from an integer loses its alignment
    and its loads would not be vectorized)."""
    return base_ptr + tl.multiple_of(tl.load(lp_ptr + layer * 12 + column), 8)


@triton.jit
def _wait(cnt_ptr, target, err_ptr, spin_limit):
    """Until the counter reaches `target` (acquire: what its writers wrote before adding is visible after)."""
    v = tl.atomic_add(cnt_ptr, 0, sem="acquire", scope="gpu")
    n = 0
    while (v < target) & (n < spin_limit):
        v = tl.atomic_add(cnt_ptr, 0, sem="acquire", scope="gpu")
        n += 1
    if v < target:
        tl.atomic_max(err_ptr, 1)


@triton.jit
def _signal(cnt_ptr):
    """Add 1 to the counter once every thread's writes are done (bar.sync, then a release add by one thread)."""
    tl.debug_barrier()
    tl.atomic_add(cnt_ptr, 1, sem="release", scope="gpu")


@triton.jit
def _sel(stage, t):
    """t[stage] for a 6-tuple t (one entry per stage, the head's last)."""
    return _pick(stage, t[0], t[1], t[2], t[3], t[4], t[5])


@triton.jit
def _advance(layer, stage, rb, chunk, L, LO, NB, C):
    """The walk position after (layer, stage, row block, column chunk): the next chunk, row block, stage, layer;
    after layer L - 1's stage 4 the head (layer L, stage 5); after the head layer L + 1 (past the walk)."""
    c = _sel(stage, C)
    chunk = chunk + 1
    wrap = chunk >= c
    chunk = tl.where(wrap, 0, chunk)
    rb = tl.where(wrap, rb + 1, rb)
    end = rb >= _sel(stage, LO) + _sel(stage, NB)
    next_stage = tl.where(stage == 4, tl.where(layer == L - 1, 5, 0), stage + 1)
    next_layer = tl.where(stage == 4, layer + 1, tl.where(stage == 5, L + 1, layer))
    stage = tl.where(end, next_stage, stage)
    layer = tl.where(end, next_layer, layer)
    rb = tl.where(end, _sel(stage, LO), rb)
    return layer, stage, rb, chunk


@triton.jit
def _rows(stage, rb, R: tl.constexpr):
    """The tile's rows in its matrix, [2, R/2], and the half each is in. Stage D (3): gate rows in half 0 and the
    same up rows in half 1 (`rows` is then the intermediate index); otherwise rows rb R .. rb R + R - 1."""
    R2: tl.constexpr = R // 2
    half = tl.arange(0, 2)[:, None]
    r = tl.arange(0, R2)[None, :]
    rows = tl.where(stage == 3, rb * R2 + r + half * 0, rb * R + half * R2 + r)
    return rows, half


@triton.jit
def _load_tile(layer, stage, rb, chunk, L, lp_ptr, base_ptr, HI, NR, KC, R: tl.constexpr, KT: tl.constexpr):
    """The weight tile at a walk position, [2, R/2, KT]; zeros (no memory moved) past its matrix, in the attention
    stage and past the walk."""
    rows, half = _rows(stage, rb, R)
    live = (layer <= L) & (stage != 1)
    k = _sel(stage, KC)
    column = _pick(stage, WQKV, WQKV, WO, WG, WD, WQKV)
    base = tl.multiple_of(tl.load(lp_ptr + layer * 12 + column, mask=live, other=0), 8)
    base_u = tl.multiple_of(tl.load(lp_ptr + layer * 12 + WU, mask=live & (stage == 3), other=0), 8)
    row_base = tl.where((stage == 3) & (half == 1), base_u, base)  # [2, 1]
    cols = chunk * KT + tl.arange(0, KT)
    offs = (row_base + rows.to(tl.int64) * k)[:, :, None] + cols[None, None, :]
    # scalar conditions folded into the row bound (the interpreter broadcasts a scalar & tensor to int32)
    n = tl.where(live & (rb < _sel(stage, HI)), _sel(stage, NR), 0)
    mask = (rows < n)[:, :, None] & (cols < k)[None, None, :]
    return tl.load(base_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_first")


@triton.jit
def _prefetch_tile(layer, stage, rb, chunk, L, lp_ptr, base_ptr, HI, NR, KC, R: tl.constexpr, KT: tl.constexpr,
                   NT: tl.constexpr):
    """Ask for the weight tile at a walk position to be brought into L2 (Hopper's bulk prefetch, one row of the
    tile per instruction, from R of the program's threads); it writes no register, so it can run far ahead."""
    R2: tl.constexpr = R // 2
    e = tl.arange(0, NT)  # one entry per thread: entry e < R is row e of the tile
    half = e // R2
    rows = tl.where(stage == 3, rb * R2 + e % R2, rb * R + e)
    live = (layer <= L) & (stage != 1)
    k = _sel(stage, KC)
    column = _pick(stage, WQKV, WQKV, WO, WG, WD, WQKV)
    base = tl.multiple_of(tl.load(lp_ptr + layer * 12 + column, mask=live, other=0), 8)
    base_u = tl.multiple_of(tl.load(lp_ptr + layer * 12 + WU, mask=live & (stage == 3), other=0), 8)
    row_base = tl.where((stage == 3) & (half == 1), base_u, base)
    n = tl.where(live & (rb < _sel(stage, HI)), _sel(stage, NR), 0)
    ok = (e < R) & (rows < n)
    ptrs = base_ptr + row_base + rows.to(tl.int64) * k + chunk * KT
    nbytes = (tl.minimum(k - chunk * KT, KT) * base_ptr.dtype.element_ty.primitive_bitwidth // 8).to(tl.int32)
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $3; } // $0",
        "=r,l,r,r", [ptrs, ok.to(tl.int32), nbytes + e * 0], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _norm_rstd(x_ptr, K, eps, scale, KT: tl.constexpr):
    """1 / sqrt(mean((x * scale)^2) + eps) over K entries of x."""
    ss = tl.zeros([KT], tl.float32)
    for k0 in range(0, K, KT):
        c = k0 + tl.arange(0, KT)
        v = tl.load(x_ptr + c, mask=c < K, other=0.0).to(tl.float32) * scale
        ss += v * v
    return tl.rsqrt(tl.sum(ss, axis=0) / K + eps)


@triton.jit
def _attention(layer, c, s, lp_ptr, li_ptr, embed_ptr, qkv_ptr, slot_ptr, start_ptr, o_ptr, m_ptr, l_ptr, acc_ptr, cnt_ptr, kvc_ptr, err_ptr, spin_limit, pid, P, HQ, HK, S, n_chunks, blocks, eps, norm_offset,
               scale,
               HALF: tl.constexpr, GROUP: tl.constexpr, GROUP_P2: tl.constexpr, GROUP_C: tl.constexpr,
               BLOCK_S: tl.constexpr, CHUNKS_P2: tl.constexpr, HAS_QK_NORM: tl.constexpr, USE_DOT: tl.constexpr,
               IEEE: tl.constexpr, WTY: tl.constexpr):
    """Stage B of `layer`: this program's (kv head, chunk) tasks, each `blocks` blocks of BLOCK_S slots, as
    `attention._rope_attn_partial_kernel` for batch 1; the last task of a kv head to finish combines the group's
    chunks into o (model dtype). A program with a task waits for stage A (its qkv) only after its first cached
    keys and values are in flight: they were written by earlier steps."""
    D: tl.constexpr = 2 * HALF
    kc_ptr = _address(lp_ptr, layer, KCACHE, embed_ptr)
    vc_ptr = _address(lp_ptr, layer, VCACHE, embed_ptr)
    g = tl.arange(0, GROUP_P2)
    gmask = g < GROUP
    i = tl.arange(0, HALF)
    cur = tl.load(slot_ptr)
    lo = tl.load(start_ptr)
    window = tl.load(li_ptr + layer)
    if window > 0:
        lo = tl.maximum(lo, cur - window + 1)
    for task in range(pid, HK * n_chunks, P):
        kvh = task // n_chunks
        chunk = task % n_chunks
        base = kvh * S * D
        sl = chunk * blocks * BLOCK_S + tl.arange(0, BLOCK_S)
        smask = (sl >= lo) & (sl < cur)  # the new slot is counted from registers below
        ka, kb, va, vb = _kv_block(kc_ptr, vc_ptr, base, sl, smask, D, HALF)
        if task == pid:
            _wait(cnt_ptr + layer * 5, P, err_ptr, spin_limit)  # stage A of this layer: qkv
        heads = kvh * GROUP + g
        q1, q2 = _rope_query(qkv_ptr, heads, gmask, _address(lp_ptr, layer, QNORM, embed_ptr), eps, norm_offset, c,
                             s, scale, kc_ptr, HAS_QK_NORM, HALF)
        m_i = tl.full([GROUP_P2], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_P2], tl.float32)
        acc1 = tl.zeros([GROUP_P2, HALF], tl.float32)
        acc2 = tl.zeros([GROUP_P2, HALF], tl.float32)
        m_i, l_i, acc1, acc2 = _attend_block(q1, q2, ka, kb, va, vb, smask, m_i, l_i, acc1, acc2, USE_DOT, IEEE)
        for blk in range(1, blocks):
            sl = (chunk * blocks + blk) * BLOCK_S + tl.arange(0, BLOCK_S)
            smask = (sl >= lo) & (sl < cur)
            ka, kb, va, vb = _kv_block(kc_ptr, vc_ptr, base, sl, smask, D, HALF)
            m_i, l_i, acc1, acc2 = _attend_block(q1, q2, ka, kb, va, vb, smask, m_i, l_i, acc1, acc2, USE_DOT,
                                                 IEEE)
        if (cur >= chunk * blocks * BLOCK_S) & (cur < (chunk + 1) * blocks * BLOCK_S):
            k1, k2, v1, v2 = _rope_new_kv(qkv_ptr, kvh, HQ, HK, _address(lp_ptr, layer, KNORM, embed_ptr), eps,
                                          norm_offset, c, s, kc_ptr, HAS_QK_NORM, HALF)
            _store_new_kv(kc_ptr, vc_ptr, base + cur * D, k1, k2, v1, v2, HALF)
            m_i, l_i, acc1, acc2 = _attend_new(q1, q2, k1, k2, v1, v2, m_i, l_i, acc1, acc2)
        out = heads * n_chunks + chunk
        tl.store(m_ptr + out, m_i, mask=gmask)
        tl.store(l_ptr + out, l_i, mask=gmask)
        tl.store(acc_ptr + out[:, None] * D + i[None, :], acc1, mask=gmask[:, None])
        tl.store(acc_ptr + out[:, None] * D + HALF + i[None, :], acc2, mask=gmask[:, None])
        tl.debug_barrier()
        done = tl.atomic_add(kvc_ptr + layer * HK + kvh, 1, sem="acq_rel", scope="gpu")
        if done == n_chunks - 1:  # every chunk of this kv head is written: combine them
            gc = tl.arange(0, GROUP_C)
            hc = kvh * GROUP + gc
            gcm = gc < GROUP
            cc = tl.arange(0, CHUNKS_P2)
            d = tl.arange(0, D)
            cmask = gcm[:, None] & (cc < n_chunks)[None, :]
            row = hc[:, None] * n_chunks + cc[None, :]
            m = tl.load(m_ptr + row, mask=cmask, other=float("-inf"), cache_modifier=".cg")
            lsum = tl.load(l_ptr + row, mask=cmask, other=0.0, cache_modifier=".cg")
            live = cmask & (lsum > 0)
            m_max = tl.max(tl.where(live, m, float("-inf")), axis=1)
            m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
            wgt = tl.where(live, tl.exp(tl.where(live, m, 0.0) - m_max[:, None]), 0.0)
            part = tl.load(acc_ptr + row[:, :, None] * D + d[None, None, :], mask=cmask[:, :, None], other=0.0,
                           cache_modifier=".cg")
            denom = tl.sum(lsum * wgt, axis=1)
            o = tl.sum(part * wgt[:, :, None], axis=1) / tl.where(denom > 0, denom, 1.0)[:, None]
            tl.store(o_ptr + hc[:, None] * D + d[None, :], o.to(WTY), mask=gcm[:, None])


@triton.jit
def _tile(layer, stage, rb, chunk, w, acc, rstd, best, best_i, pid, P, tok, rope_c, rope_s, L, H, LO, HI, NB, C, NR,
          KC,
          lp_ptr, lf_ptr, li_ptr, embed_ptr, pos_ptr, slot_ptr, start_ptr, h_ptr, qkv_ptr, o_ptr, mlp_ptr,
          logits_ptr, m_ptr, l_ptr, acc_ptr, cnt_ptr, err_ptr, HQ, HK, S, n_chunks, blocks, eps, norm_offset, scale,
          embed_scale, spin_limit,
          R: tl.constexpr, KT: tl.constexpr, HALF: tl.constexpr, GROUP: tl.constexpr, GROUP_P2: tl.constexpr,
          GROUP_C: tl.constexpr, BLOCK_S: tl.constexpr, CHUNKS_P2: tl.constexpr, HAS_QK_NORM: tl.constexpr, ACT: tl.constexpr,
          GREEDY: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr, WTY: tl.constexpr):
    """Process one walk position with its weight tile `w`: wait at a stage's first tile, accumulate, finish a row
    block at its last chunk, signal after the stage's last tile. Returns the carried state."""
    R2: tl.constexpr = R // 2
    valid = layer <= L
    lo = _sel(stage, LO)
    c = _sel(stage, C)
    k = _sel(stage, KC)
    first = valid & (rb == lo) & (chunk == 0)
    last = valid & (rb == lo + _sel(stage, NB) - 1) & (chunk == c - 1)
    g = tl.where(stage == 5, L * 5, layer * 5 + stage)  # this stage's counter; it waits for the one before
    if first & (g > 0) & (stage != 1):  # (attention waits itself, after loading cached keys and values)
        _wait(cnt_ptr + g - 1, P, err_ptr, spin_limit)
    normed = (stage == 0) | (stage == 3) | (stage == 5)
    from_embed = (stage == 0) & (layer == 0)
    if first & normed:
        if from_embed:
            rstd = _norm_rstd(embed_ptr + tok * H, H, eps, embed_scale, KT)
            if pid == 0:  # the residual stream starts as the embedding (read by nobody before stage C)
                for k0 in range(0, H, KT):
                    cc = k0 + tl.arange(0, KT)
                    e = tl.load(embed_ptr + tok * H + cc, mask=cc < H, other=0.0).to(tl.float32) * embed_scale
                    tl.store(h_ptr + cc, e, mask=cc < H)
        else:
            rstd = _norm_rstd(h_ptr, H, eps, 1.0, KT)
    if valid & (stage == 1):
        _attention(layer, rope_c, rope_s, lp_ptr, li_ptr, embed_ptr, qkv_ptr, slot_ptr, start_ptr, o_ptr, m_ptr,
                   l_ptr, acc_ptr, cnt_ptr, cnt_ptr + L * 5 + 1, err_ptr, spin_limit, pid, P, HQ, HK, S, n_chunks,
                   blocks, eps, norm_offset, scale, HALF, GROUP, GROUP_P2, GROUP_C, BLOCK_S, CHUNKS_P2, HAS_QK_NORM,
                   USE_DOT, IEEE, WTY)
        acc = tl.zeros([2, R2, KT], tl.float32)  # (every row block starts afresh: no accumulator is live here)
    elif valid:
        cols = chunk * KT + tl.arange(0, KT)
        cmask = cols < k
        if normed:
            if from_embed:
                xv = tl.load(embed_ptr + tok * H + cols, mask=cmask, other=0.0).to(tl.float32) * embed_scale
            else:
                xv = tl.load(h_ptr + cols, mask=cmask, other=0.0)
            nw = _address(lp_ptr, layer, tl.where(stage == 3, LN2, LN1), embed_ptr)
            xv = xv * (tl.load(nw + cols, mask=cmask, other=0.0).to(tl.float32) + norm_offset)
        elif stage == 2:
            xv = tl.load(o_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        else:
            xv = tl.load(mlp_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        acc = tl.where(chunk == 0, 0.0, acc) + w.to(tl.float32) * xv[None, None, :]
        if chunk == c - 1:  # the row block is complete
            y = tl.sum(acc, axis=2)  # [2, R/2]
            rows, half = _rows(stage, rb, R)
            n = tl.where(rb < _sel(stage, HI), _sel(stage, NR), 0)
            rmask = rows < n
            if stage == 0:
                tl.store(qkv_ptr + rows, (y * rstd).to(WTY), mask=rmask)
            elif stage == 3:
                yg = tl.sum(tl.where(half == 0, y, 0.0), axis=0) * rstd
                yu = tl.sum(tl.where(half == 1, y, 0.0), axis=0) * rstd
                r3 = rb * R2 + tl.arange(0, R2)
                tl.store(mlp_ptr + r3, (apply_act(yg, ACT) * yu).to(WTY), mask=r3 < n)
            elif stage == 5:
                v = y * rstd
                tl.store(logits_ptr + rows, v, mask=rmask)
                if GREEDY:  # this block's largest logit and its first row (NaN counts as largest, as torch.argmax)
                    v = tl.where(rmask, tl.where(v != v, float("inf"), v), float("-inf"))
                    top = tl.max(tl.max(v, axis=1), axis=0)
                    row = tl.min(tl.min(tl.where(rmask & (v == top), rows, 2147483647), axis=1), axis=0)
                    better = top > best
                    best = tl.where(better, top, best)
                    best_i = tl.where(better, row, best_i)
            else:  # C, E: the rows of h this program owns
                hv = tl.load(h_ptr + rows, mask=rmask, other=0.0)
                tl.store(h_ptr + rows, hv + y, mask=rmask)
    if last:
        _signal(cnt_ptr + g)
    return acc, rstd, best, best_i


@triton.jit
def _decode_step_kernel(
        lp_ptr, lf_ptr, li_ptr, embed_ptr, tok_ptr, pos_ptr, slot_ptr, start_ptr,
        h_ptr, qkv_ptr, o_ptr, mlp_ptr, logits_ptr, m_ptr, l_ptr, acc_ptr, amax_ptr, aidx_ptr, hist_ptr,
        cnt_ptr, err_ptr,
        H, I, V, L, HQ, HK, S, n_chunks, blocks, n_counters, eps, norm_offset, scale, embed_scale, spin_limit,
        R: tl.constexpr, KT: tl.constexpr, DEPTH: tl.constexpr, HALF: tl.constexpr, GROUP: tl.constexpr,
        GROUP_P2: tl.constexpr, GROUP_C: tl.constexpr, BLOCK_S: tl.constexpr, CHUNKS_P2: tl.constexpr, P_BLOCK: tl.constexpr,
        HAS_QK_NORM: tl.constexpr, ACT: tl.constexpr, GREEDY: tl.constexpr, USE_DOT: tl.constexpr,
        IEEE: tl.constexpr, LOOK: tl.constexpr, NT: tl.constexpr):
    WTY: tl.constexpr = embed_ptr.dtype.element_ty
    D: tl.constexpr = 2 * HALF
    R2: tl.constexpr = R // 2
    pid = tl.program_id(0)
    P = tl.num_programs(0)
    NQKV = (HQ + 2 * HK) * D
    HQD = HQ * D
    # this program's share of every matrix, per stage (A, B, C, D, E, head)
    lo0, hi0, n0 = _span(tl.cdiv(NQKV, R), pid, P)
    lo2, hi2, n2 = _span(tl.cdiv(H, R), pid, P)
    lo3, hi3, n3 = _span(tl.cdiv(I, R2), pid, P)
    lo4, hi4, n4 = _span(tl.cdiv(H, R), pid, P)
    lo5, hi5, n5 = _span(tl.cdiv(V, R), pid, P)
    cH = tl.cdiv(H, KT)
    LO = (lo0, 0, lo2, lo3, lo4, lo5)
    HI = (hi0, 0, hi2, hi3, hi4, hi5)
    NB = (n0, 1, n2, n3, n4, n5)
    C = (cH, 1, tl.cdiv(HQD, KT), cH, tl.cdiv(I, KT), cH)
    NR = (NQKV, 0, H, I, H, V)  # rows of each matrix (D: intermediate rows)
    KC = (H, 0, HQD, H, I, H)  # columns
    total = L * (n0 * cH + 1 + n2 * C[2] + n3 * cH + n4 * C[4]) + n5 * cH
    tok = tl.load(tok_ptr)
    # RoPE's cos and sin at this position (every layer has the same frequencies: checked by the host), computed
    # here where little else is live: the accurate sin/cos need many registers
    i = tl.arange(0, HALF)
    angle = tl.load(pos_ptr).to(tl.float32) * tl.load(lf_ptr + 1 + i)
    rope_c = tl.cos(angle) * tl.load(lf_ptr)
    rope_s = tl.sin(angle) * tl.load(lf_ptr)

    # cursor (layer, stage, row block, chunk) of the tile processed, and of the ring's next load (DEPTH ahead)
    la, sa, ra, ca = tl.program_id(0) * 0, tl.program_id(0) * 0, lo0, tl.program_id(0) * 0
    lb, sb, rb_, cb = la, sa, ra, ca
    w0 = _load_tile(lb, sb, rb_, cb, L, lp_ptr, embed_ptr, HI, NR, KC, R, KT)
    lb, sb, rb_, cb = _advance(lb, sb, rb_, cb, L, LO, NB, C)
    if DEPTH > 1:
        w1 = _load_tile(lb, sb, rb_, cb, L, lp_ptr, embed_ptr, HI, NR, KC, R, KT)
        lb, sb, rb_, cb = _advance(lb, sb, rb_, cb, L, LO, NB, C)
    if DEPTH > 2:
        w2 = _load_tile(lb, sb, rb_, cb, L, lp_ptr, embed_ptr, HI, NR, KC, R, KT)
        lb, sb, rb_, cb = _advance(lb, sb, rb_, cb, L, LO, NB, C)
    if DEPTH > 3:
        w3 = _load_tile(lb, sb, rb_, cb, L, lp_ptr, embed_ptr, HI, NR, KC, R, KT)
        lb, sb, rb_, cb = _advance(lb, sb, rb_, cb, L, LO, NB, C)
    # cursor of the L2 prefetch, LOOK positions ahead of the tile processed
    lx, sx, rx, cx = la, sa, ra, ca
    if LOOK > 0:
        for _ in range(0, LOOK):
            _prefetch_tile(lx, sx, rx, cx, L, lp_ptr, embed_ptr, HI, NR, KC, R, KT, NT)
            lx, sx, rx, cx = _advance(lx, sx, rx, cx, L, LO, NB, C)
    acc = tl.zeros([2, R2, KT], tl.float32)
    rstd = tl.sum(tl.zeros([1], tl.float32), axis=0)
    best = rstd - float("inf")
    best_i = (rstd * 0).to(tl.int32) + 2147483647
    for _ in range(0, total, DEPTH):
        acc, rstd, best, best_i = _tile(
            la, sa, ra, ca, w0, acc, rstd, best, best_i, pid, P, tok, rope_c, rope_s, L, H, LO, HI, NB, C, NR, KC,
                lp_ptr, lf_ptr,
            li_ptr, embed_ptr, pos_ptr, slot_ptr, start_ptr, h_ptr, qkv_ptr, o_ptr, mlp_ptr, logits_ptr, m_ptr,
            l_ptr, acc_ptr, cnt_ptr, err_ptr, HQ, HK, S, n_chunks, blocks, eps, norm_offset, scale, embed_scale,
            spin_limit, R, KT, HALF, GROUP, GROUP_P2, GROUP_C, BLOCK_S, CHUNKS_P2, HAS_QK_NORM, ACT, GREEDY, USE_DOT, IEEE,
            WTY)
        la, sa, ra, ca = _advance(la, sa, ra, ca, L, LO, NB, C)
        if LOOK > 0:
            _prefetch_tile(lx, sx, rx, cx, L, lp_ptr, embed_ptr, HI, NR, KC, R, KT, NT)
            lx, sx, rx, cx = _advance(lx, sx, rx, cx, L, LO, NB, C)
        w0 = _load_tile(lb, sb, rb_, cb, L, lp_ptr, embed_ptr, HI, NR, KC, R, KT)
        lb, sb, rb_, cb = _advance(lb, sb, rb_, cb, L, LO, NB, C)
        if DEPTH > 1:
            acc, rstd, best, best_i = _tile(
                la, sa, ra, ca, w1, acc, rstd, best, best_i, pid, P, tok, rope_c, rope_s, L, H, LO, HI, NB, C, NR, KC,
                lp_ptr,
                lf_ptr, li_ptr, embed_ptr, pos_ptr, slot_ptr, start_ptr, h_ptr, qkv_ptr, o_ptr, mlp_ptr, logits_ptr,
                m_ptr, l_ptr, acc_ptr, cnt_ptr, err_ptr, HQ, HK, S, n_chunks, blocks, eps, norm_offset, scale,
                embed_scale, spin_limit, R, KT, HALF, GROUP, GROUP_P2, GROUP_C, BLOCK_S, CHUNKS_P2, HAS_QK_NORM, ACT, GREEDY, USE_DOT,
                IEEE, WTY)
            la, sa, ra, ca = _advance(la, sa, ra, ca, L, LO, NB, C)
            if LOOK > 0:
                _prefetch_tile(lx, sx, rx, cx, L, lp_ptr, embed_ptr, HI, NR, KC, R, KT, NT)
                lx, sx, rx, cx = _advance(lx, sx, rx, cx, L, LO, NB, C)
            w1 = _load_tile(lb, sb, rb_, cb, L, lp_ptr, embed_ptr, HI, NR, KC, R, KT)
            lb, sb, rb_, cb = _advance(lb, sb, rb_, cb, L, LO, NB, C)
        if DEPTH > 2:
            acc, rstd, best, best_i = _tile(
                la, sa, ra, ca, w2, acc, rstd, best, best_i, pid, P, tok, rope_c, rope_s, L, H, LO, HI, NB, C, NR, KC,
                lp_ptr,
                lf_ptr, li_ptr, embed_ptr, pos_ptr, slot_ptr, start_ptr, h_ptr, qkv_ptr, o_ptr, mlp_ptr, logits_ptr,
                m_ptr, l_ptr, acc_ptr, cnt_ptr, err_ptr, HQ, HK, S, n_chunks, blocks, eps, norm_offset, scale,
                embed_scale, spin_limit, R, KT, HALF, GROUP, GROUP_P2, GROUP_C, BLOCK_S, CHUNKS_P2, HAS_QK_NORM, ACT, GREEDY, USE_DOT,
                IEEE, WTY)
            la, sa, ra, ca = _advance(la, sa, ra, ca, L, LO, NB, C)
            if LOOK > 0:
                _prefetch_tile(lx, sx, rx, cx, L, lp_ptr, embed_ptr, HI, NR, KC, R, KT, NT)
                lx, sx, rx, cx = _advance(lx, sx, rx, cx, L, LO, NB, C)
            w2 = _load_tile(lb, sb, rb_, cb, L, lp_ptr, embed_ptr, HI, NR, KC, R, KT)
            lb, sb, rb_, cb = _advance(lb, sb, rb_, cb, L, LO, NB, C)
        if DEPTH > 3:
            acc, rstd, best, best_i = _tile(
                la, sa, ra, ca, w3, acc, rstd, best, best_i, pid, P, tok, rope_c, rope_s, L, H, LO, HI, NB, C, NR, KC,
                lp_ptr,
                lf_ptr, li_ptr, embed_ptr, pos_ptr, slot_ptr, start_ptr, h_ptr, qkv_ptr, o_ptr, mlp_ptr, logits_ptr,
                m_ptr, l_ptr, acc_ptr, cnt_ptr, err_ptr, HQ, HK, S, n_chunks, blocks, eps, norm_offset, scale,
                embed_scale, spin_limit, R, KT, HALF, GROUP, GROUP_P2, GROUP_C, BLOCK_S, CHUNKS_P2, HAS_QK_NORM, ACT, GREEDY, USE_DOT,
                IEEE, WTY)
            la, sa, ra, ca = _advance(la, sa, ra, ca, L, LO, NB, C)
            if LOOK > 0:
                _prefetch_tile(lx, sx, rx, cx, L, lp_ptr, embed_ptr, HI, NR, KC, R, KT, NT)
                lx, sx, rx, cx = _advance(lx, sx, rx, cx, L, LO, NB, C)
            w3 = _load_tile(lb, sb, rb_, cb, L, lp_ptr, embed_ptr, HI, NR, KC, R, KT)
            lb, sb, rb_, cb = _advance(lb, sb, rb_, cb, L, LO, NB, C)

    # the end of the step: the last program to get here picks the token and advances the position and the slot
    if GREEDY:
        tl.store(amax_ptr + pid, best)
        tl.store(aidx_ptr + pid, best_i)
    tl.debug_barrier()
    arrived = tl.atomic_add(cnt_ptr + n_counters - 1, 1, sem="acq_rel", scope="gpu")
    if arrived == P - 1:
        cur = tl.load(slot_ptr)
        if GREEDY:
            p = tl.arange(0, P_BLOCK)
            v = tl.load(amax_ptr + p, mask=p < P, other=float("-inf"))
            ix = tl.load(aidx_ptr + p, mask=p < P, other=2147483647)
            token = tl.min(tl.where(v == tl.max(v, axis=0), ix, 2147483647), axis=0).to(tl.int64)
            tl.store(tok_ptr, token)
            tl.store(hist_ptr + cur, token)
        tl.store(pos_ptr, tl.load(pos_ptr) + 1)
        tl.store(slot_ptr, cur + 1)
        for c0 in range(0, n_counters, 256):
            cc = c0 + tl.arange(0, 256)
            tl.store(cnt_ptr + cc, tl.zeros([256], tl.int32), mask=cc < n_counters)


class PersistentStep:
    """The address tables, counters and launch of `_decode_step_kernel` for a `FastDecoder`'s static buffers
    (batch 1). `programs`: P (default: one per SM on a GPU, 1 under the interpreter); `depth`: weight tiles in
    flight per program; `tile_bytes`: bytes of one row of a tile."""

    def __init__(self, decoder, programs: int | None = None, depth: int = 2, num_warps: int = 8, rows: int = 8,
                 tile_bytes: int = 2048, chunks: int | None = None, look: int | None = None, dot: bool = False,
                 spin_limit: int = 1 << 24):
        d = decoder
        if d.shape is None or d.shape[0] != 1:
            raise ValueError("the persistent step is batch 1 only")
        why = unsupported(d)
        if why:
            raise ValueError(f"the persistent step does not cover this model: {why}")
        self.decoder = d
        dev = d.device
        if programs is None:
            programs = 1 if dev.type != "cuda" or interpreting() else \
                torch.cuda.get_device_properties(dev).multi_processor_count
        self.programs, self.depth, self.num_warps, self.spin_limit = programs, depth, num_warps, spin_limit
        if depth not in (1, 2, 3, 4):
            raise ValueError("depth must be 1..4")
        if rows < 2 or rows != triton.next_power_of_2(rows):
            raise ValueError("rows must be a power of two >= 2")
        self.rows = rows
        # attention scores through the tensor cores (the group padded to 16 rows) or multiply-and-sum
        self.use_dot = dot and not interpreting()
        # L2 prefetch distance in tiles: Hopper's bulk prefetch (compiled for sm_90+ only)
        hopper = dev.type == "cuda" and not interpreting() and torch.version.hip is None and \
            torch.cuda.get_device_capability(dev)[0] >= 9
        self.look = (8 if hopper else 0) if look is None else look
        if self.look and not hopper:
            raise ValueError("the L2 prefetch needs an NVIDIA Hopper GPU or newer")
        rows = []
        for i, layer in enumerate(d.layers):
            rows.append([layer.wqkv, layer.wo, layer.wg, layer.wu, layer.wd, layer.ln1, layer.ln2, d.k_cache[i],
                         d.v_cache[i], layer.inv_freq, layer.q_norm, layer.k_norm])
        rows.append([d.head, None, None, None, None, d.final_norm] + [None] * 6)
        first = d.layers[0]
        self.rope = torch.cat([torch.tensor([first.rope_scaling], device=dev), first.inv_freq.float()]).contiguous()
        self.window = torch.tensor([layer.window for layer in d.layers], dtype=torch.int32, device=dev)
        # offsets in elements from the embedding (model dtype) or from `rope` (fp32: inv_freq)
        table = []
        for row in rows:
            table.append([])
            for column, t in enumerate(row):
                base = d.embed
                if t is None or column == INV_FREQ:
                    table[-1].append(0)
                    continue
                if t.dtype != base.dtype or not t.is_contiguous() or t.data_ptr() % 16:
                    raise ValueError("the persistent step needs contiguous, 16-byte aligned weights and caches")
                table[-1].append((t.data_ptr() - base.data_ptr()) // t.element_size())
        self.table = torch.tensor(table, dtype=torch.int64, device=dev)
        self._keep = rows  # the table holds addresses: keep the tensors alive
        n_layers, hk = len(d.layers), d.hk
        self.n_counters = n_layers * STAGES + 1 + n_layers * hk + 1
        self.counters = torch.zeros(self.n_counters, dtype=torch.int32, device=dev)
        self.error = torch.zeros(1, dtype=torch.int32, device=dev)
        self.amax = torch.zeros(programs, dtype=torch.float32, device=dev)
        self.aidx = torch.zeros(programs, dtype=torch.int32, device=dev)
        self.kt = max(16, min(tile_bytes // d.embed.element_size(), triton.next_power_of_2(d.embed.shape[1])))
        # attention tasks: each kv head's slots in n_chunks chunks of `blocks` blocks, at most one task per program
        att = d.attention
        total_blocks = triton.cdiv(d.shape[1], att.block_s)
        chunks = chunks or max(1, min(16, programs // hk))
        self.blocks = triton.cdiv(total_blocks, min(chunks, total_blocks))
        self.n_chunks = triton.cdiv(total_blocks, self.blocks)
        self.m = torch.zeros(d.hq * self.n_chunks, dtype=torch.float32, device=dev)
        self.l = torch.zeros_like(self.m)
        self.acc = torch.zeros(d.hq * self.n_chunks * d.d, dtype=torch.float32, device=dev)

    def describe(self) -> dict:
        """What the compiled kernel and its launch depend on (the artifact key, the report)."""
        return {"programs": self.programs, "depth": self.depth, "look": self.look, "rows": self.rows, "kt": self.kt,
                "chunks": self.n_chunks, "dot": self.use_dot, "num_warps": self.num_warps}

    def _arguments(self, greedy: bool) -> tuple[list, dict]:
        d, att = self.decoder, self.decoder.attention
        args = [self.table, self.rope, self.window, d.embed, d.tokens, d.positions, d.slot, d.start,
                d.h, d.qkv, d.o, d.mlp, d.logits, self.m, self.l, self.acc, self.amax, self.aidx, d.history,
                self.counters, self.error,
                d.embed.shape[1], d.layers[0].wg.shape[0], d.head.shape[0], len(d.layers), d.hq, d.hk, d.shape[1],
                self.n_chunks, self.blocks, self.n_counters, d.eps, d.offset, d.scale, d.embed_scale,
                self.spin_limit]
        options = dict(
            R=self.rows, KT=self.kt, DEPTH=self.depth, HALF=d.d // 2, GROUP=att.group,
            GROUP_P2=group_rows(att.group, self.use_dot), GROUP_C=triton.next_power_of_2(att.group),
            BLOCK_S=att.block_s, CHUNKS_P2=triton.next_power_of_2(self.n_chunks),
            P_BLOCK=triton.next_power_of_2(self.programs), HAS_QK_NORM=d.layers[0].q_norm is not None,
            ACT=ACTIVATIONS[d.act], GREEDY=greedy, USE_DOT=self.use_dot, IEEE=d.dtype == torch.float32,
            LOOK=self.look, NT=32 * self.num_warps, num_warps=self.num_warps, num_stages=1)
        return args, options

    def launch(self, greedy: bool) -> None:
        args, options = self._arguments(greedy)
        _decode_step_kernel[(self.programs,)](*args, **options)

    def warmup(self, greedy: bool):
        """Compile (or load from Triton's cache) without running; returns the compiled kernel."""
        args, options = self._arguments(greedy)
        return _decode_step_kernel.warmup(*args, grid=(self.programs,), **options)

    def check(self) -> None:
        """Raise if a program gave up waiting for the others (the step's results are then wrong)."""
        if int(self.error.item()):
            self.error.zero_()
            self.counters.zero_()
            raise RuntimeError(f"the persistent decode step's {self.programs} programs could not all run at once "
                               "(a wait timed out; is another process using the GPU?): rerun with --no-persistent")


def unsupported(decoder) -> str | None:
    """None if the persistent step covers this decoder's model and weights, else why not."""
    d = decoder
    if d.gemma:
        return "Gemma's post-norms need the whole projection before the residual add"
    if d.weights != "native":
        return "int8 weights stream through the separate kernels"
    if d.kernels != "triton":
        return "--kernels torch"
    if d.d % 2 or d.d // 2 != triton.next_power_of_2(d.d // 2):
        return f"head dim {d.d} is not a power of two"
    first = d.layers[0]
    if any(not torch.equal(layer.inv_freq, first.inv_freq) or layer.rope_scaling != first.rope_scaling
           for layer in d.layers):
        return "the layers' rotary embeddings differ"
    return None
