"""Decoding: our split-KV kernel (kernels.decode) against a float64 reference, and the static KV cache with
its captured decode step (minigpt.decode) against the model without a cache.

Kernel criterion, as for the training kernels: the max abs error against float64 is at most twice that
of PyTorch's math run in the kernel's dtype on the same inputs (plus a tiny floor for fp32). Every buffer
the launcher allocates starts NaN-filled, so an element it forgets to write fails. On the CPU the kernel
runs in Triton's interpreter (fp32 and fp16); `-m gpu` repeats the criterion in bf16 and fp16 on long
caches, and checks the captured step against the eager one and seeded sampling.
"""

import importlib
import math

import pytest
import torch

from minigpt.decode import Decoder
from minigpt.model import GPT, GPTConfig

kd = importlib.import_module("kernels.decode")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FLOORS = {torch.float32: 2e-6, torch.float16: 1e-6, torch.bfloat16: 1e-6}
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models and tiles: more threads only add overhead (and stall on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every buffer the decode launcher allocates starts as NaN."""
    monkeypatch.setattr(kd, "_empty", lambda shape, dtype, device: torch.full(shape, math.nan, dtype=dtype,
                                                                              device=device))


# ----------------------------------------------------------------------------------------------------
# The kernel against float64
# ----------------------------------------------------------------------------------------------------
def attention_math(q, k_cache, v_cache, lengths, scale):
    """The textbook formula in the inputs' dtype: token t of sequence b sees slots j <= lengths[b] - T + t."""
    B, H, T, D = q.shape
    group, S = H // k_cache.shape[1], k_cache.shape[2]
    k = k_cache.repeat_interleave(group, dim=1)
    v = v_cache.repeat_interleave(group, dim=1)
    last = lengths.view(B, 1, 1).to(q.device) - T + torch.arange(T, device=q.device).view(1, T, 1)
    visible = torch.arange(S, device=q.device) <= last  # (B, T, S)
    scores = (q @ k.transpose(-1, -2)) * scale
    return torch.softmax(scores.masked_fill(~visible[:, None], -math.inf), dim=-1) @ v


def make_inputs(B, H, H_kv, T, S, D, dtype, lengths, seed, layout="contiguous"):
    """q (B, H, T, D), caches (B, H_kv, S, D) of seeded randn; lengths: "full", "ragged" or "short"."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)
    if layout == "transposed":  # q a (B, T, H, D) projection seen as (B, H, T, D), as the model makes it
        q = rand(B, T, H, D).transpose(1, 2)
    else:
        q = rand(B, H, T, D)
    k, v = rand(B, H_kv, S, D), rand(B, H_kv, S, D)
    if lengths == "full":
        n = torch.full((B,), S)
    elif lengths == "short":  # only the new tokens: the smallest valid cache
        n = torch.full((B,), T)
    else:  # ragged: every sequence its own length, the extremes included
        n = torch.randint(T, S + 1, (B,), generator=g)
        n[0], n[-1] = S, T
    return q, k, v, n.to(device=DEVICE, dtype=torch.int32)


def check_case(B, H, H_kv, T, S, D, dtype, lengths, num_splits, seed, layout="contiguous"):
    q, k, v, n = make_inputs(B, H, H_kv, T, S, D, dtype, lengths, seed, layout)
    scale = 1.0 / math.sqrt(D)
    got = kd.decode_attention(q, k, v, n, num_splits=num_splits)
    ref64 = attention_math(q.double(), k.double(), v.double(), n, scale)
    same = attention_math(q, k, v, n, scale)
    assert got.shape == (B, H, T, D) and got.dtype == dtype
    assert not torch.isnan(got).any(), "NaN in the output: an element was not written"
    err = (got.double() - ref64).abs().max().item()
    err_torch = (same.double() - ref64).abs().max().item()
    print(f"max error {err:.2e} (torch {err_torch:.2e})")
    assert err <= 2 * err_torch + FLOORS[dtype], f"kernel error {err:.3e} > 2 x torch's {err_torch:.3e}"


# (B, H, H_kv, T, S, D, dtype, lengths, num_splits): ragged lengths, GQA and MQA, S not a multiple of the
# tile (BLOCK_N = 128), several new tokens, a padded head dim, one split and many (None: the rule's choice).
CPU_CASES = [
    (3, 4, 2, 1, 300, 64, F32, "ragged", None),  # GQA, ragged, S = 2 tiles + 44
    (2, 6, 1, 1, 200, 32, F16, "ragged", 4),  # MQA: six heads in one tile's rows
    (2, 4, 4, 3, 130, 16, F32, "ragged", 3),  # three new tokens: causal inside the sequence
    (1, 8, 2, 2, 257, 80, F16, "full", 5),  # padded head dim
    (2, 2, 2, 1, 64, 64, F32, "short", 2),  # lengths == T: one key, splits past it empty
    (4, 12, 4, 1, 520, 64, F16, "ragged", None),  # the benchmark's GQA shape, four sequences
    (1, 3, 1, 4, 100, 32, F32, "ragged", 1),  # MQA and T = 4: twelve rows, no merge
    (2, 4, 1, 1, 600, 32, F32, "ragged", None),  # few programs: the rule splits, one tile per slice
]


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: "-".join(map(str, c)).replace("torch.", ""))
def test_matches_float64_reference(case):
    check_case(*case, seed=CPU_CASES.index(case))


def test_transposed_query_and_int64_lengths():
    q, k, v, n = make_inputs(2, 4, 2, 2, 150, 32, F32, "ragged", seed=11, layout="transposed")
    assert not q.is_contiguous()
    got = kd.decode_attention(q, k, v, n.long(), num_splits=2)
    torch.testing.assert_close(got, attention_math(q, k, v, n, 1 / math.sqrt(32)), atol=2e-6, rtol=1e-5)


def test_split_rule_fills_the_gpu_only_when_it_pays():
    assert kd.num_splits_for(programs=1000, capacity=16384, n_sm=132) == 1  # the batch fills the GPU
    assert kd.num_splits_for(programs=12, capacity=256, n_sm=132) == 1  # too short to split
    many = kd.num_splits_for(programs=4, capacity=16384, n_sm=132)
    assert 1 < many <= kd.MAX_SPLITS and many * kd.MIN_SPLIT_KEYS <= 16384
    assert kd.num_splits_for(programs=4, capacity=1024, n_sm=132) == 1024 // kd.MIN_SPLIT_KEYS
    assert kd.num_splits_for(programs=64, capacity=4096, n_sm=132) == 2  # one wave: 128 programs, not 192
    assert kd.num_splits_for(programs=96, capacity=32768, n_sm=132) == 2  # over half the SMs: still 2
    # a full GPU: only long caches split, into a few slices
    assert kd.num_splits_for(programs=192, capacity=1024, n_sm=132) == 1
    assert kd.num_splits_for(programs=192, capacity=16384, n_sm=132) == 2


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (dict(q=torch.zeros(1, 4, 1, 8, dtype=torch.int32)), TypeError, "q.dtype is torch.int32"),
        (dict(k_cache=torch.zeros(1, 3, 16, 8), v_cache=torch.zeros(1, 3, 16, 8)), ValueError,
         r"H=4 a multiple of H_kv"),
        (dict(v_cache=torch.zeros(1, 2, 8, 8)), ValueError, "k_cache and v_cache must have one shape"),
        (dict(cache_seqlens=torch.tensor([3.0])), ValueError, "cache_seqlens must be int32 or int64"),
        (dict(cache_seqlens=torch.tensor([17], dtype=torch.int32)), ValueError, r"lie in \[T=1, S_max=16\]"),
        (dict(num_splits=0), ValueError, "num_splits=0"),
        (dict(sm_scale=-1.0), ValueError, "sm_scale=-1.0"),
    ],
)
def test_bad_inputs_raise_one_clear_error(change, exc, match):
    if DEVICE == "cuda" and "cache_seqlens" in change and change["cache_seqlens"].dtype == torch.int32:
        pytest.skip("lengths are not read on a GPU")
    args = dict(q=torch.zeros(1, 4, 1, 8), k_cache=torch.zeros(1, 2, 16, 8), v_cache=torch.zeros(1, 2, 16, 8),
                cache_seqlens=torch.tensor([5], dtype=torch.int32))
    args.update(change)
    args = {name: t.to(DEVICE) if isinstance(t, torch.Tensor) else t for name, t in args.items()}
    with pytest.raises(exc, match=match):
        kd.decode_attention(**args)


# ----------------------------------------------------------------------------------------------------
# The static cache and its decode step against the model without a cache
# ----------------------------------------------------------------------------------------------------
TINY = dict(block_size=16, vocab_size=50, n_layer=2, n_head=4, n_embd=32)
MODERN = dict(rope=True, norm="rmsnorm", mlp="relu2", n_kv_head=2)


def make_model(backend, seed=0, device="cpu", **options) -> GPT:
    """A tiny GPT whose weights are scaled up: sharp logits, so greedy tokens are far from ties."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**TINY, "attention": backend, **options})).to(device).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(10.0 if p.dim() >= 2 else 1.0)
    return model


def prompt(B, T, seed=1, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY["vocab_size"], (B, T), generator=g).to(device)


@pytest.mark.parametrize("backend", ["sdpa", "naive", "triton"])
@pytest.mark.parametrize("options", [{}, MODERN], ids=["gpt2", "modern"])
def test_greedy_static_cache_equals_uncached(backend, options):
    # one layer for triton: the interpreter is slow (on a GPU the step runs eagerly there too)
    model = make_model(backend, device=DEVICE, n_layer=1 if backend == "triton" else 2, **options)
    idx = prompt(3, 4, device=DEVICE)
    n = 8 if backend == "triton" else 12
    static = Decoder(model, temperature=0.0, graph=False).generate(idx, n)
    uncached = model.generate(idx, n, temperature=0.0, use_kv_cache=False)
    assert static.shape == (3, 4 + n)
    assert torch.equal(static, uncached)


def test_decoder_reused_under_another_precision_or_weights_makes_new_buffers():
    """One decoder, three calls: under bf16 autocast, then without it, then after the weights moved to new
    memory (a cast). Each call gives the tokens a fresh decoder gives in the same setting."""
    model = make_model("sdpa", **MODERN)
    idx = prompt(2, 4)
    decoder = Decoder(model, temperature=0.0, graph=False)
    fresh = lambda: Decoder(model, temperature=0.0, graph=False).generate(idx, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(decoder.generate(idx, 6), fresh())
    assert torch.equal(decoder.generate(idx, 6), fresh())
    model.double()
    assert torch.equal(decoder.generate(idx, 6), fresh())


def test_refill_past_block_size_follows_the_sampling_rule():
    """Past block_size the decoder refills from the last block_size // 2 tokens, as python -m
    minigpt.sample does on the CPU (generate() calls there, each with a fresh growing cache)."""
    from minigpt.sample import generate

    model = make_model("sdpa", **MODERN)
    for T in (5, 16):  # a prompt that leaves room, and one that fills the block
        idx = prompt(2, T)
        static = Decoder(model, temperature=0.0, graph=False).generate(idx, 37)
        assert torch.equal(static, generate(model, idx, 37, temperature=0.0, progress=False))


def test_seeded_sampling_matches_the_growing_cache():
    """top-k, top-p and temperature draw the same tokens from the same seed on both caches; another seed
    draws others; the decoder's buffers are reused by a second generate() call."""
    model = make_model("sdpa", **MODERN)
    idx = prompt(4, 3)
    settings = dict(temperature=1.0, top_k=20, top_p=0.9)
    decoder = Decoder(model, **settings, generator=torch.Generator().manual_seed(5), graph=False)
    first = decoder.generate(idx, 12)
    grown = model.generate(idx, 12, **settings, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first, grown)
    again = Decoder(model, **settings, generator=torch.Generator().manual_seed(5), graph=False)
    again = again.generate(idx, 12)
    assert torch.equal(first, again)
    assert not torch.equal(first, decoder.generate(idx, 12)), "the generator moved on: new tokens"


def test_decoder_errors_name_the_problem():
    model = make_model("sdpa")
    with pytest.raises(ValueError, match="graph=True needs a model on CUDA"):
        Decoder(model, graph=True)
    with pytest.raises(ValueError, match="prompt length 17 is longer than block_size=16"):
        Decoder(model, graph=False).generate(prompt(1, 17), 1)
    with pytest.raises(ValueError, match="max_new_tokens must be a non-negative integer"):
        Decoder(model, graph=False).generate(prompt(1, 3), -1)
    with pytest.raises(ValueError, match="top_k must be None or an integer >= 1"):
        Decoder(model, top_k=0)


# ----------------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------------
GPU_CASES = [
    (1, 12, 12, 1, 16384, 64, BF16, "full", None),  # the benchmark's long cache at batch 1
    (16, 12, 4, 1, 4096, 64, BF16, "ragged", None),
    (2, 32, 8, 1, 3000, 128, BF16, "ragged", None),
    (4, 16, 1, 4, 1000, 64, F16, "ragged", None),  # MQA, four new tokens: 64 rows
    (3, 8, 2, 2, 777, 80, F16, "ragged", 7),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "-".join(map(str, c)).replace("torch.", ""))
def test_gpu_matches_float64_reference(case):
    check_case(*case, seed=100 + GPU_CASES.index(case))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "sdpa"])
@pytest.mark.parametrize("options", [{}, MODERN], ids=["gpt2", "modern"])
def test_gpu_captured_step_equals_eager(backend, options):
    model = make_model(backend, device="cuda", block_size=64, **options).to(torch.bfloat16)
    idx = prompt(4, 5, device="cuda")
    captured = Decoder(model, temperature=0.0).generate(idx, 150)  # refills at 64 tokens
    eager = Decoder(model, temperature=0.0, graph=False).generate(idx, 150)
    assert torch.equal(captured, eager)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "sdpa"])
def test_gpu_greedy_static_cache_equals_uncached_fp32(backend):
    model = make_model(backend, device="cuda", **MODERN)
    idx = prompt(3, 4, device="cuda")
    assert torch.equal(model.generate(idx, 12, temperature=0.0),  # on CUDA: the captured static step
                       model.generate(idx, 12, temperature=0.0, use_kv_cache=False))


@pytest.mark.gpu
def test_gpu_seeded_sampling_is_reproducible():
    model = make_model("triton", device="cuda", **MODERN).to(torch.bfloat16)
    idx = prompt(8, 3, device="cuda")
    draw = lambda seed: model.generate(idx, 13, temperature=1.0, top_k=20, top_p=0.9,
                                       generator=torch.Generator("cuda").manual_seed(seed))
    a, b, c = draw(5), draw(5), draw(6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    eager = Decoder(model, 1.0, 20, 0.9, torch.Generator("cuda").manual_seed(5), graph=False)
    eager = eager.generate(idx, 13)
    print("captured and eager draws agree:", torch.equal(a, eager))


@pytest.mark.gpu
def test_gpu_generate_under_autocast_with_fp32_weights():
    """The training callback's case: fp32 weights under bf16 autocast (the graph recasts the weights)."""
    model = make_model("triton", device="cuda", block_size=64, **MODERN)
    idx = prompt(2, 4, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        captured = model.generate(idx, 40, temperature=0.0)
        eager = Decoder(model, temperature=0.0, graph=False).generate(idx, 40)
    assert torch.equal(captured, eager)
