"""The whole batch-1 decode step of a Llama-family model as ONE persistent kernel (Llama, Qwen3, Mistral).

Why: launched as separate kernels (`backends/llama_fast.py`), each layer is a chain of five dependent launches, and at
every boundary the memory idles while the last programs of one kernel finish, the next grid is scheduled and its
first loads travel (H200: the GEMVs alone at 81% of copy bandwidth, the step at 69%). Here P programs (one per SM)
run the whole step and meet at counters in memory instead of kernel boundaries; while a program waits at one, the
weight tiles of its next units are already on their way.

    per layer:  A  qkv        = W_qkv . rmsnorm(h)
                B  attention, one task per (kv head, chunk of slots): q/k norms, RoPE and the cache write as in
                   `attention.py`; the last task of a kv head to finish combines its chunks into o
                C  h         += W_o . o
                D  mlp        = act(W_g . rmsnorm(h)) * (W_u . rmsnorm(h))
                E  h         += W_d . mlp
    head:       logits = W_head . rmsnorm(h); greedy: each program keeps its best (logit, first row)
    then the last program to finish: the argmax over the programs' bests, positions += 1, slot += 1, counters zeroed

Units of work. A GEMV stage is cut into units of R whole rows (KT >= the input's length columns: one weight tile of
R x KT, ~32 KB; stage D's unit is R/2 rows of W_g and the same rows of W_u; stage E's K = intermediate size is cut
into chunks of KT, chunk-major, and the partial sums are added to h atomically). Program p owns the contiguous units
[p U / P, (p + 1) U / P) of every stage and walks all of its units of the step in order. Its input vector (rmsnorm(h),
o, or a chunk of mlp) is loaded once per stage into registers; each unit is then one multiply-and-sum of a tile that
arrived earlier: the tiles of the next DEPTH units are loaded ahead into a ring of registers, across stage boundaries.

Synchronisation: one counter per stage; a program adds 1 with release semantics after its last unit of a stage, and
a stage's first unit waits (acquire) until the previous stage's counter reaches P. Only the input vector waits: the
weight tiles ahead are already in flight. All P programs must be resident at once: P is at most the number of SMs,
and a wait gives up after `spin_limit` polls and raises the error flag (the host turns it into an error) rather than
hang the process.

With P = 1 one program walks every unit in order, so the kernel also runs under Triton's interpreter (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from backends.kernels import interpreting
from backends.kernels.activation import ACTIVATIONS, apply_act
from backends.kernels.attention import (_attend_block, _attend_new, _kv_block, _rope_new_kv, _rope_query,
                                        _store_new_kv, group_rows)

STAGES = tl.constexpr(5)  # per layer: A qkv, B attention, C o-proj, D gate/up, E down; the head's counter: L * STAGES
# Columns of the table of offsets, one row per layer; row L holds the head in WQKV and the final norm in LN1.
WQKV, WO, WG, WU, WD, LN1, LN2, KCACHE, VCACHE, QNORM, KNORM = (tl.constexpr(i) for i in range(11))
NCOLS = 11


@triton.jit
def _span(blocks, pid, P):
    """This program's row blocks [lo, hi) of a matrix of `blocks` row blocks, balanced over P programs."""
    return pid * blocks // P, (pid + 1) * blocks // P


@triton.jit
def _offset(lp_ptr, layer, column):
    """A tensor's offset in elements from the embedding (the table holds offsets from a typed, 16-byte aligned base
    pointer rather than addresses: a pointer made from an integer loses its alignment, and the loads through it would
    not be vectorized)."""
    return tl.multiple_of(tl.load(lp_ptr + layer * 11 + column), 8)


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
def _pick(stage, v0, v1, v2, v3, v4, v5):
    """The value for `stage` (0..5), one value given per stage."""
    return tl.where(stage == 0, v0, tl.where(stage == 1, v1, tl.where(stage == 2, v2, tl.where(
        stage == 3, v3, tl.where(stage == 4, v4, v5)))))


@triton.jit
def _sel(stage, t):
    """t[stage] for a 6-tuple t (one entry per stage, the head's last)."""
    return _pick(stage, t[0], t[1], t[2], t[3], t[4], t[5])


@triton.jit
def _advance(layer, stage, u, L, LO, NB):
    """The walk position after (layer, stage, unit): the next unit of the stage, or the first of the next stage
    (after layer L - 1's stage 4: the head, layer L stage 5; after the head: layer L + 1, past the walk)."""
    u = u + 1
    end = u >= _sel(stage, LO) + _sel(stage, NB)
    next_stage = tl.where(stage == 4, tl.where(layer == L - 1, 5, 0), stage + 1)
    next_layer = tl.where(stage == 4, layer + 1, tl.where(stage == 5, L + 1, layer))
    stage = tl.where(end, next_stage, stage)
    layer = tl.where(end, next_layer, layer)
    u = tl.where(end, _sel(stage, LO), u)
    return layer, stage, u


@triton.jit
def _unit(stage, u, R: tl.constexpr, NRB4: tl.constexpr):
    """A unit's rows in its matrix, [2, R/2, 1], the half of the tile each is in, and its column chunk. Stage D (3):
    gate rows in half 0, the same up rows in half 1 (`rows` then index the intermediate size); stage E (4): units are
    chunk-major."""
    R2: tl.constexpr = R // 2
    half = tl.arange(0, 2)[:, None, None]
    r = tl.arange(0, R2)[None, :, None]
    chunk = tl.where(stage == 4, u // NRB4, 0)
    rb = tl.where(stage == 4, u % NRB4, u)
    rows = tl.where(stage == 3, rb * R2 + r + half * 0, rb * R + half * R2 + r)
    return rows, half, chunk


@triton.jit
def _load_tile(layer, stage, u, L, lp_ptr, embed_ptr, HI, NR, KC, R: tl.constexpr, KT: tl.constexpr,
               NRB4: tl.constexpr):
    """The weight tile of a walk position, [2, R/2, KT]; zeros (no memory moved) past its matrix or the program's
    units, for the attention stage and past the walk."""
    rows, half, chunk = _unit(stage, u, R, NRB4)
    live = (layer <= L) & (stage != 1)
    k = _sel(stage, KC)
    column = _pick(stage, WQKV, WQKV, WO, WG, WD, WQKV)
    base = tl.multiple_of(tl.load(lp_ptr + layer * 11 + column, mask=live, other=0), 8)
    base_u = tl.multiple_of(tl.load(lp_ptr + layer * 11 + WU, mask=live & (stage == 3), other=0), 8)
    row_base = tl.where((stage == 3) & (half == 1), base_u, base)  # [2, 1, 1]
    cols = chunk * KT + tl.arange(0, KT)[None, None, :]
    # scalar conditions folded into the row bound (the interpreter broadcasts a scalar & tensor to int32)
    n = tl.where(live & (u < _sel(stage, HI)), _sel(stage, NR), 0)
    return tl.load(embed_ptr + row_base + rows.to(tl.int64) * k + cols, mask=(rows < n) & (cols < k), other=0.0,
                   eviction_policy="evict_first")


@triton.jit
def _prefetch_tile(layer, stage, u, L, lp_ptr, embed_ptr, HI, NR, KC, R: tl.constexpr, KT: tl.constexpr,
                   NRB4: tl.constexpr, NT: tl.constexpr):
    """Hopper's bulk prefetch into L2 of a walk position's tile, one row per thread (threads 0..R-1); it writes no
    register, so it can run far ahead of the ring."""
    R2: tl.constexpr = R // 2
    e = tl.arange(0, NT)
    half = e // R2
    chunk = tl.where(stage == 4, u // NRB4, 0)
    rb = tl.where(stage == 4, u % NRB4, u)
    rows = tl.where(stage == 3, rb * R2 + e % R2, rb * R + e)
    live = (layer <= L) & (stage != 1)
    k = _sel(stage, KC)
    column = _pick(stage, WQKV, WQKV, WO, WG, WD, WQKV)
    base = tl.multiple_of(tl.load(lp_ptr + layer * 11 + column, mask=live, other=0), 8)
    base_u = tl.multiple_of(tl.load(lp_ptr + layer * 11 + WU, mask=live & (stage == 3), other=0), 8)
    row_base = tl.where((stage == 3) & (half == 1), base_u, base)
    n = tl.where(live & (u < _sel(stage, HI)), _sel(stage, NR), 0)
    ok = (e < R) & (rows < n)
    nbytes = (tl.minimum(k - chunk * KT, KT) * (embed_ptr.dtype.element_ty.primitive_bitwidth // 8)).to(tl.int32)
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $3; } // $0",
        "=r,l,r,r", [embed_ptr + row_base + rows.to(tl.int64) * k + chunk * KT, ok.to(tl.int32), nbytes + e * 0],
        dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _tile(layer, stage, u, w, xs, best, best_i, pid, P, L, LO, HI, NB, rope_c, rope_s, lp_ptr, li_ptr, embed_ptr,
          slot_ptr, start_ptr, h_ptr, qkv_ptr, o_ptr, mlp_ptr, logits_ptr, m_ptr, l_ptr, acc_ptr, cnt_ptr, err_ptr,
          S, n_chunks, blocks, eps, norm_offset, scale, spin_limit,
          H: tl.constexpr, I: tl.constexpr, V: tl.constexpr, HQ: tl.constexpr, HK: tl.constexpr, HALF: tl.constexpr,
          R: tl.constexpr, KT: tl.constexpr, NRB4: tl.constexpr, GROUP: tl.constexpr, GROUP_P2: tl.constexpr,
          GROUP_C: tl.constexpr, BLOCK_S: tl.constexpr, CHUNKS_P2: tl.constexpr, HAS_QK_NORM: tl.constexpr,
          ACT: tl.constexpr, GREEDY: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr):
    """Process one walk position with its weight tile `w`: at a stage's first unit wait for the previous stage and
    load the stage's input vector `xs` ([1, 1, KT], kept for the stage's other units); multiply; store or add the
    rows; signal after the stage's last unit. Returns the carried state (xs, the head's best logit and row)."""
    WTY: tl.constexpr = embed_ptr.dtype.element_ty
    R2: tl.constexpr = R // 2
    D: tl.constexpr = 2 * HALF
    NQKV: tl.constexpr = (HQ + 2 * HK) * D
    valid = layer <= L
    lo = _sel(stage, LO)
    first = valid & (u == lo)
    last = valid & (u == lo + _sel(stage, NB) - 1)
    g = tl.where(stage == 5, L * STAGES, layer * STAGES + stage)  # this stage's counter; it waits for the one before
    if first & (g > 0) & (stage != 1):  # (the attention waits itself, once its cached keys and values are loading)
        _wait(cnt_ptr + g - 1, P, err_ptr, spin_limit)
    if valid & (stage == 1):
        _attention(layer, rope_c, rope_s, lp_ptr, li_ptr, embed_ptr, qkv_ptr, slot_ptr, start_ptr, o_ptr, m_ptr,
                   l_ptr, acc_ptr, cnt_ptr, cnt_ptr + L * STAGES + 1, err_ptr, spin_limit, pid, P, HQ, HK, S,
                   n_chunks, blocks, eps, norm_offset, scale, HALF, GROUP, GROUP_P2, GROUP_C, BLOCK_S, CHUNKS_P2,
                   HAS_QK_NORM, USE_DOT, IEEE, WTY)
    elif valid:
        rows, half, chunk = _unit(stage, u, R, NRB4)
        if first | ((stage == 4) & (u % NRB4 == 0)):  # the stage's input vector (stage E: its next chunk)
            cols = chunk * KT + tl.arange(0, KT)[None, None, :]
            if stage == 2:
                xs = tl.load(o_ptr + cols, mask=cols < HQ * D, other=0.0).to(tl.float32)
            elif stage == 4:
                xs = tl.load(mlp_ptr + cols, mask=cols < I, other=0.0).to(tl.float32)
            else:  # rmsnorm(h) * (w + offset)
                hv = tl.load(h_ptr + cols, mask=cols < H, other=0.0)
                rstd = tl.rsqrt(tl.sum(tl.sum(tl.sum(hv * hv, axis=2), axis=1), axis=0) / H + eps)
                nw = embed_ptr + tl.multiple_of(tl.load(lp_ptr + layer * 11 + tl.where(stage == 3, LN2, LN1)), 8)
                xs = hv * rstd * (tl.load(nw + cols, mask=cols < H, other=0.0).to(tl.float32) + norm_offset)
        y = tl.sum(w.to(tl.float32) * xs, axis=2)  # [2, R/2]
        rows = tl.sum(rows, axis=2)
        half = tl.sum(half, axis=2)
        n = tl.where(u < _sel(stage, HI), _pick(stage, NQKV, 0, H, I, H, V), 0)
        if stage == 0:
            tl.store(qkv_ptr + rows, y.to(WTY), mask=rows < n)
        elif stage == 3:
            yg = tl.sum(tl.where(half == 0, y, 0.0), axis=0)
            yu = tl.sum(tl.where(half == 1, y, 0.0), axis=0)
            r3 = u * R2 + tl.arange(0, R2)
            tl.store(mlp_ptr + r3, (apply_act(yg, ACT) * yu).to(WTY), mask=r3 < n)
        elif stage == 5:
            tl.store(logits_ptr + rows, y, mask=rows < n)
            if GREEDY:  # the unit's largest logit and its first row (NaN counts as largest, as in torch.argmax)
                v = tl.where(rows < n, tl.where(y != y, float("inf"), y), float("-inf"))
                top = tl.max(tl.max(v, axis=1), axis=0)
                row = tl.min(tl.min(tl.where((rows < n) & (v == top), rows, 2147483647), axis=1), axis=0)
                better = top > best
                best = tl.where(better, top, best)
                best_i = tl.where(better, row, best_i)
        else:  # C, E: into the residual stream (E: one partial sum per chunk of the intermediate size)
            tl.atomic_add(h_ptr + rows, y, mask=rows < n)
    if last:
        _signal(cnt_ptr + g)
    return xs, best, best_i


@triton.jit
def _attention(layer, c, s, lp_ptr, li_ptr, embed_ptr, qkv_ptr, slot_ptr, start_ptr, o_ptr, m_ptr, l_ptr, acc_ptr,
               cnt_ptr, kvc_ptr, err_ptr, spin_limit, pid, P, HQ, HK, S, n_chunks, blocks, eps, norm_offset, scale,
               HALF: tl.constexpr, GROUP: tl.constexpr, GROUP_P2: tl.constexpr, GROUP_C: tl.constexpr,
               BLOCK_S: tl.constexpr, CHUNKS_P2: tl.constexpr, HAS_QK_NORM: tl.constexpr, USE_DOT: tl.constexpr,
               IEEE: tl.constexpr, WTY: tl.constexpr):
    """Stage B of `layer`: this program's (kv head, chunk) tasks, each `blocks` blocks of BLOCK_S slots, as
    `attention._rope_attn_partial_kernel` for batch 1; the last task of a kv head to finish combines the group's
    chunks into o (model dtype). A program with a task waits for stage A (its qkv) only after its first cached
    keys and values are in flight: they were written by earlier steps."""
    D: tl.constexpr = 2 * HALF
    kc_ptr = embed_ptr + _offset(lp_ptr, layer, KCACHE)
    vc_ptr = embed_ptr + _offset(lp_ptr, layer, VCACHE)
    g = tl.arange(0, GROUP_P2)
    gmask = g < GROUP
    i = tl.arange(0, HALF)
    cur = tl.load(slot_ptr)
    lo = tl.load(start_ptr)
    window = tl.load(li_ptr + layer)
    if window > 0:
        lo = tl.maximum(lo, cur - window + 1)
    for task in tl.range(pid, HK * n_chunks, P, num_stages=1):  # (not pipelined: it waits inside)
        kvh = task // n_chunks
        chunk = task % n_chunks
        base = kvh * S * D
        sl = chunk * blocks * BLOCK_S + tl.arange(0, BLOCK_S)
        smask = (sl >= lo) & (sl < cur)  # the new slot is counted from registers below
        ka, kb, va, vb = _kv_block(kc_ptr, vc_ptr, base, sl, smask, D, HALF)
        if task == pid:
            _wait(cnt_ptr + layer * 5, P, err_ptr, spin_limit)  # stage A of this layer: qkv
        heads = kvh * GROUP + g
        q1, q2 = _rope_query(qkv_ptr, heads, gmask, embed_ptr + _offset(lp_ptr, layer, QNORM), eps, norm_offset, c,
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
            k1, k2, v1, v2 = _rope_new_kv(qkv_ptr, kvh, HQ, HK, embed_ptr + _offset(lp_ptr, layer, KNORM), eps,
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
def _decode_step_kernel(
        lp_ptr, rope_ptr, li_ptr, embed_ptr, tok_ptr, pos_ptr, slot_ptr, start_ptr,
        h_ptr, qkv_ptr, o_ptr, mlp_ptr, logits_ptr, m_ptr, l_ptr, acc_ptr, amax_ptr, aidx_ptr, hist_ptr,
        cnt_ptr, err_ptr, L, S, n_chunks, blocks, n_counters, eps, norm_offset, scale, embed_scale, spin_limit,
        H: tl.constexpr, I: tl.constexpr, V: tl.constexpr, HQ: tl.constexpr, HK: tl.constexpr, HALF: tl.constexpr,
        R: tl.constexpr, KT: tl.constexpr, DEPTH: tl.constexpr, LOOK: tl.constexpr, NT: tl.constexpr,
        GROUP: tl.constexpr, GROUP_P2: tl.constexpr, GROUP_C: tl.constexpr, BLOCK_S: tl.constexpr,
        CHUNKS_P2: tl.constexpr, P_BLOCK: tl.constexpr, HAS_QK_NORM: tl.constexpr, ACT: tl.constexpr,
        GREEDY: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr):
    D: tl.constexpr = 2 * HALF
    R2: tl.constexpr = R // 2
    NQKV: tl.constexpr = (HQ + 2 * HK) * D
    HQD: tl.constexpr = HQ * D
    NRB4: tl.constexpr = (H + R - 1) // R  # stage E: row blocks per chunk of the intermediate size
    pid = tl.program_id(0)
    P = tl.num_programs(0)
    tok = tl.load(tok_ptr)
    # Every program writes the whole residual stream h = embed[token] * scale (identical values, so whichever write
    # lands last is right; the first other write to h, stage C of layer 0, comes after every program has passed
    # stage B, so after all of these).
    for k0 in range(0, H, KT):
        c = k0 + tl.arange(0, KT)
        e = tl.load(embed_ptr + tok * H + c, mask=c < H, other=0.0).to(tl.float32) * embed_scale
        tl.store(h_ptr + c, e, mask=c < H)
    # RoPE's cos and sin at this position (every layer has the same frequencies: the host checks), here where little
    # else is live: the accurate sin and cos need many registers
    i = tl.arange(0, HALF)
    angle = tl.load(pos_ptr).to(tl.float32) * tl.load(rope_ptr + 1 + i)
    rope_c = tl.cos(angle) * tl.load(rope_ptr)
    rope_s = tl.sin(angle) * tl.load(rope_ptr)
    # this program's units of every stage (A, B, C, D, E, head): [lo, hi), walked: n >= 1 (an empty one if none)
    lo0, hi0 = _span((NQKV + R - 1) // R, pid, P)
    lo2, hi2 = _span((H + R - 1) // R, pid, P)
    lo3, hi3 = _span((I + R2 - 1) // R2, pid, P)
    lo4, hi4 = _span(NRB4 * ((I + KT - 1) // KT), pid, P)
    lo5, hi5 = _span((V + R - 1) // R, pid, P)
    LO = (lo0, 0, lo2, lo3, lo4, lo5)
    HI = (hi0, 1, hi2, hi3, hi4, hi5)
    NB = (tl.maximum(hi0 - lo0, 1), 1, tl.maximum(hi2 - lo2, 1), tl.maximum(hi3 - lo3, 1),
          tl.maximum(hi4 - lo4, 1), tl.maximum(hi5 - lo5, 1))
    NR = (NQKV, 0, H, I, H, V)  # rows of each matrix (D: intermediate rows)
    KC = (H, 0, HQD, H, I, H)  # its columns
    total = L * (NB[0] + 1 + NB[2] + NB[3] + NB[4]) + NB[5]

    # walk cursors (layer, stage, unit): the unit processed, the ring's next load (DEPTH ahead), the L2 prefetch
    la, sa, ua = pid * 0, pid * 0, lo0
    lb, sb, ub = la, sa, ua
    w0 = _load_tile(lb, sb, ub, L, lp_ptr, embed_ptr, HI, NR, KC, R, KT, NRB4)
    lb, sb, ub = _advance(lb, sb, ub, L, LO, NB)
    if DEPTH > 1:
        w1 = _load_tile(lb, sb, ub, L, lp_ptr, embed_ptr, HI, NR, KC, R, KT, NRB4)
        lb, sb, ub = _advance(lb, sb, ub, L, LO, NB)
    if DEPTH > 2:
        w2 = _load_tile(lb, sb, ub, L, lp_ptr, embed_ptr, HI, NR, KC, R, KT, NRB4)
        lb, sb, ub = _advance(lb, sb, ub, L, LO, NB)
    lx, sx, ux = lb, sb, ub
    if LOOK > 0:
        for _ in range(0, LOOK):
            _prefetch_tile(lx, sx, ux, L, lp_ptr, embed_ptr, HI, NR, KC, R, KT, NRB4, NT)
            lx, sx, ux = _advance(lx, sx, ux, L, LO, NB)
    xs = tl.zeros([1, 1, KT], tl.float32)
    best = tl.sum(tl.zeros([1], tl.float32), axis=0) - float("inf")
    best_i = (best * 0).to(tl.int32) + 2147483647
    for _ in range(0, total, DEPTH):
        xs, best, best_i = _tile(
            la, sa, ua, w0, xs, best, best_i, pid, P, L, LO, HI, NB, rope_c, rope_s, lp_ptr, li_ptr, embed_ptr,
            slot_ptr, start_ptr, h_ptr, qkv_ptr, o_ptr, mlp_ptr, logits_ptr, m_ptr, l_ptr, acc_ptr, cnt_ptr, err_ptr,
            S, n_chunks, blocks, eps, norm_offset, scale, spin_limit, H, I, V, HQ, HK, HALF, R, KT, NRB4, GROUP,
            GROUP_P2, GROUP_C, BLOCK_S, CHUNKS_P2, HAS_QK_NORM, ACT, GREEDY, USE_DOT, IEEE)
        la, sa, ua = _advance(la, sa, ua, L, LO, NB)
        w0 = _load_tile(lb, sb, ub, L, lp_ptr, embed_ptr, HI, NR, KC, R, KT, NRB4)
        lb, sb, ub = _advance(lb, sb, ub, L, LO, NB)
        if LOOK > 0:
            _prefetch_tile(lx, sx, ux, L, lp_ptr, embed_ptr, HI, NR, KC, R, KT, NRB4, NT)
            lx, sx, ux = _advance(lx, sx, ux, L, LO, NB)
        if DEPTH > 1:
            xs, best, best_i = _tile(
                la, sa, ua, w1, xs, best, best_i, pid, P, L, LO, HI, NB, rope_c, rope_s, lp_ptr, li_ptr, embed_ptr,
                slot_ptr, start_ptr, h_ptr, qkv_ptr, o_ptr, mlp_ptr, logits_ptr, m_ptr, l_ptr, acc_ptr, cnt_ptr,
                err_ptr, S, n_chunks, blocks, eps, norm_offset, scale, spin_limit, H, I, V, HQ, HK, HALF, R, KT,
                NRB4, GROUP, GROUP_P2, GROUP_C, BLOCK_S, CHUNKS_P2, HAS_QK_NORM, ACT, GREEDY, USE_DOT, IEEE)
            la, sa, ua = _advance(la, sa, ua, L, LO, NB)
            w1 = _load_tile(lb, sb, ub, L, lp_ptr, embed_ptr, HI, NR, KC, R, KT, NRB4)
            lb, sb, ub = _advance(lb, sb, ub, L, LO, NB)
            if LOOK > 0:
                _prefetch_tile(lx, sx, ux, L, lp_ptr, embed_ptr, HI, NR, KC, R, KT, NRB4, NT)
                lx, sx, ux = _advance(lx, sx, ux, L, LO, NB)
        if DEPTH > 2:
            xs, best, best_i = _tile(
                la, sa, ua, w2, xs, best, best_i, pid, P, L, LO, HI, NB, rope_c, rope_s, lp_ptr, li_ptr, embed_ptr,
                slot_ptr, start_ptr, h_ptr, qkv_ptr, o_ptr, mlp_ptr, logits_ptr, m_ptr, l_ptr, acc_ptr, cnt_ptr,
                err_ptr, S, n_chunks, blocks, eps, norm_offset, scale, spin_limit, H, I, V, HQ, HK, HALF, R, KT,
                NRB4, GROUP, GROUP_P2, GROUP_C, BLOCK_S, CHUNKS_P2, HAS_QK_NORM, ACT, GREEDY, USE_DOT, IEEE)
            la, sa, ua = _advance(la, sa, ua, L, LO, NB)
            w2 = _load_tile(lb, sb, ub, L, lp_ptr, embed_ptr, HI, NR, KC, R, KT, NRB4)
            lb, sb, ub = _advance(lb, sb, ub, L, LO, NB)
            if LOOK > 0:
                _prefetch_tile(lx, sx, ux, L, lp_ptr, embed_ptr, HI, NR, KC, R, KT, NRB4, NT)
                lx, sx, ux = _advance(lx, sx, ux, L, LO, NB)

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
    """The offset tables, counters and launch of `_decode_step_kernel` for a `FastDecoder`'s static buffers (batch 1).

    `programs`: P (default: one per SM on a GPU, 1 under the interpreter); `tile_bytes`: the size of a unit's weight
    tile (its rows: tile_bytes / (KT x itemsize), at least 2); `depth`: units whose tiles are loaded ahead; `look`:
    units requested into L2 ahead (Hopper's bulk prefetch); `chunks`: at most this many attention tasks per kv head
    (default: as many as P allows)."""

    def __init__(self, decoder, programs: int | None = None, num_warps: int = 8, tile_bytes: int = 32768,
                 depth: int = 2, look: int | None = None, chunks: int | None = None, dot: bool = False,
                 spin_limit: int = 1 << 24):
        d = decoder
        if d.shape is None or d.shape[0] != 1:
            raise ValueError("the persistent step is batch 1 only")
        why = unsupported(d)
        if why:
            raise ValueError(f"the persistent step does not cover this model: {why}")
        if depth not in (1, 2, 3):
            raise ValueError("depth must be 1, 2 or 3")
        self.decoder = d
        dev = d.device
        compiled = dev.type == "cuda" and not interpreting()
        if programs is None:
            programs = torch.cuda.get_device_properties(dev).multi_processor_count if compiled else 1
        hopper = compiled and torch.version.hip is None and torch.cuda.get_device_capability(dev)[0] >= 9
        self.look = 0 if look is None else look
        if self.look and not hopper:
            raise ValueError("the L2 prefetch needs an NVIDIA Hopper GPU or newer")
        self.programs, self.num_warps, self.depth, self.spin_limit = programs, num_warps, depth, spin_limit
        self.use_dot = dot and not interpreting()  # attention scores through the tensor cores (group padded to 16)
        self.kt = triton.next_power_of_2(max(d.embed.shape[1], d.hq * d.d))  # whole rows (stage E: chunks of KT)
        self.rows = max(2, triton.next_power_of_2(tile_bytes // (self.kt * d.embed.element_size())))
        rows_of = []
        for i, layer in enumerate(d.layers):
            rows_of.append([layer.wqkv, layer.wo, layer.wg, layer.wu, layer.wd, layer.ln1, layer.ln2, d.k_cache[i],
                            d.v_cache[i], layer.q_norm, layer.k_norm])
        rows_of.append([d.head, None, None, None, None, d.final_norm] + [None] * 5)
        table = []
        for row in rows_of:  # offsets in elements from the embedding
            table.append([])
            for t in row:
                if t is None:
                    table[-1].append(0)
                    continue
                if t.dtype != d.embed.dtype or not t.is_contiguous() or t.data_ptr() % 16:
                    raise ValueError("the persistent step needs contiguous, 16-byte aligned weights and caches")
                table[-1].append((t.data_ptr() - d.embed.data_ptr()) // t.element_size())
        self.table = torch.tensor(table, dtype=torch.int64, device=dev)
        self._keep = rows_of  # the table holds addresses: keep the tensors alive
        first = d.layers[0]
        self.rope = torch.cat([torch.tensor([first.rope_scaling], device=dev), first.inv_freq.float()]).contiguous()
        self.window = torch.tensor([layer.window for layer in d.layers], dtype=torch.int32, device=dev)
        n_layers = len(d.layers)
        self.n_counters = n_layers * STAGES.value + 1 + n_layers * d.hk + 1
        self.counters = torch.zeros(self.n_counters, dtype=torch.int32, device=dev)
        self.error = torch.zeros(1, dtype=torch.int32, device=dev)
        self.amax = torch.zeros(programs, dtype=torch.float32, device=dev)
        self.aidx = torch.zeros(programs, dtype=torch.int32, device=dev)
        # attention tasks: each kv head's slots in n_chunks chunks of `blocks` blocks, at most one task per program
        att = d.attention
        total_blocks = triton.cdiv(d.shape[1], att.block_s)
        chunks = chunks or max(1, min(16, programs // d.hk))
        self.blocks = triton.cdiv(total_blocks, min(chunks, total_blocks))
        self.n_chunks = triton.cdiv(total_blocks, self.blocks)
        self.m = torch.zeros(d.hq * self.n_chunks, dtype=torch.float32, device=dev)
        self.l = torch.zeros_like(self.m)
        self.acc = torch.zeros(d.hq * self.n_chunks * d.d, dtype=torch.float32, device=dev)

    def describe(self) -> dict:
        """What the compiled kernel and its launch depend on (the artifact key, the report)."""
        return {"programs": self.programs, "rows": self.rows, "kt": self.kt, "depth": self.depth, "look": self.look,
                "chunks": self.n_chunks, "dot": self.use_dot, "num_warps": self.num_warps}

    def _arguments(self, greedy: bool) -> tuple[list, dict]:
        d, att = self.decoder, self.decoder.attention
        args = [self.table, self.rope, self.window, d.embed, d.tokens, d.positions, d.slot, d.start,
                d.h, d.qkv, d.o, d.mlp, d.logits, self.m, self.l, self.acc, self.amax, self.aidx, d.history,
                self.counters, self.error, len(d.layers), d.shape[1], self.n_chunks, self.blocks, self.n_counters,
                d.eps, d.offset, d.scale, d.embed_scale, self.spin_limit]
        options = dict(
            H=d.embed.shape[1], I=d.layers[0].wg.shape[0], V=d.head.shape[0], HQ=d.hq, HK=d.hk, HALF=d.d // 2,
            R=self.rows, KT=self.kt, DEPTH=self.depth, LOOK=self.look, NT=32 * self.num_warps, GROUP=att.group,
            GROUP_P2=group_rows(att.group, self.use_dot), GROUP_C=triton.next_power_of_2(att.group),
            BLOCK_S=att.block_s, CHUNKS_P2=triton.next_power_of_2(self.n_chunks),
            P_BLOCK=triton.next_power_of_2(self.programs), HAS_QK_NORM=d.layers[0].q_norm is not None,
            ACT=ACTIVATIONS[d.act], GREEDY=greedy, USE_DOT=self.use_dot, IEEE=d.dtype == torch.float32,
            num_warps=self.num_warps, num_stages=1)
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
            raise RuntimeError(f"the persistent decode step's {self.programs} programs could not all run at once (a "
                               "wait timed out; is another process using this GPU?): run with --no-persistent")


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
