"""The C++ host path of flash_attention (host_path.cpp), and the plans it runs.

Why. At small shapes attention is bound by the host, not the GPU: at the char GPT's (64, 6, 256, 64) an
H100 runs our forward and backward kernels in about 100 us, while the Python around them (the
autograd.Function, its backward called back from the autograd engine's thread, the launchers) takes
longer than that, and longer than SDPA's C++ path (bench/NOTES.md v10, v11).

How. The second call with a signature (shapes, strides, dtypes, device, 16-byte alignment, causal, scale,
dropout) runs the Python path while ``_launch`` records each launch (the first call is left alone: it
may tune, and a decoding loop's growing key length would plan every step). The records become a plan: per
launch the compiled kernel, its grid, and its parameters as words with the tensors' addresses left open;
and the layouts of the tensors the call allocates. The plan goes to a table in C++ under the signature's key. A
later call with that key goes from ``flash_attention`` straight to a C++ autograd node that allocates,
fills in addresses and launches, and so does its backward, with no Python in between. The backward is
planned the same way, from the first backward of a C++ node that finds no plan (its key also holds the
layouts of the saved tensors, which saved-tensor hooks may change). Whatever has no plan
takes the Python path, as before: it stays the reference and the fallback.

Life cycle. The first flash_attention call on a CUDA tensor starts building the extension in a background
thread (torch.utils.cpp_extension and the machine's C++ compiler: half a minute or so, once; then cached
under TORCH_EXTENSIONS_DIR, by default ~/.cache/torch_extensions); calls take the Python path until it is
ready.
If the build fails, a warning says why and everything stays on the Python path; so do ROCm builds of
torch. ``MINIGPT_CPP_HOST=0`` keeps every call on the Python path. ``wait()`` blocks until the build is
done (benchmarks and the GPU tests call it).
Launches through this path skip Triton's launch hooks (used by some Triton profilers); torch's profiler
sees them as usual.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import os
import shutil
import struct
import sys
import tempfile
import threading
import warnings

import torch

fa = importlib.import_module("kernels.flash_attention")  # the module: the package's attribute is the function

__all__ = ["enabled", "start", "wait", "ready", "num_plans", "clear_plans", "disabled"]

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "host_path.cpp")
_NAME = "minigpt_host_path"

_ext = None  # the built extension
_thread: threading.Thread | None = None
_start_lock = threading.Lock()
_KEYS_KEPT = 4096  # bound on each of the two key sets below: a full set starts over
_seen: set = set()  # forward keys seen once: the second sighting plans
_unplannable: set = set()  # keys whose calls this path cannot reproduce: Python keeps them
_planned_kernels: dict = {}  # the compiled kernels plans launch: Triton unloads a kernel collected

# Forward slots, then backward slots: the call's own tensors, in host_path.cpp's order.
_F_Q, _F_K, _F_V, _F_SEED, _F_OUT, _F_LSE = range(6)
_B_Q, _B_K, _B_V, _B_OUT, _B_LSE, _B_SEED, _B_GRAD_OUT, _B_DQ, _B_DK, _B_DV = range(10)

# Triton's scalar parameter types, as the kernel reads them from its parameter buffer.
_PACK = {"i32": "<i", "i64": "<q", "u32": "<I", "u64": "<Q", "fp32": "<f", "fp64": "<d"}


def enabled() -> bool:
    """Whether eager CUDA calls may use the C++ path: not with MINIGPT_CPP_HOST=0, nor on ROCm (the plans
    launch through the CUDA driver)."""
    return os.environ.get("MINIGPT_CPP_HOST", "1") != "0" and torch.version.hip is None


def ready() -> bool:
    return _ext is not None


def start() -> None:
    """Start building the extension in the background (once per process)."""
    global _thread
    with _start_lock:
        if _thread is None and enabled():
            _thread = threading.Thread(target=_build, name="flash-attention-host-path", daemon=True)
            _thread.start()


def wait(timeout: float | None = None) -> bool:
    """Build the extension if needed and wait for it; whether the C++ path is in use."""
    start()
    if _thread is not None:
        _thread.join(timeout)
    return ready()


def num_plans() -> tuple[int, int]:
    """(forward plans, backward plans) in the table."""
    return tuple(_ext.num_plans()) if _ext is not None else (0, 0)


def clear_plans() -> None:
    """Forget every plan (``forced_config`` does, so that forced tiles are the ones launched)."""
    if _ext is not None:
        _ext.clear_plans()
    _seen.clear()
    _unplannable.clear()


@contextlib.contextmanager
def disabled():
    """Every call inside takes the Python path (``kernels.bench``'s ours-python provider)."""
    before = fa._host_path_enabled
    fa._host_forward, fa._host_path_enabled = None, False
    try:
        yield
    finally:
        fa._host_path_enabled = before
        fa._host_forward = _ext.forward if _ext is not None and before else None


def set_poison(on: bool) -> None:
    """Fill what plans allocate with NaN (integers with -1), so a test sees elements no kernel wrote."""
    wait()
    _ext.set_poison(on)


# ----------------------------------------------------------------------------------------------------
# Building and loading
# ----------------------------------------------------------------------------------------------------
def _library_path() -> str:
    """Where the built library is kept: named by a hash of the source and of what its binary depends on."""
    with open(_SOURCE, "rb") as f:
        source = f.read()
    depends = f"{torch.__version__}|{torch.version.cuda}|{sys.version}|{sys.platform}".encode()
    tag = hashlib.sha256(source + depends).hexdigest()[:16]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(cache, "torch_extensions")
    return os.path.join(root, f"{_NAME}_{tag}.so")


def _import(path: str):
    spec = importlib.util.spec_from_file_location(_NAME, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load():
    """The extension: the cached library, or a fresh build (which is then cached)."""
    path = _library_path()
    if os.path.exists(path):
        try:
            return _import(path)
        except ImportError:  # a damaged or foreign file: build again over it
            pass
    from torch.utils.cpp_extension import load

    # A private build folder, then an atomic rename: a build killed half way leaves no lock behind, and
    # processes building at once (one per GPU) do not wait on each other.
    with tempfile.TemporaryDirectory(prefix=f"{_NAME}_") as build:
        module = load(_NAME, [_SOURCE], extra_cflags=["-O2"], build_directory=build, with_cuda=True,
                      verbose=False)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, partial = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f"{_NAME}_", suffix=".partial")
        os.close(fd)
        shutil.copyfile(module.__file__, partial)
        os.replace(partial, path)
    return module  # loaded from the build folder; its mapping outlives the folder


def _build() -> None:
    global _ext
    try:
        ext = _load()
        ext.set_python_backward(_python_backward)
    except Exception as e:  # no compiler, no CUDA toolkit headers, ...: the Python path serves
        warnings.warn(f"flash_attention: the C++ host path was not built ({type(e).__name__}: {e}); "
                      "calls take the Python path", stacklevel=1)
        return
    _ext = ext
    if fa._host_path_enabled:  # (not inside ``disabled()``, which sets it on leaving)
        fa._host_forward = ext.forward  # from here on, flash_attention tries the C++ path first


# ----------------------------------------------------------------------------------------------------
# Plans
# ----------------------------------------------------------------------------------------------------
def forward_planner(q, k, v, causal, sm_scale, dropout_p):
    """For a call the C++ path could take but has no plan for: a drop-in for ``fa._forward_impl`` that
    records what it does and adds the plan; None when there is nothing to plan (yet)."""
    ext = _ext
    if ext is None:
        return None
    key = ext.forward_key(q, k, v, causal, sm_scale, dropout_p)
    if key is None or key in _unplannable:
        return None
    if key not in _seen:
        _remember(_seen, key)
        return None

    def planned_forward(q, k, v, causal, scale, dropout_p, seed):
        with fa._recording() as recording:
            out, lse = fa._forward_impl(q, k, v, causal, scale, dropout_p, seed)
        _add_plan(False, key, recording, [q, k, v, seed, out, lse], allocated=(_F_OUT, _F_LSE))
        return out, lse

    return planned_forward


def _python_backward(grad_out, q, k, v, out, lse, seed, causal, scale, dropout_p, key):
    """The backward of a C++ node that found no plan under ``key`` (None: not to be planned), called from
    C++: the gradients through the Python path, whose launches then become the plan."""
    args = (grad_out, q, k, v, out, lse, causal, scale, dropout_p, seed)
    if torch.is_grad_enabled():  # create_graph: gradients with a node that refuses a second backward
        return fa._backward_once(None, *args)
    if key is None or key in _unplannable:
        return fa._backward_impl(*args)
    with fa._recording() as recording:
        dq, dk, dv = fa._backward_impl(*args)
    slots = [q, k, v, out, lse, seed, grad_out, dq, dk, dv]
    _add_plan(True, key, recording, slots, allocated=(_B_DQ, _B_DK, _B_DV))
    return dq, dk, dv


def _remember(keys: set, key: bytes) -> None:
    if len(keys) >= _KEYS_KEPT:
        keys.clear()
    keys.add(key)


def _add_plan(backward: bool, key: bytes, recording, slots: list, allocated: tuple) -> None:
    """Turn what a call did into a plan under ``key``. ``slots``: the call's own tensors in C++'s slot
    order (None where absent); ``allocated``: the slots the call allocates. A tensor the launches address
    that is none of these must be one the call allocated for itself (delta): the plan allocates it afresh,
    and the plan's own launches write it before they read it (the dQ launch stores delta, the dK/dV
    launch after it reads it). Anything else (a launch without a compiled kernel, a tensor from elsewhere,
    one tensor in two slots) leaves the key to the Python path."""
    own = [t for t in slots if t is not None]
    entries = None
    try:  # the call itself is done: whatever goes wrong here only leaves the key to the Python path
        if len({id(t) for t in own}) == len(own):  # one tensor in two slots (q is k): ambiguous positions
            named, slots = len(slots), list(slots)
            fresh = {id(t) for t in recording.allocated}
            entries = [_launch_entry(launch, slots, fresh) for launch in recording.launches]
        if entries and None not in entries:
            allocs = [(i, list(slots[i].shape), list(slots[i].stride()), slots[i].dtype)
                      for i in (*allocated, *range(named, len(slots)))]
            for compiled, *_ in recording.launches:
                _planned_kernels[id(compiled.kernel)] = compiled.kernel
            _ext.add_plan(backward, key, len(slots), allocs, entries)
            return
    except Exception as e:
        warnings.warn(f"flash_attention: a call could not be planned for the C++ host path ({e})",
                      stacklevel=1)
    _remember(_unplannable, key)


def _launch_entry(launch: tuple, slots: list, fresh: set) -> tuple | None:
    """(function, grid, threads, shared bytes, words, addresses) for one recorded launch, or None when
    this path cannot reproduce it (cluster launches, PDL, scratch memory, a Triton older than 3.5, a
    tensor that is neither in ``slots`` nor freshly allocated by the call, whose ids are ``fresh``)."""
    compiled, grid, tensors, scalars = launch
    if compiled is None:  # the interpreter, the autotuner, a launch that returned no kernel
        return None
    kernel = compiled.kernel
    meta = kernel.metadata
    if (getattr(meta, "num_ctas", 1) != 1 or getattr(meta, "launch_pdl", False)
            or getattr(meta, "launch_cooperative_grid", False) or not hasattr(meta, "profile_scratch_size")
            or meta.global_scratch_size or meta.profile_scratch_size
            or getattr(kernel.run, "gsan_enabled", False)):
        return None
    # The kernel's parameters: its non-constexpr arguments in signature order (what Triton's launcher
    # passes), then the global and profile scratch pointers.
    types = list(kernel.src.signature.values())
    values = (*tensors, *scalars, *compiled.constexprs)
    if len(types) != len(values):
        return None
    words, addresses = [], []
    for ty, value in zip(types, values):
        if ty == "constexpr":
            continue
        if isinstance(ty, str) and ty.startswith("*"):
            slot = next((i for i, t in enumerate(slots) if t is value), None)
            if slot is None:
                if id(value) not in fresh:
                    return None
                slots.append(value)  # allocated by the call for itself: the plan allocates it too
                slot = len(slots) - 1
            addresses.append((len(words), slot))
            words.append(0)
        elif ty in _PACK:
            words.append(int.from_bytes(struct.pack(_PACK[ty], value).ljust(8, b"\0"), "little"))
        else:
            return None
    words += [0, 0]  # no scratch
    return (kernel.function, list(grid), 32 * meta.num_warps, meta.shared, words, addresses)
