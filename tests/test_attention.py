"""The attention entry point: every backend against a float64 reference, the mask alignment, the errors."""

import math

import pytest
import torch

from minigpt.attention import BACKENDS, attention, causal_mask, resolve_backend


def reference(q, k, v, causal=True):
    """Attention in float64 with loops over heads and an index-built mask, independent of attention.py."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, T, D = q.shape
    H_kv, S = k.size(1), k.size(2)
    i = torch.arange(T)[:, None]
    j = torch.arange(S)[None, :]
    allowed = (j <= i + (S - T)) if causal else torch.ones(T, S, dtype=torch.bool)
    out = torch.empty(B, H, T, D, dtype=torch.float64)
    for h in range(H):
        g = h // (H // H_kv)  # the key/value head this query head reads
        scores = q[:, h] @ k[:, g].transpose(-2, -1) / math.sqrt(D)  # (B, T, S)
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[:, h] = torch.softmax(scores, dim=-1) @ v[:, g]
    return out


def make_qkv(B, H, H_kv, T, S, D, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g).to(device, dtype)
    k = torch.randn(B, H_kv, S, D, generator=g).to(device, dtype)
    v = torch.randn(B, H_kv, S, D, generator=g).to(device, dtype)
    return q, k, v


SHAPES = [  # (H, H_kv, T, S, causal)
    (4, 4, 16, 16, True),  # multi-head, square
    (4, 2, 16, 16, True),  # grouped-query
    (4, 1, 16, 16, True),  # multi-query
    (4, 4, 5, 12, True),  # T < S: bottom-right aligned
    (4, 2, 5, 12, True),
    (4, 2, 1, 9, True),  # one decode step against a cache
    (4, 1, 1, 1, True),
    (4, 2, 7, 11, False),  # no mask
]


@pytest.mark.parametrize("backend", ["sdpa", "naive"])
@pytest.mark.parametrize("H,H_kv,T,S,causal", SHAPES)
def test_matches_float64_reference(backend, H, H_kv, T, S, causal):
    q, k, v = make_qkv(2, H, H_kv, T, S, 8, seed=T * 100 + S)
    out = attention(q, k, v, backend, causal=causal)
    ref = reference(q, k, v, causal)
    err = (out.double() - ref).abs().max().item()
    print(f"{backend} H={H} H_kv={H_kv} T={T} S={S} causal={causal}: max error {err:.2e}")
    assert out.shape == (2, H, T, 8) and out.dtype == torch.float32
    assert err < 1e-5


@pytest.mark.parametrize("H,H_kv,T,S", [(4, 2, 16, 16), (4, 1, 5, 12), (2, 2, 1, 6)])
def test_sdpa_and_naive_gradients_agree(H, H_kv, T, S):
    grads = {}
    for backend in ("sdpa", "naive"):
        q, k, v = (t.requires_grad_() for t in make_qkv(2, H, H_kv, T, S, 8, seed=3))
        dout = torch.randn(2, H, T, 8, generator=torch.Generator().manual_seed(4))
        attention(q, k, v, backend).backward(dout)
        grads[backend] = (q.grad, k.grad, v.grad)
    for name, a, b in zip("qkv", grads["sdpa"], grads["naive"]):
        err = (a - b).abs().max().item()
        print(f"d{name} H={H} H_kv={H_kv} T={T} S={S}: max error {err:.2e}")
        assert err < 1e-5


def test_bottom_right_mask():
    # T=2 queries over S=4 keys are positions 2 and 3: they see keys 0..2 and 0..3
    assert causal_mask(2, 4).tolist() == [[True, True, True, False], [True, True, True, True]]
    assert torch.equal(causal_mask(5, 5), torch.ones(5, 5, dtype=torch.bool).tril())


def test_decode_step_equals_last_row_of_full_attention():
    # what the KV cache relies on: the last query alone over all keys == the last row of full causal attention
    q, k, v = make_qkv(1, 4, 2, 10, 10, 8, seed=5)
    for backend in ("sdpa", "naive"):
        full = attention(q, k, v, backend)
        last = attention(q[:, :, -1:], k, v, backend)
        tail = attention(q[:, :, -3:], k, v, backend)
        torch.testing.assert_close(last, full[:, :, -1:])
        torch.testing.assert_close(tail, full[:, :, -3:])


def test_strided_inputs():
    # the model passes q, k, v as strided views of one projection
    B, T, H, H_kv, D = 2, 6, 4, 2, 8
    qkv = torch.randn(B, T, (H + 2 * H_kv) * D, generator=torch.Generator().manual_seed(6))
    q, k, v = qkv.split([H * D, H_kv * D, H_kv * D], dim=2)
    q = q.view(B, T, H, D).transpose(1, 2)
    k = k.view(B, T, H_kv, D).transpose(1, 2)
    v = v.view(B, T, H_kv, D).transpose(1, 2)
    assert not q.is_contiguous()
    ref = reference(q, k, v)
    for backend in ("sdpa", "naive"):
        assert (attention(q, k, v, backend).double() - ref).abs().max() < 1e-5


def test_dropout():
    q, k, v = make_qkv(2, 2, 2, 8, 8, 8, seed=7)
    torch.manual_seed(0)
    for backend in ("sdpa", "naive"):
        a = attention(q, k, v, backend, dropout_p=0.5)
        b = attention(q, k, v, backend, dropout_p=0.5)
        assert torch.isfinite(a).all() and not torch.allclose(a, b)
        assert torch.equal(attention(q, k, v, backend), attention(q, k, v, backend))


def test_resolve_backend():
    assert BACKENDS == ("auto", "triton", "sdpa", "naive")
    assert resolve_backend("auto", "cpu") == "sdpa"
    assert resolve_backend("auto", torch.device("cpu")) == "sdpa"
    assert resolve_backend("auto", "cuda") == "triton"
    for name in ("triton", "sdpa", "naive"):
        assert resolve_backend(name, "cpu") == name
    with pytest.raises(ValueError, match="'flash'") as e:
        resolve_backend("flash", "cpu")
    assert "sdpa" in str(e.value) and "naive" in str(e.value)


def test_errors():
    q, k, v = make_qkv(1, 4, 2, 4, 4, 8)
    with pytest.raises(ValueError, match="'flash'"):
        attention(q, k, v, "flash")
    with pytest.raises(ValueError, match="divisible"):
        attention(*make_qkv(1, 4, 3, 4, 4, 8), "naive")
    with pytest.raises(ValueError, match="T <= S"):
        attention(*make_qkv(1, 4, 2, 6, 4, 8), "sdpa")
    with pytest.raises(ValueError, match="dropout_p"):
        attention(q, k, v, "naive", dropout_p=1.0)
    with pytest.raises(ValueError, match="expects q"):
        attention(q[0], k, v, "sdpa")


@pytest.mark.gpu
@pytest.mark.parametrize("H,H_kv,T,S", [(4, 4, 128, 128), (8, 2, 200, 200), (8, 1, 1, 77), (4, 2, 64, 192)])
def test_triton_matches_sdpa_bf16(H, H_kv, T, S):
    results = {}
    for backend in ("sdpa", "triton"):
        qkv = make_qkv(2, H, H_kv, T, S, 64, seed=8, dtype=torch.bfloat16, device="cuda")
        q, k, v = (t.requires_grad_() for t in qkv)
        dout = torch.randn(2, H, T, 64, generator=torch.Generator().manual_seed(9)).to("cuda", torch.bfloat16)
        out = attention(q, k, v, backend)
        out.backward(dout)
        results[backend] = (out, q.grad, k.grad, v.grad)
    for name, a, b in zip(("out", "dq", "dk", "dv"), results["sdpa"], results["triton"]):
        err = (a.float() - b.float()).abs().max().item()
        print(f"triton vs sdpa {name} H={H} H_kv={H_kv} T={T} S={S}: max error {err:.2e}")
        torch.testing.assert_close(b.float(), a.float(), atol=3e-2, rtol=3e-2)
