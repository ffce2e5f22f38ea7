"""minigpt.attention_zoo: every step of the progression computes what the previous one did."""

import math

import pytest
import torch

from minigpt import attention_zoo as zoo


def _x(B=2, T=9, C=12, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, C, generator=g).to(device=device, dtype=dtype)


def test_average_loop_equals_tril_equals_masked_softmax():
    x = _x()
    loop = zoo.average_past_loop(x)
    torch.testing.assert_close(loop[:, 0], x[:, 0])  # the first token only sees itself
    torch.testing.assert_close(loop[:, -1], x.mean(dim=1))  # the last token sees everything
    torch.testing.assert_close(zoo.average_past_tril(x), loop)
    torch.testing.assert_close(zoo.average_past_softmax(x), loop)


def test_masked_softmax_of_zeros_is_a_head_whose_scores_are_zero():
    # Queries of zero make every score 0; an identity value projection passes x through: step 3 again.
    x = _x()
    C = x.shape[-1]
    w_key = torch.randn(C, C, generator=torch.Generator().manual_seed(1))
    out = zoo.causal_attention_head(x, torch.zeros(C, C), w_key, torch.eye(C))
    torch.testing.assert_close(out, zoo.average_past_softmax(x))


def test_head_function_equals_head_module():
    x = _x(C=12)
    torch.manual_seed(2)
    head = zoo.CausalSelfAttention(12, 8, block_size=16)
    # nn.Linear computes x @ weight.T, so the function's (C, D) matrices are the transposed weights.
    ref = zoo.causal_attention_head(x, head.query.weight.T, head.key.weight.T, head.value.weight.T)
    torch.testing.assert_close(head(x), ref)
    # Causality: changing the last token leaves every earlier output unchanged.
    x2 = x.clone()
    x2[:, -1] += 1.0
    torch.testing.assert_close(head(x2)[:, :-1], head(x)[:, :-1])


def test_one_head_wrapper_equals_head_module():
    x = _x(C=12)
    torch.manual_seed(3)
    wrapper = zoo.MultiHeadAttentionWrapper(12, 12, block_size=16, n_head=1)
    with torch.no_grad():
        wrapper.proj.weight.copy_(torch.eye(12))  # an identity projection leaves the single head
    torch.testing.assert_close(wrapper(x), wrapper.heads[0](x))


@pytest.mark.parametrize("bias", [False, True])
def test_wrapper_equals_fused_multihead(bias):
    torch.manual_seed(4)
    wrapper = zoo.MultiHeadAttentionWrapper(16, 24, block_size=32, n_head=4, bias=bias)
    fused = zoo.fuse_heads(wrapper)
    x = _x(T=13, C=16).requires_grad_()
    x_fused = x.detach().clone().requires_grad_()
    y, y_fused = wrapper(x), fused(x_fused)
    torch.testing.assert_close(y_fused, y, atol=1e-5, rtol=1e-5)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
    (y * dy).sum().backward()
    (y_fused * dy).sum().backward()
    torch.testing.assert_close(x_fused.grad, x.grad, atol=1e-5, rtol=1e-5)


def _gqa_from_multihead(mha: zoo.MultiHeadAttention, n_kv_head: int) -> zoo.GroupedQueryAttention:
    """A GQA whose query heads are mha's and whose kv heads are mha's first head of each group."""
    C, d_out = mha.c_attn.weight.shape[1], mha.c_proj.weight.shape[0]
    gqa = zoo.GroupedQueryAttention(C, d_out, mha.n_head, n_kv_head)
    hd, group = mha.head_dim, mha.n_head // n_kv_head
    wq, wk, wv = mha.c_attn.weight.split(d_out)
    keep = [h * group for h in range(n_kv_head)]  # head index kept for each group
    pick = lambda w: torch.cat([w[h * hd : (h + 1) * hd] for h in keep])
    with torch.no_grad():
        gqa.q_proj.weight.copy_(wq)
        gqa.kv_proj.weight.copy_(torch.cat([pick(wk), pick(wv)]))
        gqa.c_proj.weight.copy_(mha.c_proj.weight)
    return gqa


def test_fused_multihead_equals_gqa_with_as_many_kv_heads():
    torch.manual_seed(6)
    mha = zoo.MultiHeadAttention(16, 24, n_head=4)
    gqa = _gqa_from_multihead(mha, n_kv_head=4)
    x = _x(T=11, C=16)
    torch.testing.assert_close(gqa(x), mha(x), atol=1e-5, rtol=1e-5)


def test_gqa_equals_multihead_with_shared_kv_weights():
    # Tie the key/value weights within each group of an MHA: it becomes the GQA with 2 kv heads.
    torch.manual_seed(7)
    mha = zoo.MultiHeadAttention(16, 24, n_head=4)
    hd, d_out = mha.head_dim, 24
    with torch.no_grad():
        w = mha.c_attn.weight.view(3, 4, hd, 16)  # (q/k/v, head, hd, C)
        w[1:, 1] = w[1:, 0]  # heads 0 and 1 share k and v
        w[1:, 3] = w[1:, 2]  # heads 2 and 3 share k and v
    gqa = _gqa_from_multihead(mha, n_kv_head=2)
    assert gqa.kv_proj.weight.shape == (2 * 2 * hd, 16) and mha.c_attn.weight.shape == (3 * d_out, 16)
    x = _x(T=11, C=16)
    torch.testing.assert_close(gqa(x), mha(x), atol=1e-5, rtol=1e-5)


def test_scale_keeps_score_variance_near_one():
    g = torch.Generator().manual_seed(8)
    for D in (16, 256):
        q, k = torch.randn(4096, D, generator=g), torch.randn(4096, D, generator=g)
        raw = (q * k).sum(-1)  # q . k for 4096 random pairs
        assert math.isclose(raw.var().item(), D, rel_tol=0.15)  # grows with the head size
        assert math.isclose((raw / math.sqrt(D)).var().item(), 1.0, rel_tol=0.15)


def test_invalid_head_counts():
    with pytest.raises(ValueError, match="divisible"):
        zoo.MultiHeadAttentionWrapper(16, 20, 8, n_head=3)
    with pytest.raises(ValueError, match="divisible"):
        zoo.MultiHeadAttention(16, 20, n_head=3)
    with pytest.raises(ValueError, match="n_kv_head"):
        zoo.GroupedQueryAttention(16, 24, n_head=4, n_kv_head=3)


def test_bench_runs_on_cpu(capsys):
    rows = zoo.bench([(1, 16, 24, 2)], "cpu", torch.float32)
    assert [r["module"] for r in rows][:2] == ["wrapper (stacked heads)", "fused qkv + sdpa"]
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > r["fwd_ms"] * 0.5 for r in rows)


@pytest.mark.gpu
def test_modules_agree_in_bf16_on_gpu():
    torch.manual_seed(9)
    wrapper = zoo.MultiHeadAttentionWrapper(64, 64, block_size=128, n_head=4).cuda().bfloat16()
    fused = zoo.fuse_heads(wrapper)
    gqa = _gqa_from_multihead(fused.float(), n_kv_head=4).cuda().bfloat16()
    fused = fused.bfloat16()
    x = _x(T=100, C=64, dtype=torch.bfloat16, device="cuda")
    torch.testing.assert_close(fused(x), wrapper(x), atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(gqa(x), fused(x), atol=3e-2, rtol=3e-2)
