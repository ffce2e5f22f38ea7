"""Attention as three separate Triton kernels: scores, softmax, weighted values.

This is attention the way it is written on paper, one kernel per line of the formula:

    1. scores   S = Q K^T * scale          (B, H, T, S) float32, written to GPU memory
    2. softmax  P = softmax(mask(S))       reads S, writes P (B, H, T, S) in the input dtype
    3. values   O = P V                    reads P, writes O (B, H, T, D)

Each kernel is block-tiled with masked loads and stores, so any T, S and D work (no padding needed).
The (T, S) matrix is written twice and read twice: with T = S = 16384 and 16 heads that is 17 GB of
float32 scores, most of the time spent moving it. The fused kernel (kernels/flash_attention.py) does the
same arithmetic without ever writing S or P: it keeps a block of scores on chip and uses an online softmax.
Timing the three steps separately (`step_times`) shows where the time goes.

Layout and semantics follow `kernels.flash_attention`: q (B, H, T, D), k and v (B, H_kv, S, D) with
H % H_kv == 0 (grouped-query attention), causal masks aligned to the bottom-right (query i sees keys
j <= i + S - T); a query row that sees no key at all (only when T > S) gives zeros.

Backward goes through the same steps in reverse, with the same kernels for the four matrix products:
    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - rowsum(dP * P)),   dQ = dS K * scale,   dK = dS^T Q * scale
The softmax step of the backward (dS) is plain PyTorch; rowsum(dP * P) is computed as rowsum(dO * O),
which is equal and much smaller. No dropout.

`UnfusedMultiheadAttention` wraps it all in the interface of `torch.nn.MultiheadAttention(batch_first=True)`.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
import triton
import triton.language as tl

# ---------------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _scores_kernel(
    Q, K, Out, scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_ob, stride_oh, stride_om, stride_on,
    H, M, N, D, GROUP,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Out[b, h] = Q[b, h] @ K[b, h // GROUP]^T * scale, one BLOCK_M x BLOCK_N tile per program."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_bh = tl.program_id(2).to(tl.int64)  # int64: B*H*T*S offsets pass 2**31 at long T
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    # A (BLOCK_M, BLOCK_D) tile of Q and a (BLOCK_D, BLOCK_N) tile of K^T: K read with swapped strides.
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    k_ptrs = K + b * stride_kb + (h // GROUP) * stride_kh + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        # Out-of-range rows, columns and head dims load as 0 and add nothing to the dot product.
        q = tl.load(q_ptrs, mask=(offs_m[:, None] < M) & (d0 + offs_d[None, :] < D), other=0.0)
        kt = tl.load(k_ptrs, mask=(d0 + offs_d[:, None] < D) & (offs_n[None, :] < N), other=0.0)
        if IEEE:  # float32 inputs: full precision, not TF32
            acc = tl.dot(q, kt, acc, input_precision="ieee")
        else:
            acc = tl.dot(q, kt, acc)
        q_ptrs += BLOCK_D * stride_qd
        k_ptrs += BLOCK_D * stride_kd

    out_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc * scale, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _softmax_kernel(
    X, Out,
    stride_xb, stride_xh, stride_xm, stride_xn,
    stride_ob, stride_oh, stride_om, stride_on,
    H, M, N,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Row softmax of a block of BLOCK_M rows, walking the row in BLOCK_N chunks (rows may be very long).

    Pass 1 finds each row's max m and sum l = sum(exp(x - m)) in one sweep: when a chunk raises the max,
    the sum so far is rescaled by exp(m_old - m_new) (the online softmax that FlashAttention builds on).
    Pass 2 writes exp(x - m) / l. Subtracting the max keeps exp from overflowing.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < M
    last_key = offs_m + N - M  # causal, bottom-right aligned: row i keeps keys j <= i + N - M
    x_row = X + b * stride_xb + h * stride_xh + offs_m[:, None] * stride_xm
    o_row = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om

    # Pass 1: running max and running sum. Causal rows stop at the block's last visible key.
    hi = N
    if CAUSAL:
        hi = tl.minimum(N, (pid_m + 1) * BLOCK_M + N - M)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        keep = row_ok[:, None] & (offs_n[None, :] < N)
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= last_key[:, None])
        x = tl.load(x_row + offs_n[None, :] * stride_xn, mask=keep, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m_i, tl.max(x, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing seen yet stays at l = 0
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
        m_i = m_new

    # Pass 2: normalize and write every column; masked ones get exp(-inf) = 0.
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    inv_l = 1.0 / tl.where(l_i > 0.0, l_i, 1.0)  # a row that sees no key has only exp(-inf) = 0 terms
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        in_bounds = row_ok[:, None] & (offs_n[None, :] < N)
        keep = in_bounds
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= last_key[:, None])
        x = tl.load(x_row + offs_n[None, :] * stride_xn, mask=keep, other=float("-inf")).to(tl.float32)
        p = tl.exp(x - m_safe[:, None]) * inv_l[:, None]
        tl.store(o_row + offs_n[None, :] * stride_on, p.to(Out.dtype.element_ty), mask=in_bounds)


@triton.jit
def _matmul_kernel(
    A, B, C, scale,
    stride_ab, stride_ah, stride_am, stride_ak,
    stride_bb, stride_bh, stride_bk, stride_bn,
    stride_cb, stride_ch, stride_cm, stride_cn,
    H, M, N, K, GROUP,
    CAUSAL: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """C[b, h] = A[b, h] @ B[b, h // GROUP] * scale: out = P V in the forward, the products of the backward.

    With CAUSAL, A is a causal P of shape (M=T, K=S): the row block ends its loop at its last visible key,
    since P is exactly 0 beyond it.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_bh = tl.program_id(2).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = A + b * stride_ab + h * stride_ah + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = B + b * stride_bb + (h // GROUP) * stride_bh + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn

    hi = K
    if CAUSAL:
        hi = tl.minimum(K, (pid_m + 1) * BLOCK_M + K - M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hi, BLOCK_K):
        a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & (k0 + offs_k[None, :] < K), other=0.0)
        bt = tl.load(b_ptrs, mask=(k0 + offs_k[:, None] < K) & (offs_n[None, :] < N), other=0.0)
        if IEEE:
            acc = tl.dot(a, bt, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, bt, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    c_ptrs = C + b * stride_cb + h * stride_ch + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, (acc * scale).to(C.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


# ---------------------------------------------------------------------------------------------------------
# Launchers: one per step, each usable (and tested) on its own


def _block(n: int, cap: int) -> int:
    """A power-of-two tile edge covering n, at least 16 (tl.dot's minimum) and at most cap."""
    return max(16, min(cap, triton.next_power_of_2(n)))


def _check_group(name: str, x: torch.Tensor, H: int) -> int:
    if x.dim() != 4 or H % x.shape[1] != 0:
        raise ValueError(f"{name} must be (B, H_kv, S, D) with H % H_kv == 0 (H = {H}), got {tuple(x.shape)}")
    return H // x.shape[1]


def attention_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Step 1: q (B, H, T, D), k (B, H_kv, S, D) -> scores (B, H, T, S) float32 = q k^T * scale."""
    B, H, T, D = q.shape
    group = _check_group("k", k, H)
    S = k.shape[2]
    out = torch.empty(B, H, T, S, device=q.device, dtype=torch.float32)
    BLOCK_M, BLOCK_N, BLOCK_D = 64, 64, _block(D, 64)
    grid = (triton.cdiv(T, BLOCK_M), triton.cdiv(S, BLOCK_N), B * H)
    _scores_kernel[grid](
        q, k, out, scale, *q.stride(), *k.stride(), *out.stride(), H, T, S, D, group,
        IEEE=q.dtype == torch.float32, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
    )
    return out


def softmax_rows(scores: torch.Tensor, causal: bool, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Step 2: row softmax of (B, H, T, S) scores, optionally causal (bottom-right), in `dtype`."""
    B, H, T, S = scores.shape
    out = torch.empty(B, H, T, S, device=scores.device, dtype=dtype or scores.dtype)
    BLOCK_M, BLOCK_N = 16, _block(S, 256)
    grid = (triton.cdiv(T, BLOCK_M), B * H)
    _softmax_kernel[grid](
        scores, out, *scores.stride(), *out.stride(), H, T, S,
        CAUSAL=causal, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
    )
    return out


def batched_matmul(a: torch.Tensor, b: torch.Tensor, scale: float = 1.0, causal: bool = False) -> torch.Tensor:
    """a (B, H, M, K) @ b (B, H_b, K, N) * scale with H % H_b == 0 -> (B, H, M, N) in a's dtype.

    causal=True skips the blocks of a that a causal P holds as zeros (keys past each query's last).
    """
    Bsz, H, M, K = a.shape
    group = _check_group("b", b, H)
    N = b.shape[3]
    out = torch.empty(Bsz, H, M, N, device=a.device, dtype=a.dtype)
    BLOCK_M, BLOCK_N, BLOCK_K = 64, _block(N, 128), 64
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N), Bsz * H)
    _matmul_kernel[grid](
        a, b, out, scale, *a.stride(), *b.stride(), *out.stride(), H, M, N, K, group,
        CAUSAL=causal, IEEE=a.dtype == torch.float32, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
    )
    return out


def weighted_values(p: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """Step 3: p (B, H, T, S) @ v (B, H_kv, S, D) -> out (B, H, T, D)."""
    return batched_matmul(p, v, 1.0, causal)


# ---------------------------------------------------------------------------------------------------------
# The pipeline, its gradient, and an nn.MultiheadAttention look-alike


def _validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{name} must be a 4-d tensor (B, heads, seq, head_dim), got {getattr(x, 'shape', x)}")
        if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {x.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if min(*q.shape, *k.shape) < 1:
        raise ValueError(f"empty inputs are not supported, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"q (B, H, T, D) and k, v (B, H_kv, S, D) need the same B and D and H % H_kv == 0; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must share dtype and device, got {q.dtype}/{k.dtype}/{v.dtype}, "
                         f"{q.device}/{k.device}/{v.device}")
    if q.shape[0] * q.shape[1] > 65535:  # a grid axis of every kernel holds the (batch, head) pairs
        raise ValueError(f"B * H = {q.shape[0] * q.shape[1]} must be at most 65535 (CUDA's grid limit)")
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError(f"q, k, v are on {q.device}: the kernels need CUDA (or TRITON_INTERPRET=1)")


class _UnfusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float):
        scores = attention_scores(q, k, scale)  # (B, H, T, S) float32
        p = softmax_rows(scores, causal, dtype=q.dtype)  # (B, H, T, S), exact zeros where masked
        del scores
        out = weighted_values(p, v, causal)  # (B, H, T, D)
        ctx.save_for_backward(q, k, v, p, out)
        ctx.scale = scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # no double backward: a clear error if one is asked for
    def backward(ctx, dout):
        q, k, v, p, out = ctx.saved_tensors
        B, H, T, D = q.shape
        H_kv, S = k.shape[1], k.shape[2]
        group = H // H_kv
        dout = dout.to(q.dtype)
        # Step 3 backward: out = P V.
        dv = batched_matmul(p.transpose(-2, -1), dout)  # (B, H, S, D), one per query head
        dp = attention_scores(dout, v, 1.0)  # dO V^T: (B, H, T, S) float32
        # Step 2 backward, the softmax Jacobian row by row: dS = P * (dP - rowsum(dP * P)). The row sum
        # equals rowsum(dO * O) (as dP = dO V^T and O = P V), a (B, H, T, 1) product that avoids one more
        # (T, S) temporary; FlashAttention calls it delta. Masked entries have P = 0, so dS = 0 there.
        delta = (dout.float() * out.float()).sum(dim=-1, keepdim=True)
        ds = dp.sub_(delta).mul_(p).to(q.dtype)
        del dp
        # Step 1 backward: S = Q K^T * scale.
        dq = batched_matmul(ds, k, ctx.scale)  # (B, H, T, D)
        dk = batched_matmul(ds.transpose(-2, -1), q, ctx.scale)  # (B, H, S, D)
        if group > 1:  # grouped-query attention: a key/value head collects the gradients of its group
            dk = dk.view(B, H_kv, group, S, D).sum(dim=2)
            dv = dv.view(B, H_kv, group, S, D).sum(dim=2)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None


def unfused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                      sm_scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale, causal mask) v through three kernels. q (B, H, T, D), k/v (B, H_kv, S, D)."""
    _validate(q, k, v)
    if sm_scale is not None and not (math.isfinite(sm_scale) and sm_scale > 0):
        raise ValueError(f"sm_scale={sm_scale} must be a positive finite number or None")
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    return _UnfusedAttention.apply(q, k, v, bool(causal), scale)


def step_times(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
               sm_scale: float | None = None) -> dict[str, float]:
    """Median milliseconds of each forward step (CUDA): {'scores': ..., 'softmax': ..., 'values': ...}."""
    from triton.testing import do_bench

    _validate(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    scores = attention_scores(q, k, scale)
    p = softmax_rows(scores, causal, dtype=q.dtype)
    return {
        "scores": float(do_bench(lambda: attention_scores(q, k, scale), return_mode="median")),
        "softmax": float(do_bench(lambda: softmax_rows(scores, causal, dtype=q.dtype), return_mode="median")),
        "values": float(do_bench(lambda: weighted_values(p, v, causal), return_mode="median")),
    }


class UnfusedMultiheadAttention(nn.Module):
    """`torch.nn.MultiheadAttention(batch_first=True)` on the unfused kernels (same parameters and names).

    Supported: self- and cross-attention with equal embedding sizes, `is_causal`. Not supported (ValueError):
    `attn_mask`, `key_padding_mask`, `need_weights=True`, dropout > 0, `batch_first=False`.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 batch_first: bool = True, device=None, dtype=None):
        super().__init__()
        if num_heads <= 0 or embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if dropout != 0.0:
            raise ValueError(f"dropout must be 0.0 (the unfused kernels have no dropout), got {dropout}")
        if not batch_first:
            raise ValueError("batch_first must be True: inputs are (batch, seq, embed)")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.batch_first = True
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))  # rows: q, k, v
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory)) if bias else None
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        # The same initialization as nn.MultiheadAttention.
        nn.init.xavier_uniform_(self.in_proj_weight)
        if bias:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding_mask=None,
                need_weights: bool = False, attn_mask=None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, None]:
        """(batch, T, E) query, (batch, S, E) key/value -> ((batch, T, E) output, None)."""
        if attn_mask is not None or key_padding_mask is not None:
            raise ValueError("attn_mask and key_padding_mask must be None; use is_causal=True for a causal mask")
        if need_weights:
            raise ValueError("need_weights must be False: the layer returns no attention weights")
        B, T, E = query.shape
        S = key.shape[1]
        if E != self.embed_dim or key.shape[-1] != E or value.shape != key.shape:
            raise ValueError(f"query (B, T, {self.embed_dim}) and key = value (B, S, {self.embed_dim}) expected, "
                             f"got {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        nh, hd = self.num_heads, self.head_dim
        q = F.linear(query, w_q, b_q).view(B, T, nh, hd).transpose(1, 2)  # (B, nh, T, hd)
        k = F.linear(key, w_k, b_k).view(B, S, nh, hd).transpose(1, 2)  # (B, nh, S, hd)
        v = F.linear(value, w_v, b_v).view(B, S, nh, hd).transpose(1, 2)  # (B, nh, S, hd)
        y = unfused_attention(q, k, v, causal=is_causal)  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, E)  # heads side by side again
        return self.out_proj(y), None
