"""Tests for kernels.flash_attention: our FlashAttention-2 against a float64 reference.

Criterion: for out, log-sum-exp, dq, dk and dv, the kernel's max abs error against float64 is at most
twice that of PyTorch's own math path run in the kernel's dtype on the same inputs (plus a tiny floor
for fp32, where both errors sit at rounding level). Outputs are allocated NaN-filled, so an element the
kernels forget to write fails. On CPU the kernels run in the Triton interpreter (fp32 and fp16: the
interpreter has no bf16); `-m gpu` repeats the criteria in bf16 and fp16 on training-sized shapes.
"""

import contextlib
import math
import sys
import types

import pytest
import torch
import triton
import triton.language as tl

import kernels.flash_attention as fa
from kernels import tiles

flash_attention = fa.flash_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Absolute floors: where PyTorch's error is exactly 0 (one visible key: out == v, dq == 0), the kernel's
# fp32 sums in another order may still leave ~1e-7; far below the half-precision resolution of ~1e-3.
FLOORS = {torch.float32: 2e-6, torch.float16: 1e-6, torch.bfloat16: 1e-6}


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every buffer the kernels allocate starts as NaN (their integer seeds are not allocated here)."""

    def nan_empty_strided(size, stride, dtype=None, device=None, **kwargs):
        return torch.empty_strided(size, stride, dtype=dtype, device=device).fill_(float("nan"))

    monkeypatch.setattr(fa, "_empty_strided", nan_empty_strided)


# ----------------------------------------------------------------------------------------------------
# Reference: explicit matmul, mask, softmax, matmul, in any dtype
# ----------------------------------------------------------------------------------------------------
def visible_mask(T: int, S: int, causal: bool, device) -> torch.Tensor:
    """(T, S) bool, True where query i may attend to key j (bottom-right aligned causal mask)."""
    if not causal:
        return torch.ones(T, S, dtype=torch.bool, device=device)
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(S, device=device)[None, :]
    return j <= i + (S - T)


def attention_math(q, k, v, causal, scale, keep=None, dropout_p=0.0):
    """(out, lse) by the textbook formula in the inputs' dtype; rows that see no key give 0 and -inf."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    T, S = q.shape[2], k.shape[2]
    vis = visible_mask(T, S, causal, q.device)
    has_key = vis.any(dim=1, keepdim=True)
    scores = (q @ k.transpose(-1, -2)) * scale
    lse = torch.logsumexp(scores.masked_fill(~vis, float("-inf")), dim=-1)
    # Rows with no visible key would softmax to NaN: let them see everything, then zero them.
    p = torch.softmax(scores.masked_fill(~(vis | ~has_key), float("-inf")), dim=-1) * has_key
    if keep is not None:
        p = p * keep / (1.0 - dropout_p)
    return p @ v, lse


def run_reference(q, k, v, do, causal, scale, dtype, keep=None, dropout_p=0.0):
    """out, lse, dq, dk, dv of attention_math with inputs cast to dtype (float64: the reference)."""
    qc, kc, vc = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out, lse = attention_math(qc, kc, vc, causal, scale, keep, dropout_p)
    out.backward(do.to(dtype))
    return out.detach(), lse.detach(), qc.grad, kc.grad, vc.grad


def run_kernel(q, k, v, do, causal, scale, dropout_p=0.0, seed=None):
    qk, kk, vk = (t.detach().requires_grad_() for t in (q, k, v))  # same strides as given
    out, lse = torch.ops.minigpt_kernels.flash_attention_forward(qk, kk, vk, causal, scale, dropout_p, seed)
    out.backward(do)
    return out.detach(), lse.detach(), qk.grad, kk.grad, vk.grad


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs difference; infinities must match exactly (a NaN anywhere makes the error NaN)."""
    x, ref = x.double(), ref.double()
    inf = torch.isinf(ref)
    if not torch.equal(torch.isinf(x) & (x == ref), inf):
        return math.nan
    return (x - ref)[~inf].abs().max().item() if (~inf).any() else 0.0


def assert_close_as_torch(got, ref64, same, dtype, what=("out", "lse", "dq", "dk", "dv")):
    """Kernel error <= 2x the same-dtype PyTorch error (+ floor), for each of out, lse, dq, dk, dv."""
    report = []
    for name, g, r, s in zip(what, got, ref64, same):
        assert g.shape == r.shape, f"{name}: shape {tuple(g.shape)} != {tuple(r.shape)}"
        assert not torch.isnan(g).any(), f"{name}: NaN in kernel output (unwritten element?)"
        err, err_torch = max_err(g, r), max_err(s, r)
        bound = 2.0 * (0.0 if math.isnan(err_torch) else err_torch) + FLOORS[dtype]
        report.append(f"{name}: {err:.2e} (torch {err_torch:.2e})")
        assert err <= bound, f"{name}: kernel error {err:.3e} > bound {bound:.3e}; " + ", ".join(report)


# ----------------------------------------------------------------------------------------------------
# Inputs in several memory layouts
# ----------------------------------------------------------------------------------------------------
def make_qkv(B, H, H_kv, T, S, D, dtype, layout, device=DEVICE, seed=0):
    """q (B, H, T, D), k and v (B, H_kv, S, D), seeded randn, laid out as `layout` says:
    contiguous; fused (views of one (B, T, H + 2 H_kv, D) projection, T == S); transposed (each a
    (B, T, H, D) tensor seen as (B, H, T, D)); padded (rows of D + 8 elements, sliced); dmajor
    (stored (B, H, D, T): the head dim is the strided one)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
    if layout == "contiguous":
        return rand(B, H, T, D), rand(B, H_kv, S, D), rand(B, H_kv, S, D)
    if layout == "fused":
        assert T == S
        qkv = rand(B, T, H + 2 * H_kv, D)
        q, k, v = qkv.split([H, H_kv, H_kv], dim=2)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if layout == "transposed":
        return tuple(rand(B, n, h, D).transpose(1, 2) for n, h in ((T, H), (S, H_kv), (S, H_kv)))
    if layout == "padded":
        return tuple(rand(B, h, n, D + 8)[..., :D] for n, h in ((T, H), (S, H_kv), (S, H_kv)))
    if layout == "dmajor":
        return (rand(B, H, D, T).transpose(-1, -2), rand(B, H_kv, D, S).transpose(-1, -2),
                rand(B, H_kv, D, S).transpose(-1, -2))
    raise ValueError(layout)


def check_case(B, H, H_kv, T, S, D, causal, dtype, layout, seed=0, device=DEVICE):
    q, k, v = make_qkv(B, H, H_kv, T, S, D, dtype, layout, device=device, seed=seed)
    if layout != "contiguous":
        assert not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous())
    do = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(seed + 1))
    do = do.to(device=device, dtype=dtype)
    scale = 1.0 / math.sqrt(D)
    got = run_kernel(q, k, v, do, causal, scale)
    ref64 = run_reference(q, k, v, do, causal, scale, torch.float64)
    same = run_reference(q, k, v, do, causal, scale, dtype)
    assert_close_as_torch(got, ref64, same, dtype)
    if causal and T > S:  # rows that see no key: exactly 0 out, -inf log-sum-exp, 0 gradient
        assert torch.all(got[0][:, :, : T - S] == 0) and torch.all(got[1][:, :, : T - S] == float("-inf"))
        assert torch.all(got[2][:, :, : T - S] == 0)


# (B, H, H_kv, T, S, D, causal, dtype, layout): a covering subset of B x T x S x D x causal x heads x
# layout x dtype. Every value of every axis appears; the hard corners are in: causal with T < S and
# T > S (empty rows), T = 1 decoding, S = 1, D = 80 (padded head dim), GQA and MQA on strided views.
F32, F16 = torch.float32, torch.float16
CPU_CASES = [
    (1, 2, 2, 17, 17, 16, True, F32, "contiguous"),
    (2, 4, 2, 64, 64, 32, True, F16, "fused"),  # GQA on views of one fused projection
    (1, 4, 1, 100, 257, 80, True, F32, "contiguous"),  # MQA, causal T < S, padded D
    (2, 2, 2, 257, 100, 64, True, F32, "transposed"),  # causal T > S: rows with no key
    (1, 4, 2, 1, 100, 64, True, F16, "contiguous"),  # one decoding step against a KV cache
    (2, 3, 1, 1, 1, 16, False, F32, "padded"),
    (1, 4, 2, 257, 257, 32, True, F16, "fused"),
    (2, 2, 2, 17, 64, 80, False, F16, "transposed"),
    (1, 3, 1, 64, 17, 16, True, F32, "dmajor"),  # MQA, T > S, strided head dim
    (2, 4, 2, 100, 100, 16, False, F16, "contiguous"),
    (1, 2, 2, 17, 1, 32, True, F32, "contiguous"),  # one key: only the last query row sees it
    (2, 2, 1, 100, 17, 64, False, F16, "padded"),
    (1, 2, 2, 1, 257, 80, False, F16, "dmajor"),
    (1, 4, 2, 257, 64, 32, False, F32, "contiguous"),
    (2, 2, 2, 64, 100, 64, True, F16, "padded"),
    (1, 4, 4, 100, 100, 80, True, F32, "fused"),
    (5, 4, 2, 65, 65, 16, True, F32, "fused"),  # 20 heads, 10 kv heads: launch-order groups of 8 and less
]


@pytest.mark.parametrize("B,H,H_kv,T,S,D,causal,dtype,layout", CPU_CASES)
def test_matches_float64_reference(B, H, H_kv, T, S, D, causal, dtype, layout):
    check_case(B, H, H_kv, T, S, D, causal, dtype, layout)


BACKWARD_PATHS = {"split": False, "atomic-dq": True}  # the two ways _backward_impl runs: _use_atomic_dq


@pytest.mark.parametrize("path", BACKWARD_PATHS)
@pytest.mark.parametrize(
    "case", [CPU_CASES[i] for i in (1, 2, 3, 8)], ids=["gqa", "mqa-short-t", "t-gt-s", "dmajor"])
def test_every_backward_path_matches_float64_reference(monkeypatch, path, case):
    """Each backward path, forced whatever head dim and length would pick, on the hard corners: GQA on
    views, MQA with T < S, rows with no key, strided D."""
    monkeypatch.setattr(fa, "_use_atomic_dq", lambda *args: BACKWARD_PATHS[path])
    check_case(*case)


@pytest.mark.parametrize("tile", [(32, 32), (16, 64)], ids=["32x32", "16x64"])
@pytest.mark.parametrize("path", BACKWARD_PATHS)
@pytest.mark.parametrize("case", [CPU_CASES[i] for i in (2, 3)], ids=["mqa-short-t", "t-gt-s"])
def test_other_tiles_match_float64_reference(monkeypatch, tile, path, case):
    """forced_config reaches every kernel: other tiles than the interpreter's (equal blocks; 16 rows)
    compute the same attention."""
    monkeypatch.setattr(fa, "_use_atomic_dq", lambda *args: BACKWARD_PATHS[path])
    with fa.forced_config(*tile):
        check_case(*case)


def test_the_package_exports_the_module_and_calling_it_attends():
    """``import kernels.flash_attention`` gives the module; ``from kernels import flash_attention`` gives the
    same module, and calling it is calling its function."""
    import kernels
    from kernels import flash_attention as exported

    assert isinstance(fa, types.ModuleType) and fa is sys.modules["kernels.flash_attention"]
    assert exported is fa and kernels.flash_attention is fa and callable(exported)
    assert hasattr(fa, "forced_config") and hasattr(fa, "dropout_keep_mask")
    q, k, v = make_qkv(1, 2, 1, 17, 17, 16, torch.float32, "contiguous")
    assert torch.equal(exported(q, k, v, causal=False, sm_scale=0.3), fa.flash_attention(q, k, v, False, 0.3))


def test_public_entry_matches_sdpa_semantics():
    """flash_attention == SDPA (is_causal, scale, enable_gqa) when T == S, default scale included."""
    q, k, v = make_qkv(2, 4, 2, 64, 64, 32, torch.float32, "fused")
    for causal, scale in ((True, None), (False, 0.3)):
        got = flash_attention(q, k, v, causal=causal, sm_scale=scale)
        want = torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=causal, scale=scale)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_eager_path_equals_custom_op():
    """flash_attention runs an autograd.Function eagerly and the custom op under torch.compile: the
    two paths launch the same kernels and must agree bit for bit, forward and backward."""
    q, k, v = (t.requires_grad_() for t in make_qkv(2, 4, 2, 33, 40, 16, torch.float32, "contiguous"))
    do = torch.randn(2, 4, 33, 16).to(DEVICE)
    out = flash_attention(q, k, v, sm_scale=0.3)
    grads = torch.autograd.grad(out, (q, k, v), do)
    out_op, _ = torch.ops.minigpt_kernels.flash_attention_forward(q, k, v, True, 0.3, 0.0, None)
    grads_op = torch.autograd.grad(out_op, (q, k, v), do)
    assert torch.equal(out, out_op) and out.stride() == out_op.stride()
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_op))


def test_poison_is_detected():
    """The criterion fails a kernel that leaves an element unwritten (guards the poisoning itself)."""
    q, k, v = make_qkv(1, 2, 2, 17, 17, 16, torch.float32, "contiguous")
    out = flash_attention(q, k, v)
    assert not torch.isnan(out).any()
    bad = out.clone()
    bad[0, 1, 16, 15] = float("nan")
    assert math.isnan(max_err(bad, out))
    assert torch.isnan(fa._alloc((3, 2), (1, 0), torch.float32, DEVICE)).all()


# ----------------------------------------------------------------------------------------------------
# Dropout
# ----------------------------------------------------------------------------------------------------
def test_dropout_keep_fraction_and_streams():
    p, (B, H, T, S) = 0.3, (2, 2, 128, 100)
    seed = torch.tensor([1234], dtype=torch.int64, device=DEVICE)
    keep = fa.dropout_keep_mask(seed, B, H, T, S, p)
    n = keep.numel()
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(keep.sum().item() - n * (1 - p)) < 5 * sigma  # binomial bound, 5 sigma
    per_head = keep.flatten(2).float().mean(-1)
    assert (per_head - (1 - p)).abs().max() < 5 * math.sqrt(p * (1 - p) / (T * S))
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])
    # one Philox call serves eight keys (two 16-bit halves of four outputs) spread over a group of 32: each
    # of the 32 lanes keeps 1 - p of its entries, so no half or output is biased (e.g. by a sign-extending
    # shift)
    lanes = keep[..., : S // 32 * 32].unflatten(-1, (S // 32, 32)).float().mean((0, 1, 2, 3))
    assert (lanes - (1 - p)).abs().max() < 5 * math.sqrt(p * (1 - p) / (n / S * (S // 32)))
    assert torch.equal(keep, fa.dropout_keep_mask(seed.clone(), B, H, T, S, p))
    assert not torch.equal(keep, fa.dropout_keep_mask(seed + 1, B, H, T, S, p))


@triton.jit
def _raw_philox(Seed, Out, n, off_bh, BLOCK: tl.constexpr):
    """The four raw 32-bit Philox4x32-7 outputs of counters [0, n) under one head's key."""
    c = tl.arange(0, BLOCK)
    r0, r1, r2, r3 = tl.randint4x(tl.load(Seed) + (off_bh.to(tl.int64) << 32), c, n_rounds=7)
    tl.store(Out + c * 4 + 0, r0.to(tl.int32, bitcast=True), mask=c < n)
    tl.store(Out + c * 4 + 1, r1.to(tl.int32, bitcast=True), mask=c < n)
    tl.store(Out + c * 4 + 2, r2.to(tl.int32, bitcast=True), mask=c < n)
    tl.store(Out + c * 4 + 3, r3.to(tl.int32, bitcast=True), mask=c < n)


@triton.jit
def _record_program_order(Out):
    block, head = fa_program_order()
    launched = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    tl.store(Out + launched * 2, block)
    tl.store(Out + launched * 2 + 1, head)


fa_program_order = fa._program_order


@pytest.mark.parametrize("blocks,heads", [(5, 20), (3, 8), (4, 3), (1, 17)])
def test_program_order_is_a_permutation_heaviest_blocks_first(blocks, heads):
    """Every (block, head) of the grid exactly once; in launch order, heads come in groups of HEAD_GROUP
    (the last one smaller), and within a group block 0 of every head comes first, then block 1, ..."""
    out = torch.full((heads * blocks, 2), -1, dtype=torch.int32, device=DEVICE)
    _record_program_order[(blocks, heads)](out)
    order = [tuple(pair) for pair in out.tolist()]
    assert sorted(order) == [(b, h) for b in range(blocks) for h in range(heads)]
    group = fa.HEAD_GROUP.value
    expected = [(b, h) for start in range(0, heads, group)
                for b in range(blocks) for h in range(start, min(start + group, heads))]
    assert order == expected


def test_dropout_mask_follows_the_documented_philox_layout():
    """Key 32g + 8o + 2q + e of row i is kept when half e of output o of the Philox call at counter
    (i * cdiv(S, 32) + g) * 4 + q is at least p * 2**16 (the kernels' docstring, rebuilt by hand)."""
    B, H, T, S, p = 1, 2, 5, 70, 0.3  # S not a multiple of 32: a ragged last group
    seed = torch.tensor([1234], dtype=torch.int64, device=DEVICE)
    keep = fa.dropout_keep_mask(seed, B, H, T, S, p).cpu()
    groups = triton.cdiv(S, 32)
    n = T * groups * 4
    j = torch.arange(S)
    g, o, q, e = j // 32, j % 32 // 8, j % 8 // 2, j % 2
    for bh in range(B * H):
        raw = torch.zeros(256 * 4, dtype=torch.int32, device=DEVICE)
        _raw_philox[(1,)](seed, raw, n, bh, BLOCK=256)
        raw = raw.cpu().view(256, 4).long() & 0xFFFFFFFF
        i = torch.arange(T)[:, None]
        numbers = raw[(i * groups + g) * 4 + q, o] >> (16 * e) & 0xFFFF  # (T, S)
        assert torch.equal(keep[bh // H, bh % H], numbers >= int(p * 65536))


@pytest.mark.parametrize("path", BACKWARD_PATHS)
@pytest.mark.parametrize("causal,layout", [(True, "contiguous"), (False, "transposed")])
def test_dropout_replays_kernel_mask(monkeypatch, causal, layout, path):
    """Forward and backward use one mask: out, dq, dk, dv match a float64 reference that replays it, on
    both backward paths."""
    monkeypatch.setattr(fa, "_use_atomic_dq", lambda *args: BACKWARD_PATHS[path])
    B, H, H_kv, T, S, D, p = 1, 4, 2, 48, 80, 32, 0.25
    q, k, v = make_qkv(B, H, H_kv, T, S, D, torch.float32, layout, seed=3)
    do = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    seed = torch.tensor([987654], dtype=torch.int64, device=DEVICE)
    keep = fa.dropout_keep_mask(seed, B, H, T, S, p)
    scale = 1.0 / math.sqrt(D)
    got = run_kernel(q, k, v, do, causal, scale, dropout_p=p, seed=seed)
    ref64 = run_reference(q, k, v, do, causal, scale, torch.float64, keep=keep, dropout_p=p)
    same = run_reference(q, k, v, do, causal, scale, torch.float32, keep=keep, dropout_p=p)
    assert_close_as_torch(got, ref64, same, torch.float32)
    no_drop = run_reference(q, k, v, do, causal, scale, torch.float64)
    assert (got[0] - no_drop[0]).abs().max() > 0.05  # dropout did something


def test_dropout_seed_follows_torch_generator():
    q, k, v = make_qkv(1, 2, 2, 17, 33, 16, torch.float32, "contiguous")
    torch.manual_seed(7)
    a = flash_attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(7)
    b = flash_attention(q, k, v, dropout_p=0.5)
    c = flash_attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(7)
    seed = fa._make_seed(q.device)
    d, _ = torch.ops.minigpt_kernels.flash_attention_forward(q, k, v, True, 0.25, 0.5, seed)
    assert torch.equal(a, b) and torch.equal(a, d) and not torch.equal(a, c)


# ----------------------------------------------------------------------------------------------------
# torch.compile and the custom op registration
# ----------------------------------------------------------------------------------------------------
class TinyAttentionModel(torch.nn.Module):
    """Embedding, fused qkv projection (GQA), flash_attention, output projection, LM head."""

    def __init__(self, vocab=32, n_embd=32, n_head=4, n_kv_head=2, dropout=0.0):
        super().__init__()
        self.n_head, self.n_kv_head, self.dropout = n_head, n_kv_head, dropout
        self.head_dim = n_embd // n_head
        self.wte = torch.nn.Embedding(vocab, n_embd)
        self.c_attn = torch.nn.Linear(n_embd, (n_head + 2 * n_kv_head) * self.head_dim, bias=False)
        self.c_proj = torch.nn.Linear(n_embd, n_embd, bias=False)
        self.lm_head = torch.nn.Linear(n_embd, vocab, bias=False)

    def forward(self, idx, targets):
        B, T = idx.shape
        x = self.wte(idx)
        qkv = self.c_attn(x).view(B, T, self.n_head + 2 * self.n_kv_head, self.head_dim)
        q, k, v = qkv.split([self.n_head, self.n_kv_head, self.n_kv_head], dim=2)
        y = flash_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                            dropout_p=self.dropout if self.training else 0.0)  # (B, H, T, hd)
        x = x + self.c_proj(y.transpose(1, 2).reshape(B, T, -1))
        logits = self.lm_head(x)
        return torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def compiled_matches_eager(backend, dtype=torch.float32, device=DEVICE, T=24):
    torch.manual_seed(0)
    model = TinyAttentionModel().to(device=device, dtype=dtype)
    idx = torch.randint(0, 32, (2, T), device=device)
    tgt = torch.randint(0, 32, (2, T), device=device)
    loss = model(idx, tgt)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    loss_c = compiled(idx, tgt)
    loss_c.backward()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(loss_c, loss, **tol)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g, **tol)
    model.dropout = 0.2  # dropout's seed is drawn inside the graph: still no graph break
    torch._dynamo.reset()
    assert torch.isfinite(torch.compile(model, fullgraph=True, backend=backend)(idx, tgt))


def test_compile_fullgraph_cpu():
    compiled_matches_eager("aot_eager")


def test_compile_fullgraph_through_the_model_entry_point():
    """minigpt's attention entry point traces into one graph with the triton backend (it imports the
    function: TorchDynamo would not call the module object)."""
    attention = pytest.importorskip("minigpt.attention").attention
    q, k, v = make_qkv(1, 4, 2, 24, 24, 16, torch.float32, "fused")
    compiled = torch.compile(lambda q, k, v: attention(q, k, v, "triton"), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(q, k, v), flash_attention(q, k, v), atol=0, rtol=0)
    torch._dynamo.reset()


def test_compile_fullgraph_with_dynamic_lengths():
    """A new sequence length makes TorchDynamo trace with symbolic sizes and strides: the input checks and
    the gradients' layout must still trace as one graph (no sort with a key, no data-dependent branch)."""
    attention = pytest.importorskip("minigpt.attention").attention
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: attention(q, k, v, "triton"), fullgraph=True,
                             backend="aot_eager", dynamic=True)
    for T in (16, 24):
        q, k, v = make_qkv(1, 4, 2, T, T, 16, torch.float32, "fused")
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        out = compiled(q, k, v)
        out.sum().backward()
        torch.testing.assert_close(out, flash_attention(q, k, v), atol=0, rtol=0)
        assert q.grad is not None and torch.isfinite(q.grad).all()
    torch._dynamo.reset()


def test_opcheck():
    """torch.library's own checks: schema, fake tensors (shapes and strides), autograd registration."""
    q, k, v = make_qkv(1, 2, 1, 17, 17, 16, torch.float32, "fused")
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.minigpt_kernels.flash_attention_forward.default,
                          (q, k, v, True, 0.25, 0.0, None))
    out, lse = torch.ops.minigpt_kernels.flash_attention_forward(q.detach(), k.detach(), v.detach(),
                                                                  True, 0.25, 0.0, None)
    torch.library.opcheck(torch.ops.minigpt_kernels.flash_attention_backward.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, True, 0.25,
                           0.0, None))


@pytest.mark.parametrize("layout", ["contiguous", "fused", "transposed", "padded", "dmajor", "seq_first"])
def test_gradients_are_dense_in_the_inputs_layout(layout):
    """dq, dk, dv come out dense, head dim innermost, B, H, T in the memory order of q, k, v: for (B, T, H, D)
    views of a fused projection that is (B, T, H, D), which the projection's backward gathers without a
    transpose; head-dim-major inputs still get head-dim-minor gradients (coalesced stores). seq_first,
    (T, B, H, D) in memory, takes the general order, not one of the two common ones."""
    if layout == "seq_first":
        qkv = [torch.randn(17, 2, h, 16).permute(1, 2, 0, 3) for h in (4, 2, 2)]
    else:
        qkv = make_qkv(1, 4, 2, 17, 17, 16, torch.float32, layout)
    q, k, v = (t.detach().requires_grad_() for t in qkv)
    grads = torch.autograd.grad(flash_attention(q, k, v).sum(), (q, k, v))  # .grad would re-lay them out
    for x, g in zip((q, k, v), grads):
        expected = [*sorted(range(3), key=lambda d: -x.stride(d)), 3]
        assert g.permute(expected).is_contiguous(), (layout, x.stride(), g.stride())
        if layout == "fused":
            assert expected == [0, 2, 1, 3]
        if layout == "seq_first":
            assert expected == [2, 0, 1, 3]


# ----------------------------------------------------------------------------------------------------
# Inputs the kernel cannot take: a clear error before anything launches
# ----------------------------------------------------------------------------------------------------
def _bad_inputs():
    r = lambda *s, dtype=torch.float32, device=DEVICE: torch.randn(*s, dtype=dtype, device=device)
    q, k = r(1, 4, 8, 16), r(1, 2, 8, 16)
    return [
        ("rank", (r(4, 8, 16), k, k), {}, ValueError, "q must have rank 4"),
        ("batch", (q, r(2, 2, 8, 16), r(2, 2, 8, 16)), {}, ValueError, "batch size"),
        ("head dim", (q, r(1, 2, 8, 32), r(1, 2, 8, 32)), {}, ValueError, "head dim of k/v"),
        ("k vs v", (q, k, r(1, 2, 9, 16)), {}, ValueError, "same shape"),
        ("dtype mismatch", (q, k.half(), k.half()), {}, TypeError, "share one dtype"),
        ("dtype", (q.double(), k.double(), k.double()), {}, TypeError, "allowed: float16, bfloat16"),
        ("int dtype", (q.long(), k.long(), k.long()), {}, TypeError, "q.dtype is torch.int64"),
        ("groups", (q, r(1, 3, 8, 16), r(1, 3, 8, 16)), {}, ValueError, "multiple of kv heads"),
        ("max head dim", (r(1, 2, 8, 160), r(1, 2, 8, 160), r(1, 2, 8, 160)), {}, ValueError, "D=160"),
        ("device", (q, k.to("meta"), k.to("meta")), {}, ValueError, "one device"),
        ("dropout high", (q, k, k), {"dropout_p": 1.0}, ValueError, "dropout_p=1.0"),
        ("dropout low", (q, k, k), {"dropout_p": -0.1}, ValueError, "dropout_p=-0.1"),
        ("not a tensor", (q.tolist(), k, k), {}, TypeError, "q must be a torch.Tensor"),
        ("empty", (r(1, 4, 0, 16), k, k), {}, ValueError, "empty inputs"),
        ("scale", (q, k, k), {"sm_scale": -1.0}, ValueError, "sm_scale=-1.0"),
        ("scale beyond fp32", (q, k, k), {"sm_scale": 1e300}, ValueError, "sm_scale=1e.300"),
        ("bf16 in the interpreter", (q.bfloat16(), k.bfloat16(), k.bfloat16()), {}, TypeError, "bfloat16 on"),
        # CUDA's grid limit: the (batch, head) pairs lie on the grid's second axis
        ("grid", (q[:1, :1].expand(4096, 16, 8, 16), k[:1, :1].expand(4096, 16, 8, 16),
                  k[:1, :1].expand(4096, 16, 8, 16)), {}, ValueError, "B \\* H = 65536"),
        # row offsets within a (batch, head) slice are int32 in the kernels: meta tensors, no memory
        ("offsets of an input", (torch.empty_strided((1, 2, 3, 16), (96, 48, 2**30, 1), device="meta"),
                                 k.to("meta"), k.to("meta")), {}, ValueError, "q spans 2147483664 elements"),
        ("offsets of the output", (torch.empty((1, 128, 2**17 + 1, 128), device="meta"),
                                   torch.empty((1, 8, 16, 128), device="meta"),
                                   torch.empty((1, 8, 16, 128), device="meta")),
         {}, ValueError, "the output spans 2147483776 elements"),
    ]


@pytest.mark.parametrize("name,args,kwargs,exc,match", _bad_inputs(), ids=[c[0] for c in _bad_inputs()])
def test_bad_inputs_raise_before_launch(monkeypatch, name, args, kwargs, exc, match):
    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("a kernel was launched")

    monkeypatch.setattr(fa, "_attn_fwd", NoLaunch())
    with pytest.raises(exc, match=match):
        flash_attention(*args, **kwargs)


def test_backward_refuses_grad_out_offsets_beyond_int32():
    q = torch.empty((1, 1, 3, 16), device="meta")
    grad_out = torch.empty_strided((1, 1, 3, 16), (48, 48, 2**30, 1), device="meta")
    with pytest.raises(ValueError, match="grad_out's strides"):
        fa._backward_impl(grad_out, q, q, q, q, q[..., 0], True, 0.25, 0.0, None)


def test_double_backward_raises():
    """The backward is not differentiable: asking for a gradient of the gradient fails loudly (a silent
    zero would corrupt a gradient penalty)."""
    q, k, v = (torch.randn(1, 2, 8, 16, requires_grad=True) for _ in range(3))
    (dq,) = torch.autograd.grad(flash_attention(q, k, v).square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        dq.sum().backward()


def test_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setattr(fa, "_interpreting", lambda: False)
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="CPU tensors"):
        flash_attention(q, q, q)


# ----------------------------------------------------------------------------------------------------
# GPU: training-sized shapes in bf16 and fp16, determinism, torch.compile with Inductor
# ----------------------------------------------------------------------------------------------------
def run_reference_chunked(q, k, v, do, causal, scale, dtype):
    """run_reference one (batch, kv head) group at a time, so the T x S float64 matrices fit in memory."""
    B, H, T, D = q.shape
    H_kv = k.shape[1]
    G = H // H_kv
    shapes = ((B, H, T, D), (B, H, T), (B, H, T, D), k.shape, v.shape)
    outs = [torch.empty(shape, dtype=dtype, device=q.device) for shape in shapes]
    for b in range(B):
        for h in range(H_kv):
            hs = slice(h * G, (h + 1) * G)
            res = run_reference(q[b:b + 1, hs], k[b:b + 1, h:h + 1], v[b:b + 1, h:h + 1], do[b:b + 1, hs],
                                causal, scale, dtype)
            for dst, src, sl in zip(outs, res, (hs, hs, hs, slice(h, h + 1), slice(h, h + 1))):
                dst[b:b + 1, sl] = src
    return outs


def quick_config():
    """One fixed tile: GPU tests of odd shapes skip the table's larger tiles (fewer compilations); the
    headline shapes run with the table's tiles, as training does."""
    return fa.forced_config(block_m=64, block_n=64, num_warps=4, num_stages=2)


@contextlib.contextmanager
def deterministic_algorithms(on: bool = True):
    saved = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved)


GPU_CASES = [  # (B, H, H_kv, T, S, D, causal, layout, table tiles)
    (4, 16, 16, 8192, 8192, 128, True, "contiguous", True),  # the atomic-dQ backward
    (64, 6, 6, 256, 256, 64, True, "fused", True),
    (4, 16, 4, 1024, 1024, 64, True, "fused", False),  # GQA on a fused projection
    (2, 8, 1, 1000, 1000, 80, False, "transposed", False),  # MQA, padded D, ragged T
    (2, 8, 2, 300, 1500, 128, True, "contiguous", False),  # T < S (prefill against a cache)
    (2, 8, 8, 1, 4096, 128, True, "transposed", False),  # decode step
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("B,H,H_kv,T,S,D,causal,layout,table", GPU_CASES)
def test_gpu_matches_float64_reference(B, H, H_kv, T, S, D, causal, layout, table, dtype):
    q, k, v = make_qkv(B, H, H_kv, T, S, D, dtype, layout, device="cuda")
    do = torch.randn(B, H, T, D, device="cuda", dtype=dtype)
    scale = 1.0 / math.sqrt(D)
    with contextlib.nullcontext() if table else quick_config():
        got = run_kernel(q, k, v, do, causal, scale)
    ref64 = run_reference_chunked(q, k, v, do, causal, scale, torch.float64)
    same = run_reference_chunked(q, k, v, do, causal, scale, dtype)
    assert_close_as_torch(got, ref64, same, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("path", BACKWARD_PATHS)
@pytest.mark.parametrize("B,H,H_kv,T,S,D,causal,layout", [
    (4, 16, 4, 1024, 1024, 64, True, "fused"), (2, 8, 2, 300, 1500, 128, True, "contiguous")])
def test_gpu_every_backward_path(monkeypatch, path, B, H, H_kv, T, S, D, causal, layout):
    """Each backward path with the table's tiles, in bf16, whatever head dim and length would pick."""
    monkeypatch.setattr(fa, "_use_atomic_dq", lambda *args: BACKWARD_PATHS[path])
    dtype = torch.bfloat16
    q, k, v = make_qkv(B, H, H_kv, T, S, D, dtype, layout, device="cuda")
    do = torch.randn(B, H, T, D, device="cuda", dtype=dtype)
    scale = 1.0 / math.sqrt(D)
    got = run_kernel(q, k, v, do, causal, scale)
    ref64 = run_reference_chunked(q, k, v, do, causal, scale, torch.float64)
    same = run_reference_chunked(q, k, v, do, causal, scale, dtype)
    assert_close_as_torch(got, ref64, same, dtype)


@pytest.mark.gpu
def test_gpu_cpu_case_subset_fp16():
    with quick_config():
        for case in CPU_CASES:
            B, H, H_kv, T, S, D, causal, _, layout = case
            check_case(B, H, H_kv, T, S, D, causal, torch.float16, layout, device="cuda")


@pytest.mark.gpu
def test_gpu_fp32_takes_tiles_that_fit():
    """fp32 doubles the shared memory a tile needs: the table's largest tiles give up stages and rows."""
    check_case(1, 4, 4, 4096, 4096, 128, True, torch.float32, "contiguous", device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_gpu_inputs_away_from_the_current_device():
    """Triton launches on the current device: inputs on another GPU are computed there all the same, and
    give what they give with their device current."""
    q, k, v = (torch.randn(2, 4, 256, 64, device="cuda:1", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    do = torch.randn_like(q)
    results = []
    for current in (0, 1):
        with torch.cuda.device(current):
            out = flash_attention(q, k, v)
            results.append((out, *torch.autograd.grad(out, (q, k, v), do)))
    assert all(t.device == q.device for t in results[0])
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.gpu
@pytest.mark.parametrize("B,H,H_kv,T,D", [(4, 16, 4, 1024, 64), (2, 8, 8, 4096, 128)], ids=["d64", "d128"])
def test_gpu_deterministic_path_repeats_bit_for_bit(B, H, H_kv, T, D):
    """20 repeats of forward and backward, identical to the bit, on the split backward (at D = 128 from
    T = 2048 under torch.use_deterministic_algorithms, which selects it)."""
    q, k, v = make_qkv(B, H, H_kv, T, T, D, torch.bfloat16, "fused", device="cuda")
    do = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16)
    with deterministic_algorithms():
        first = run_kernel(q, k, v, do, True, 0.1)
        for _ in range(20):
            again = run_kernel(q, k, v, do, True, 0.1)
            assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.gpu
def test_gpu_atomic_dq_differs_from_split_only_in_rounding():
    """The atomic path sums dQ in another order (and in fp32); out, lse, dK and dV are the same bits."""
    q, k, v = make_qkv(2, 8, 8, 4096, 4096, 128, torch.bfloat16, "fused", device="cuda")
    do = torch.randn(2, 8, 4096, 128, device="cuda", dtype=torch.bfloat16)
    atomic = run_kernel(q, k, v, do, True, 0.1)
    with deterministic_algorithms():
        split = run_kernel(q, k, v, do, True, 0.1)
    assert all(torch.equal(a, b) for a, b in zip(split[:2] + split[3:], atomic[:2] + atomic[3:]))
    assert (split[2].float() - atomic[2].float()).abs().max() <= 2**-7 * split[2].float().abs().max()


@pytest.mark.gpu
@pytest.mark.parametrize("T,D", [(256, 64), (2048, 128)], ids=["split", "atomic-dq"])
def test_gpu_cuda_graph_replay_equals_eager(T, D):
    """Forward and backward captured in a CUDA graph and replayed on new inputs give what eager calls give
    (to the bit on the split path; within rounding where dQ is summed atomically)."""
    q, k, v = (t.detach().requires_grad_() for t in make_qkv(4, 8, 8, T, T, D, torch.bfloat16, "contiguous",
                                                             device="cuda"))
    do = torch.randn(4, 8, T, D, device="cuda", dtype=torch.bfloat16)

    def step():
        out = flash_attention(q, k, v)
        return (out, *torch.autograd.grad(out, (q, k, v), do))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for seed in (1, 2):
        for t, new in zip((q, k, v), make_qkv(4, 8, 8, T, T, D, torch.bfloat16, "contiguous", "cuda", seed)):
            t.data.copy_(new)
        do.normal_()
        graph.replay()
        eager = step()
        assert torch.equal(captured[0], eager[0]) and torch.equal(captured[2], eager[2])
        assert torch.equal(captured[3], eager[3])
        dq, dq_eager = captured[1].float(), eager[1].float()
        exact = T == 256  # the split path
        assert torch.equal(dq, dq_eager) if exact else (dq - dq_eager).abs().max() <= 2**-7 * dq.abs().max()


@pytest.mark.gpu
@pytest.mark.parametrize("B,H,H_kv,T,S,D", [(2, 8, 2, 512, 512, 64), (1, 4, 2, 2048, 2048, 128)],
                         ids=["split", "atomic-dq"])  # the backward path each shape takes
def test_gpu_dropout_replays_mask(B, H, H_kv, T, S, D):
    p = 0.2
    q, k, v = make_qkv(B, H, H_kv, T, S, D, torch.float16, "fused", device="cuda")
    do = torch.randn(B, H, T, D, device="cuda", dtype=torch.float16)
    seed = fa._make_seed(torch.device("cuda"))
    keep = fa.dropout_keep_mask(seed, B, H, T, S, p)
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / keep.numel())
    scale = 1.0 / math.sqrt(D)
    got = run_kernel(q, k, v, do, True, scale, dropout_p=p, seed=seed)
    ref64 = run_reference(q, k, v, do, True, scale, torch.float64, keep=keep, dropout_p=p)
    same = run_reference(q, k, v, do, True, scale, torch.float16, keep=keep, dropout_p=p)
    assert_close_as_torch(got, ref64, same, torch.float16)


@pytest.mark.gpu
def test_gpu_compile_fullgraph_inductor():
    with quick_config():
        compiled_matches_eager("inductor", dtype=torch.float32, device="cuda", T=256)


@pytest.mark.gpu
def test_gpu_compile_gpt_triton_backend():
    model_mod = pytest.importorskip("minigpt.model")
    torch.manual_seed(0)
    cfg = model_mod.GPTConfig(block_size=64, vocab_size=65, n_layer=2, n_head=4, n_embd=64,
                              attention="triton")
    model = model_mod.GPT(cfg).cuda()
    idx = torch.randint(0, 65, (4, 64), device="cuda")
    with quick_config():
        _, loss = model(idx, idx)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        model.zero_grad()
        _, loss_c = torch.compile(model, fullgraph=True)(idx, idx)
        loss_c.backward()
    torch.testing.assert_close(loss_c, loss, atol=1e-4, rtol=1e-4)
    for p, g in zip([p for p in model.parameters() if p.grad is not None], grads):
        torch.testing.assert_close(p.grad, g, atol=1e-4, rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_gpu_dropout_under_compile_draws_new_masks(mode):
    """Compiled (and replayed as CUDA graphs), each call still draws a fresh dropout mask, and seeding
    torch's generator repeats it: the seed is a random op inside the graph, not a constant baked into it."""
    torch.compiler.reset()
    q = torch.randn(2, 2, 128, 64, device="cuda", dtype=torch.bfloat16)

    def attend(q):
        return flash_attention(q, q, q, dropout_p=0.5)

    compiled = torch.compile(attend, mode=None if mode == "default" else mode, fullgraph=True)  # no break
    outs = []
    for seed in (0, 1, 2, 0):
        torch.manual_seed(seed)
        torch.compiler.cudagraph_mark_step_begin()
        outs.append(compiled(q).clone())
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2]), "masks must change"
    assert torch.equal(outs[0], outs[3]), "the same seed must give the same mask"
    unseeded = []
    for _ in range(2):
        torch.compiler.cudagraph_mark_step_begin()
        unseeded.append(compiled(q).clone())
    assert not torch.equal(unseeded[0], unseeded[1])
    torch.compiler.reset()


# ----------------------------------------------------------------------------------------------------
# The tile table and the choice of backward path
# ----------------------------------------------------------------------------------------------------
H100_SHARED_MEMORY = 232448  # bytes a block may opt into on an H100


def test_backward_path_by_head_dim_length_and_determinism():
    """The atomic dQ serves padded head dims above 64 from 2048 tokens, unless deterministic algorithms
    are asked for."""
    assert not fa._use_atomic_dq(64, 16384, 16384) and not fa._use_atomic_dq(128, 1024, 1024)
    assert fa._use_atomic_dq(128, 2048, 2048) and fa._use_atomic_dq(128, 300, 1500)
    with deterministic_algorithms():
        assert not fa._use_atomic_dq(128, 2048, 2048) and not fa._use_atomic_dq(128, 16384, 16384)


def test_every_table_tile_suits_dropout_and_fits_an_h100():
    """Key blocks are multiples of 32 (dropout draws 32 keys at a time), blocks are at least tl.dot's 16,
    and bf16 tiles fit an H100's shared memory as the table gives them."""
    for kernel in tiles.KERNELS:
        for bucket in (2**i for i in range(4, 18)):
            for block_d in (16, 32, 64, 128):
                bm, bn, warps, stages = tiles.table(kernel, bucket, block_d)
                where = (kernel, bucket, block_d)
                assert bn % 32 == 0 and bm >= 16 and warps in (4, 8) and stages >= 1, where
                assert tiles.shared_memory(kernel, bm, bn, block_d, stages) * 2 <= H100_SHARED_MEMORY
    with pytest.raises(ValueError, match="kernel must be one of"):
        tiles.table("bwd", 1024, 64)


@pytest.mark.parametrize("limit", [H100_SHARED_MEMORY, 166912, 101376, 49152])  # H100, A100, RTX 4090, 48 KB
def test_tiles_shrink_to_fit_smaller_shared_memory(limit):
    """Tiles that do not fit give up stages, then rows, and keep key blocks that dropout can use."""
    for kernel in tiles.KERNELS:
        for element_size in (2, 4):  # bf16 / fp16, fp32
            tile = tiles.table(kernel, 16384, 128)
            bm, bn, _, stages = tiles.fit(kernel, tile, 128, element_size, limit)
            assert tiles.shared_memory(kernel, bm, bn, 128, stages) * element_size <= limit
            assert bn % 32 == 0 and bm >= 16 and bm <= tile[0] and bn <= tile[1]
            if tiles.shared_memory(kernel, *tile[:2], 128, tile[3]) * element_size <= limit:
                assert (bm, bn, stages) == (tile[0], tile[1], tile[3]), "a tile that fits is kept"


def test_forced_config_pins_every_kernel_and_restores():
    q = torch.empty(1, 1, 64, 64)
    forced = dict(BLOCK_M=16, BLOCK_N=32, num_warps=8, num_stages=1)
    with fa.forced_config(16, 32, num_warps=8, num_stages=1):
        assert all(tiles.pick(kernel, q, 64, 64) == forced for kernel in tiles.KERNELS)
    assert tuple(tiles.pick("dkdv", q, 64, 64).values()) == tiles.INTERPRETER["dkdv"]
