"""The C++ host path (kernels/host_path.py, host_path.cpp): its plans on the CPU with fake compiled kernels,
and on the GPU bit for bit against the Python path, forward and backward."""

import importlib
import itertools
import math
import os
import struct
import threading
import types

import pytest
import torch

from kernels import flash_attention
from tests.test_kernels import DEVICE, deterministic_algorithms, make_qkv

fa = importlib.import_module("kernels.flash_attention")
host_path = importlib.import_module("kernels.host_path")


# ----------------------------------------------------------------------------------------------------
# CPU: how launches become plans
# ----------------------------------------------------------------------------------------------------
def fake_compiled(signature: dict, constexprs=(), num_warps=4, shared=1024, **meta):
    """What `_launch_entry` reads of a `_Compiled`: the kernel's signature, metadata and handle."""
    metadata = dict(num_warps=num_warps, shared=shared, num_ctas=1, launch_pdl=False,
                    launch_cooperative_grid=False, global_scratch_size=0, profile_scratch_size=0)
    metadata.update(meta)
    kernel = types.SimpleNamespace(src=types.SimpleNamespace(signature=signature), function=0xABC,
                                   metadata=types.SimpleNamespace(**metadata), run=types.SimpleNamespace())
    return types.SimpleNamespace(kernel=kernel, constexprs=constexprs)


def recording(launches=(), allocated=()):
    r = fa._Recording()
    r.launches.extend(launches)
    r.allocated.extend(allocated)
    return r


def test_launch_entry_packs_parameters_as_the_kernel_reads_them():
    a, b, delta = torch.empty(4), torch.empty(4), torch.empty(2)
    compiled = fake_compiled({"A": "*bf16", "B": "*fp32", "n": "i32", "big": "i64", "one": "constexpr",
                              "scale": "fp32", "C": "*fp32", "BLOCK": "constexpr"}, constexprs=(64,),
                             num_warps=8, shared=4096)
    slots = [a, None, b]
    launch = (compiled, (3, 5, 1), (a, b), (-7, 2**40, 1, 0.5, delta))
    entry = host_path._launch_entry(launch, slots, {id(delta)})
    # The scalar 1 was specialized into a constexpr, so it is skipped like BLOCK; C is a tensor of no slot,
    # allocated by the call: it gets a slot of its own.
    function, grid, threads, shared, words, addresses = entry
    assert (function, grid, threads, shared) == (0xABC, [3, 5, 1], 256, 4096)
    assert words == [0, 0, 2**32 - 7, 2**40, struct.unpack("<I", struct.pack("<f", 0.5))[0], 0, 0, 0]
    assert addresses == [(0, 0), (1, 2), (5, 3)]
    assert slots[3] is delta


def test_launch_entry_refuses_a_tensor_the_call_did_not_allocate():
    a, stranger = torch.empty(4), torch.empty(4)
    compiled = fake_compiled({"A": "*fp32", "B": "*fp32"})
    assert host_path._launch_entry((compiled, (1, 1, 1), (a, stranger), ()), [a], set()) is None


@pytest.mark.parametrize("change", [dict(num_ctas=2), dict(launch_pdl=True), dict(global_scratch_size=128),
                                    dict(profile_scratch_size=64)])
def test_launch_entry_refuses_what_it_cannot_reproduce(change):
    compiled = fake_compiled({"A": "*fp32", "n": "i32"}, **change)
    assert host_path._launch_entry((compiled, (1, 1, 1), (torch.empty(1),), (3,)), [None], set()) is None


def test_launch_entry_refuses_unknown_types_and_launches_without_a_kernel():
    compiled = fake_compiled({"A": "*fp32", "flag": "i1"})
    a = torch.empty(1)
    assert host_path._launch_entry((compiled, (1, 1, 1), (a,), (True,)), [a], set()) is None
    assert host_path._launch_entry((None, (), (a,), ()), [a], set()) is None


def test_add_plan_slots_and_allocations(monkeypatch):
    added = []
    monkeypatch.setattr(host_path, "_ext", types.SimpleNamespace(add_plan=lambda *args: added.append(args)))
    monkeypatch.setattr(host_path, "_planned_kernels", {})
    q, k, v, out, delta = (torch.empty(2, 3, dtype=torch.float16) for _ in range(5))
    lse = torch.empty(5, dtype=torch.float32)
    compiled = fake_compiled({"Q": "*fp16", "K": "*fp16", "V": "*fp16", "O": "*fp16", "L": "*fp32",
                              "Delta": "*fp32", "Seed": "*fp32"})
    launch = (compiled, (1, 1, 1), (q, k, v, out, lse, delta, lse), ())
    host_path._add_plan(False, b"key", recording([launch], [out, lse, delta]), [q, k, v, None, out, lse],
                        allocated=(4, 5))
    (backward, key, num_slots, allocs, entries), = added
    assert (backward, key, num_slots) == (False, b"key", 7)
    assert [a[0] for a in allocs] == [4, 5, 6]  # out, lse, and delta in the first slot after the call's own
    assert allocs[1] == (5, [5], [1], torch.float32)
    assert entries[0][5] == [(0, 0), (1, 1), (2, 2), (3, 4), (4, 5), (5, 6), (6, 5)]


def test_add_plan_refuses_one_tensor_in_two_slots(monkeypatch):
    monkeypatch.setattr(host_path, "_ext", types.SimpleNamespace(add_plan=pytest.fail))
    monkeypatch.setattr(host_path, "_unplannable", set())
    x, out, lse = torch.empty(1), torch.empty(1), torch.empty(1)
    launch = (fake_compiled({"Q": "*fp32"}), (1, 1, 1), (x,), ())
    host_path._add_plan(False, b"k", recording([launch]), [x, x, x, None, out, lse], allocated=(4, 5))
    assert host_path._unplannable == {b"k"}


def test_a_plan_that_fails_to_build_leaves_the_call_alone(monkeypatch):
    def refuse(*args):
        raise RuntimeError("too many kernel parameters")

    monkeypatch.setattr(host_path, "_ext", types.SimpleNamespace(add_plan=refuse))
    monkeypatch.setattr(host_path, "_unplannable", set())
    monkeypatch.setattr(host_path, "_planned_kernels", {})
    q, k, v, out, lse = (torch.empty(1) for _ in range(5))
    launch = (fake_compiled({"Q": "*fp32"}), (1, 1, 1), (q,), ())
    with pytest.warns(UserWarning, match="could not be planned"):
        host_path._add_plan(False, b"k", recording([launch]), [q, k, v, None, out, lse], allocated=(4, 5))
    assert host_path._unplannable == {b"k"}


def test_add_plan_remembers_what_it_cannot_plan(monkeypatch):
    monkeypatch.setattr(host_path, "_ext", types.SimpleNamespace(add_plan=pytest.fail))
    monkeypatch.setattr(host_path, "_unplannable", set())
    q, k, v, out, lse = (torch.empty(1) for _ in range(5))
    unplannable = recording([(None, (), (q,), ())])
    host_path._add_plan(False, b"k", unplannable, [q, k, v, None, out, lse], allocated=(4, 5))
    assert host_path._unplannable == {b"k"}


def test_the_second_sighting_of_a_signature_plans(monkeypatch):
    """A decoding loop's key changes every step: the first call of a key plans nothing."""
    monkeypatch.setattr(host_path, "_ext", types.SimpleNamespace(forward_key=lambda *args: b"k"))
    monkeypatch.setattr(host_path, "_seen", set())
    q = torch.empty(1)
    assert host_path.forward_planner(q, q, q, True, None, 0.0) is None
    assert callable(host_path.forward_planner(q, q, q, True, None, 0.0))


def test_launches_and_allocations_are_recorded_in_their_thread_only():
    """Each launch inside is recorded with its tensors (compiled kernel None under the interpreter, which
    keeps nothing to plan), and each allocation; nothing outside, or from another thread."""
    q, k, v = (torch.randn(1, 2, 16, 16, device=DEVICE) for _ in range(3))
    with fa._recording() as rec:
        other = threading.Thread(target=fa._forward_impl, args=(q, k, v, True, 0.25, 0.0, None))
        other.start()
        other.join()
        out, lse = fa._forward_impl(q, k, v, True, 0.25, 0.0, None)
    fa._forward_impl(q, k, v, True, 0.25, 0.0, None)
    assert len(rec.launches) == 1
    compiled, grid, tensors, scalars = rec.launches[0]
    assert all(a is b for a, b in zip(tensors, (q, k, v, out, lse)))
    assert (compiled is None) == (DEVICE == "cpu")
    assert len(rec.allocated) == 2 and rec.allocated[0] is out and rec.allocated[1] is lse
    assert fa._recordings == {}


def test_cpu_calls_never_start_the_build():
    if torch.cuda.is_available():
        pytest.skip("a CPU-only check")
    q = torch.randn(1, 2, 16, 16)
    flash_attention(q, q, q)
    assert fa._host_path is None and fa._host_forward is None


# ----------------------------------------------------------------------------------------------------
# GPU: the C++ path against the Python path, bit for bit
# ----------------------------------------------------------------------------------------------------
@pytest.fixture
def cpp():
    """The built extension, with no plans, and what plans allocate filled with NaN."""
    if not host_path.wait():
        pytest.fail("the C++ host path did not build")
    fa._forget_compiled()
    host_path.set_poison(True)
    yield host_path._ext
    host_path.set_poison(False)
    fa._forget_compiled()


def python_path(q, k, v, **kwargs):
    return fa._FlashAttentionFunction.apply(
        q, k, v, kwargs.get("causal", True), kwargs.get("sm_scale") or 1.0 / math.sqrt(q.shape[-1]),
        float(kwargs.get("dropout_p", 0.0)), kwargs.get("seed"), fa._forward_impl)


def outputs_and_grads(call, q, k, v, do):
    """(type of the output's autograd node, [out, dq, dk, dv]) for fresh copies of q, k, v (same strides)."""
    qq, kk, vv = (torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t)
                  .requires_grad_() for t in (q, k, v))
    out = call(qq, kk, vv)
    node = type(out.grad_fn).__name__
    out.backward(do.clone())
    return node, [out.detach(), qq.grad, kk.grad, vv.grad]


def assert_same(got, want, atomic_dq=False):
    """Bit for bit; with ``atomic_dq`` (the fused backward plan), dq up to the order its fp32 sums land in:
    within a bf16 rounding step of the largest entry, and NaN-free."""
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.stride() == w.stride(), name
        diff = (g.float() - w.float()).abs().max().item()
        if name == "dq" and atomic_dq:
            assert diff <= 2**-8 * w.float().abs().max().item(), f"dq: max diff {diff}"
        else:
            assert torch.equal(g, w), f"{name}: max diff {diff}"


PYTHON_NODE = "_FlashAttentionFunctionBackward"
GPU_SIGNATURES = [  # (B, H, H_kv, T, S, D, dtype, layout, kwargs)
    (64, 6, 6, 256, 256, 64, torch.bfloat16, "fused", {}),  # the char GPT: one backward launch
    (2, 8, 2, 2048, 2048, 128, torch.bfloat16, "contiguous", {}),  # fused plan: three launches, atomic dQ
    # two backward launches, delta between: the plan under deterministic algorithms
    (2, 8, 2, 2048, 2048, 128, torch.bfloat16, "contiguous", dict(deterministic=True)),
    (4, 16, 4, 1024, 1024, 64, torch.float16, "fused", dict(sm_scale=0.1)),  # GQA
    (2, 8, 1, 300, 1500, 80, torch.float32, "transposed", dict(causal=False)),  # MQA, padded D, fp32
    (2, 8, 8, 1, 4096, 128, torch.bfloat16, "transposed", {}),  # decode step
    (2, 4, 4, 512, 512, 64, torch.float16, "padded", dict(dropout_p=0.2)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("B,H,H_kv,T,S,D,dtype,layout,kwargs", GPU_SIGNATURES)
def test_gpu_cpp_path_matches_python_path_bit_for_bit(cpp, B, H, H_kv, T, S, D, dtype, layout, kwargs):
    kwargs = dict(kwargs)
    with deterministic_algorithms(kwargs.pop("deterministic", False)):
        check_cpp_path_against_python_path(B, H, H_kv, T, S, D, dtype, layout, kwargs)


def check_cpp_path_against_python_path(B, H, H_kv, T, S, D, dtype, layout, kwargs):
    q, k, v = make_qkv(B, H, H_kv, T, S, D, dtype, layout, device="cuda")
    atomic_dq = fa._bwd_plan(fa._seq_bucket(T, S), fa._kernel_consts(q, True, 0.0)["BLOCK_D"]) == "fused"
    do = torch.randn(B, H, T, D, device="cuda", dtype=dtype)
    torch.manual_seed(7)
    seed = fa._make_seed(q.device) if kwargs.get("dropout_p") else None
    _, want = outputs_and_grads(lambda q, k, v: python_path(q, k, v, seed=seed, **kwargs), q, k, v, do)
    nodes = []
    # Calls 1 and 2 take the Python path (the second plans the forward), call 3 runs the forward from C++
    # and plans its backward, call 4 runs both from C++. Every call reads fresh copies of the inputs.
    for call in range(4):
        torch.manual_seed(7)  # dropout: the same seed for every call, through either path
        node, got = outputs_and_grads(lambda q, k, v: flash_attention(q, k, v, **kwargs), q, k, v, do)
        nodes.append(node)
        assert_same(got, want, atomic_dq)
        assert host_path.num_plans() == [(0, 0), (1, 0), (1, 1), (1, 1)][call]
    assert nodes[1] == PYTHON_NODE and nodes[2] != PYTHON_NODE and nodes[3] == nodes[2]


def planned(q, k, v, do, **kwargs):
    """Three calls, so the forward and backward of this signature have plans; the third's results."""
    for _ in range(3):
        _, got = outputs_and_grads(lambda q, k, v: flash_attention(q, k, v, **kwargs), q, k, v, do)
    return got


@pytest.mark.gpu
def test_gpu_cpp_path_keys_what_the_kernels_specialize_on(cpp):
    """Another alignment, a scale given instead of derived, a new grad_out layout: each gets a plan of its
    own, and the right result."""
    q, k, v = make_qkv(2, 4, 4, 256, 256, 64, torch.bfloat16, "contiguous", device="cuda")
    do = torch.randn(2, 4, 256, 64, device="cuda", dtype=torch.bfloat16)
    _, want = outputs_and_grads(python_path, q, k, v, do)
    assert_same(planned(q, k, v, do), want)
    plans = host_path.num_plans()
    buffer = torch.empty(q.numel() + 1, device="cuda", dtype=q.dtype)
    q_odd = buffer[1:].view(q.shape).copy_(q)  # 2 bytes past a 16-byte boundary
    qq = q_odd.detach().requires_grad_()
    out = flash_attention(qq, k, v)
    out.backward(do)
    assert torch.equal(out, want[0]) and torch.equal(qq.grad, want[1])
    assert host_path.num_plans()[0] == plans[0]  # (the odd address is seen once: not planned yet)
    assert_same(planned(q, k, v, do, sm_scale=0.125), want)  # 1 / sqrt(64), given
    assert host_path.num_plans()[0] == plans[0] + 1
    do_t = do.transpose(1, 2).contiguous().transpose(1, 2)  # (B, T, H, D) in memory
    for _ in range(2):
        _, got = outputs_and_grads(flash_attention, q, k, v, do_t)
        assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.gpu
def test_gpu_cpp_path_keys_deterministic_algorithms(cpp):
    """A backward planned with atomic dQ (the fused plan) is not replayed once deterministic algorithms are
    asked for: the backward key holds the switch."""
    q, k, v = make_qkv(2, 8, 2, 2048, 2048, 128, torch.bfloat16, "contiguous", device="cuda")
    do = torch.randn(2, 8, 2048, 128, device="cuda", dtype=torch.bfloat16)
    planned(q, k, v, do)
    assert host_path.num_plans() == (1, 1)
    with deterministic_algorithms():
        _, want = outputs_and_grads(python_path, q, k, v, do)
        for _ in range(3):
            assert_same(outputs_and_grads(flash_attention, q, k, v, do)[1], want)
    assert host_path.num_plans() == (1, 2)


@pytest.mark.gpu
def test_gpu_cpp_path_from_several_threads(cpp):
    q, k, v = make_qkv(4, 8, 8, 512, 512, 64, torch.bfloat16, "contiguous", device="cuda")
    do = torch.randn(4, 8, 512, 64, device="cuda", dtype=torch.bfloat16)
    _, want = outputs_and_grads(python_path, q, k, v, do)
    planned(q, k, v, do)
    results = [[] for _ in range(4)]

    def work(i):
        for _ in range(5):
            results[i].append(outputs_and_grads(flash_attention, q, k, v, do)[1])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(len(r) == 5 for r in results)
    for got in itertools.chain(*results):
        assert_same(got, want)
    assert host_path.num_plans() == (1, 1)


@pytest.mark.gpu
def test_gpu_cpp_path_under_saved_tensor_hooks(cpp):
    """save_on_cpu hands the saved tensors back contiguous: the backward must not use a plan made for the
    fused layout's strides."""
    q, k, v = make_qkv(2, 4, 4, 256, 256, 64, torch.bfloat16, "fused", device="cuda")
    do = torch.randn(2, 4, 256, 64, device="cuda", dtype=torch.bfloat16)
    _, want = outputs_and_grads(python_path, q, k, v, do)
    assert_same(planned(q, k, v, do), want)
    with torch.autograd.graph.save_on_cpu(pin_memory=True):
        for _ in range(3):
            _, got = outputs_and_grads(flash_attention, q, k, v, do)
            for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
                assert torch.equal(g, w), name


@pytest.mark.gpu
def test_gpu_cpp_path_takes_any_grad_out_layout(cpp):
    """grad_out is read in place with its strides: an expanded one (from .sum()) gets its own plan."""
    q, k, v = make_qkv(2, 4, 4, 128, 128, 64, torch.bfloat16, "contiguous", device="cuda")
    grads = []
    for _ in range(4):
        qq = q.detach().requires_grad_()
        flash_attention(qq, k, v).sum().backward()
        grads.append(qq.grad)
    ones = torch.ones(2, 4, 128, 64, device="cuda", dtype=torch.bfloat16)
    _, want = outputs_and_grads(python_path, q, k, v, ones)
    assert all(torch.equal(g, want[1]) for g in grads)
    assert host_path.num_plans() == (1, 1)


@pytest.mark.gpu
def test_gpu_cpp_path_refuses_double_backward(cpp):
    q, k, v = make_qkv(2, 4, 4, 128, 128, 64, torch.float32, "contiguous", device="cuda")
    q.requires_grad_()
    for _ in range(3):
        flash_attention(q, k, v).sum().backward()
    out = flash_attention(q, k, v)
    assert type(out.grad_fn).__name__ != PYTHON_NODE
    (dq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        dq.sum().backward()


@pytest.mark.gpu
def test_gpu_errors_in_the_python_backward_keep_their_type(cpp, monkeypatch):
    q, k, v = make_qkv(2, 4, 4, 128, 128, 64, torch.bfloat16, "contiguous", device="cuda")
    q.requires_grad_()
    for _ in range(3):
        out = flash_attention(q, k, v)
    assert type(out.grad_fn).__name__ != PYTHON_NODE  # a C++ node with no backward plan yet

    def fail(*args):
        raise ValueError("from the backward")

    monkeypatch.setattr(fa, "_backward_impl", fail)
    with pytest.raises(ValueError, match="from the backward"):
        out.sum().backward()


@pytest.mark.gpu
def test_gpu_cpp_path_without_grad_and_for_subclasses(cpp):
    q, k, v = make_qkv(2, 4, 4, 128, 128, 64, torch.bfloat16, "contiguous", device="cuda")
    want = python_path(q, k, v)
    for _ in range(3):
        with torch.no_grad():
            assert torch.equal(flash_attention(q, k, v), want)
        with torch.inference_mode():
            assert torch.equal(flash_attention(q, k, v), want)
    assert host_path.num_plans()[0] == 1

    class Subclass(torch.Tensor):
        pass

    sub = q.clone().as_subclass(Subclass).requires_grad_()  # the Python path serves subclasses
    assert type(flash_attention(sub, k, v).grad_fn).__name__ == PYTHON_NODE


@pytest.mark.gpu
def test_gpu_cpp_path_checks_inputs_like_the_python_path(cpp):
    q, k, v = make_qkv(2, 4, 4, 128, 128, 64, torch.bfloat16, "contiguous", device="cuda")
    for _ in range(3):
        flash_attention(q, k, v)
    with pytest.raises(ValueError, match="dropout_p"):
        flash_attention(q, k, v, dropout_p=1.0)
    with pytest.raises(TypeError, match="causal"):
        flash_attention(q, k, v, causal=1)
    with pytest.raises(ValueError, match="head dim"):
        flash_attention(q, k[..., :32], v[..., :32])
    with pytest.raises(ValueError, match="rank 4"):
        flash_attention(q[0, 0, 0, 0], k, v)


@pytest.mark.gpu
def test_gpu_forced_config_forgets_plans(cpp):
    q, k, v = make_qkv(2, 4, 4, 256, 256, 64, torch.bfloat16, "contiguous", device="cuda")
    for _ in range(2):
        flash_attention(q, k, v)
    assert host_path.num_plans()[0] == 1
    with fa.forced_config(32, 32):
        assert host_path.num_plans() == (0, 0)
        for _ in range(3):
            out = flash_attention(q, k, v)  # planned with the forced tiles
        assert host_path.num_plans()[0] == 1
        torch.testing.assert_close(out, python_path(q, k, v))
    assert host_path.num_plans() == (0, 0)


@pytest.mark.gpu
def test_gpu_built_library_is_reused(cpp, monkeypatch):
    import torch.utils.cpp_extension

    assert os.path.exists(host_path._library_path())
    monkeypatch.setattr(torch.utils.cpp_extension, "load", lambda *args, **kwargs: pytest.fail("rebuilt"))
    assert hasattr(host_path._load(), "forward")  # from the cache, without a compiler run
