"""The GPT model: shapes, init, backend agreement, KV-cache generation, sampling filters and errors."""

import math
import os

import pytest
import torch

from minigpt.model import GPT, GPTConfig, KVCache, sample
from minigpt.timing import attach_timer

TINY = dict(block_size=24, vocab_size=67, n_layer=2, n_head=4, n_embd=32)
MODERN = dict(rope=True, norm="rmsnorm", qk_norm=True, mlp="swiglu")


def make_model(seed=0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **overrides}))


def tokens(B, T, vocab=TINY["vocab_size"], seed=1) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("options", [{}, MODERN, dict(n_kv_head=2, mlp="relu2", bias=True)])
def test_forward_backward_shapes(options):
    model = make_model(**options)
    x, y = tokens(3, 24), tokens(3, 24, seed=2)
    logits, loss = model(x, y)
    assert logits.shape == (3, 24, 67) and loss.dim() == 0
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, name
        assert torch.isfinite(p.grad).all(), name
    logits, loss = model(x[:, :5])
    assert logits.shape == (3, 1, 67) and loss is None


def test_loss_at_init_is_uniform():
    model = make_model(vocab_size=257)
    _, loss = model(tokens(8, 24, vocab=257), tokens(8, 24, vocab=257, seed=2))
    print(f"loss at init {loss.item():.4f}, ln(257) = {math.log(257):.4f}")
    assert abs(loss.item() - math.log(257)) < 0.05


def test_ignore_index():
    model = make_model()
    x, y = tokens(2, 10), tokens(2, 10, seed=2)
    y_half = y.clone()
    y_half[:, 5:] = -1
    logits, loss = model(x, y_half)
    expected = torch.nn.functional.cross_entropy(logits[:, :5].reshape(-1, 67), y[:, :5].reshape(-1))
    torch.testing.assert_close(loss, expected)


def test_init_and_tying():
    model = make_model(n_layer=4)
    assert model.transformer.wte.weight is model.lm_head.weight
    std = model.transformer.h[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(2 * 4)) < 0.003
    assert abs(model.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.002


@pytest.mark.parametrize("n_kv_head", [None, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize(
    "options", [{}, MODERN, dict(mlp="relu2", norm="rmsnorm")], ids=["gpt2", "modern", "relu2"]
)
def test_sdpa_and_naive_agree(n_kv_head, options):
    x, y = tokens(2, 24), tokens(2, 24, seed=2)
    results = {}
    for backend in ("sdpa", "naive"):
        model = make_model(n_kv_head=n_kv_head, attention=backend, **options)
        logits, loss = model(x, y)
        loss.backward()
        results[backend] = (logits, {n: p.grad for n, p in model.named_parameters()})
    (logits_a, grads_a), (logits_b, grads_b) = results["sdpa"], results["naive"]
    print(f"\nlogits: max error {(logits_a - logits_b).abs().max().item():.2e}")
    torch.testing.assert_close(logits_a, logits_b, atol=1e-5, rtol=1e-5)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        err = (grads_a[name] - grads_b[name]).abs().max().item()
        print(f"grad {name}: max error {err:.2e}")
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["sdpa", "naive"])
@pytest.mark.parametrize(
    "options", [{}, dict(n_kv_head=2), dict(MODERN, n_kv_head=1)], ids=["gpt2", "gqa", "modern"]
)
def test_greedy_generate_with_and_without_kv_cache(backend, options):
    model = make_model(attention=backend, **options).double()  # float64: no near-ties flip an argmax
    with torch.no_grad():  # larger weights than at init, so attention (and any position mistake) matters
        for p in model.parameters():
            p.mul_(10.0 if p.dim() >= 2 else 1.0)
    prompt = tokens(3, 5)
    with_cache = model.generate(prompt, 19, temperature=0.0)
    without = model.generate(prompt, 19, temperature=0.0, use_kv_cache=False)
    assert with_cache.shape == (3, 24)
    assert torch.equal(with_cache[:, :5], prompt)
    assert torch.equal(with_cache, without)
    assert len(set(with_cache[:, 5:].flatten().tolist())) > 1  # a real sequence, not one repeated token


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the kernel in the interpreter")
def test_triton_backend_in_the_model_matches_sdpa():
    """The model's triton path on the CPU (Triton's interpreter, fp32): q, k, v as strided views of c_attn,
    grouped-query heads, and T=1 decode steps against the KV cache."""
    x, y = tokens(2, 24), tokens(2, 24, seed=2)
    results = {}
    for backend in ("sdpa", "triton"):
        model = make_model(n_kv_head=2, attention=backend)
        logits, loss = model(x, y)
        loss.backward()
        results[backend] = (logits, {n: p.grad for n, p in model.named_parameters()})
    (logits_a, grads_a), (logits_b, grads_b) = results["sdpa"], results["triton"]
    torch.testing.assert_close(logits_b, logits_a, atol=1e-4, rtol=1e-4)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-4, rtol=1e-3, msg=name)

    model = make_model(n_kv_head=2, attention="triton")
    with torch.no_grad():  # sharper attention, as in the generate test above
        for p in model.parameters():
            p.mul_(10.0 if p.dim() >= 2 else 1.0)
    prompt = tokens(2, 5)
    triton_tokens = model.generate(prompt, 10, temperature=0.0)
    for block in model.transformer.h:
        block.attn.backend = "sdpa"
    assert torch.equal(triton_tokens, model.generate(prompt, 10, temperature=0.0))


def test_kv_cache_logits_match_full_forward():
    # prefill 7 tokens, then decode one at a time: each step's logits equal the full forward's there
    for options in ({}, MODERN):
        model = make_model(n_kv_head=2, **options).eval()
        x = tokens(2, 12)
        full, _ = model(x, x)  # (B, T, V) at every position
        cache = [KVCache(model.config.block_size) for _ in model.transformer.h]
        logits, _ = model(x[:, :7], kv_cache=cache)
        torch.testing.assert_close(logits[:, -1], full[:, 6], atol=1e-5, rtol=1e-5)
        for t in range(7, 12):
            logits, _ = model(x[:, t : t + 1], kv_cache=cache)
            torch.testing.assert_close(logits[:, -1], full[:, t], atol=1e-5, rtol=1e-5)
        assert cache[0].pos == 12


def test_generate_sampling_is_reproducible_and_restores_mode():
    model = make_model(dropout=0.1)
    model.train()
    prompt = tokens(2, 3)
    a = model.generate(prompt, 10, top_k=10, top_p=0.9, generator=torch.Generator().manual_seed(5))
    b = model.generate(prompt, 10, top_k=10, top_p=0.9, generator=torch.Generator().manual_seed(5))
    c = model.generate(prompt, 10, top_k=10, top_p=0.9, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert model.training


def test_generate_runs_eagerly_in_a_compiled_model():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = make_model(rope=True)
    counter = CompileCounter()
    model.compile(backend=counter)  # in place, as the training module does
    model(tokens(2, 24), tokens(2, 24, seed=2))
    assert counter.frame_count == 1
    prompt = tokens(2, 4)
    out = model.generate(prompt, 12, temperature=0.0)
    assert counter.frame_count == 1  # no recompiles for new lengths while generating
    torch.compiler.reset()
    assert torch.equal(out, make_model(rope=True).generate(prompt, 12, temperature=0.0))


def test_generate_past_block_size():
    model = make_model()
    prompt = tokens(1, 20)
    with pytest.raises(ValueError, match=r"prompt length 20 \+ max_new_tokens 5 .*block_size=24"):
        model.generate(prompt, 5)
    out = model.generate(prompt, 30, use_kv_cache=False)  # crops the context to the last 24 tokens
    assert out.shape == (1, 50)
    with pytest.raises(ValueError, match="prompt length 30 .*block_size=24"):
        model.generate(tokens(1, 30), 1, use_kv_cache=False)
    assert model.generate(prompt, 4).shape == (1, 24)  # exactly fills the cache


PROBS = torch.tensor([0.05, 0.4, 0.05, 0.3, 0.2])  # sorted: 1 (0.4), 3 (0.3), 4 (0.2), 0, 2 (0.05 each)


@pytest.mark.parametrize(
    "top_k,top_p,allowed",
    [
        (None, None, {0, 1, 2, 3, 4}),
        (2, None, {1, 3}),
        (1, None, {1}),
        (None, 0.65, {1, 3}),
        (None, 0.75, {1, 3, 4}),
        (None, 0.3, {1}),
        (3, 0.65, {1, 3}),
        (2, 0.95, {1, 3}),
    ],
)
def test_sampling_stays_in_the_allowed_set(top_k, top_p, allowed):
    logits = PROBS.log().repeat(4000, 1)  # (4000, 5)
    drawn = sample(logits, 1.0, top_k, top_p, generator=torch.Generator().manual_seed(0)).flatten()
    assert set(drawn.tolist()) == allowed  # never outside, and every allowed token shows up
    # and in proportion to the renormalized probabilities
    kept = torch.tensor(sorted(allowed))
    expected = PROBS[kept] / PROBS[kept].sum()
    freq = torch.stack([(drawn == i).float().mean() for i in kept])
    assert (freq - expected).abs().max() < 0.03


def test_sampling_temperature():
    logits = PROBS.log().repeat(4000, 1)
    assert torch.equal(sample(logits, 0.0).flatten(), torch.ones(4000, dtype=torch.long))  # greedy
    g = torch.Generator().manual_seed(0)
    cold = sample(logits, 0.1, generator=g).flatten()
    assert (cold == 1).float().mean() > 0.9
    with pytest.raises(ValueError, match="top_p"):
        sample(logits, 1.0, top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        sample(logits, 1.0, top_k=0)
    with pytest.raises(ValueError, match="temperature"):
        sample(logits, -1.0)


def test_sequence_longer_than_block_size():
    model = make_model()
    with pytest.raises(ValueError, match="25.*block_size=24"):
        model(tokens(1, 25))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(n_embd=30, n_head=4), "n_embd=30: must be divisible by n_head=4"),
        (dict(n_head=4, n_kv_head=3), "n_head=4: must be divisible by n_kv_head=3"),
        (dict(attention="flash"), r"attention='flash': allowed: auto \| triton \| sdpa \| naive"),
        (dict(norm="batchnorm"), r"norm='batchnorm': allowed: layernorm \| rmsnorm"),
        (dict(mlp="moe"), "mlp='moe': allowed: gelu"),
        (dict(n_layer=0), "n_layer=0: must be a positive integer"),
        (dict(n_layer=True), "n_layer=True: must be a positive integer"),
        (dict(block_size=-1), "block_size=-1: must be a positive integer"),
        (dict(dropout=1.0), r"dropout=1.0: must lie in \[0, 1\)"),
        (dict(rope=True, n_embd=36, n_head=4), "rope=True needs an even head size"),
    ],
)
def test_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**{**TINY, **overrides})


def test_config_defaults():
    cfg = GPTConfig()
    assert (cfg.block_size, cfg.vocab_size, cfg.n_layer, cfg.n_head, cfg.n_embd) == (256, 257, 6, 6, 384)
    assert cfg.n_kv_head == 6 and cfg.attention == "auto" and cfg.dropout == 0.0 and cfg.bias is False
    assert (cfg.rope, cfg.norm, cfg.qk_norm, cfg.mlp) == (False, "layernorm", False, "gelu")


def test_attention_timer_called_once_per_layer():
    model = make_model(n_layer=3)
    calls = []

    def timer(fn, q, k, v):
        calls.append(q.shape)
        return fn(q, k, v)

    attach_timer(model, timer)
    _, loss = model(tokens(2, 24), tokens(2, 24, seed=2))
    assert len(calls) == 3
    loss.backward()  # the timer passes gradients through
    assert model.transformer.h[0].attn.c_attn.weight.grad is not None
    model(tokens(2, 8))
    assert len(calls) == 6
    attach_timer(model, None)
    model(tokens(2, 8))
    assert len(calls) == 6


def test_num_params_and_flops():
    model = make_model()
    total = sum(p.numel() for p in model.parameters())
    assert model.num_params(non_embedding=False) == total
    assert model.num_params() == total - 24 * 32  # minus wpe
    assert make_model(rope=True).num_params() == total - 24 * 32  # no wpe to subtract
    n = model.num_params()
    assert model.flops_per_token() == 6 * n + 12 * 2 * 4 * 8 * 24


def test_qkv_are_views_of_one_projection():
    model = make_model(n_kv_head=2, attention="naive")
    seen = []
    attach_timer(model, lambda fn, q, k, v: seen.append((q, k, v)) or fn(q, k, v))
    model(tokens(1, 8))
    q, k, v = seen[0]
    assert q.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
    assert q.shape == (1, 4, 8, 8) and k.shape == v.shape == (1, 2, 8, 8)


@pytest.mark.gpu
@pytest.mark.parametrize("options", [{}, dict(MODERN, n_kv_head=2)], ids=["gpt2", "modern"])
def test_triton_model_matches_sdpa_bf16(options):
    cfg = dict(block_size=128, vocab_size=257, n_layer=2, n_head=4, n_embd=256, **options)
    x = tokens(4, 128, vocab=257).cuda()
    y = tokens(4, 128, vocab=257, seed=2).cuda()
    results = {}
    for backend in ("sdpa", "triton"):
        torch.manual_seed(0)
        model = GPT(GPTConfig(attention=backend, **cfg)).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits, loss = model(x, y)
        loss.backward()
        results[backend] = (logits.float(), {n: p.grad for n, p in model.named_parameters()})
    (logits_a, grads_a), (logits_b, grads_b) = results["sdpa"], results["triton"]
    print(f"\nlogits: max error {(logits_a - logits_b).abs().max().item():.2e}")
    torch.testing.assert_close(logits_b, logits_a, atol=5e-2, rtol=5e-2)
    for name in grads_a:
        scale = grads_a[name].abs().max().item()
        err = (grads_a[name] - grads_b[name]).abs().max().item()
        print(f"grad {name}: max error {err:.2e} (max {scale:.2e})")
        assert err <= 0.05 * scale + 1e-5, name


def test_padded_vocabulary_trains_and_predicts_like_the_unpadded_one():
    """vocab_multiple pads the embedding/output rows, but the padding is never predicted: with the same real
    weights the loss, its gradients and the returned logits equal those of the unpadded model."""
    plain = make_model(vocab_size=50)
    padded = make_model(vocab_size=50, vocab_multiple=64)
    assert padded.lm_head.weight.shape[0] == 64 and padded.config.padded_vocab_size == 64
    with torch.no_grad():
        padded.lm_head.weight.normal_()  # padding rows with values that would matter if they leaked
        for name, p in plain.named_parameters():
            dict(padded.named_parameters())[name][: p.shape[0]].copy_(p)
    idx, targets = tokens(2, 8, vocab=50), tokens(2, 8, vocab=50, seed=2)
    logits_a, loss_a = plain(idx, targets)
    logits_b, loss_b = padded(idx, targets)
    assert logits_b.shape == logits_a.shape == (2, 8, 50)
    torch.testing.assert_close(loss_b, loss_a)
    torch.testing.assert_close(logits_b, logits_a)
    loss_a.backward()
    loss_b.backward()
    grad_a, grad_b = plain.lm_head.weight.grad, padded.lm_head.weight.grad
    torch.testing.assert_close(grad_b[:50], grad_a)
    assert torch.all(grad_b[50:] == 0)
    assert padded(idx)[0].shape == (2, 1, 50)
    assert padded.num_params() == plain.num_params()
    with pytest.raises(ValueError, match="vocab_multiple"):
        GPTConfig(vocab_multiple=0)
