"""FlashAttention-2 in Triton: fused causal attention, forward and backward.

Attention computes ``O = softmax(scale * Q K^T + mask) V``. Written out, the score matrix ``Q K^T`` has
T x S entries per head, far too many bytes to write to memory and read back. FlashAttention
(Dao et al. 2022; FlashAttention-2, Dao 2023) never materializes it: each program owns a block of
query rows, streams the keys and values through on-chip memory one block at a time, and keeps a
running ("online") softmax. Nothing of size T x S is stored: extra memory is linear in the sequence
length, and each key or value read from memory serves a whole block of queries.

The parts, in the order a call uses them:

1. ``_attn_fwd``: grid over (query blocks, batch * heads). Online softmax in base 2 (the softmax scale
   and log2(e) are folded into the scores so ``exp2`` does the work). Under a causal mask the key
   blocks split in two: the off-band part left of the diagonal is fully visible and runs with no
   masking at all, the on-band part on the diagonal is masked element by element, and blocks right
   of the diagonal are never loaded. The row log-sum-exp is saved for the backward pass.
2. A dK/dV program holds one key block (its K and V stay on chip) and walks the query blocks of every
   query head that shares this kv head (grouped-query and multi-query attention with no copies of K
   and V).
3. A dQ program holds one query block and walks the key blocks like the forward. It computes
   ``delta = rowsum(dO * O)``, the term every softmax gradient row needs, from its own tiles.
4. ``_attn_bwd``: one kernel for both kinds of program, launched by one of three plans. Short sequences
   at D <= 64 launch both kinds in one grid, where the dK/dV programs compute delta themselves: one
   launch, for shapes where the host's launch cost rivals the GPU work. Elsewhere dQ programs (which
   store delta) run first, then dK/dV programs, each with its own tile. Long sequences at D = 128, where
   the matrix products decide, drop the dQ programs: dK/dV programs add their share of dQ to an fp32
   buffer with atomic adds (FlashAttention-2's own scheme), five products per step instead of seven; the
   buffer's sums land in any order, so ``torch.use_deterministic_algorithms(True)`` keeps the two-launch
   plan.
5. The launchers, and two doors to them: a plain ``torch.autograd.Function`` for eager calls and the
   ``torch.library`` custom ops that ``torch.compile(fullgraph=True)`` traces as single graph nodes.
   ``flash_attention`` validates its inputs and picks the door. On a GPU, eager calls whose signature
   has been seen are replayed from C++ instead, with no Python (``kernels/host_path.py``).

Conventions. q is (B, H, T, D), k and v are (B, H_kv, S, D), any strides. The causal mask is aligned
bottom-right: query i sees key j when ``j <= i + S - T`` (for T == S the usual lower triangle; for
T == 1 the newest query of a KV-cache decode sees every key). When T > S the first T - S query rows
see no key at all: their output is 0 and their log-sum-exp is -inf (PyTorch's math path returns NaN
there). Dropout is drawn inside the kernels from Philox, keyed by the seed and the (batch, head) pair and
counting over (row, column), so the backward regenerates exactly the forward's mask and no mask is stored.
"""

import contextlib
import functools
import math
import os
import threading
from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = ["flash_attention", "dropout_keep_mask", "forced_config", "MAX_HEAD_DIM"]

MAX_HEAD_DIM = 128
LOG2E = 1.4426950408889634  # log2(e): exp(x) == exp2(x * LOG2E)
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The kernels add a (batch, head) slice's offset in int64 and the row and column offsets within it in int32
# (64-bit address math throughout would cost every load): within a slice, offsets must stay below this.
_INT32_OFFSETS = 2**31
_MAX_GRID_Y = 65535  # CUDA's limit on a grid's second axis, where the kernels put the (batch, head) pairs


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Plain-Python twins of triton.cdiv and triton.next_power_of_2 for the host's hot path (Triton's versions
# unwrap constexpr arguments on every call).
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1


# Outputs are allocated through this name so a test can swap in NaN-filled buffers and prove that the
# kernels write every element.
_empty_strided = torch.empty_strided


def _dense_strides(shape, order) -> list[int]:
    """The strides of a dense tensor of ``shape`` whose dimensions lie in memory in ``order`` (outermost
    first)."""
    strides, step = [0] * len(shape), 1
    for d in reversed(order):
        strides[d] = step
        step *= shape[d]
    return strides


def _alloc(shape, order, dtype, device) -> torch.Tensor:
    """An empty dense tensor of ``shape``, dimensions in memory in ``order``: one allocation, no view on top
    (each torch op costs host time, and small shapes are bound by it)."""
    t = _empty_strided(shape, _dense_strides(shape, order), dtype=dtype, device=device)
    if _recordings:
        _record_alloc(t)
    return t


# ----------------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _load_tile(ptrs, rows, n_rows, cols, n_cols, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """Load a (rows, cols) tile, masking only the edges that can run past the tensor (out of range -> 0)."""
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
def _dropout_keep(seed_bh, offs_m, start_n, S, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Philox keep-mask (BLOCK_M, BLOCK_N) for query rows ``offs_m`` and keys ``start_n + [0, BLOCK_N)`` of
    one (batch, head); ``start_n`` and ``BLOCK_N`` are multiples of 32.

    ``seed_bh`` is the 64-bit Philox key: the call's seed in the low word, batch * H + head in the high
    word, so every head has its own stream. Philox is the costly part of dropout (at the char-GPT shape
    one call per score cost more than the attention itself), so each call serves eight keys: it returns
    four 32-bit numbers, each split into two 16-bit ones. An entry is kept when its 16-bit number is at
    least ``dropout_p * 2**16`` (p resolved to 1 / 65536). Seven Philox rounds instead of ten:
    Philox4x32-7 already passes the BigCrush statistical tests (Salmon et al., 2011).

    Which keys share a call follows the tensor cores' accumulator layout, where a thread holds two
    neighbouring columns of every group of eight: key ``32g + 8o + 2q + e`` of row i takes half e (0: low,
    1: high) of output o of the call with counter ``(i * cdiv(S, 32) + g) * 4 + q`` (int32: T * S / 8
    < 2**31). The eight numbers of a call then land in one thread, and in the forward and dQ programs the
    mask needs no trip through shared memory to meet the scores (it did when a call served eight adjacent
    keys); the dK/dV programs work on transposed tiles, where it still crosses threads. The forward, both
    kinds of backward program and ``dropout_keep_mask`` call this same function.
    """
    tl.static_assert(BLOCK_N % 32 == 0, "dropout needs key tiles (BLOCK_N) that are multiples of 32")
    g = start_n // 32 + tl.arange(0, BLOCK_N // 32)
    q = tl.arange(0, 4)
    counter = (offs_m[:, None, None] * tl.cdiv(S, 32) + g[None, :, None]) * 4 + q[None, None, :]
    r0, r1, r2, r3 = tl.randint4x(seed_bh, counter, n_rounds=7)
    h0, h1 = _halves(r0), _halves(r1)  # (BLOCK_M, BLOCK_N // 32, 4, 2) indexed [m, g, q, e]
    h2, h3 = _halves(r2), _halves(r3)
    # [m, g, q, e, a, b] = half e of output 2a + b; reordered to [m, g, a, b, q, e], flattened row-major to
    # key 32g + 8(2a + b) + 2q + e
    r = tl.permute(tl.join(tl.join(h0, h2), tl.join(h1, h3)), (0, 1, 4, 5, 2, 3))
    r = tl.reshape(r, (BLOCK_M, BLOCK_N))
    return r >= tl.cast(dropout_p * 65536.0, tl.int32)


@triton.jit
def _halves(r):
    """(low, high) 16 bits of each 32-bit number, as int32 in [0, 65536), joined on a new last axis.
    Masked after the shift, so the result is the same whichever signedness the shift assumes."""
    r = r.to(tl.int32, bitcast=True)
    return tl.join(r & 0xFFFF, (r >> 16) & 0xFFFF)


@triton.jit
def _philox_key(Seed, off_bh):
    return tl.load(Seed) + (off_bh.to(tl.int64) << 32)


# Heads whose programs are interleaved in launch order (_program_order).
HEAD_GROUP = tl.constexpr(8)


@triton.jit
def _program_order():
    """(block, batch * head) of this program of a (blocks, batch * heads) grid, in an order that balances
    causal work. Every attention kernel below numbers its blocks heaviest first (under a causal mask
    block 0 does the most work), and the GPU starts programs in grid order, axis 0 fastest. Taken as is,
    each head's programs would start one after another, so the last head's heaviest block would start in
    the last wave and run on alone at the end. Instead heads are taken HEAD_GROUP at a time and, within a
    group, block by block across its heads: a group's heaviest blocks start first, its lightest end it.
    The K and V (or Q and dO) of eight heads stay few enough to share L2 while their programs run.
    bench/NOTES.md v10: 1-6% faster than head by head at long sequences."""
    n_blocks = tl.num_programs(0)
    n_heads = tl.num_programs(1)
    linear = tl.program_id(1) * n_blocks + tl.program_id(0)
    group = linear // (HEAD_GROUP * n_blocks)
    heads = tl.minimum(HEAD_GROUP, n_heads - group * HEAD_GROUP)  # the last group may be smaller
    rank = linear - group * HEAD_GROUP * n_blocks
    return rank // heads, group * HEAD_GROUP + rank % heads


@triton.jit
def _query_block(H, GROUP, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """Coordinates of a program of the (query blocks, batch * heads) grid: (first row, batch * head, batch,
    head, kv head). Causal: the last query blocks see the most keys, so they are launched first."""
    pid_m, off_bh = _program_order()
    if IS_CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    return pid_m * BLOCK_M, off_bh, off_b, off_h, off_h // GROUP  # GROUP query heads share a kv head


@triton.jit
def _key_band(start_m, S, diag, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Split the keys of the query block at ``start_m`` into [0, band_lo), seen in full by every row (no
    mask), and [band_lo, band_hi), masked; keys from band_hi on are never loaded. Causal: band_lo is the
    first key block that crosses the diagonal (shifted by diag = S - T to the bottom-right corner), band_hi
    the last key the last row sees. Otherwise: the full blocks, then the ragged tail."""
    if IS_CAUSAL:
        band_lo = (tl.maximum(start_m + diag + 1, 0) // BLOCK_N) * BLOCK_N
        band_hi = tl.maximum(tl.minimum(start_m + BLOCK_M + diag, S), band_lo)
    else:
        band_lo = (S // BLOCK_N) * BLOCK_N
        band_hi = S
    return band_lo, band_hi


# ----------------------------------------------------------------------------------------------------
# Tiles: a default per head dim and power-of-two sequence bucket, or autotuned (MINIGPT_AUTOTUNE=1)
# ----------------------------------------------------------------------------------------------------
def _seq_bucket(T: int, S: int) -> int:
    """Autotune key: one tuning per power-of-two bucket of the longer sequence, not per length."""
    return max(16, _next_power_of_2(max(T, S)))


@functools.cache
def _smem_limit(device_index: int | None) -> int:
    index = device_index if device_index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return int(getattr(props, "shared_memory_per_block_optin", 101376))


def _make_pruner(smem_tiles, default_tile):
    """Drop configs whose tiles exceed the sequence bucket or whose buffers cannot fit shared memory; then,
    unless MINIGPT_AUTOTUNE=1, keep only the default tile for this key, so nothing is benchmarked.

    ``smem_tiles(BLOCK_M, BLOCK_N, BLOCK_D, num_stages)`` estimates the elements staged in shared memory;
    ``default_tile(args)`` gives the (BLOCK_M, BLOCK_N, warps, stages) used without tuning for the kernel's
    arguments ``args`` (by name).
    """

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        bucket, block_d = args["SEQ_BUCKET"], args["BLOCK_D"]
        q = args["Q"]
        limit = _smem_limit(q.device.index)
        kept = []
        for c in configs:
            bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
            if bm > bucket or bn > bucket:
                continue
            if smem_tiles(bm, bn, block_d, c.num_stages) * q.element_size() > limit:
                continue
            kept.append(c)
        kept = kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]
        if _autotuning() or len(kept) == 1:
            return kept
        wanted = default_tile(args)
        tile = lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
        return [next((c for c in kept if tile(c) == wanted), kept[-1])]

    return prune


def _autotuning() -> bool:
    """MINIGPT_AUTOTUNE=1: benchmark every config at the first call of each key (tens of seconds of
    compiling and timing per kernel) instead of taking the default tiles below."""
    return os.environ.get("MINIGPT_AUTOTUNE", "0") == "1"


# Default tiles, (BLOCK_M, BLOCK_N, warps, stages), by sequence bucket and padded head dim: chosen from a
# per-kernel sweep on an H100 (bench/tile_sweep.py; bench/NOTES.md v5, v8 and v9), the fastest or within 3%
# of it. Small buckets want small tiles (more programs for 132 SMs).
def _fwd_tile(bucket: int, block_d: int) -> tuple:
    if bucket >= 2048:
        if block_d > 64:
            return (128, 128, 8, 3)
        return (128, 64, 8, 4) if bucket >= 4096 else (128, 64, 8, 3)
    if bucket >= 1024 or (bucket >= 512 and block_d <= 64):
        return (64, 64, 4, 3)
    return (64, 32, 4, 3)


# The roles of a backward launch (section 4): constexpr, so the kernel can read them as globals.
ROLE_DKDV, ROLE_DQ = tl.constexpr(0), tl.constexpr(1)
ROLE_BOTH, ROLE_FUSED = tl.constexpr(2), tl.constexpr(3)


def _bwd_tile(role: int, bucket: int, block_d: int) -> tuple:
    """(BLOCK_M rows streamed, BLOCK_N rows held, warps, stages) of a backward launch in ``role``. At D = 128
    a dK/dV program holds two fp32 (BLOCK_N x 128) accumulators, which only long sequences repay at
    BLOCK_N = 128; a dQ program holds one, and takes 128 rows from T = 1024 on (D = 128) or 2048 (D <= 64).
    A fused program (dK/dV adding to dQ) holds 128 keys from T = 2048: half the atomic traffic of 64."""
    if block_d > 64:
        if role == ROLE_DQ.value and bucket >= 1024:
            return (64, 128, 8, 3)
        if bucket >= 4096 or (role == ROLE_FUSED.value and bucket >= 2048):
            return (64, 128, 8, 3)
        return (64, 64, 4, 2)
    if role == ROLE_DQ.value and bucket >= 2048:
        return (64, 128, 8, 3)
    return (32, 64, 4, 3)


def _bwd_plan(bucket: int, block_d: int) -> str:
    """How a backward is launched (bench/NOTES.md v9 and v12 have the sweeps behind it):

    - "one", a single ROLE_BOTH launch, for short sequences at D <= 64 (the char GPT), where the host's cost
      per launch rivals the GPU work;
    - "fused", prepare, ROLE_FUSED, dQ out: five matrix products per step instead of seven, for the long
      sequences at D > 64 where the products decide (4-9% faster than "split" from T = 2048 on an H100);
      its dQ sums in whatever order the atomics land, so with ``torch.use_deterministic_algorithms(True)``
      "split" serves instead;
    - "split", ROLE_DQ then ROLE_DKDV, elsewhere: delta computed once per row instead of once per dK/dV
      step, each kind with its own tile; faster than one grid at D = 64 from T = 512, level with it at
      D = 128 up to T = 2048."""
    if block_d <= 64:
        return "one" if bucket <= 256 else "split"
    return "fused" if bucket >= 2048 and not torch.are_deterministic_algorithms_enabled() else "split"


def _configs(gpu_list, interpret_tile):
    if _interpreting():  # the interpreter runs every program in numpy: one small config, no tuning
        bm, bn = interpret_tile
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in gpu_list]


# (BLOCK_M queries, BLOCK_N keys, warps, pipeline stages)
_FWD_CONFIGS = [
    (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 4),
    (64, 64, 4, 3), (64, 32, 4, 4), (128, 128, 8, 2), (64, 32, 4, 3), (128, 64, 8, 4),
]
# BLOCK_M rows streamed, BLOCK_N rows held (keys by dK/dV programs, queries by dQ programs). Both are keys
# in one role or the other, so both are multiples of 32 (see _dropout_keep).
_BWD_CONFIGS = [
    (32, 128, 4, 3), (64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 4), (64, 128, 4, 2),
    (64, 64, 8, 3), (32, 128, 8, 3), (64, 64, 4, 2), (32, 64, 4, 3), (32, 64, 4, 2),
]
_AUTOTUNE_KEY = ["SEQ_BUCKET", "HEAD_DIM", "IS_CAUSAL", "HAS_DROPOUT"]  # dtypes join the key by themselves


# ----------------------------------------------------------------------------------------------------
# 1. Forward
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q, K_base, V_base, stride_kn, stride_kd, stride_vn, stride_vd,
    offs_m, offs_d, lo, hi, S, HEAD_DIM, diag, qk_scale, seed_bh, dropout_p,
    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Stream key blocks [lo, hi) through the online softmax. MASKED: the on-band (or ragged tail) part."""
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(K_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                       offs_n, S, offs_d, HEAD_DIM, MASKED, not EVEN_D)
        # Scores in base-2 units: qk_scale = sm_scale * log2(e), so exp2(qk) == exp(sm_scale * q.k).
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASKED:  # hide keys past the end and, on the band, keys right of the diagonal
            visible = offs_n[None, :] < S
            if IS_CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + diag)
            qk = tl.where(visible, qk, float("-inf"))
        # Online softmax: raise the running max, rescale what was accumulated under the old max.
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        if MASKED:  # a row that has seen only masked keys keeps m = -inf: subtract 0 instead (no NaN)
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_sub = m_new
        p = tl.exp2(qk - m_sub[:, None])
        alpha = tl.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)  # the normalizer counts every visible key, dropped or not
        acc = acc * alpha[:, None]
        if HAS_DROPOUT:
            keep = _dropout_keep(seed_bh, offs_m, start_n, S, dropout_p, BLOCK_M, BLOCK_N)
            p = tl.where(keep, p, 0.0)
        v = _load_tile(V_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                       offs_n, S, offs_d, HEAD_DIM, MASKED, not EVEN_D)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(
    configs=_configs(_FWD_CONFIGS, (32, 32)),  # BLOCK_N >= 32: see _dropout_keep
    key=_AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": _make_pruner(
        lambda bm, bn, bd, st: bm * bd + 2 * st * bn * bd,
        lambda args: _fwd_tile(args["SEQ_BUCKET"], args["BLOCK_D"]))},
)
@triton.jit
def _attn_fwd(
    Q, K, V, Out, Lse, Seed,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    H, GROUP, T, S, qk_scale, dropout_p, inv_keep, SEQ_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m, off_bh, off_b, off_h, off_hkv = _query_block(H, GROUP, IS_CAUSAL, BLOCK_M)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    K_base = K + off_b * stride_kb + off_hkv * stride_kh
    V_base = V + off_b * stride_vb + off_hkv * stride_vh
    q = _load_tile(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qt
                   + offs_d[None, :] * stride_qd, offs_m, T, offs_d, HEAD_DIM, True, not EVEN_D)
    seed_bh = 0
    if HAS_DROPOUT:
        seed_bh = _philox_key(Seed, off_bh)

    # Running state per row: max m_i (base 2), normalizer l_i, unnormalized output acc, all fp32.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Off-band keys unmasked, then the on-band ones masked. diag = S - T: the causal diagonal's offset.
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

    # Epilogue: normalize; rows that saw no key (causal, T > S) output 0 with log-sum-exp -inf.
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    if HAS_DROPOUT:
        acc = acc * (inv_keep / l_safe)[:, None]  # kept entries are scaled by 1 / (1 - p)
    else:
        acc = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))  # natural log
    tl.store(Lse + off_bh.to(tl.int64) * T + offs_m, lse, mask=offs_m < T)
    o_ptrs = (Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_ot
              + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=(offs_m[:, None] < T) & (offs_d[None, :] < HEAD_DIM))


# ----------------------------------------------------------------------------------------------------
# 2. Backward, dK and dV of one key block: loop over query blocks of every head in the group
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _attn_bwd_dkdv_inner(
    dk, dv, k, v, Q_base, O_base, DO_base, Lse_base, Delta_base, DQ_acc,
    stride_qt, stride_qd, stride_ot, stride_od, stride_dot, stride_dod, stride_dqt,
    start_n, offs_n, offs_d, lo, hi, T, S, HEAD_DIM, diag, qk_scale, seed_bh, dropout_p, inv_keep,
    MASKED: tl.constexpr, EVEN_D: tl.constexpr, HAS_DROPOUT: tl.constexpr, DELTA_INLINE: tl.constexpr,
    ADD_DQ: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Accumulate dK, dV of this key block over query blocks [lo, hi). Tiles are transposed
    (keys x queries) so P^T and dS^T come out directly in the shape the dK, dV products need. ADD_DQ:
    also add this key block's share of dQ, dS K, to the fp32 accumulator ``DQ_acc`` (section 4)."""
    for start_m in tl.range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        # Query rows past T load q = dO = 0 and lse = +inf, so their P^T column is exactly 0.
        q = _load_tile(Q_base + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                       offs_m, T, offs_d, HEAD_DIM, True, not EVEN_D)
        lse2 = tl.load(Lse_base + offs_m, mask=offs_m < T, other=float("inf")) * 1.4426950408889634
        # Recompute P^T from the saved log-sum-exp instead of storing P in the forward.
        qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
        pT = tl.exp2(qkT * qk_scale - lse2[None, :])
        if MASKED:  # on the band: query i sees key j only when j <= i + diag
            pT = tl.where(offs_n[:, None] <= offs_m[None, :] + diag, pT, 0.0)
        do = _load_tile(DO_base + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod,
                        offs_m, T, offs_d, HEAD_DIM, True, not EVEN_D)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (dO V^T)^T
        if HAS_DROPOUT:  # the same Philox mask as the forward, read transposed
            keepT = tl.trans(_dropout_keep(seed_bh, offs_m, start_n, S, dropout_p, BLOCK_M, BLOCK_N))
            pT_drop = tl.where(keepT, pT * inv_keep, 0.0)
            dv = tl.dot(pT_drop.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
            dpT = tl.where(keepT, dpT * inv_keep, 0.0)
        else:
            dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)  # dV += P^T dO
        if DELTA_INLINE:  # delta of these rows from their O and dO tiles: one more load per step
            o = _load_tile(O_base + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od,
                           offs_m, T, offs_d, HEAD_DIM, True, not EVEN_D)
            delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
        else:
            delta = tl.load(Delta_base + offs_m, mask=offs_m < T, other=0.0)
        dsT = (pT * (dpT - delta[None, :])).to(q.dtype)  # softmax backward
        dk = tl.dot(dsT, q, dk, input_precision=DOT_PRECISION)  # dK += dS^T Q (scaled later)
        if ADD_DQ:  # every key block adds to these rows: atomically, in any order
            dq = tl.dot(tl.trans(dsT), k, input_precision=DOT_PRECISION)  # dQ += dS K (scaled later)
            tl.atomic_add(DQ_acc + offs_m[:, None] * stride_dqt + offs_d[None, :], dq,
                          mask=offs_m[:, None] < T, sem="relaxed")
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_program(
    Q, K, V, O, DO, Lse, Delta, DQ, DK, DV, Seed,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dqb, stride_dqh, stride_dqt,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    key_block, off_b, off_hkv, H, GROUP, T, S, sm_scale, qk_scale, dropout_p, inv_keep,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DELTA_INLINE: tl.constexpr, ADD_DQ: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dK, dV of key block ``key_block`` of kv head ``off_hkv``: BLOCK_N keys held, BLOCK_M queries streamed.
    delta is read from ``Delta``, or computed per step from the O and dO tiles when DELTA_INLINE."""
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    # This program's key block stays on chip for the whole pass.
    start_n = key_block * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(K + off_b * stride_kb + off_hkv * stride_kh + offs_n[:, None] * stride_kn
                   + offs_d[None, :] * stride_kd, offs_n, S, offs_d, HEAD_DIM, True, not EVEN_D)
    v = _load_tile(V + off_b * stride_vb + off_hkv * stride_vh + offs_n[:, None] * stride_vn
                   + offs_d[None, :] * stride_vd, offs_n, S, offs_d, HEAD_DIM, True, not EVEN_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Split the queries. The band holds rows that see only part of this key block; rows below it
    # see all of it (off-band, unmasked); rows above it see none of it and are skipped.
    diag = S - T
    if IS_CAUSAL:
        first_row = tl.maximum(start_n - diag, 0)  # first query that sees any key of the block
        full_row = tl.maximum(tl.minimum(start_n + BLOCK_N, S) - 1 - diag, 0)  # first that sees all
        band_lo = (first_row // BLOCK_M) * BLOCK_M
        band_hi = tl.maximum(tl.cdiv(full_row, BLOCK_M) * BLOCK_M, band_lo)
    else:
        band_lo = 0
        band_hi = 0

    for g in range(GROUP):  # every query head that reads this kv head
        off_h = off_hkv * GROUP + g
        off_bh = off_b * H + off_h
        Q_base = Q + off_b * stride_qb + off_h * stride_qh
        O_base = O + off_b * stride_ob + off_h * stride_oh
        DO_base = DO + off_b * stride_dob + off_h * stride_doh
        seed_bh = 0
        if HAS_DROPOUT:
            seed_bh = _philox_key(Seed, off_bh)
        DQ_acc = DQ + off_b * stride_dqb + off_h * stride_dqh  # read under ADD_DQ only
        dk, dv = _attn_bwd_dkdv_inner(  # on the band: masked
            dk, dv, k, v, Q_base, O_base, DO_base, Lse + off_bh * T, Delta + off_bh * T, DQ_acc,
            stride_qt, stride_qd, stride_ot, stride_od, stride_dot, stride_dod, stride_dqt,
            start_n, offs_n, offs_d, band_lo, band_hi, T, S, HEAD_DIM, diag, qk_scale, seed_bh, dropout_p,
            inv_keep, True, EVEN_D, HAS_DROPOUT, DELTA_INLINE, ADD_DQ, DOT_PRECISION, BLOCK_M, BLOCK_N)
        dk, dv = _attn_bwd_dkdv_inner(  # off-band: every row sees the whole key block
            dk, dv, k, v, Q_base, O_base, DO_base, Lse + off_bh * T, Delta + off_bh * T, DQ_acc,
            stride_qt, stride_qd, stride_ot, stride_od, stride_dot, stride_dod, stride_dqt,
            start_n, offs_n, offs_d, band_hi, T, T, S, HEAD_DIM, diag, qk_scale, seed_bh, dropout_p,
            inv_keep, False, EVEN_D, HAS_DROPOUT, DELTA_INLINE, ADD_DQ, DOT_PRECISION, BLOCK_M, BLOCK_N)

    # Scores were sm_scale * q.k, so dK picks up sm_scale once here.
    mask = (offs_n[:, None] < S) & (offs_d[None, :] < HEAD_DIM)
    tl.store(DK + off_b * stride_dkb + off_hkv * stride_dkh + offs_n[:, None] * stride_dkn
             + offs_d[None, :] * stride_dkd, (dk * sm_scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + off_b * stride_dvb + off_hkv * stride_dvh + offs_n[:, None] * stride_dvn
             + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# 3. Backward, dQ of one query block: walk the key blocks like the forward
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _attn_bwd_dq_inner(
    dq, q, do, lse2, delta, K_base, V_base, stride_kn, stride_kd, stride_vn, stride_vd,
    offs_m, offs_d, lo, hi, S, HEAD_DIM, diag, qk_scale, seed_bh, dropout_p, inv_keep,
    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(K_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                       offs_n, S, offs_d, HEAD_DIM, MASKED, not EVEN_D)
        v = _load_tile(V_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                       offs_n, S, offs_d, HEAD_DIM, MASKED, not EVEN_D)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        p = tl.exp2(qk * qk_scale - lse2[:, None])
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
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)  # dQ += dS K (scaled later)
    return dq


@triton.jit
def _attn_bwd_dq_program(
    Q, K, V, O, DO, Lse, Delta, DQ, Seed,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    query_block, off_b, off_h, off_hkv, H, T, S, sm_scale, qk_scale, dropout_p, inv_keep,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    STORE_DELTA: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ of query block ``query_block`` of head ``off_h``: BLOCK_M queries held, BLOCK_N keys streamed.
    delta = rowsum(dO * O) comes from the block's own O and dO tiles (one more load per program), and is
    stored for the dK/dV launch that follows when STORE_DELTA."""
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    off_bh = off_b * H + off_h
    start_m = query_block * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < T
    q = _load_tile(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qt
                   + offs_d[None, :] * stride_qd, offs_m, T, offs_d, HEAD_DIM, True, not EVEN_D)
    do = _load_tile(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dot
                    + offs_d[None, :] * stride_dod, offs_m, T, offs_d, HEAD_DIM, True, not EVEN_D)
    lse2 = tl.load(Lse + off_bh * T + offs_m, mask=row_ok, other=float("inf")) * 1.4426950408889634
    # With P the softmax and dP = dO V^T, the score gradient is dS = P * (dP - delta), where
    # delta_i = sum_j P_ij dP_ij = dO_i . O_i: one number per row.
    o = _load_tile(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_ot
                   + offs_d[None, :] * stride_od, offs_m, T, offs_d, HEAD_DIM, True, not EVEN_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    if STORE_DELTA:
        tl.store(Delta + off_bh * T + offs_m, delta, mask=row_ok)
    K_base = K + off_b * stride_kb + off_hkv * stride_kh
    V_base = V + off_b * stride_vb + off_hkv * stride_vh
    seed_bh = 0
    if HAS_DROPOUT:
        seed_bh = _philox_key(Seed, off_bh)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # The same key split as the forward: off-band unmasked, on-band masked, hidden blocks skipped.
    diag = S - T
    band_lo, band_hi = _key_band(start_m, S, diag, IS_CAUSAL, BLOCK_M, BLOCK_N)
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse2, delta, K_base, V_base, stride_kn, stride_kd, stride_vn, stride_vd,
        offs_m, offs_d, 0, band_lo, S, HEAD_DIM, diag, qk_scale, seed_bh, dropout_p, inv_keep,
        False, IS_CAUSAL, EVEN_D, HAS_DROPOUT, DOT_PRECISION, BLOCK_M, BLOCK_N)
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse2, delta, K_base, V_base, stride_kn, stride_kd, stride_vn, stride_vd,
        offs_m, offs_d, band_lo, band_hi, S, HEAD_DIM, diag, qk_scale, seed_bh, dropout_p, inv_keep,
        True, IS_CAUSAL, EVEN_D, HAS_DROPOUT, DOT_PRECISION, BLOCK_M, BLOCK_N)

    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqt
             + offs_d[None, :] * stride_dqd, (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=(offs_m[:, None] < T) & (offs_d[None, :] < HEAD_DIM))


# ----------------------------------------------------------------------------------------------------
# 4. The backward kernel: dK/dV programs, dQ programs, or both in one grid
# ----------------------------------------------------------------------------------------------------
@triton.autotune(
    # Interpreter tile: both blocks >= 32 (see _dropout_keep), and unequal, so a BLOCK_M / BLOCK_N mix-up in
    # the roles' index math shows in the CPU tests.
    configs=_configs(_BWD_CONFIGS, (32, 64)),
    key=[*_AUTOTUNE_KEY, "ROLE"],
    reset_to_zero=["DQ"],  # ROLE_FUSED adds into DQ: each timed run (and the run after them) starts from 0
    prune_configs_by={"early_config_prune": _make_pruner(
        lambda bm, bn, bd, st: 2 * bn * bd + 2 * st * bm * bd,
        lambda args: _bwd_tile(args["ROLE"], args["SEQ_BUCKET"], args["BLOCK_D"]))},
)
@triton.jit
def _attn_bwd(
    Q, K, V, O, DO, Lse, Delta, DQ, DK, DV, Seed,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    H, H_KV, GROUP, T, S, sm_scale, qk_scale, dropout_p, inv_keep, SEQ_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    ROLE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (programs, batch * kv heads). Every program holds BLOCK_N rows and streams BLOCK_M rows past
    them: a dK/dV program holds a key block and streams queries, a dQ program holds a query block of one
    head of the group and streams keys. Every dQ program computes delta = rowsum(dO * O) for its rows.

    ROLE_DQ then ROLE_DKDV: two launches, each compiled without the other's code and with its own tile;
    the dQ launch stores delta, the dK/dV launch reads it. ROLE_BOTH: one launch, the dK/dV programs first
    along axis 0 and the dQ programs after them; its dK/dV programs compute delta themselves, one more
    O tile per step, since nothing orders them after the dQ programs.

    ROLE_FUSED: dK/dV programs only, each adding its key block's share of dQ, dS K, to an fp32 accumulator
    (``DQ`` then points to it) with atomic adds, after ``_attn_bwd_prepare`` stored delta and zeroed the
    accumulator; ``_attn_bwd_dq_out`` scales and converts it. Five matrix products per step where the
    other roles together make seven (both kinds recompute Q K^T and dO V^T), for the price of an fp32
    read-modify-write of (BLOCK_M x D) per step in L2, and of a dQ whose sums depend on arrival order."""
    pid, off_bhkv = _program_order()
    off_b = (off_bhkv // H_KV).to(tl.int64)
    off_hkv = (off_bhkv % H_KV).to(tl.int64)
    if ROLE == ROLE_BOTH:
        n_key_blocks = tl.cdiv(S, BLOCK_N)
        holds_keys = pid < n_key_blocks
    else:  # a single role: decided at compile time, the other branch is not compiled
        n_key_blocks = 0
        holds_keys = ROLE != ROLE_DQ
    if holds_keys:
        _attn_bwd_dkdv_program(
            Q, K, V, O, DO, Lse, Delta, DQ, DK, DV, Seed,
            stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
            stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_ot, stride_od,
            stride_dob, stride_doh, stride_dot, stride_dod, stride_dqb, stride_dqh, stride_dqt,
            stride_dkb, stride_dkh, stride_dkn, stride_dkd, stride_dvb, stride_dvh, stride_dvn, stride_dvd,
            pid, off_b, off_hkv, H, GROUP, T, S, sm_scale, qk_scale, dropout_p, inv_keep,
            HEAD_DIM, BLOCK_D, IS_CAUSAL, HAS_DROPOUT, ROLE == ROLE_BOTH, ROLE == ROLE_FUSED,
            DOT_PRECISION, BLOCK_M, BLOCK_N)
    else:
        # query blocks of the GROUP heads that share this kv head, block by block across those heads
        j = pid - n_key_blocks
        query_block = j // GROUP
        if IS_CAUSAL:  # the last query blocks see the most keys: launched first
            query_block = tl.cdiv(T, BLOCK_N) - 1 - query_block
        _attn_bwd_dq_program(
            Q, K, V, O, DO, Lse, Delta, DQ, Seed,
            stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
            stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_ot, stride_od,
            stride_dob, stride_doh, stride_dot, stride_dod, stride_dqb, stride_dqh, stride_dqt, stride_dqd,
            query_block, off_b, off_hkv * GROUP + j % GROUP, off_hkv, H, T, S, sm_scale, qk_scale,
            dropout_p, inv_keep,
            HEAD_DIM, BLOCK_D, IS_CAUSAL, HAS_DROPOUT, ROLE == ROLE_DQ, DOT_PRECISION, BLOCK_N, BLOCK_M)


# ----------------------------------------------------------------------------------------------------
# 4b. The fused plan's two helpers: delta and a zeroed dQ accumulator before, dQ out of it after
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _attn_bwd_prepare(
    O, DO, Delta, DQ_acc,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_ab, stride_ah, stride_at,
    H, T,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Grid (query blocks, batch * heads): delta = rowsum(dO * O) of BLOCK_M rows, and their rows of the
    fp32 dQ accumulator set to zero."""
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_ot
                   + offs_d[None, :] * stride_od, offs_m, T, offs_d, HEAD_DIM, True, HEAD_DIM != BLOCK_D)
    do = _load_tile(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dot
                    + offs_d[None, :] * stride_dod, offs_m, T, offs_d, HEAD_DIM, True, HEAD_DIM != BLOCK_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(Delta + off_bh.to(tl.int64) * T + offs_m, delta, mask=offs_m < T)
    tl.store(DQ_acc + off_b * stride_ab + off_h * stride_ah + offs_m[:, None] * stride_at + offs_d[None, :],
             tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32), mask=offs_m[:, None] < T)


@triton.jit
def _attn_bwd_dq_out(
    DQ_acc, DQ,
    stride_ab, stride_ah, stride_at,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    H, T, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Grid (query blocks, batch * heads): dQ = sm_scale * accumulator, in dQ's dtype and strides."""
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows = offs_m[:, None] < T
    acc = tl.load(DQ_acc + off_b * stride_ab + off_h * stride_ah + offs_m[:, None] * stride_at
                  + offs_d[None, :], mask=rows, other=0.0)
    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqt
             + offs_d[None, :] * stride_dqd, (acc * sm_scale).to(DQ.dtype.element_ty),
             mask=rows & (offs_d[None, :] < HEAD_DIM))


# ----------------------------------------------------------------------------------------------------
# Dropout mask, materialized (tests only: the kernels never store it)
# ----------------------------------------------------------------------------------------------------
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
    device). Exists so tests can replay the kernels' dropout in a reference; training never calls it."""
    mask = torch.empty((B, H, T, S), dtype=torch.int8, device=seed.device)
    grid = (_cdiv(T, 32), _cdiv(S, 32), B * H)
    _dropout_mask_kernel[grid](seed, mask, T, S, dropout_p, BLOCK_M=32, BLOCK_N=32)
    return mask.bool()


def _make_seed(device: torch.device) -> torch.Tensor:
    """A fresh dropout seed drawn from torch's generator, as a device tensor: the kernels read it from
    memory, so it costs no host sync and torch.compile traces it as an ordinary random op."""
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=device)


# ----------------------------------------------------------------------------------------------------
# 5. Launchers, the autograd function and the torch custom ops
# ----------------------------------------------------------------------------------------------------
def _kernel_consts(q: torch.Tensor, causal: bool, dropout_p: float) -> dict:
    D = q.shape[-1]
    return dict(
        HEAD_DIM=D,
        BLOCK_D=max(16, _next_power_of_2(D)),  # tl.dot wants power-of-two tiles >= 16: pad and mask
        IS_CAUSAL=causal,
        HAS_DROPOUT=dropout_p > 0.0,
        # fp32 inputs use full fp32 products; TF32 (10-bit mantissa) would lose accuracy silently.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )


_tuned: dict = {}  # (kernel, tuning key) -> the config in use: the default tile, or the autotuner's pick
# (kernel, tuning key, device, constexprs, tensor dtypes and alignment, scalars) -> _Compiled
_compiled: dict = {}
_COMPILED_LIMIT = 512  # decoding grows S by one per call: a bound on what the cache keeps


class _Compiled:
    """A compiled kernel as the direct launch needs it: Triton's C launcher and what it takes besides the
    grid, the stream and the arguments."""

    __slots__ = ("kernel", "run", "function", "packed_metadata", "constexprs", "meta")

    def __init__(self, kernel, constexprs: tuple, meta: dict):
        kernel._init_handles()  # loads the binary: after this, run/function/packed_metadata are set
        self.kernel, self.constexprs, self.meta = kernel, constexprs, meta
        self.run, self.function, self.packed_metadata = kernel.run, kernel.function, kernel.packed_metadata


def _launch_hooks_set() -> bool:
    """Whether a profiler has set Triton's launch hooks (chains of callbacks from triton 3.5, a callable or
    None in 3.4)."""
    runtime = triton.knobs.runtime
    return any(getattr(hook, "calls", hook) for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook))


def _launch(kernel, grid, key: tuple | None, tensors: tuple, scalars: tuple, **kwargs) -> None:
    """Launch ``kernel`` (autotuned, or a plain ``@triton.jit`` function with key None) on ``tensors`` (its
    first arguments) and ``scalars`` (the integers and floats after them). An autotuned kernel runs the
    config its pruner picks for the tuning key (the default tile), or with MINIGPT_AUTOTUNE=1 the one the
    autotuner finds at the key's first call. After the first launch, every launch with arguments Triton
    would specialize the same way goes to the compiled kernel's C launcher directly, skipping the
    autotuner's and Triton's per-call argument binding: with ~50 arguments that Python costs tens of
    microseconds, as long as the char GPT's whole attention forward takes on the GPU."""
    config = None
    if isinstance(kernel, triton.runtime.Autotuner):
        config = _tuned.get((kernel, key))
        if config is None and _autotuning():  # the autotuner times the configs the pruner keeps
            kernel[grid](*tensors, *scalars, **kwargs)
            _tuned[(kernel, key)] = kernel.best_config
            if _recordings:  # launched by the autotuner: nothing to plan from this call
                _record(None, (), tensors, scalars)
            return
        if config is None:  # the default tile, picked here: Triton 3.6's autotuner would time even one config
            configs = kernel.configs
            if len(configs) > 1:
                named_args = dict(zip(kernel.fn.arg_names, (*tensors, *scalars)))
                configs = kernel.early_config_prune(configs, named_args, **kwargs)
            config = _tuned[(kernel, key)] = configs[0]
    fn = kernel.fn if config else kernel
    if _interpreting():  # the interpreter compiles nothing: nothing to keep
        fn[grid](*tensors, *scalars, **kwargs, **(config.all_kwargs() if config else {}))
        if _recordings:
            _record(None, (), tensors, scalars)
        return
    # The key is at least as fine as what Triton specializes a compiled kernel on: each tensor's dtype and
    # 16-byte alignment, each integer's exact value (Triton looks at == 1, % 16 and the int32 range), and
    # the current device (compiled kernels belong to it, as in Triton's own cache). Floats join by value:
    # they never change within a run. Exact integers make a decoding step (S grows by one) miss, which
    # costs what Triton's own path costs; training repeats its shapes and hits. The direct launch skips
    # what JITFunction.run checks per call besides binding (pre-run hooks, changed globals, debug knobs):
    # none of them applies to these kernels. The C launcher takes pointers as integers, the ones the
    # alignment test reads anyway.
    pointers = [t.data_ptr() for t in tensors]
    device = torch.cuda.current_device()
    layout = tuple([(t.dtype, p % 16 == 0) for t, p in zip(tensors, pointers)])
    spec = (kernel, key, device, tuple(kwargs.values()), layout, scalars)
    hit = _compiled.get(spec)
    if hit is not None and not _launch_hooks_set():
        grid_xyz = (*grid(hit.meta), 1, 1)[:3]
        hit.run(*grid_xyz, triton.runtime.driver.active.get_current_stream(device), hit.function,
                hit.packed_metadata, None, None, None, *pointers, *scalars, *hit.constexprs)
    elif hit is not None:  # a profiler's launch hooks are set: Triton's launch path calls them
        grid_xyz = (*grid(hit.meta), 1, 1)[:3]
        hit.kernel[grid_xyz](*tensors, *scalars, *hit.constexprs)
    else:  # Triton's own path: bind, specialize, find or compile, launch; then remember the compiled kernel
        compiled = fn[grid](*tensors, *scalars, **kwargs, **(config.all_kwargs() if config else {}))
        if compiled is None:  # launched without handing back a compiled kernel: nothing to keep or plan
            if _recordings:
                _record(None, (), tensors, scalars)
            return
        meta = {**kwargs, **(config.kwargs if config else {})}
        n_args = len(tensors) + len(scalars)
        constexprs = tuple(meta[name] for name in fn.arg_names[n_args:])  # in signature order
        if len(_compiled) >= _COMPILED_LIMIT:
            _compiled.clear()
        hit = _compiled[spec] = _Compiled(compiled, constexprs, meta)
        grid_xyz = (*grid(meta), 1, 1)[:3]
    if _recordings:
        _record(hit, grid_xyz, tensors, scalars)


class _Recording:
    """What one call did on the Python path, for the C++ host path (kernels/host_path.py) to plan from: its
    launches, as (compiled kernel or None, grid, tensors, scalars), and the tensors it allocated."""

    def __init__(self):
        self.launches: list[tuple] = []
        self.allocated: list[torch.Tensor] = []


_recordings: dict[int, _Recording] = {}  # by thread


def _record(compiled: _Compiled | None, grid: tuple, tensors: tuple, scalars: tuple) -> None:
    recording = _recordings.get(threading.get_ident())
    if recording is not None:
        recording.launches.append((compiled, grid, tensors, scalars))


def _record_alloc(t: torch.Tensor) -> None:
    recording = _recordings.get(threading.get_ident())
    if recording is not None:
        recording.allocated.append(t)


@contextlib.contextmanager
def _recording():
    """Record what this thread launches and allocates inside."""
    thread = threading.get_ident()
    _recordings[thread] = recording = _Recording()
    try:
        yield recording
    finally:
        del _recordings[thread]


_SAME_DEVICE = contextlib.nullcontext()


def _on_device(t: torch.Tensor):
    """Triton compiles for and launches on the current CUDA device: a context that makes ``t``'s device
    current while the kernels launch, when it is not already."""
    if t.is_cuda and t.get_device() != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return _SAME_DEVICE


def _forward_impl(q, k, v, causal: bool, sm_scale: float, dropout_p: float, seed):
    """(out, lse): out (B, H, T, D) stored as (B, T, H, D), so merging heads afterwards is a free view;
    lse (B, H, T) fp32, the natural-log log-sum-exp of each row's scaled scores."""
    B, H, T, D = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    out = _alloc((B, H, T, D), (0, 2, 1, 3), q.dtype, q.device)
    lse = _alloc((B, H, T), (0, 1, 2), torch.float32, q.device)
    consts = _kernel_consts(q, causal, dropout_p)
    bucket = _seq_bucket(T, S)
    with _on_device(q):
        _launch(
            _attn_fwd, lambda meta: (_cdiv(T, meta["BLOCK_M"]), B * H),
            (bucket, D, causal, dropout_p > 0.0, q.dtype),
            (q, k, v, out, lse, seed if seed is not None else lse),  # without dropout Seed is never read
            (*q.stride(), *k.stride(), *v.stride(), *out.stride(),
             H, H // H_kv, T, S, sm_scale * LOG2E, dropout_p, 1.0 / (1.0 - dropout_p), bucket), **consts,
        )
    return out, lse


def _grad_order(strides) -> tuple:
    """The memory order (outermost first) of the gradient of a (B, H, T, D) tensor with ``strides``: B, H
    and T in the tensor's order (a stable sort: ties keep B, H, T order), D last."""
    stride_b, stride_h, stride_t, _ = strides
    if stride_b >= stride_h >= stride_t:  # the two common orders, without a sort
        return (0, 1, 2, 3)
    if stride_b >= stride_t > stride_h:
        return (0, 2, 1, 3)
    return (*sorted(range(3), key=strides.__getitem__, reverse=True), 3)


def _grad_like(t: torch.Tensor) -> torch.Tensor:
    """An empty gradient for the (B, H, T, D) tensor ``t``: dense, the head dim innermost (coalesced stores),
    B, H and T in ``t``'s order in memory. q, k, v are often (B, T, H, D) views of one projection, transposed
    to (B, H, T, D): their gradients laid out the same way let the projection's backward gather them with
    coalesced copies instead of a transpose (for GPT-2 small at 64 x 1024 tokens, 9.3 ms of a 139 ms step
    on an H100, bench/NOTES.md v8)."""
    return _alloc(t.shape, _grad_order(t.stride()), t.dtype, t.device)


def _backward_impl(grad_out, q, k, v, out, lse, causal: bool, sm_scale: float, dropout_p: float, seed):
    """(dq, dk, dv), each dense in the dimension order of its input (``_grad_like``). grad_out is read in
    place with its own strides, never copied. The launches follow ``_bwd_plan``."""
    B, H, T, D = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    if _span(T, D, grad_out.stride()) >= _INT32_OFFSETS:  # the inputs were checked in the forward
        raise ValueError(f"flash_attention backward: grad_out's strides {grad_out.stride()} reach 2**31 "
                         "elements within one (batch, head) slice (see _INT32_OFFSETS)")
    group = H // H_kv
    dq, dk, dv = _grad_like(q), _grad_like(k), _grad_like(v)
    consts = _kernel_consts(q, causal, dropout_p)
    block_d = consts["BLOCK_D"]
    bucket = _seq_bucket(T, S)
    plan = _bwd_plan(bucket, block_d)
    if plan == "fused" and T * block_d >= _INT32_OFFSETS:  # the fp32 buffer's rows are padded to BLOCK_D
        plan = "split"
    # delta: written by the dQ launch (split) or the prepare launch (fused), read by the dK/dV launch;
    # "one" stores none (lse is passed, unread)
    delta = _alloc((B, H, T), (0, 1, 2), torch.float32, q.device) if plan != "one" else lse
    # what the backward kernel writes dQ into: dq, or under "fused" an fp32 accumulator of padded rows
    dq_acc = _alloc((B, H, T, block_d), (0, 1, 2, 3), torch.float32, q.device) if plan == "fused" else dq
    tensors = (q, k, v, out, grad_out, lse, delta, dq_acc, dk, dv, seed if seed is not None else lse)
    scalars = (
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *grad_out.stride(), *dq_acc.stride(),
        *dk.stride(), *dv.stride(),
        H, H_kv, group, T, S, sm_scale, sm_scale * LOG2E, dropout_p, 1.0 / (1.0 - dropout_p), bucket,
    )
    key = (bucket, D, causal, dropout_p > 0.0, q.dtype)
    fused = plan == "fused"
    if fused:  # the two helper launches: (query blocks, batch * heads), _HELPER_ROWS rows each
        helper = dict(HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=_HELPER_ROWS)
        helper_grid = lambda meta: (_cdiv(T, _HELPER_ROWS), B * H)
    with _on_device(q):
        if fused:
            _launch(_attn_bwd_prepare, helper_grid, None, (out, grad_out, delta, dq_acc),
                    (*out.stride(), *grad_out.stride(), *dq_acc.stride()[:3], H, T), **helper)
        for role in _PLAN_ROLES[plan]:
            _launch(
                _attn_bwd, lambda meta, role=role: (_bwd_programs(role, T, S, group, meta["BLOCK_N"]), B * H_kv),
                (*key, role), tensors, scalars, ROLE=role, **consts,
            )
        if fused:
            _launch(_attn_bwd_dq_out, helper_grid, None, (dq_acc, dq),
                    (*dq_acc.stride()[:3], *dq.stride(), H, T, sm_scale), **helper)
    return dq, dk, dv


_PLAN_ROLES = {"one": (ROLE_BOTH.value,), "split": (ROLE_DQ.value, ROLE_DKDV.value), "fused": (ROLE_FUSED.value,)}
_HELPER_ROWS = 64  # rows per program of the fused plan's prepare and dQ-out launches


def _bwd_programs(role: int, T: int, S: int, group: int, block_n: int) -> int:
    """Programs along axis 0 of a backward launch: key blocks (ROLE_DKDV, ROLE_FUSED), query blocks of every
    head in the group (ROLE_DQ), or both (ROLE_BOTH)."""
    key_blocks = _cdiv(S, block_n) if role != ROLE_DQ.value else 0
    query_blocks = group * _cdiv(T, block_n) if role in (ROLE_DQ.value, ROLE_BOTH.value) else 0
    return key_blocks + query_blocks


def _save_for_backward(ctx, q, k, v, causal, sm_scale, dropout_p, seed, out, lse) -> None:
    ctx.save_for_backward(q, k, v, out, lse, seed)
    ctx.causal, ctx.sm_scale, ctx.dropout_p = causal, sm_scale, dropout_p


def _input_grads(ctx, grad_out, backward) -> tuple:
    """(dq, dk, dv, None x 4) through `backward` (the custom op's backward). lse only serves the backward
    pass: it is not differentiated through."""
    q, k, v, out, lse, seed = ctx.saved_tensors
    dq, dk, dv = backward(grad_out, q, k, v, out, lse, ctx.causal, ctx.sm_scale, ctx.dropout_p, seed)
    return dq, dk, dv, None, None, None, None


class _FlashAttentionFunction(torch.autograd.Function):
    """The eager path: a plain autograd.Function over the same launchers as the custom ops below.
    It exists for speed alone: a custom op's Python dispatch and autograd wrapper cost about 100 us
    per call, more than the whole attention of a small model on the GPU. It returns the output alone (the
    log-sum-exp is saved, not returned): an autograd node with one output costs the engine less."""

    @staticmethod
    def forward(ctx, q, k, v, causal, sm_scale, dropout_p, seed, forward_impl):
        # forward_impl: _forward_impl, or the C++ host path's planner around it (kernels/host_path.py)
        out, lse = forward_impl(q, k, v, causal, sm_scale, dropout_p, seed)
        _save_for_backward(ctx, q, k, v, causal, sm_scale, dropout_p, seed, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, seed = ctx.saved_tensors
        args = (grad_out, q, k, v, out, lse, ctx.causal, ctx.sm_scale, ctx.dropout_p, seed)
        if torch.is_grad_enabled():  # create_graph=True: the gradients get a node that refuses a backward
            return *_backward_once(ctx, *args), None, None, None, None, None
        return *_backward_impl(*args), None, None, None, None, None  # (once_differentiable costs ~8 us)


@torch.autograd.function.once_differentiable
def _backward_once(_ctx, *args):
    """The gradients, marked as not differentiable: asking for their own gradient raises (a silent zero would
    corrupt a gradient penalty)."""
    return _backward_impl(*args)


# The custom ops: what torch.compile sees. Opaque to the compiler, described by their fake (shape-only)
# implementations, differentiated through register_autograd, so a compiled model has no graph break.
@torch.library.custom_op("minigpt_kernels::flash_attention_forward", mutates_args=())
def _forward_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, sm_scale: float, dropout_p: float,
    seed: Optional[torch.Tensor],  # noqa: UP045 (the schema inference of older torch wants Optional)
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward_impl(q, k, v, causal, sm_scale, dropout_p, seed)


@_forward_op.register_fake
def _(q, k, v, causal, sm_scale, dropout_p, seed):
    B, H, T, D = q.shape
    out = q.new_empty((B, T, H, D)).transpose(1, 2)
    return out, q.new_empty((B, H, T), dtype=torch.float32)


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


_forward_op.register_autograd(
    lambda ctx, grad_out, grad_lse: _input_grads(ctx, grad_out, _backward_op),
    setup_context=lambda ctx, inputs, output: _save_for_backward(ctx, *inputs, *output),
)


@contextlib.contextmanager
def forced_config(block_m: int, block_n: int, num_warps: int = 4, num_stages: int = 2):
    """Pin every kernel to one tile shape, skipping autotuning; for benchmarks that map speed against tile
    shape. The forward takes BLOCK_M queries x BLOCK_N keys, the backward holds BLOCK_N rows and streams
    BLOCK_M (``_attn_bwd``). Restores the tuned configs on exit."""
    kernels = (_attn_fwd, _attn_bwd)
    saved = [(kern.configs, kern.cache) for kern in kernels]
    try:
        for kern in kernels:
            kern.configs = [triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps,
                                          num_stages=num_stages)]
            kern.cache = {}
        _forget_compiled()
        yield
    finally:
        for kern, (configs, cache) in zip(kernels, saved):
            kern.configs, kern.cache = configs, cache
        _forget_compiled()


def _forget_compiled() -> None:
    """Forget the picked tiles, the compiled kernels kept for direct launches and the C++ host path's plans."""
    _tuned.clear()
    _compiled.clear()
    if _host_path is not None:
        _host_path.clear_plans()


# ----------------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------------
def _validate(q, k, v, causal, sm_scale, dropout_p) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"flash_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"flash_attention: {name} must have rank 4 ({'(B, H, T, D)' if name == 'q' else '(B, H_kv, S, D)'}), "
                             f"got shape {tuple(t.shape)}")
        if t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"flash_attention: {name}.dtype is {t.dtype}; allowed: float16, bfloat16, float32")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"flash_attention: q, k, v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    device = q.device
    if k.device != device or v.device != device:
        raise ValueError(f"flash_attention: q, k, v must be on one device, got q {device}, k {k.device}, v {v.device}")
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
    # Bounds on the inputs' spans and on those of what is allocated (their sizes); the exact check runs only
    # when one of them is large. The bitwise or of non-negative ints reaches 2**31 when one of them does.
    sq, sk, sv = q.stride(), k.stride(), v.stride()
    if ((T * sq[2] + D * sq[3]) | (S * sk[2] + D * sk[3]) | (S * sv[2] + D * sv[3]) | (B * H * T * D)
            | (B * H_kv * S * D)) >= _INT32_OFFSETS:
        _check_offsets(q, k, v)
    if not q.is_cuda:
        if device.type == "cpu" and not _interpreting():
            raise ValueError("flash_attention: q, k, v are CPU tensors; the kernels need a CUDA device "
                             "(or TRITON_INTERPRET=1 set before importing triton, for the slow interpreter)")
        if device.type != "cpu":
            raise ValueError(f"flash_attention: device {device} is not supported; allowed: cuda (cpu with TRITON_INTERPRET=1)")
        if q.dtype == torch.bfloat16:
            raise TypeError("flash_attention: bfloat16 on the CPU: Triton's interpreter computes bf16 wrongly; "
                            "use float16 or float32 there")
    if not isinstance(causal, bool):
        raise TypeError(f"flash_attention: causal must be a bool, got {causal!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"flash_attention: dropout_p={dropout_p} is out of range; allowed: 0 <= dropout_p < 1")
    if dropout_p > 0.0 and T * _cdiv(S, 32) * 4 >= 2**31:
        raise ValueError(f"flash_attention: dropout needs T * S / 8 < 2**31 (Philox counters are int32), got T={T}, S={S}")
    if sm_scale is not None and not (math.isfinite(sm_scale) and 0 < sm_scale * LOG2E < _FLOAT32_MAX):
        raise ValueError(f"flash_attention: sm_scale={sm_scale} must be a positive number (in float32's range) or None")


_FLOAT32_MAX = torch.finfo(torch.float32).max  # the kernels take the scale as float32


def _span(rows: int, D: int, strides) -> int:
    """The largest element offset within one (batch, head) slice of a (B, H, rows, D) tensor."""
    return (rows - 1) * strides[2] + (D - 1) * strides[3]


def _check_offsets(q, k, v) -> None:
    """Refuse shapes and layouts whose offsets within one (batch, head) slice reach 2**31 in any tensor the
    kernels address: q, k, v, the output and the three gradients (see _INT32_OFFSETS)."""
    layouts = (
        ("q", q.shape, q.stride()), ("k", k.shape, k.stride()), ("v", v.shape, v.stride()),
        ("the output", q.shape, _dense_strides(q.shape, (0, 2, 1, 3))),
        ("the gradient of q", q.shape, _dense_strides(q.shape, _grad_order(q.stride()))),
        ("the gradient of k", k.shape, _dense_strides(k.shape, _grad_order(k.stride()))),
        ("the gradient of v", v.shape, _dense_strides(v.shape, _grad_order(v.stride()))),
    )
    for name, shape, strides in layouts:
        span = _span(shape[2], shape[3], strides) + 1
        if span > _INT32_OFFSETS:
            raise ValueError(f"flash_attention: {name} spans {span} elements within one (batch, head) slice "
                             f"(shape {tuple(shape)}, strides {tuple(strides)}); the kernels address at most "
                             "2**31 there: fewer heads per call, a shorter sequence, or a layout with the heads "
                             "outside the sequence")


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    sm_scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Fused attention, ``F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=sm_scale,
    dropout_p=dropout_p, enable_gqa=True)`` computed by the Triton kernels above.

    Args:
        q: (B, H, T, D) queries; k, v: (B, H_kv, S, D) with H % H_kv == 0 (GQA / MQA read shared heads
            in place). Any strides: views of one fused qkv projection are read without copies.
            fp16, bf16 or fp32, D up to 128 (D that is not a power of two is padded inside the kernel).
        causal: mask aligned to the bottom-right corner (query i sees key j <= i + S - T); rows that
            see no key (T > S) output 0.
        sm_scale: score scale, default 1 / sqrt(D).
        dropout_p: attention dropout drawn in the kernel (pass 0.0 in eval). Each call draws a new seed
            from torch's default generator for the device, so ``torch.manual_seed`` makes it repeatable.

    fp32 inputs use full-precision fp32 matrix products ("ieee"), never TF32. Results are deterministic:
    no atomics. Limits: B * H <= 65535, and within one (batch, head) slice of q, k, v, the output and the
    gradients, offsets below 2**31 elements (for the output, laid out (B, T, H, D): T * H * D < 2**31).
    The backward is not differentiable (no double backward).
    Returns the (B, H, T, D) output, laid out in memory as (B, T, H, D).
    """
    if not torch.compiler.is_compiling():  # (first: torch.compile would guard on the global below)
        host_forward = _host_forward
        if host_forward is not None:
            out = host_forward(q, k, v, causal, sm_scale, dropout_p)  # None: no plan for this call
            if out is not None:
                return out
    _validate(q, k, v, causal, sm_scale, dropout_p)
    scale = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    seed = _make_seed(q.device) if dropout_p > 0.0 else None
    if torch.compiler.is_compiling():  # traced: the custom op, one node in the graph
        return _forward_op(q, k, v, causal, scale, float(dropout_p), seed)[0]
    forward_impl = _forward_impl
    if q.is_cuda and _host_path_enabled:  # plan this call for the C++ host path, once it is built
        forward_impl = _host_planner(q, k, v, causal, sm_scale, dropout_p) or _forward_impl
    return _FlashAttentionFunction.apply(q, k, v, causal, scale, float(dropout_p), seed, forward_impl)  # eager


# The C++ host path (kernels/host_path.py): its module once a CUDA call has started its build, and its
# forward once built. MINIGPT_CPP_HOST=0 keeps every call on the Python path.
_host_path = None
_host_forward = None
_host_path_enabled = os.environ.get("MINIGPT_CPP_HOST", "1") != "0"


def _host_planner(q, k, v, causal, sm_scale, dropout_p):
    global _host_path
    if _host_path is None:
        import kernels.host_path as host_path  # here: the kernels' module stays importable without it

        _host_path = host_path
        host_path.start()
    return _host_path.forward_planner(q, k, v, causal, sm_scale, dropout_p)
