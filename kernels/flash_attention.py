"""FlashAttention-2 in Triton: fused attention, forward and backward.

Attention is ``O = softmax(scale * Q K^T + mask) V``. Its score matrix has T x S entries per head, too many
bytes to write to memory and read back. FlashAttention (Dao et al., 2022) never stores it: a program owns a
block of query rows and streams keys and values through on-chip memory a block at a time, keeping a running
("online") softmax (Milakov and Gimelshein, 2018); extra memory is one number per row. FlashAttention-2
(Dao, 2023) normalizes the output once at the end instead of at every block, spreads the query blocks of a
head over programs, and runs the backward over key blocks.

1. Forward, ``_attn_fwd``: one program per (query block, batch * head). Scores are taken in base 2 (the
   scale and log2(e) fold into one multiplier, so ``exp2`` does the work). Under a causal mask, off-band key
   blocks left of the diagonal run with no mask, on-band blocks that cross it are masked element by element,
   blocks right of it are never loaded. The row's log-sum-exp (LSE) is saved for the backward.
2. Backward. With P the softmax, dP = dO V^T and ``delta_i = sum_j P_ij dP_ij = dO_i . O_i``, the score
   gradient is ``dS = P * (dP - delta)``; then ``dV = P^T dO``, ``dK = scale dS^T Q``, ``dQ = scale dS K``.
   P is recomputed from Q, K and the LSE, never stored. ``_attn_bwd_dq`` holds a query block and walks the
   keys as the forward does; it computes delta of its rows and stores it. ``_attn_bwd_dkdv`` then holds a
   key block (K, V on chip) and walks the query blocks of every query head that shares its kv head (GQA
   without copies of K and V). Each gradient element is written by one program, summed in a fixed order:
   bitwise deterministic. At head dims above 64 beyond 1024 tokens a second path (bench/NOTES.md v12) is
   FlashAttention-2's own: ``_attn_bwd_preprocess`` stores delta and zeroes an fp32 dQ buffer, and the dK/dV
   programs add their ``dS K`` to it atomically: five matrix products per step instead of seven (the dQ
   programs recompute Q K^T and dO V^T), but dQ's sums land in any order.
   ``torch.use_deterministic_algorithms(True)`` keeps the first path.
3. Launchers: plain ``kernel[grid](...)``, tiles from kernels/tiles.py. Per-call launch cost is left to CUDA
   graphs (``torch.compile(mode="reduce-overhead")``).
4. The autograd Function (eager calls) and the ``torch.library`` custom ops with their fakes, which
   ``torch.compile(fullgraph=True)`` traces as graph nodes.
5. Input validation and the public ``flash_attention()``.

Conventions. q is (B, H, T, D), k and v are (B, H_kv, S, D), any strides. The causal mask is aligned to the
bottom-right: query i sees key j when ``j <= i + S - T`` (T == 1, a decode step, sees every key). When T > S
the first T - S rows see no key: output 0, LSE -inf. Dropout is drawn in the kernels from Philox (Salmon et
al., 2011), keyed by seed and (batch, head) and counting over (row, key), so the backward draws the forward's
mask again instead of storing it.
"""

import contextlib
import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from kernels import tiles
from kernels.tiles import forced_config

__all__ = ["flash_attention", "dropout_keep_mask", "forced_config", "MAX_HEAD_DIM"]

MAX_HEAD_DIM = 128
_LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) == exp2(x * log2(e))
LOG2E = _LOG2E.value
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The kernels add a (batch, head) slice's offset in int64 and row and column offsets within it in int32
# (64-bit address math everywhere would cost every load): within a slice, offsets stay below this.
_INT32_OFFSETS = 2**31
_MAX_GRID_Y = 65535  # CUDA's limit on a grid's second axis, where the kernels put the (batch, head) pairs
_FLOAT32_MAX = torch.finfo(torch.float32).max

# Outputs are allocated through this name, so a test can hand out NaN-filled buffers and prove that the
# kernels write every element.
_empty_strided = torch.empty_strided


# ----------------------------------------------------------------------------------------------------
# Shared pieces: tile loads and stores, the dropout mask, the order programs start in, the causal band
@triton.jit
def _load_tile(base, rows, n_rows, stride_r, cols, n_cols, stride_c, CHECK_ROWS: tl.constexpr,
               CHECK_COLS: tl.constexpr):
    """Load the (rows, cols) tile at ``base``, masking only the edges that can run past the tensor (outside
    -> 0): off-band loops know their rows are in range and skip the compare."""
    ptrs = base + rows[:, None] * stride_r + cols[None, :] * stride_c
    if CHECK_ROWS and CHECK_COLS:
        tile = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
    elif CHECK_ROWS:
        tile = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    elif CHECK_COLS:
        tile = tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _store_tile(base, rows, n_rows, stride_r, cols, n_cols, stride_c, value):
    tl.store(base + rows[:, None] * stride_r + cols[None, :] * stride_c, value,
             mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols))


@triton.jit
def _dropout_keep(seed_bh, offs_m, start_n, S, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Philox keep-mask (BLOCK_M, BLOCK_N) of query rows ``offs_m`` and keys ``start_n + [0, BLOCK_N)``.

    ``seed_bh``: the seed in the low word, batch * H + head in the high one (a stream per head). One call of
    Philox4x32-7 (seven rounds pass BigCrush) gives four 32-bit numbers, split into eight 16-bit ones; an
    entry is kept when its number is at least ``dropout_p * 2**16``. The eight follow the tensor cores'
    accumulator layout, where a thread holds two neighbouring columns of every eight, so they land in the
    thread that needs them: key ``32g + 8o + 2q + e`` of row i takes half e (0: low) of output o of the call
    at counter ``(i * cdiv(S, 32) + g) * 4 + q``.
    """
    tl.static_assert(BLOCK_N % 32 == 0, "dropout needs key blocks (BLOCK_N) that are multiples of 32")
    g = start_n // 32 + tl.arange(0, BLOCK_N // 32)
    q = tl.arange(0, 4)
    counter = (offs_m[:, None, None] * tl.cdiv(S, 32) + g[None, :, None]) * 4 + q[None, None, :]
    r0, r1, r2, r3 = tl.randint4x(seed_bh, counter, n_rounds=7)
    h0, h1, h2, h3 = _halves(r0), _halves(r1), _halves(r2), _halves(r3)  # each [m, g, q, e]
    # [m, g, q, e, a, b] = half e of output 2a + b; reordered to [m, g, a, b, q, e], flattened row-major to
    # key 32g + 8(2a + b) + 2q + e
    r = tl.permute(tl.join(tl.join(h0, h2), tl.join(h1, h3)), (0, 1, 4, 5, 2, 3))
    return tl.reshape(r, (BLOCK_M, BLOCK_N)) >= tl.cast(dropout_p * 65536.0, tl.int32)


@triton.jit
def _halves(r):
    """(low, high) 16 bits of each 32-bit number, as int32 in [0, 65536), joined on a new last axis."""
    r = r.to(tl.int32, bitcast=True)
    return tl.join(r & 0xFFFF, (r >> 16) & 0xFFFF)  # masked after the shift: either signedness works


@triton.jit
def _philox_key(Seed, off_bh):
    return tl.load(Seed) + (off_bh.to(tl.int64) << 32)


HEAD_GROUP = tl.constexpr(8)  # heads whose programs are interleaved in launch order


@triton.jit
def _program_order():
    """(block, batch * head) of this program of a (blocks, batch * heads) grid. Kernels number blocks heaviest
    first, and the GPU starts programs in grid order, axis 0 fastest: head by head, the last head's heaviest
    block would run alone at the end. So heads go HEAD_GROUP at a time, block by block across a group: heavy
    blocks start first, light ones fill the tail, and eight heads' K and V share L2 (bench/NOTES.md v10)."""
    n_blocks = tl.num_programs(0)
    n_heads = tl.num_programs(1)
    linear = tl.program_id(1) * n_blocks + tl.program_id(0)
    group = linear // (HEAD_GROUP * n_blocks)
    heads = tl.minimum(HEAD_GROUP, n_heads - group * HEAD_GROUP)  # the last group may be smaller
    rank = linear - group * HEAD_GROUP * n_blocks
    return rank // heads, group * HEAD_GROUP + rank % heads


@triton.jit
def _query_block(H, GROUP, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """(first row, batch * head, batch, head, kv head) of a program of a (query blocks, batch * heads) grid.
    Causal: the last query blocks see the most keys, so they start first."""
    pid_m, off_bh = _program_order()
    if IS_CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    return pid_m * BLOCK_M, off_bh, off_b, off_h, off_h // GROUP  # GROUP query heads share a kv head


@triton.jit
def _key_band(start_m, S, diag, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Split the keys of the query block at ``start_m``: [0, band_lo) is seen by every row (no mask),
    [band_lo, band_hi) is masked, keys from band_hi on are never loaded. Causal: band_lo is the first key
    block that crosses the diagonal (offset by diag = S - T), band_hi one past the last key the last row
    sees. Otherwise: the full key blocks, then the ragged tail."""
    if IS_CAUSAL:
        band_lo = (tl.maximum(start_m + diag + 1, 0) // BLOCK_N) * BLOCK_N
        band_hi = tl.maximum(tl.minimum(start_m + BLOCK_M + diag, S), band_lo)
    else:
        band_lo = (S // BLOCK_N) * BLOCK_N
        band_hi = S
    return band_lo, band_hi


# ----------------------------------------------------------------------------------------------------
# 1. Forward: O and the LSE per row, the T x S scores a tile at a time in registers
@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q, K_base, V_base, stride_kn, stride_kd, stride_vn, stride_vd,
    offs_m, offs_d, lo, hi, S, HEAD_DIM, diag, qk_scale, seed_bh, dropout_p,
    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Stream key blocks [lo, hi) through the online softmax. MASKED: the on-band blocks (or ragged tail)."""
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(K_base, offs_n, S, stride_kn, offs_d, HEAD_DIM, stride_kd, MASKED, not EVEN_D)
        # Scores in base-2 units: qk_scale = sm_scale * log2(e), so exp2(qk) == exp(sm_scale * q.k).
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASKED:  # hide keys past the end and, on the band, keys right of the diagonal
            visible = offs_n[None, :] < S
            if IS_CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + diag)
            qk = tl.where(visible, qk, float("-inf"))
        # Online softmax: raise the running max, rescale what was summed under the old max by alpha.
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        if MASKED:  # a row that has seen only masked keys keeps m = -inf: subtract 0 instead (no -inf - -inf)
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_sub = m_new
        p = tl.exp2(qk - m_sub[:, None])
        alpha = tl.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)  # the normalizer counts every visible key, dropped or not
        acc = acc * alpha[:, None]
        if HAS_DROPOUT:
            p = tl.where(_dropout_keep(seed_bh, offs_m, start_n, S, dropout_p, BLOCK_M, BLOCK_N), p, 0.0)
        v = _load_tile(V_base, offs_n, S, stride_vn, offs_d, HEAD_DIM, stride_vd, MASKED, not EVEN_D)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(
    Q, K, V, Out, Lse, Seed,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    H, GROUP, T, S, qk_scale, dropout_p, inv_keep,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (query blocks, batch * heads): O and LSE of BLOCK_M query rows of one head."""
    start_m, off_bh, off_b, off_h, off_hkv = _query_block(H, GROUP, IS_CAUSAL, BLOCK_M)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    K_base = K + off_b * stride_kb + off_hkv * stride_kh
    V_base = V + off_b * stride_vb + off_hkv * stride_vh
    q = _load_tile(Q + off_b * stride_qb + off_h * stride_qh, offs_m, T, stride_qt, offs_d, HEAD_DIM, stride_qd,
                   True, not EVEN_D)
    seed_bh = 0
    if HAS_DROPOUT:
        seed_bh = _philox_key(Seed, off_bh)

    # Running state per row, fp32: max m_i (base 2), normalizer l_i, unnormalized output acc.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Off-band keys without a mask, then on-band keys masked. diag = S - T: the diagonal's offset.
    diag = S - T
    band_lo, band_hi = _key_band(start_m, S, diag, IS_CAUSAL, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, K_base, V_base, stride_kn, stride_kd, stride_vn, stride_vd,
        offs_m, offs_d, 0, band_lo, S, HEAD_DIM, diag, qk_scale, seed_bh, dropout_p,
        False, IS_CAUSAL, EVEN_D, HAS_DROPOUT, DOT_PRECISION, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, K_base, V_base, stride_kn, stride_kd, stride_vn, stride_vd,
        offs_m, offs_d, band_lo, band_hi, S, HEAD_DIM, diag, qk_scale, seed_bh, dropout_p,
        True, IS_CAUSAL, EVEN_D, HAS_DROPOUT, DOT_PRECISION, BLOCK_M, BLOCK_N)

    # Normalize once at the end; rows that saw no key (causal, T > S) have l = 0: output 0, LSE -inf.
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    acc = acc * (inv_keep / l_safe)[:, None]  # with dropout, kept weights are scaled by 1 / (1 - p)
    lse = tl.where(seen, (m_i + tl.log2(l_safe)) / _LOG2E, float("-inf"))  # back to natural log
    tl.store(Lse + off_bh.to(tl.int64) * T + offs_m, lse, mask=offs_m < T)
    _store_tile(Out + off_b * stride_ob + off_h * stride_oh, offs_m, T, stride_ot, offs_d, HEAD_DIM, stride_od,
                acc.to(Out.dtype.element_ty))


# ----------------------------------------------------------------------------------------------------
# 2. Backward: delta, dK/dV programs, dQ programs. The default path launches _attn_bwd_dq (it stores
#    delta) and then _attn_bwd_dkdv; the atomic-dQ path launches _attn_bwd_preprocess and then
#    _attn_bwd_dkdv with ATOMIC_DQ.
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _row_delta(o, do):
    """delta = rowsum(dO * O) of a tile of rows, fp32: equal to rowsum(P * dP), the term every row of the
    softmax gradient needs, since O = P V and dP = dO V^T (with dropout, O is the output after it)."""
    return tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)


@triton.jit
def _attn_bwd_preprocess(
    O, DO, Delta, DQ,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    H, T, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Atomic-dQ path only. Grid (query blocks, batch * heads): delta of BLOCK_M rows, and the same rows of
    the fp32 dQ buffer set to zero for the dK/dV programs to add into."""
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(O + off_b * stride_ob + off_h * stride_oh, offs_m, T, stride_ot, offs_d, HEAD_DIM, stride_od,
                   True, True)
    do = _load_tile(DO + off_b * stride_dob + off_h * stride_doh, offs_m, T, stride_dot, offs_d, HEAD_DIM,
                    stride_dod, True, True)
    tl.store(Delta + off_bh.to(tl.int64) * T + offs_m, _row_delta(o, do), mask=offs_m < T)
    _store_tile(DQ + off_b * stride_dqb + off_h * stride_dqh, offs_m, T, stride_dqt, offs_d, HEAD_DIM, stride_dqd,
                tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32))


@triton.jit
def _attn_bwd_dkdv_inner(
    dk, dv, k, v, Q_rows, DO_rows, Lse_rows, Delta_rows, DQ_rows,
    stride_qt, stride_qd, stride_dot, stride_dod, stride_dqt, stride_dqd,
    start_n, offs_n, offs_d, lo, hi, T, S, HEAD_DIM, diag, sm_scale, qk_scale, seed_bh, dropout_p, inv_keep,
    MASKED: tl.constexpr, EVEN_D: tl.constexpr, HAS_DROPOUT: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Add query blocks [lo, hi) of one head to dK, dV of the key block held. Tiles are transposed (keys x
    queries), so P^T and dS^T come out in the shape the dV and dK products take. MASKED: on the causal
    band (the only masked part: without a causal mask the caller passes no band, and keys past S load as
    zeros whose gradients the masked stores drop)."""
    for start_m in tl.range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        # Query rows past T load q = dO = 0 and LSE = +inf, so their column of P^T is exactly 0.
        q = _load_tile(Q_rows, offs_m, T, stride_qt, offs_d, HEAD_DIM, stride_qd, True, not EVEN_D)
        lse2 = tl.load(Lse_rows + offs_m, mask=offs_m < T, other=float("inf")) * _LOG2E
        # P^T recomputed from the saved LSE: exp2(scores - lse) is the normalized softmax at once.
        pT = tl.exp2(tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale - lse2[None, :])
        if MASKED:  # query i sees key j only when j <= i + diag
            pT = tl.where(offs_n[:, None] <= offs_m[None, :] + diag, pT, 0.0)
        do = _load_tile(DO_rows, offs_m, T, stride_dot, offs_d, HEAD_DIM, stride_dod, True, not EVEN_D)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (dO V^T)^T
        if HAS_DROPOUT:  # the forward's mask, drawn again and read transposed
            keepT = tl.trans(_dropout_keep(seed_bh, offs_m, start_n, S, dropout_p, BLOCK_M, BLOCK_N))
            pT_kept = tl.where(keepT, pT * inv_keep, 0.0)
            dv = tl.dot(pT_kept.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
            dpT = tl.where(keepT, dpT * inv_keep, 0.0)
        else:
            dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)  # dV += P^T dO
        delta = tl.load(Delta_rows + offs_m, mask=offs_m < T, other=0.0)
        dsT = (pT * (dpT - delta[None, :])).to(q.dtype)  # softmax backward, transposed
        dk = tl.dot(dsT, q, dk, input_precision=DOT_PRECISION)  # dK += dS^T Q (scaled at the end)
        if ATOMIC_DQ:  # this key block's share of dQ, added to rows every key block adds to: atomically
            dq = tl.dot(tl.trans(dsT), k, input_precision=DOT_PRECISION) * sm_scale
            tl.atomic_add(DQ_rows + offs_m[:, None] * stride_dqt + offs_d[None, :] * stride_dqd, dq,
                          mask=(offs_m[:, None] < T) & (offs_d[None, :] < HEAD_DIM), sem="relaxed")
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, Lse, Delta, DQ, DK, DV, Seed,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    H, GROUP, T, S, sm_scale, qk_scale, dropout_p, inv_keep,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    ATOMIC_DQ: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (key blocks, batch * kv heads): dK and dV of BLOCK_N keys of one kv head, the only program that
    writes them. ATOMIC_DQ: also adds dS K to the fp32 buffer DQ (the second backward path)."""
    key_block, off_bhkv = _program_order()  # causal: key block 0 is seen by the most queries, it goes first
    H_KV = H // GROUP
    off_b = (off_bhkv // H_KV).to(tl.int64)
    off_hkv = (off_bhkv % H_KV).to(tl.int64)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    # This key block stays on chip for the whole pass.
    start_n = key_block * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(K + off_b * stride_kb + off_hkv * stride_kh, offs_n, S, stride_kn, offs_d, HEAD_DIM, stride_kd,
                   True, not EVEN_D)
    v = _load_tile(V + off_b * stride_vb + off_hkv * stride_vh, offs_n, S, stride_vn, offs_d, HEAD_DIM, stride_vd,
                   True, not EVEN_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # The query rows, split like the forward's keys: rows above the band see none of this key block and
    # are skipped; rows in the band see part of it (masked); rows below it see all of it (no mask).
    diag = S - T
    if IS_CAUSAL:
        first_row = tl.maximum(start_n - diag, 0)  # the first query that sees a key of the block
        full_row = tl.maximum(tl.minimum(start_n + BLOCK_N, S) - 1 - diag, 0)  # the first that sees all
        band_lo = (first_row // BLOCK_M) * BLOCK_M
        band_hi = tl.maximum(tl.cdiv(full_row, BLOCK_M) * BLOCK_M, band_lo)
    else:
        band_lo = 0
        band_hi = 0

    for g in range(GROUP):  # GQA: every query head that reads this kv head adds to its dK and dV
        off_h = off_hkv * GROUP + g
        off_bh = off_b * H + off_h
        Q_rows = Q + off_b * stride_qb + off_h * stride_qh
        DO_rows = DO + off_b * stride_dob + off_h * stride_doh
        DQ_rows = DQ + off_b * stride_dqb + off_h * stride_dqh  # read under ATOMIC_DQ only
        seed_bh = 0
        if HAS_DROPOUT:
            seed_bh = _philox_key(Seed, off_bh)
        dk, dv = _attn_bwd_dkdv_inner(  # on the band: masked
            dk, dv, k, v, Q_rows, DO_rows, Lse + off_bh * T, Delta + off_bh * T, DQ_rows,
            stride_qt, stride_qd, stride_dot, stride_dod, stride_dqt, stride_dqd,
            start_n, offs_n, offs_d, band_lo, band_hi, T, S, HEAD_DIM, diag, sm_scale, qk_scale, seed_bh,
            dropout_p, inv_keep, True, EVEN_D, HAS_DROPOUT, ATOMIC_DQ, DOT_PRECISION, BLOCK_M, BLOCK_N)
        dk, dv = _attn_bwd_dkdv_inner(  # below the band: every row sees the whole key block
            dk, dv, k, v, Q_rows, DO_rows, Lse + off_bh * T, Delta + off_bh * T, DQ_rows,
            stride_qt, stride_qd, stride_dot, stride_dod, stride_dqt, stride_dqd,
            start_n, offs_n, offs_d, band_hi, T, T, S, HEAD_DIM, diag, sm_scale, qk_scale, seed_bh,
            dropout_p, inv_keep, False, EVEN_D, HAS_DROPOUT, ATOMIC_DQ, DOT_PRECISION, BLOCK_M, BLOCK_N)

    # Scores were sm_scale * q.k, so dK picks up sm_scale once, here.
    _store_tile(DK + off_b * stride_dkb + off_hkv * stride_dkh, offs_n, S, stride_dkn, offs_d, HEAD_DIM, stride_dkd,
                (dk * sm_scale).to(DK.dtype.element_ty))
    _store_tile(DV + off_b * stride_dvb + off_hkv * stride_dvh, offs_n, S, stride_dvn, offs_d, HEAD_DIM, stride_dvd,
                dv.to(DV.dtype.element_ty))


@triton.jit
def _attn_bwd_dq_inner(
    dq, q, do, lse2, delta, K_base, V_base, stride_kn, stride_kd, stride_vn, stride_vd,
    offs_m, offs_d, lo, hi, S, HEAD_DIM, diag, qk_scale, seed_bh, dropout_p, inv_keep,
    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Add key blocks [lo, hi) to dQ of the query block held. MASKED: on the band, as in the forward."""
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(K_base, offs_n, S, stride_kn, offs_d, HEAD_DIM, stride_kd, MASKED, not EVEN_D)
        v = _load_tile(V_base, offs_n, S, stride_vn, offs_d, HEAD_DIM, stride_vd, MASKED, not EVEN_D)
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale - lse2[:, None])
        if MASKED:
            visible = offs_n[None, :] < S
            if IS_CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + diag)
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed_bh, offs_m, start_n, S, dropout_p, BLOCK_M, BLOCK_N)
            dp = tl.where(keep, dp * inv_keep, 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)  # dQ += dS K (scaled at the end)
    return dq


@triton.jit
def _attn_bwd_dq(
    Q, K, V, O, DO, Lse, Delta, DQ, Seed,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    H, GROUP, T, S, sm_scale, qk_scale, dropout_p, inv_keep,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (query blocks, batch * heads), launched before the dK/dV programs: delta of BLOCK_M query rows,
    stored for them, and dQ of those rows, the only program that writes it."""
    start_m, off_bh, off_b, off_h, off_hkv = _query_block(H, GROUP, IS_CAUSAL, BLOCK_M)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + off_b * stride_qb + off_h * stride_qh, offs_m, T, stride_qt, offs_d, HEAD_DIM, stride_qd,
                   True, not EVEN_D)
    do = _load_tile(DO + off_b * stride_dob + off_h * stride_doh, offs_m, T, stride_dot, offs_d, HEAD_DIM,
                    stride_dod, True, not EVEN_D)
    o = _load_tile(O + off_b * stride_ob + off_h * stride_oh, offs_m, T, stride_ot, offs_d, HEAD_DIM, stride_od,
                   True, not EVEN_D)
    delta = _row_delta(o, do)
    tl.store(Delta + off_bh.to(tl.int64) * T + offs_m, delta, mask=offs_m < T)  # for the dK/dV launch
    lse2 = tl.load(Lse + off_bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=float("inf")) * _LOG2E
    seed_bh = 0
    if HAS_DROPOUT:
        seed_bh = _philox_key(Seed, off_bh)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # The forward's key split: off-band blocks unmasked, on-band blocks masked, hidden blocks skipped.
    diag = S - T
    band_lo, band_hi = _key_band(start_m, S, diag, IS_CAUSAL, BLOCK_M, BLOCK_N)
    K_base = K + off_b * stride_kb + off_hkv * stride_kh
    V_base = V + off_b * stride_vb + off_hkv * stride_vh
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse2, delta, K_base, V_base, stride_kn, stride_kd, stride_vn, stride_vd,
        offs_m, offs_d, 0, band_lo, S, HEAD_DIM, diag, qk_scale, seed_bh, dropout_p, inv_keep,
        False, IS_CAUSAL, EVEN_D, HAS_DROPOUT, DOT_PRECISION, BLOCK_M, BLOCK_N)
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse2, delta, K_base, V_base, stride_kn, stride_kd, stride_vn, stride_vd,
        offs_m, offs_d, band_lo, band_hi, S, HEAD_DIM, diag, qk_scale, seed_bh, dropout_p, inv_keep,
        True, IS_CAUSAL, EVEN_D, HAS_DROPOUT, DOT_PRECISION, BLOCK_M, BLOCK_N)
    _store_tile(DQ + off_b * stride_dqb + off_h * stride_dqh, offs_m, T, stride_dqt, offs_d, HEAD_DIM, stride_dqd,
                (dq * sm_scale).to(DQ.dtype.element_ty))


# The dropout mask, materialized: tests replay it in a reference; the kernels never store it.
@triton.jit
def _dropout_mask_kernel(Seed, Mask, T, S, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    off_bh = tl.program_id(2)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    start_n = tl.program_id(1) * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    keep = _dropout_keep(_philox_key(Seed, off_bh), offs_m, start_n, S, dropout_p, BLOCK_M, BLOCK_N)
    ptrs = Mask + off_bh.to(tl.int64) * T * S + offs_m[:, None] * S + offs_n[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(offs_m[:, None] < T) & (offs_n[None, :] < S))


def dropout_keep_mask(seed: torch.Tensor, B: int, H: int, T: int, S: int, dropout_p: float) -> torch.Tensor:
    """The (B, H, T, S) boolean keep-mask the kernels draw for ``seed`` (a one-element int64 tensor on the
    device)."""
    mask = torch.empty((B, H, T, S), dtype=torch.int8, device=seed.device)
    _dropout_mask_kernel[(triton.cdiv(T, 32), triton.cdiv(S, 32), B * H)](seed, mask, T, S, dropout_p,
                                                                          BLOCK_M=32, BLOCK_N=32)
    return mask.bool()


# ----------------------------------------------------------------------------------------------------
# 3. Launchers: allocate outputs in the layouts callers want, pick tiles, launch through kernel[grid](...)
def _dense_strides(shape, order) -> list[int]:
    """The strides of a dense tensor whose dimensions lie in memory in ``order``, outermost first."""
    strides, step = [0] * len(shape), 1
    for d in reversed(order):
        strides[d] = step
        step *= shape[d]
    return strides


def _alloc(shape, order, dtype, device) -> torch.Tensor:
    return _empty_strided(shape, _dense_strides(shape, order), dtype=dtype, device=device)


def _grad_order(strides) -> tuple:
    """The memory order of the gradient of a (B, H, T, D) tensor with ``strides``: B, H and T in the
    tensor's order (ties keep B, H, T), D innermost. q, k, v are often (B, T, H, D) views of one projection:
    gradients in that order let the projection's backward gather them without a transpose (NOTES v8)."""
    order = [0, 1, 2]  # sorted by descending stride, written out: torch.compile traces this with symbolic
    for i in (1, 2):  # strides, which sorted() with a key cannot take
        while i > 0 and strides[order[i - 1]] < strides[order[i]]:
            order[i - 1], order[i] = order[i], order[i - 1]
            i -= 1
    return (*order, 3)


def _grad_like(t: torch.Tensor, dtype=None) -> torch.Tensor:
    return _alloc(t.shape, _grad_order(t.stride()), dtype or t.dtype, t.device)


def _constexprs(q: torch.Tensor, causal: bool, dropout_p: float) -> dict:
    D = q.shape[-1]
    return dict(
        HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)),  # tl.dot wants power-of-two tiles >= 16
        IS_CAUSAL=causal, HAS_DROPOUT=dropout_p > 0.0,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32: full precision, never TF32
    )


def _on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make ``t``'s device current while the kernels launch."""
    if t.is_cuda and t.get_device() != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _forward_impl(q, k, v, causal: bool, sm_scale: float, dropout_p: float, seed):
    """(out, lse): out (B, H, T, D) laid out as (B, T, H, D), so merging heads afterwards is a free view;
    lse (B, H, T) fp32, the natural-log log-sum-exp of each row's scaled scores."""
    B, H, T, D = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    out = _alloc((B, H, T, D), (0, 2, 1, 3), q.dtype, q.device)
    lse = _alloc((B, H, T), (0, 1, 2), torch.float32, q.device)
    consts = _constexprs(q, causal, dropout_p)
    tile = tiles.pick("fwd", q, S, consts["BLOCK_D"])
    with _on_device(q):
        _attn_fwd[(triton.cdiv(T, tile["BLOCK_M"]), B * H)](
            q, k, v, out, lse, seed if seed is not None else lse,  # without dropout Seed is never read
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            H, H // H_kv, T, S, sm_scale * LOG2E, dropout_p, 1.0 / (1.0 - dropout_p), **consts, **tile)
    return out, lse


def _use_atomic_dq(block_d: int, T: int, S: int) -> bool:
    """The atomic-dQ backward: at head dims above 64 beyond 1024 tokens, where it beat the split backward on
    the kernel table by the margin bench/NOTES.md v12 records; not under
    torch.use_deterministic_algorithms(True)."""
    return block_d > 64 and max(T, S) > 1024 and not torch.are_deterministic_algorithms_enabled()


def _backward_impl(grad_out, q, k, v, out, lse, causal: bool, sm_scale: float, dropout_p: float, seed):
    """(dq, dk, dv), each dense in its input's dimension order; grad_out is read in place, any strides."""
    B, H, T, D = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    if (T - 1) * grad_out.stride(2) + (D - 1) * grad_out.stride(3) >= _INT32_OFFSETS:
        raise ValueError(f"flash_attention backward: grad_out's strides {grad_out.stride()} reach 2**31 "
                         "elements within one (batch, head) slice")
    consts = _constexprs(q, causal, dropout_p)
    atomic = _use_atomic_dq(consts["BLOCK_D"], T, S)
    dq = _grad_like(q, torch.float32 if atomic else None)  # the atomic path sums dQ in fp32
    dk, dv = _grad_like(k), _grad_like(v)
    delta = _alloc((B, H, T), (0, 1, 2), torch.float32, q.device)
    seed = seed if seed is not None else lse  # without dropout Seed is never read
    scalars = (H, H // H_kv, T, S, sm_scale, sm_scale * LOG2E, dropout_p, 1.0 / (1.0 - dropout_p))
    dkdv_tile = tiles.pick("dkdv_atomic" if atomic else "dkdv", q, S, consts["BLOCK_D"])
    with _on_device(q):
        if atomic:  # delta and a zeroed fp32 dQ first; the dK/dV programs then add dQ into it
            _attn_bwd_preprocess[(triton.cdiv(T, 64), B * H)](
                out, grad_out, delta, dq, *out.stride(), *grad_out.stride(), *dq.stride(),
                H, T, HEAD_DIM=D, BLOCK_D=consts["BLOCK_D"], BLOCK_M=64)
        else:  # dQ programs first: they store the delta the dK/dV programs read
            dq_tile = tiles.pick("dq", q, S, consts["BLOCK_D"])
            _attn_bwd_dq[(triton.cdiv(T, dq_tile["BLOCK_M"]), B * H)](
                q, k, v, out, grad_out, lse, delta, dq, seed,
                *q.stride(), *k.stride(), *v.stride(), *out.stride(), *grad_out.stride(), *dq.stride(),
                *scalars, **consts, **dq_tile)
        _attn_bwd_dkdv[(triton.cdiv(S, dkdv_tile["BLOCK_N"]), B * H_kv)](
            q, k, v, grad_out, lse, delta, dq, dk, dv, seed,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(), *dk.stride(), *dv.stride(),
            *scalars, ATOMIC_DQ=atomic, **consts, **dkdv_tile)
    return dq.to(q.dtype), dk, dv  # (to: a no-op unless the atomic path summed fp32 for half inputs)


# ----------------------------------------------------------------------------------------------------
# 4. Autograd: a Function for eager calls, custom ops for torch.compile; both run the launchers above
def _save_for_backward(ctx, q, k, v, causal, sm_scale, dropout_p, seed, out, lse) -> None:
    ctx.save_for_backward(q, k, v, out, lse, seed)
    ctx.causal, ctx.sm_scale, ctx.dropout_p = causal, sm_scale, dropout_p


def _saved(ctx) -> tuple:
    q, k, v, out, lse, seed = ctx.saved_tensors
    return q, k, v, out, lse, ctx.causal, ctx.sm_scale, ctx.dropout_p, seed


class _FlashAttentionFunction(torch.autograd.Function):
    """Eager calls: an autograd.Function over the launchers (cheaper per call than the custom op's
    dispatch). It returns the output alone; the LSE is saved for the backward, not returned."""

    @staticmethod
    def forward(ctx, q, k, v, causal, sm_scale, dropout_p, seed):
        out, lse = _forward_impl(q, k, v, causal, sm_scale, dropout_p, seed)
        _save_for_backward(ctx, q, k, v, causal, sm_scale, dropout_p, seed, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        backward = _backward_once if torch.is_grad_enabled() else _backward_impl  # (create_graph=True)
        return *backward(grad_out, *_saved(ctx)), None, None, None, None


@torch.autograd.function.once_differentiable
def _backward_once(*args):
    """The gradients under create_graph=True, marked as not differentiable: asking for their own gradient
    raises (a silent zero would corrupt a gradient penalty)."""
    return _backward_impl(*args)


# What torch.compile sees: opaque ops, described by their fakes (shapes and strides only) and
# differentiated through register_autograd, so a compiled model has no graph break.
@torch.library.custom_op("minigpt_kernels::flash_attention_forward", mutates_args=())
def _forward_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, sm_scale: float, dropout_p: float,
    seed: Optional[torch.Tensor],  # noqa: UP045 (older torch's schema inference wants Optional)
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward_impl(q, k, v, causal, sm_scale, dropout_p, seed)


@_forward_op.register_fake
def _(q, k, v, causal, sm_scale, dropout_p, seed):
    B, H, T, D = q.shape
    return q.new_empty((B, T, H, D)).transpose(1, 2), q.new_empty((B, H, T), dtype=torch.float32)


@torch.library.custom_op("minigpt_kernels::flash_attention_backward", mutates_args=())
def _backward_op(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, causal: bool, sm_scale: float, dropout_p: float,
    seed: Optional[torch.Tensor],  # noqa: UP045
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward_impl(grad_out, q, k, v, out, lse, causal, sm_scale, dropout_p, seed)


@_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, causal, sm_scale, dropout_p, seed):
    return _grad_like(q), _grad_like(k), _grad_like(v)


_forward_op.register_autograd(  # the LSE output only serves the backward: it gets no gradient
    lambda ctx, grad_out, grad_lse: (*_backward_op(grad_out, *_saved(ctx)), None, None, None, None),
    setup_context=lambda ctx, inputs, output: _save_for_backward(ctx, *inputs, *output),
)


# ----------------------------------------------------------------------------------------------------
# 5. Input validation (a clear error before any launch) and the public entry point
def _validate(q, k, v, causal, sm_scale, dropout_p) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"flash_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"flash_attention: {name} must have rank 4 ({'(B, H, T, D)' if name == 'q' else '(B, H_kv, S, D)'}), "
                             f"got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"flash_attention: {name}.dtype is {t.dtype}; allowed: float16, bfloat16, float32")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"flash_attention: q, k, v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"flash_attention: q, k, v must be on one device, got q {q.device}, k {k.device}, v {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"flash_attention: k and v must have the same shape, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    (B, H, T, D), (B_kv, H_kv, S, D_kv) = q.shape, k.shape
    if B_kv != B:
        raise ValueError(f"flash_attention: batch size of k/v ({B_kv}) must equal that of q ({B})")
    if D_kv != D:
        raise ValueError(f"flash_attention: head dim of k/v ({D_kv}) must equal that of q ({D})")
    if H_kv == 0 or H % H_kv != 0:
        raise ValueError(f"flash_attention: query heads H={H} must be a multiple of kv heads H_kv={H_kv}")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"flash_attention: head dim D={D} is not supported; allowed: 1 to {MAX_HEAD_DIM}")
    if min(B, H, T, S, D) < 1:
        raise ValueError(f"flash_attention: empty inputs are not supported, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if B * H > _MAX_GRID_Y:
        raise ValueError(f"flash_attention: B * H = {B * H} (batch x query heads) must be at most {_MAX_GRID_Y}, "
                         "CUDA's limit on the grid axis that holds them; split the batch")
    _check_offsets(q, k, v)
    if not q.is_cuda:
        if q.device.type != "cpu":
            raise ValueError(f"flash_attention: device {q.device} is not supported; allowed: cuda (cpu with TRITON_INTERPRET=1)")
        if not _interpreting():
            raise ValueError("flash_attention: q, k, v are CPU tensors; the kernels need a CUDA device "
                             "(or TRITON_INTERPRET=1 set before importing triton, for the slow interpreter)")
        if q.dtype == torch.bfloat16:
            raise TypeError("flash_attention: bfloat16 on the CPU: Triton's interpreter computes bf16 wrongly; "
                            "use float16 or float32 there")
    if not isinstance(causal, bool):
        raise TypeError(f"flash_attention: causal must be a bool, got {causal!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"flash_attention: dropout_p={dropout_p} is out of range; allowed: 0 <= dropout_p < 1")
    # plain integers, not triton.cdiv: this runs inside torch.compile's trace, and some TorchDynamo versions
    # break the graph at a call into Triton's host helpers
    if dropout_p > 0.0 and T * -(-S // 32) * 4 >= 2**31:
        raise ValueError(f"flash_attention: dropout needs T * S / 8 < 2**31 (Philox counters are int32), got T={T}, S={S}")
    if sm_scale is not None and not (math.isfinite(sm_scale) and 0 < sm_scale * LOG2E < _FLOAT32_MAX):
        raise ValueError(f"flash_attention: sm_scale={sm_scale} must be a positive number (in float32's range) or None")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_offsets(q, k, v) -> None:
    """Refuse layouts whose offsets within one (batch, head) slice reach 2**31 in a tensor the kernels
    address: q, k, v, the output and the three gradients (see _INT32_OFFSETS). A dense tensor spans fewer
    elements than it holds, so the layouts of the output and the gradients are worked out only when large."""
    checks = [("q", q.shape, q.stride()), ("k", k.shape, k.stride()), ("v", v.shape, v.stride())]
    if q.numel() > _INT32_OFFSETS:
        checks += [("the output", q.shape, _dense_strides(q.shape, (0, 2, 1, 3))),
                   ("the gradient of q", q.shape, _dense_strides(q.shape, _grad_order(q.stride())))]
    if k.numel() > _INT32_OFFSETS:
        checks += [(f"the gradient of {name}", t.shape, _dense_strides(t.shape, _grad_order(t.stride())))
                   for name, t in (("k", k), ("v", v))]
    for name, t_shape, strides in checks:
        span = (t_shape[2] - 1) * strides[2] + (t_shape[3] - 1) * strides[3] + 1
        if span > _INT32_OFFSETS:
            raise ValueError(f"flash_attention: {name} spans {span} elements within one (batch, head) slice "
                             f"(shape {tuple(t_shape)}, strides {tuple(strides)}); the kernels address at most "
                             "2**31 there: fewer heads per call, a shorter sequence, or a layout with the heads "
                             "outside the sequence")


def _make_seed(device: torch.device) -> torch.Tensor:
    """A fresh dropout seed from torch's generator, as a device tensor: the kernels read it from memory, so
    it costs no host sync, and torch.compile and CUDA graphs treat it as an ordinary random op."""
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=device)


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    sm_scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=sm_scale, dropout_p=dropout_p,
    enable_gqa=True)``, computed by the kernels above; returns (B, H, T, D), laid out as (B, T, H, D).

    q: (B, H, T, D); k, v: (B, H_kv, S, D), H % H_kv == 0 (GQA / MQA read shared heads in place); any
    strides (views of one fused qkv projection are read without copies); fp16, bf16 or fp32 (full fp32
    products, never TF32); D up to 128. causal: aligned to the bottom-right (query i sees key j <= i + S - T;
    rows that see no key output 0). sm_scale: default 1 / sqrt(D). dropout_p: drawn in the kernels with a
    fresh seed from torch's generator per call (``torch.manual_seed`` repeats it); pass 0.0 in eval.

    Determinism: the output, dK and dV repeat bit for bit from run to run on one GPU; so does dQ, except at
    head dims above 64 beyond 1024 tokens, where fp32 atomic adds sum it in arrival order (its last bits can
    change) unless ``torch.use_deterministic_algorithms(True)`` is on. Limits: B * H <= 65535; offsets within
    one (batch, head) slice of q, k, v, the output and the gradients below 2**31 elements (for the output:
    T * H * D < 2**31). No double backward.
    """
    _validate(q, k, v, causal, sm_scale, dropout_p)
    scale = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    seed = _make_seed(q.device) if dropout_p > 0.0 else None
    if torch.compiler.is_compiling():  # traced: the custom op, one node in the graph
        return _forward_op(q, k, v, causal, scale, float(dropout_p), seed)[0]
    return _FlashAttentionFunction.apply(q, k, v, causal, scale, float(dropout_p), seed)
