"""kernels.unfused: each of the three kernels against PyTorch, the pipeline and its gradient, the MHA layer.

On CPU the kernels run in the Triton interpreter (fp32 and fp16; the interpreter has no bf16); the bf16
cases run on a GPU only.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from kernels.unfused import (
    UnfusedMultiheadAttention,
    attention_scores,
    softmax_rows,
    unfused_attention,
    weighted_values,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [
    torch.float32,
    torch.float16,
    pytest.param(torch.bfloat16, marks=pytest.mark.gpu),
]
TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 3e-2}


def _randn(*shape, dtype, seed, scale=1.0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device=DEVICE, dtype=dtype)


def _keep(T, S):
    """Bottom-right aligned causal mask: query i sees keys j <= i + S - T."""
    return torch.ones(T, S, dtype=torch.bool, device=DEVICE).tril(S - T)


def _reference(q, k, v, causal, scale=None):
    """Float32 attention with an explicit mask; k and v repeated for grouped-query heads."""
    group = q.shape[1] // k.shape[1]
    k, v = k.float().repeat_interleave(group, 1), v.float().repeat_interleave(group, 1)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q.float() @ k.transpose(-2, -1) * scale
    if causal:
        s = s.masked_fill(~_keep(q.shape[2], k.shape[2]), float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def _assert_close(actual, expected, tol):
    """Close to the float32 expectation, with the absolute tolerance scaled by its largest value."""
    expected = expected.float()
    atol = tol * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.float(), expected, atol=atol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scores_kernel_ragged(dtype):
    B, H, H_kv, T, S, D = 2, 4, 2, 37, 53, 24
    q, k = _randn(B, H, T, D, dtype=dtype, seed=0), _randn(B, H_kv, S, D, dtype=dtype, seed=1)
    out = attention_scores(q, k, 0.3)
    ref = q.float() @ k.float().repeat_interleave(2, 1).transpose(-2, -1) * 0.3
    assert out.dtype == torch.float32 and out.shape == (B, H, T, S)
    torch.testing.assert_close(out, ref, atol=TOL[dtype], rtol=TOL[dtype])
    # Strided (non-contiguous) inputs read through their strides.
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    torch.testing.assert_close(attention_scores(qt, k, 0.3), out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_softmax_kernel_ragged_long_rows(dtype, causal):
    # S = 300 spans two 256-wide chunks; large scores check that the max is subtracted (no overflow).
    B, H, T, S = 1, 2, 37, 300
    x = _randn(B, H, T, S, dtype=torch.float32, seed=2, scale=30.0)
    p = softmax_rows(x, causal, dtype=dtype)
    ref = torch.softmax(x.masked_fill(~_keep(T, S), float("-inf")) if causal else x, dim=-1)
    assert p.dtype == dtype and torch.isfinite(p).all()
    torch.testing.assert_close(p.float(), ref, atol=TOL[dtype], rtol=TOL[dtype])
    if causal:
        assert (p[..., ~_keep(T, S)] == 0).all()


def test_softmax_rows_that_see_no_key_are_zero():
    T, S = 20, 7  # bottom-right alignment: the first T - S queries see nothing
    p = softmax_rows(_randn(1, 1, T, S, dtype=torch.float32, seed=3), causal=True)
    assert (p[0, 0, : T - S] == 0).all()
    torch.testing.assert_close(p[0, 0, T - S :].sum(-1), torch.ones(S, device=DEVICE))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_weighted_values_kernel_ragged(dtype, causal):
    B, H, H_kv, T, S, D = 2, 4, 1, 37, 53, 24
    x = _randn(B, H, T, S, dtype=torch.float32, seed=4)
    p = torch.softmax(x.masked_fill(~_keep(T, S), float("-inf")) if causal else x, dim=-1).to(dtype)
    v = _randn(B, H_kv, S, D, dtype=dtype, seed=5)
    out = weighted_values(p, v, causal)  # causal: skips the all-zero blocks right of the diagonal
    ref = p.float() @ v.float().expand(B, H, S, D)
    assert out.dtype == dtype and out.shape == (B, H, T, D)
    torch.testing.assert_close(out.float(), ref, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_unfused_attention_forward_and_backward(dtype, causal):
    B, H, H_kv, T, S, D = 2, 4, 2, 37, 53, 24
    q = _randn(B, H, T, D, dtype=dtype, seed=6).requires_grad_()
    k = _randn(B, H_kv, S, D, dtype=dtype, seed=7).requires_grad_()
    v = _randn(B, H_kv, S, D, dtype=dtype, seed=8).requires_grad_()
    out = unfused_attention(q, k, v, causal=causal, sm_scale=0.2)
    ref = _reference(q, k, v, causal, scale=0.2)
    torch.testing.assert_close(out.float(), ref, atol=TOL[dtype], rtol=TOL[dtype])
    dout = _randn(B, H, T, D, dtype=dtype, seed=9)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.float())
    for name, g, r in zip("qkv", grads, ref_grads):
        assert g.dtype == dtype, name
        torch.testing.assert_close(g.float(), r.float(), atol=2 * TOL[dtype], rtol=2 * TOL[dtype], msg=name)


def test_unfused_attention_matches_sdpa_default_scale():
    q, k, v = (_randn(1, 2, 33, 16, dtype=torch.float32, seed=s) for s in (10, 11, 12))
    torch.testing.assert_close(
        unfused_attention(q, k, v),
        F.scaled_dot_product_attention(q, k, v, is_causal=True),
        atol=1e-4,
        rtol=1e-4,
    )


def test_unfused_attention_rejects_bad_inputs():
    q = _randn(1, 4, 8, 16, dtype=torch.float32, seed=0)
    with pytest.raises(ValueError, match="H % H_kv"):
        unfused_attention(q, q[:, :3], q[:, :3])
    with pytest.raises(ValueError, match="4-d"):
        unfused_attention(q[0], q, q)
    with pytest.raises(TypeError, match="float16"):
        unfused_attention(q.long(), q.long(), q.long())
    with pytest.raises(ValueError, match="empty inputs"):
        unfused_attention(q, q[:, :0], q[:, :0])
    with pytest.raises(ValueError, match="sm_scale=nan"):
        unfused_attention(q, q, q, sm_scale=float("nan"))
    with pytest.raises(ValueError, match="65535"):
        big = q[:1, :1].expand(4096, 16, 8, 16)
        unfused_attention(big, big, big)


def test_unfused_double_backward_raises():
    q = _randn(1, 2, 8, 16, dtype=torch.float32, seed=0).requires_grad_()
    (dq,) = torch.autograd.grad(unfused_attention(q, q, q).square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        dq.sum().backward()


@pytest.mark.parametrize("dtype", DTYPES)
def test_unfused_mha_matches_torch_mha(dtype):
    """Same weights and input as torch.nn.MultiheadAttention; the reference runs in float32."""
    E, nh, B, T = 48, 4, 2, 29
    torch.manual_seed(0)
    ours = UnfusedMultiheadAttention(E, nh, bias=True, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.2)  # non-zero biases too
    ref = torch.nn.MultiheadAttention(E, nh, bias=True, batch_first=True, device=DEVICE)
    ref.load_state_dict({name: p.float() for name, p in ours.state_dict().items()})  # same parameter names
    x = _randn(B, T, E, dtype=dtype, seed=13).requires_grad_()
    x_ref = x.detach().float().requires_grad_()
    y, weights = ours(x, x, x, is_causal=True)
    causal_mask = ~_keep(T, T)  # nn.MultiheadAttention: True = not allowed to attend
    y_ref, _ = ref(x_ref, x_ref, x_ref, attn_mask=causal_mask, need_weights=False)
    assert weights is None and y.dtype == dtype
    _assert_close(y, y_ref, TOL[dtype])
    dy = _randn(B, T, E, dtype=dtype, seed=14)
    (y.float() * dy.float()).sum().backward()
    (y_ref * dy.float()).sum().backward()
    _assert_close(x.grad, x_ref.grad, 2 * TOL[dtype])
    _assert_close(ours.in_proj_weight.grad, ref.in_proj_weight.grad, 2 * TOL[dtype])
    _assert_close(ours.out_proj.weight.grad, ref.out_proj.weight.grad, 2 * TOL[dtype])


def test_unfused_mha_cross_attention_non_causal():
    E, nh = 32, 2
    torch.manual_seed(1)
    ours = UnfusedMultiheadAttention(E, nh, device=DEVICE)
    ref = torch.nn.MultiheadAttention(E, nh, batch_first=True, device=DEVICE)
    ref.load_state_dict(ours.state_dict())  # same parameter names
    query, memory = (
        _randn(2, 11, E, dtype=torch.float32, seed=15),
        _randn(2, 19, E, dtype=torch.float32, seed=16),
    )
    torch.testing.assert_close(
        ours(query, memory, memory)[0], ref(query, memory, memory)[0], atol=1e-4, rtol=1e-4
    )


def test_unfused_mha_rejects_unsupported_options():
    with pytest.raises(ValueError, match="divisible"):
        UnfusedMultiheadAttention(30, 4)
    with pytest.raises(ValueError, match="dropout"):
        UnfusedMultiheadAttention(32, 4, dropout=0.1)
    layer = UnfusedMultiheadAttention(32, 4)
    x = torch.randn(1, 5, 32)
    with pytest.raises(ValueError, match="need_weights"):
        layer(x, x, x, need_weights=True)
    with pytest.raises(ValueError, match="attn_mask"):
        layer(x, x, x, attn_mask=torch.ones(5, 5, dtype=torch.bool))
