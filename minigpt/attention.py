"""The one attention entry point of the model, with its backends.

    attention(q, k, v, backend)   q (B, H, T, D), k and v (B, H_kv, S, D), H % H_kv == 0
    decode_attention(q, k_cache, v_cache, lengths, backend)   a decode step against a static KV cache

Backends:
- ``triton``: our fused FlashAttention-2 kernel (``kernels.flash_attention``); on CPU tensors only under
  Triton's interpreter (TRITON_INTERPRET=1).
- ``sdpa``: PyTorch's ``F.scaled_dot_product_attention``, grouped-query attention through ``enable_gqa``.
- ``naive``: the readable reference: scores, mask, softmax, dropout, weighted sum of values.
- ``auto``: ``triton`` on CUDA, ``sdpa`` elsewhere.

The causal mask is aligned to the bottom-right corner of the (T, S) score matrix: query i sees the keys
j <= i + S - T. With T == S this is the usual lower triangle; with T < S the queries are the last T
positions of the sequence, which is what decoding with a KV cache needs (one new query, S cached keys).
"""

import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F

try:  # imported with this module, never inside a torch.compile trace (a traced import can break the graph)
    from kernels.decode import decode_attention as decode_kernel
    from kernels.flash_attention import flash_attention
except ImportError:  # no Triton (its wheels are Linux-only): the other backends still work
    decode_kernel = flash_attention = None

Backend = Literal["auto", "triton", "sdpa", "naive"]
BACKENDS = get_args(Backend)


def resolve_backend(name: str, device: torch.device | str) -> str:
    """The backend that ``name`` means on ``device``: ``auto`` is ``triton`` on CUDA, ``sdpa`` elsewhere."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {name!r}")
    if name != "auto":
        return name
    return "triton" if torch.device(device).type == "cuda" else "sdpa"


def causal_mask(T: int, S: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean (T, S) mask, True where query i may see key j: j <= i + S - T (bottom-right aligned)."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    backend: str,
    dropout_p: float = 0.0,
    causal: bool = True,
) -> torch.Tensor:
    """Scaled dot-product attention of q (B, H, T, D) over k, v (B, H_kv, S, D); returns (B, H, T, D).

    Query head h reads key/value head h // (H // H_kv) (grouped-query attention; H_kv == 1 is multi-query).
    Pass ``dropout_p`` > 0 only in training.
    """
    backend = resolve_backend(backend, q.device)
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(
            f"attention expects q (B, H, T, D) and k, v (B, H_kv, S, D), got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    B, H, T, D = q.shape
    H_kv, S = k.size(1), k.size(2)
    if k.size(0) != B or k.size(3) != D or H % H_kv != 0:
        raise ValueError(
            f"k, v must be (B={B}, H_kv, S, D={D}) with H={H} divisible by H_kv, got {tuple(k.shape)}"
        )
    if causal and T > S:
        raise ValueError(
            f"causal attention needs T <= S (the queries are the last T of S positions), got T={T}, S={S}"
        )
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")

    if backend == "triton":
        if flash_attention is None:
            raise ValueError("attention backend 'triton' needs the triton package; allowed here: sdpa, naive")
        return flash_attention(q, k, v, causal=causal, dropout_p=dropout_p)

    if backend == "sdpa":
        # is_causal in SDPA aligns the mask top-left, which only agrees with ours when T == S;
        # a single query (T == 1) is the last position and sees every key, so it needs no mask.
        mask = causal_mask(T, S, q.device) if causal and T > 1 and T != S else None
        is_causal = causal and T == S and T > 1
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, enable_gqa=True
        )

    # naive: every step written out
    if H != H_kv:
        k = k.repeat_interleave(H // H_kv, dim=1)  # (B, H, S, D)
        v = v.repeat_interleave(H // H_kv, dim=1)  # (B, H, S, D)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(D))  # (B, H, T, S)
    att = att.float()  # softmax in float32 also when q, k, v are half precision
    if causal:
        att = att.masked_fill(~causal_mask(T, S, q.device), float("-inf"))
    att = F.softmax(att, dim=-1)
    if dropout_p > 0.0:
        att = F.dropout(att, p=dropout_p)
    return att.to(v.dtype) @ v  # (B, H, T, S) x (B, H, S, D) -> (B, H, T, D)


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor, backend: str
) -> torch.Tensor:
    """Attention of a decode step against a static KV cache; returns (B, H, T, D).

    q (B, H, T, D) holds the newest T tokens of each sequence; k_cache, v_cache (B, H_kv, S_max, D) hold
    sequence b in their first lengths[b] slots, the new tokens' keys and values included. lengths (B,) is
    a device tensor, so a captured CUDA graph replays this call unchanged while the sequences grow. Token
    t sees the slots j <= lengths[b] - T + t (the causal mask, bottom-right aligned in each sequence).
    ``triton`` runs our split-KV kernel (``kernels.decode``); ``sdpa`` and ``naive`` attend over the
    whole cache under a mask of those slots.
    """
    backend = resolve_backend(backend, q.device)
    if backend == "triton":
        if decode_kernel is None:
            raise ValueError("attention backend 'triton' needs the triton package; allowed here: sdpa, naive")
        return decode_kernel(q, k_cache, v_cache, lengths)

    B, H, T, D = q.shape
    H_kv, S = k_cache.size(1), k_cache.size(2)
    G = H // H_kv
    last = lengths.view(B, 1, 1) - T + torch.arange(T, device=q.device).view(1, T, 1)  # (B, T, 1)
    visible = torch.arange(S, device=q.device) <= last  # (B, T, S)
    if backend == "sdpa":
        # The G query heads of a kv head as G * T rows of one head: SDPA reads each K and V once per kv head.
        rows = q.reshape(B, H_kv, G * T, D)  # (B, H, T, D) -> (B, H_kv, G * T, D)
        mask = visible.unsqueeze(1).expand(B, G, T, S).reshape(B, 1, G * T, S)
        y = F.scaled_dot_product_attention(rows, k_cache, v_cache, attn_mask=mask)
        return y.reshape(B, H, T, D)  # a view unless the backend wrote its output in another layout

    # naive: every step written out
    k = k_cache.repeat_interleave(G, dim=1)  # (B, H, S_max, D)
    v = v_cache.repeat_interleave(G, dim=1)  # (B, H, S_max, D)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(D))  # (B, H, T, S_max)
    att = att.float().masked_fill(~visible.unsqueeze(1), float("-inf"))
    return F.softmax(att, dim=-1).to(v.dtype) @ v  # (B, H, T, S_max) x (B, H, S_max, D) -> (B, H, T, D)
