"""Attention for decoding: a few new queries against a long KV cache, split across the GPU (flash-decoding).

    decode_attention(q, k_cache, v_cache, cache_seqlens, sm_scale=None, num_splits=None)

q (B, H, T, D) holds the newest T tokens of each sequence (T = 1 when sampling one token per step);
k_cache and v_cache (B, H_kv, S_max, D) are preallocated buffers, and sequence b occupies their first
cache_seqlens[b] slots, its T queries being the last T of them (their keys and values already written).
Causal: query token t of sequence b sees the keys j <= cache_seqlens[b] - T + t, the mask of
``kernels.flash_attention`` aligned to the bottom-right corner of each sequence's own length.

Why a kernel of its own. The training forward tiles 16 or more query rows of one head and runs one program
per (query block, head); at decode there is one query per head and the work is reading K and V once.
1. Grouped-query heads share a tile: the G = H / H_kv query heads (times T tokens) that read one kv head
   are the rows of one query tile, so each K and V tile is read once per kv head, not once per query head.
2. Split-KV: B * H_kv programs cannot fill a GPU's SMs when the batch is small, so the keys are cut into
   ``num_splits`` slices, one program each. A program returns its slice's softmax-weighted values with
   their log-sum-exp (in base 2, as the kernels' exp2 works); a second kernel merges the slices, weighting
   each by exp2(lse_slice - lse_total).
3. The lengths are read on the GPU, so one launch serves every step and can be captured in a CUDA graph.
   The number of splits is chosen on the host from the cache's capacity S_max, never from the lengths
   (reading them would make the host wait for the GPU); slices past a sequence's length exit at once.

References: Dao et al. 2023, "Flash-Decoding for long-context inference",
https://crfm.stanford.edu/2023/10/12/flashdecoding.html, and ``flash_attn_with_kvcache`` in
https://github.com/Dao-AILab/flash-attention.
"""

import contextlib
import functools
import math
import os

import torch
import triton
import triton.language as tl

# the training kernel's limits, and its base-2 scale (exp(x) = exp2(x * LOG2E))
from kernels.flash_attention import _DTYPES as DTYPES
from kernels.flash_attention import LOG2E, MAX_HEAD_DIM


# ----------------------------------------------------------------------------------------------------
# 1. One slice of the keys for one (sequence, kv head, block of packed query rows)
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _decode_slice(
    Q, K, V, SeqLens, Out, PartOut, PartLse,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_len, H_kv, GROUP, T, S, keys_per_split, num_splits, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Program -> (sequence, kv head, row block) on axis 0 and the slice of keys on axis 1.
    pid = tl.program_id(0)
    split = tl.program_id(1)
    rows = GROUP * T
    row_blocks = tl.cdiv(rows, BLOCK_M)
    off_b = pid // (H_kv * row_blocks)
    off_hkv = (pid // row_blocks) % H_kv
    offs_r = (pid % row_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_r < rows
    d_ok = offs_d < HEAD_DIM

    # Packed rows: row r is query head off_hkv * GROUP + r // T at token r % T; all read kv head off_hkv.
    off_t = offs_r % T
    off_h = off_hkv * GROUP + offs_r // T
    q = tl.load(Q + off_b.to(tl.int64) * stride_qb + off_h[:, None] * stride_qh + off_t[:, None] * stride_qt
                + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    # This slice's keys [lo, hi), cut at the sequence's length; token t sees keys j <= length - T + t.
    length = tl.load(SeqLens + off_b * stride_len).to(tl.int32)
    lo = split * keys_per_split
    hi = tl.minimum(tl.minimum(lo + keys_per_split, length), S)
    last_key = length - T + off_t
    K_base = K + off_b.to(tl.int64) * stride_kb + off_hkv.to(tl.int64) * stride_kh
    V_base = V + off_b.to(tl.int64) * stride_vb + off_hkv.to(tl.int64) * stride_vh

    # Running state per row: max m_i (base 2), normalizer l_i, unnormalized output acc, all fp32.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in tl.range(lo, hi, BLOCK_N):
        # Scores of the packed rows against one tile of keys, masked past the slice and the diagonal.
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_ok = offs_n < hi
        k = tl.load(K_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=key_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(key_ok[None, :] & (offs_n[None, :] <= last_key[:, None]), s, float("-inf"))
        # Online softmax: raise the running max, rescale what was accumulated under the old one.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet stays at zero
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=key_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # Epilogue: the slice's normalized output; with one slice that is the answer, else a partial result.
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    acc = acc / l_safe[:, None]
    if SPLIT:
        # Partials are (B * H * T, num_splits, D): row (b, kv head, r) is row (b, h, t) of the output.
        row = ((off_b * H_kv + off_hkv) * rows + offs_r).to(tl.int64) * num_splits + split
        tl.store(PartLse + row, tl.where(seen, m_i + tl.log2(l_safe), float("-inf")), mask=row_ok)
        tl.store(PartOut + row[:, None] * HEAD_DIM + offs_d[None, :], acc,
                 mask=row_ok[:, None] & d_ok[None, :])
    else:
        tl.store(Out + off_b.to(tl.int64) * stride_ob + off_h[:, None] * stride_oh + off_t[:, None] * stride_ot
                 + offs_d[None, :] * stride_od, acc.to(Out.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------------------------------
# 2. Merge the slices of one output row by their log-sum-exps
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _decode_merge(
    PartOut, PartLse, Out,
    stride_ob, stride_oh, stride_ot, stride_od,
    H, T, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # One program per output row (b, h, t); its partials are rows of a (num_splits, D) matrix.
    row = tl.program_id(0)
    off_b = row // (H * T)
    off_h = (row // T) % H
    off_t = row % T
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < num_splits
    d_ok = offs_d < HEAD_DIM
    first = row.to(tl.int64) * num_splits
    # A slice's weight is its share of the total softmax mass: exp2(lse_slice - max) / sum; empty ones 0.
    lse = tl.load(PartLse + first + offs_s, mask=s_ok, other=float("-inf"))
    weight = tl.exp2(lse - tl.max(lse, 0))
    weight = weight / tl.sum(weight, 0)
    part = tl.load(PartOut + (first + offs_s[:, None]) * HEAD_DIM + offs_d[None, :],
                   mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    out = tl.sum(weight[:, None] * part, 0)
    tl.store(Out + off_b.to(tl.int64) * stride_ob + off_h * stride_oh + off_t * stride_ot + offs_d * stride_od,
             out.to(Out.dtype.element_ty), mask=d_ok)


# ----------------------------------------------------------------------------------------------------
# 3. Launcher: tiles, the number of splits, checks
# ----------------------------------------------------------------------------------------------------
# Tiles and splits. The rules below come from a sweep of tiles and split counts on an H100 at the points
# of kernels/bench_decode.py. Two regimes:
# - Few programs (B * H_kv below the SM count): the keys are cut into as many slices as fill the SMs in one
#   wave (at least 2), at least MIN_SPLIT_KEYS keys each, and a slice of at most ONE_TILE keys is read as a
#   single tile.
# - Programs enough to fill the GPU: tiles of BLOCK_N keys, small enough for several programs to share an
#   SM; only caches of LONG_SPLIT_KEYS and more are split, in a few slices that even out the SMs' loads.
# Caches shorter than SPLIT_FROM keys are never split: the merge would cost more than it saves.
BLOCK_N = 64
ONE_TILE = 256
NUM_WARPS = 4
NUM_STAGES = 3
SPLIT_FROM = 512
MIN_SPLIT_KEYS = 128
LONG_SPLIT_KEYS = 4096
MAX_SPLITS = 128


def _empty(shape, dtype, device) -> torch.Tensor:
    """Every buffer the launcher allocates (tests replace this to fill them with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


@functools.lru_cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; a nominal 8 elsewhere (the CPU interpreter)."""
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache
def _shared_memory(device: torch.device) -> int:
    """Bytes of shared memory a program may use (no limit in the interpreter)."""
    if device.type != "cuda":
        return 1 << 30
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def num_splits_for(programs: int, capacity: int, n_sm: int) -> int:
    """Slices of the keys per (sequence, kv head, row block), from the cache's capacity, never its lengths."""
    if capacity < SPLIT_FROM:
        return 1
    if programs < n_sm:  # one wave where the SMs take 2 slices or more (a partial second wave and more
        # slices to merge cost more than they fill); else 2 slices, so that a long cache still spreads
        return max(1, min(max(2, n_sm // programs), capacity // MIN_SPLIT_KEYS, MAX_SPLITS))
    return max(1, min(triton.cdiv(2 * n_sm, programs), capacity // LONG_SPLIT_KEYS))  # even out the SMs


def tile_for(slice_keys: int, programs: int, block_m: int, block_d: int, element_size: int,
             device: torch.device) -> tuple[int, int]:
    """(keys per tile, pipeline stages) for slices of slice_keys keys: one tile per slice when the slices
    are short and the programs few, else BLOCK_N keys and NUM_STAGES; fewer of either where the query tile
    and the K and V tiles in flight would not fit in shared memory."""
    if slice_keys <= ONE_TILE and programs < sm_count(device):
        block_n, stages = max(16, triton.next_power_of_2(slice_keys)), 2  # one iteration: nothing to overlap
    elif programs < sm_count(device):
        block_n, stages = 2 * BLOCK_N, NUM_STAGES  # few programs on long slices: wider tiles, more in flight
    else:
        block_n, stages = BLOCK_N, NUM_STAGES
    fits = lambda: (block_m + 2 * stages * block_n) * block_d * element_size <= _shared_memory(device)
    while not fits() and stages > 1:
        stages -= 1
    while not fits() and block_n > 16:
        block_n //= 2
    return block_n, stages


def _check(q, k_cache, v_cache, cache_seqlens, sm_scale, num_splits):
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("cache_seqlens", cache_seqlens)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"decode_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dim() != 4:
            shape = "(B, H, T, D)" if name == "q" else "(B, H_kv, S_max, D)"
            raise ValueError(f"decode_attention: {name} must have rank 4 {shape}, got {tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise TypeError(f"decode_attention: {name}.dtype is {t.dtype}; allowed: float16, bfloat16, float32")
    if not q.dtype == k_cache.dtype == v_cache.dtype:
        raise TypeError(f"decode_attention: q, k_cache, v_cache must share one dtype, got {q.dtype}, "
                        f"{k_cache.dtype}, {v_cache.dtype}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"decode_attention: k_cache and v_cache must have one shape, got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    B, H, T, D = q.shape
    B_kv, H_kv, S, D_kv = k_cache.shape
    if B_kv != B or D_kv != D or H % H_kv != 0:
        raise ValueError(f"decode_attention: k_cache must be (B={B}, H_kv, S_max, D={D}) with H={H} a "
                         f"multiple of H_kv, got {tuple(k_cache.shape)}")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"decode_attention: head dim D={D} is not supported; allowed: 1 to {MAX_HEAD_DIM}")
    if B == 0 or T == 0 or T > S:
        raise ValueError(f"decode_attention: need B >= 1 and 1 <= T <= S_max, got q {tuple(q.shape)}, "
                         f"k_cache {tuple(k_cache.shape)}")
    if cache_seqlens.shape != (B,) or cache_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"decode_attention: cache_seqlens must be int32 or int64 of shape ({B},), got "
                         f"{cache_seqlens.dtype} of shape {tuple(cache_seqlens.shape)}")
    devices = {t.device for t in (q, k_cache, v_cache, cache_seqlens)}
    if len(devices) != 1:
        raise ValueError(f"decode_attention: all inputs must be on one device, got {sorted(map(str, devices))}")
    if q.device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("decode_attention: the inputs are CPU tensors; the kernel needs a CUDA device "
                             "(or TRITON_INTERPRET=1 to run it in Triton's interpreter)")
        if q.dtype == torch.bfloat16:
            raise TypeError("decode_attention: bfloat16 on the CPU: Triton's interpreter has no bfloat16; "
                            "use float16 or float32")
        # on the CPU the lengths can be read for free: check them
        if cache_seqlens.min().item() < T or cache_seqlens.max().item() > S:
            raise ValueError(f"decode_attention: cache_seqlens must lie in [T={T}, S_max={S}], got "
                             f"{cache_seqlens.tolist()}")
    elif q.device.type != "cuda":
        raise ValueError(f"decode_attention: device {q.device} is not supported; allowed: cuda "
                         f"(cpu with TRITON_INTERPRET=1)")
    if sm_scale is not None and not (isinstance(sm_scale, (int, float)) and 0 < sm_scale < math.inf):
        raise ValueError(f"decode_attention: sm_scale={sm_scale!r} must be a positive number or None")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):  # the kernels add offsets in int32
        span = sum((n - 1) * st for n, st in zip(t.shape[1:], t.stride()[1:])) + 1
        if span >= 2**31:
            raise ValueError(f"decode_attention: {name} spans {span} elements within one sequence (shape "
                             f"{tuple(t.shape)}, strides {tuple(t.stride())}); the kernel addresses at most 2**31")
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"decode_attention: num_splits={num_splits!r} must be a positive integer or None")


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    sm_scale: float | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Causal attention of the newest tokens q (B, H, T, D) over the first cache_seqlens[b] keys and
    values of k_cache, v_cache (B, H_kv, S_max, D); returns (B, H, T, D) in q's dtype.

    cache_seqlens (B,) int32 or int64 on q's device counts each sequence's tokens, the T new ones
    included (their keys and values are already in the caches), and must lie in [T, S_max]: on a GPU
    this is not checked, since reading the lengths would make the host wait for the GPU. Any strides.
    sm_scale defaults to 1 / sqrt(D). num_splits (default: chosen from B, H_kv, S_max and the SM count)
    sets how many slices the keys are cut into; 1 runs a single kernel with no merge.
    """
    _check(q, k_cache, v_cache, cache_seqlens, sm_scale, num_splits)
    B, H, T, D = q.shape
    H_kv, S = k_cache.shape[1], k_cache.shape[2]
    group = H // H_kv
    rows = group * T  # query rows per kv head: the grouped heads times the new tokens
    block_m = max(16, min(64, triton.next_power_of_2(rows)))  # tl.dot wants >= 16 rows
    block_d = max(16, triton.next_power_of_2(D))
    programs = B * H_kv * triton.cdiv(rows, block_m)
    splits = min(num_splits or num_splits_for(programs, S, sm_count(q.device)), S)
    block_n, stages = tile_for(triton.cdiv(S, splits), programs, block_m, block_d, q.element_size(), q.device)
    # Slices are whole tiles; recount them, since rounding up can leave fewer than asked for.
    keys_per_split = triton.cdiv(triton.cdiv(S, splits), block_n) * block_n
    splits = triton.cdiv(S, keys_per_split)

    out = _empty((B, H, T, D), q.dtype, q.device)
    if splits > 1:
        part_out = _empty((B * H * T, splits, D), torch.float32, q.device)
        part_lse = _empty((B * H * T, splits), torch.float32, q.device)
    else:
        part_out = part_lse = out  # unused
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    # Triton launches on the current device: make the inputs' current for the launches
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _decode_slice[(programs, splits)](
            q, k_cache, v_cache, cache_seqlens, out, part_out, part_lse,
            *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(),
            cache_seqlens.stride(0), H_kv, group, T, S, keys_per_split, splits, scale * LOG2E,
            HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, SPLIT=splits > 1,
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            num_warps=NUM_WARPS, num_stages=stages,
        )
        if splits > 1:
            _decode_merge[(B * H * T,)](
                part_out, part_lse, out, *out.stride(), H, T, splits,
                HEAD_DIM=D, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(splits), num_warps=4,
            )
    return out
