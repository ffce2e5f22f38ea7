"""Causal self-attention built up one idea at a time, from averaging past tokens to grouped-query attention.

Read it top to bottom. Each step computes what the previous one did, then adds one idea (the tests check
that neighbouring steps agree on the same input):

1. ``average_past_loop``      every position takes the mean of itself and the positions before it. Two loops.
2. ``average_past_tril``      the same mean as one matrix product with a row-normalized lower triangle.
3. ``average_past_softmax``   the same weights as a softmax of zeros with the future masked to -inf.
4. ``causal_attention_head``  the scores are no longer zeros but computed from the data: query . key.
5. ``CausalSelfAttention``    step 4 as a module with learned projections: one attention head.
6. ``MultiHeadAttentionWrapper``  several heads side by side, concatenated, then a projection.
7. ``MultiHeadAttention``     the same function with one fused q/k/v projection over
                              ``F.scaled_dot_product_attention`` (one kernel for all heads).
8. ``GroupedQueryAttention``  fewer key/value heads than query heads; each serves a group of queries.

The model itself (minigpt/model.py) uses step 8's layout with the project's own attention backends;
kernels/unfused.py and kernels/flash_attention.py are the GPU kernels for steps 4 to 8.

    python -m minigpt.attention_zoo --bench    # stacked heads vs the fused module, same weights
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------------------
# Steps 1 to 3: a fixed way of mixing the past (a plain average)
# ---------------------------------------------------------------------------------------------------------


def average_past_loop(x: torch.Tensor) -> torch.Tensor:
    """x (B, T, C) -> out (B, T, C) with out[b, t] = mean(x[b, :t+1]): each token sees only its past."""
    B, T, C = x.shape
    out = torch.zeros_like(x)
    for b in range(B):
        for t in range(T):
            out[b, t] = x[b, : t + 1].mean(dim=0)
    return out


def average_past_tril(x: torch.Tensor) -> torch.Tensor:
    """The same average as a matrix product: row t of `weights` holds 1/(t+1) in its first t+1 columns."""
    T = x.shape[1]
    weights = torch.tril(torch.ones(T, T, device=x.device, dtype=x.dtype))
    weights = weights / weights.sum(dim=1, keepdim=True)  # each row sums to 1
    return weights @ x  # (T, T) @ (B, T, C) -> (B, T, C)


def average_past_softmax(x: torch.Tensor) -> torch.Tensor:
    """The same weights again, as softmax over scores that are all 0, with the future set to -inf.

    exp(0) = 1 for each visible position and exp(-inf) = 0 for the future, so softmax gives 1/(t+1): the
    average. Attention keeps exactly this shape and only replaces the zeros by scores computed from the data.
    """
    T = x.shape[1]
    scores = torch.zeros(T, T, device=x.device, dtype=x.dtype)
    future = torch.triu(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=1)
    weights = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    return weights @ x


# ---------------------------------------------------------------------------------------------------------
# Step 4: weights from the data
# ---------------------------------------------------------------------------------------------------------


def causal_attention_head(
    x: torch.Tensor, w_query: torch.Tensor, w_key: torch.Tensor, w_value: torch.Tensor
) -> torch.Tensor:
    """One causal self-attention head. x (B, T, C), each w (C, D) -> (B, T, D).

    Every token emits a query ("what am I looking for"), a key ("what do I hold") and a value ("what I
    pass on"). The score of token t for an earlier token s is q_t . k_s; softmax turns a row of scores into
    weights, and the output is the weighted sum of values.

    Why divide by sqrt(D): if q and k have entries of variance 1, q . k is a sum of D products and has
    variance D. Without the scale, scores grow with the head size, softmax saturates towards a one-hot
    vector (one weight near 1, the rest near 0) and its gradients vanish. Dividing by sqrt(D) keeps the
    scores at variance 1 for every head size.
    """
    q, k, v = x @ w_query, x @ w_key, x @ w_value  # (B, T, D) each
    T, D = x.shape[1], q.shape[-1]
    scores = q @ k.transpose(-2, -1) / math.sqrt(D)  # (B, T, T): row t scores every token s
    future = torch.triu(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=1)
    weights = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)  # the future gets weight 0
    return weights @ v  # (B, T, D)


# ---------------------------------------------------------------------------------------------------------
# Steps 5 to 8: modules
# ---------------------------------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    """Step 5: one attention head with learned query/key/value projections and dropout on the weights."""

    def __init__(self, d_in: int, d_out: int, block_size: int, dropout: float = 0.0, bias: bool = False):
        super().__init__()
        self.query = nn.Linear(d_in, d_out, bias=bias)
        self.key = nn.Linear(d_in, d_out, bias=bias)
        self.value = nn.Linear(d_in, d_out, bias=bias)
        self.dropout = nn.Dropout(dropout)
        # The mask is built once for the longest sequence and sliced; a buffer moves with .to(device).
        mask = torch.triu(torch.ones(block_size, block_size, dtype=torch.bool), diagonal=1)
        self.register_buffer("future", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.query(x), self.key(x), self.value(x)  # (B, T, d_out)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, T, T)
        scores = scores.masked_fill(self.future[:T, :T], float("-inf"))
        weights = self.dropout(torch.softmax(scores, dim=-1))
        return weights @ v  # (B, T, d_out)


class MultiHeadAttentionWrapper(nn.Module):
    """Step 6: n_head independent heads of size d_out // n_head, concatenated, then mixed by a projection.

    Easy to read and slow: each head runs its own three small matrix products and its own softmax.
    """

    def __init__(
        self, d_in: int, d_out: int, block_size: int, n_head: int, dropout: float = 0.0, bias: bool = False
    ):
        super().__init__()
        if d_out % n_head != 0:
            raise ValueError(f"d_out ({d_out}) must be divisible by n_head ({n_head})")
        self.heads = nn.ModuleList(
            CausalSelfAttention(d_in, d_out // n_head, block_size, dropout, bias) for _ in range(n_head)
        )
        self.proj = nn.Linear(d_out, d_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([head(x) for head in self.heads], dim=-1)  # (B, T, n_head * head_size)
        return self.proj(y)


class MultiHeadAttention(nn.Module):
    """Step 7: all heads at once. One linear layer makes q, k and v for every head; the heads become a
    batch dimension, and F.scaled_dot_product_attention runs them in one fused kernel.

    With the weights of a MultiHeadAttentionWrapper stacked into c_attn (see `fuse_heads`) it computes
    the same function.
    """

    def __init__(self, d_in: int, d_out: int, n_head: int, dropout: float = 0.0, bias: bool = False):
        super().__init__()
        if d_out % n_head != 0:
            raise ValueError(f"d_out ({d_out}) must be divisible by n_head ({n_head})")
        self.n_head, self.head_dim, self.dropout = n_head, d_out // n_head, dropout
        self.c_attn = nn.Linear(d_in, 3 * d_out, bias=bias)  # rows: all query heads, all keys, all values
        self.c_proj = nn.Linear(d_out, d_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        nh, hd = self.n_head, self.head_dim
        q, k, v = self.c_attn(x).split(nh * hd, dim=2)  # (B, T, d_out) each
        q = q.view(B, T, nh, hd).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, nh, hd).transpose(1, 2)
        v = v.view(B, T, nh, hd).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).reshape(B, T, nh * hd)  # heads side by side again: (B, T, d_out)
        return self.c_proj(y)


class GroupedQueryAttention(nn.Module):
    """Step 8: n_head query heads share n_kv_head key/value heads (n_head % n_kv_head == 0).

    Each key/value head serves a group of n_head // n_kv_head query heads. The key/value projection and,
    more importantly, the KV cache used in generation shrink by that factor, at a small cost in quality.
    n_kv_head = n_head is step 7; n_kv_head = 1 is multi-query attention.
    """

    def __init__(
        self, d_in: int, d_out: int, n_head: int, n_kv_head: int, dropout: float = 0.0, bias: bool = False
    ):
        super().__init__()
        if d_out % n_head != 0 or n_kv_head <= 0 or n_head % n_kv_head != 0:
            raise ValueError(
                f"need d_out % n_head == 0 and n_head % n_kv_head == 0, got d_out={d_out}, n_head={n_head}, "
                f"n_kv_head={n_kv_head}"
            )
        self.n_head, self.n_kv_head, self.head_dim, self.dropout = n_head, n_kv_head, d_out // n_head, dropout
        self.q_proj = nn.Linear(d_in, d_out, bias=bias)
        self.kv_proj = nn.Linear(d_in, 2 * n_kv_head * self.head_dim, bias=bias)  # rows: all keys, all values
        self.c_proj = nn.Linear(d_out, d_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        nh, nkv, hd = self.n_head, self.n_kv_head, self.head_dim
        q = self.q_proj(x).view(B, T, nh, hd).transpose(1, 2)  # (B, nh, T, hd)
        k, v = self.kv_proj(x).split(nkv * hd, dim=2)
        k = k.view(B, T, nkv, hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, nkv, hd).transpose(1, 2)
        # enable_gqa: query head h reads key/value head h // (nh // nkv), without copying k and v.
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0, enable_gqa=True
        )
        y = y.transpose(1, 2).reshape(B, T, nh * hd)  # (B, T, d_out)
        return self.c_proj(y)


def fuse_heads(wrapper: MultiHeadAttentionWrapper) -> MultiHeadAttention:
    """A MultiHeadAttention computing exactly what `wrapper` computes: its per-head weights stacked."""
    heads = list(wrapper.heads)
    d_out, d_in = wrapper.proj.weight.shape[0], heads[0].query.weight.shape[1]
    bias = heads[0].query.bias is not None
    fused = MultiHeadAttention(d_in, d_out, len(heads), heads[0].dropout.p, bias)
    fused = fused.to(device=wrapper.proj.weight.device, dtype=wrapper.proj.weight.dtype)
    with torch.no_grad():
        # c_attn rows: [q of head 0, q of head 1, ..., k of head 0, ..., v of head 0, ...]
        fused.c_attn.weight.copy_(
            torch.cat([getattr(h, n).weight for n in ("query", "key", "value") for h in heads])
        )
        if bias:
            fused.c_attn.bias.copy_(
                torch.cat([getattr(h, n).bias for n in ("query", "key", "value") for h in heads])
            )
        fused.c_proj.load_state_dict(wrapper.proj.state_dict())
    return fused


# ---------------------------------------------------------------------------------------------------------
# Benchmark: the same function, stacked heads vs fused
# ---------------------------------------------------------------------------------------------------------


def _median_ms(fn) -> float:
    from torch.utils.benchmark import Timer  # synchronizes CUDA around each measurement

    return Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.3).median * 1e3


def _bench_shape(B: int, T: int, C: int, nh: int, device: str, dtype: torch.dtype) -> list[dict]:
    torch.manual_seed(0)
    wrapper = MultiHeadAttentionWrapper(C, C, T, nh).to(device=device, dtype=dtype)
    fused = fuse_heads(wrapper)  # the same function as the wrapper
    gqa = GroupedQueryAttention(C, C, nh, max(1, nh // 4)).to(device=device, dtype=dtype)
    x = torch.randn(B, T, C, device=device, dtype=dtype, requires_grad=True)
    calls = {
        "wrapper (stacked heads)": lambda: wrapper(x),
        "fused qkv + sdpa": lambda: fused(x),
        f"gqa, n_kv_head={gqa.n_kv_head}": lambda: gqa(x),
    }
    if device == "cuda":  # the three-kernel pipeline behind nn.MultiheadAttention's interface
        from kernels.unfused import UnfusedMultiheadAttention

        unfused = UnfusedMultiheadAttention(C, nh, bias=False, device=device, dtype=dtype)
        calls["unfused triton kernels"] = lambda: unfused(x, x, x, is_causal=True)[0]
    rows = []
    for name, forward in calls.items():
        fwd = _median_ms(forward)
        both = _median_ms(lambda forward=forward: forward().sum().backward())
        rows.append({"B": B, "T": T, "C": C, "n_head": nh, "module": name, "fwd_ms": fwd, "fwd_bwd_ms": both})
    return rows


def bench(shapes: list[tuple[int, int, int, int]], device: str, dtype: torch.dtype) -> list[dict]:
    """Forward and forward+backward ms of each module at each (B, T, d_model, n_head)."""
    return [row for shape in shapes for row in _bench_shape(*shape, device, dtype)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m minigpt.attention_zoo", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--bench", action="store_true", help="time stacked heads against the fused module")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if not args.bench:
        parser.print_help()
        return 0
    if args.device == "cuda":  # (B, T, d_model, n_head): the char GPT and GPT-2 small
        shapes, dtype = [(64, 256, 384, 6), (16, 1024, 768, 12)], torch.bfloat16
    else:
        shapes, dtype = [(4, 128, 192, 6)], torch.float32
    rows = bench(shapes, args.device, dtype)
    print(f"{args.device} {torch.cuda.get_device_name() if args.device == 'cuda' else ''} {dtype}")
    print(f"{'B,T,C,n_head':<16} {'module':<26} {'fwd ms':>9} {'fwd+bwd ms':>11} {'x wrapper':>10}")
    base = {}
    for r in rows:
        key = (r["B"], r["T"], r["C"], r["n_head"])
        base.setdefault(key, r["fwd_bwd_ms"])
        print(
            f"{','.join(map(str, key)):<16} {r['module']:<26} {r['fwd_ms']:>9.3f} {r['fwd_bwd_ms']:>11.3f} "
            f"{base[key] / r['fwd_bwd_ms']:>10.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
