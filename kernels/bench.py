"""Attention benchmark: `python -m kernels.bench`.

Times causal attention forward, backward and forward+backward for several implementations ("providers") on
the same random inputs, and reports milliseconds, TFLOP/s, the speed relative to PyTorch's default
`F.scaled_dot_product_attention` ("x sdpa": above 1 is faster than SDPA default; `--baseline flex`
compares against another provider), and each provider's host cost per eager call.

Providers
    ours            kernels.flash_attention, our fused FlashAttention-2 kernel
    before          the flash_attention module of another checkout (`--before PATH`), for before/after tables
    sdpa            F.scaled_dot_product_attention, letting PyTorch pick (cuDNN on recent builds for H100)
    sdpa-flash      SDPA forced to its FlashAttention-2 backend   (torch.nn.attention.sdpa_kernel)
    sdpa-cudnn      SDPA forced to cuDNN's fused attention
    sdpa-efficient  SDPA forced to the memory-efficient (xformers-style) backend
    flex            torch.compile(flex_attention) with a causal block mask built once per shape
    naive           matmul, mask, softmax, matmul: the T x T matrix goes through memory
    unfused         kernels.unfused: the same three steps as separate Triton kernels
A provider that is missing, unsupported on this torch, out of memory or failing is reported as n/a.

Method. GPU time ("ms"): each provider's step (forward; backward of a kept output; or both) is captured
N times in one CUDA graph after a few eager calls that compile and tune, the graph is replayed for half a
second (the GPU's clock comes back up after compiling), then ten timed replays; the median over N. Every
provider is timed the same way, without its host cost, as compiled training with CUDA graphs runs it.
Host cost ("host us"): wall time per eager call, 5 rounds of 20 calls back to back without a sync, median;
what a provider costs the CPU when it is not replayed from a graph. Inputs are seeded `randn`, one set per
shape, shared by all providers; the forward runs with gradients enabled, as in training. FLOPs: forward
4*B*H*T*S*D (two matrix products of 2*T*S*D per head), halved for causal; backward 2.5x forward (five
products instead of two); forward+backward 3.5x forward.

Outputs (under --out): bench.csv/json (the table), before_after.md (with --before: ours against the other
checkout, both as ratios to the baseline), sweep.csv/json + sweep_d{64,128}_{mode}.png (--sweep: TFLOP/s
against T at B*T = 16384 tokens, H*D = 2048), heatmap.json + heatmap.png (--heatmap: our kernel over a
BLOCK_M x BLOCK_N grid, through `kernels.flash_attention.forced_config(block_m=..., block_n=...,
num_warps=...)`, which pins the tile of every kernel).

Examples
    python -m kernels.bench
    python -m kernels.bench --shapes 16,12,1024,64 --modes fwd,bwd --providers ours,sdpa,flex
    python -m kernels.bench --providers ours,before,sdpa --before ../old-checkout
    python -m kernels.bench --sweep --heatmap --out bench/results
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import importlib
import importlib.util
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

MODES = ("fwd", "bwd", "fwd_bwd")
PROVIDERS = (
    "ours", "before", "sdpa", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "flex", "naive", "unfused",
)
BASELINE = "sdpa"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# (B, H, T, D): the char GPT, GPT-2 small, two long-context shapes, one very long sequence.
DEFAULT_SHAPES = (
    (64, 6, 256, 64),
    (16, 12, 1024, 64),
    (4, 32, 4096, 64),
    (4, 16, 4096, 128),
    (1, 16, 16384, 128),
)
# Sequence-length sweep as in the FlashAttention papers: constant tokens per batch and constant H*D.
SWEEP_TOKENS = 16384
SWEEP_HIDDEN = 2048
SWEEP_T = (256, 512, 1024, 2048, 4096, 8192, 16384)
SWEEP_D = (64, 128)
SWEEP_PROVIDERS = ("ours", "sdpa", "sdpa-flash", "sdpa-cudnn", "flex")
HEATMAP_SHAPE = (4, 16, 4096, 128)
HEATMAP_BLOCKS = (16, 32, 64, 128)
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}
BEFORE_TOLERANCE = 0.03  # a ratio to the baseline that drops by more than this is flagged in before_after.md


class Unavailable(Exception):
    """The provider cannot run here (module missing, backend absent, mode unsupported)."""


@dataclass
class Result:
    """One timed (provider, shape, mode); ms/tflops/ratio are None when the provider could not run."""

    provider: str
    B: int
    H: int
    T: int
    D: int
    mode: str
    causal: bool = True
    dtype: str = "bf16"
    dropout: float = 0.0
    ms: float | None = None  # GPU time per call, replayed from a CUDA graph
    tflops: float | None = None
    ratio: float | None = None  # SDPA default's ms / this ms: above 1 is faster than SDPA default
    host_us: float | None = None  # host time per eager call
    note: str = ""

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.B, self.H, self.T, self.D)


# ---------------------------------------------------------------------------------------------------------
# FLOPs and providers
# ---------------------------------------------------------------------------------------------------------


def attention_flops(B: int, H: int, T: int, S: int, D: int, causal: bool, mode: str) -> float:
    """FLOPs of attention: forward 4*D per (query, key) pair that is computed, backward 2.5x, forward +
    backward 3.5x. Without a mask that is all T*S pairs. The causal mask (bottom-right aligned) keeps
    T*S - T²/2 when S >= T (for T == S the usual half; a decode step, T = 1, sees every key) and S²/2 when
    T > S (the first T - S queries see nothing)."""
    if mode not in FLOP_FACTOR:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    pairs = float(T * S)
    if causal:
        pairs = T * S - T * T / 2 if S >= T else S * S / 2
    return 4.0 * B * H * D * pairs * FLOP_FACTOR[mode]


def _causal_keep(T: int, S: int, device: torch.device) -> torch.Tensor:
    """Boolean (T, S) mask of kept scores, bottom-right aligned: query i sees keys j <= i + S - T."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)


def _sdpa_backend(name: str):
    """The SDPBackend member for 'flash' | 'cudnn' | 'efficient', or Unavailable on this torch."""
    try:
        from torch.nn.attention import SDPBackend
    except ImportError as e:
        raise Unavailable("torch.nn.attention.SDPBackend missing") from e
    member = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}
    member = member[name]
    if not hasattr(SDPBackend, member):
        raise Unavailable(f"SDPBackend.{member} missing on torch {torch.__version__}")
    return getattr(SDPBackend, member)


_compiled_flex = None


def _flex():
    """torch.compile(flex_attention), compiled once per process (recompiled by dynamo for each shape)."""
    global _compiled_flex
    if _compiled_flex is None:
        try:
            from torch.nn.attention.flex_attention import flex_attention
        except ImportError as e:
            raise Unavailable("torch.nn.attention.flex_attention missing") from e
        # Every shape is a new static graph; the default recompile limit (8) would fall back to eager.
        import torch._dynamo

        for knob in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 256))
        # The bwd mode times backward(retain_graph=True); a compiled backward that donates its buffers
        # refuses that (seen when Inductor's cache already held the graphs). Donation saves memory, not
        # time.
        import torch._functorch.config

        if hasattr(torch._functorch.config, "donated_buffer"):
            torch._functorch.config.donated_buffer = False
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


BEFORE_PATH: str | None = None  # the checkout of the "before" provider (--before)
_before_modules: dict[str, object] = {}


def load_before(root: str | Path):
    """The kernels/flash_attention.py of the checkout at ``root``, loaded beside ours under its own module
    name. Its torch custom ops are registered under another namespace (the names would clash with ours),
    and a C++ host path it may have stays off: under CUDA graphs only its kernels count."""
    root = str(Path(root).resolve())
    if root not in _before_modules:
        path = Path(root) / "kernels" / "flash_attention.py"
        if not path.is_file():
            raise Unavailable(f"--before: no kernels/flash_attention.py under {root}")
        tag = f"before_{len(_before_modules)}"
        spec = importlib.util.spec_from_file_location(f"minigpt_{tag}", path)
        module = importlib.util.module_from_spec(spec)
        custom_op = torch.library.custom_op

        def renamed(name, *args, **kwargs):  # "ns::op" -> "ns_before_0::op"
            return custom_op(name.replace("::", f"_{tag}::", 1), *args, **kwargs)

        torch.library.custom_op = renamed
        try:
            spec.loader.exec_module(module)
        finally:
            torch.library.custom_op = custom_op
        if hasattr(module, "_host_path_enabled"):
            module._host_path_enabled = False
        _before_modules[root] = module
    return _before_modules[root]


def make_provider(
    name: str, q: torch.Tensor, k: torch.Tensor, causal: bool, dropout_p: float = 0.0
) -> tuple[
    Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    Callable[[], contextlib.AbstractContextManager],
]:
    """Returns (fn(q, k, v) -> out, context factory to hold while timing). Raises Unavailable.

    dropout_p: attention dropout as in training (ours, before, the sdpa providers and naive; flex and
    unfused have none)."""
    T, S, D = q.shape[-2], k.shape[-2], q.shape[-1]
    if dropout_p > 0.0 and name in ("flex", "unfused"):
        raise Unavailable(f"{name} has no attention dropout")
    scale = 1.0 / math.sqrt(D)
    nullctx = contextlib.nullcontext

    if name in ("ours", "before"):
        if name == "before" and BEFORE_PATH is None:
            raise Unavailable("before: no checkout given (--before PATH)")
        try:
            module = load_before(BEFORE_PATH) if name == "before" else importlib.import_module("kernels.flash_attention")
        except Unavailable:
            raise
        except Exception as e:  # any import failure means the provider is absent
            raise Unavailable(f"{name}: {type(e).__name__}: {e}") from e
        fa = module.flash_attention
        return (lambda q, k, v: fa(q, k, v, causal=causal, dropout_p=dropout_p)), nullctx

    if name == "sdpa" or name.startswith("sdpa-"):

        def fn(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout_p)

        if name == "sdpa":
            return fn, nullctx
        from torch.nn.attention import sdpa_kernel

        backend = _sdpa_backend(name.removeprefix("sdpa-"))
        return fn, (lambda: sdpa_kernel(backend))

    if name == "flex":
        flex = _flex()
        block_mask = None
        if causal:
            from torch.nn.attention.flex_attention import create_block_mask

            offset = S - T

            def causal_mod(b, h, q_idx, kv_idx):
                return q_idx + offset >= kv_idx

            block_mask = create_block_mask(causal_mod, B=None, H=None, Q_LEN=T, KV_LEN=S, device=q.device)
        return (lambda q, k, v: flex(q, k, v, block_mask=block_mask)), nullctx

    if name == "naive":
        keep = _causal_keep(T, S, q.device) if causal else None

        def naive(q, k, v):
            scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, T, S) written to memory
            if keep is not None:
                scores = scores.masked_fill(~keep, float("-inf"))
            p = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)  # read, written again
            return F.dropout(p, dropout_p) @ v

        return naive, nullctx

    if name == "unfused":
        try:
            module = importlib.import_module("kernels.unfused")
        except Exception as e:
            raise Unavailable(f"kernels.unfused: {type(e).__name__}: {e}") from e
        ua = module.unfused_attention
        return (lambda q, k, v: ua(q, k, v, causal=causal)), nullctx

    raise ValueError(f"provider must be one of {PROVIDERS}, got {name!r}")


# ---------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------


def make_inputs(
    B: int, H: int, T: int, D: int, dtype: torch.dtype, device: str = "cuda", seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded standard-normal q, k, v of shape (B, H, T, D) that require grad."""
    g = torch.Generator(device=device).manual_seed(seed)
    return tuple(
        torch.randn(B, H, T, D, generator=g, device=device, dtype=dtype).requires_grad_() for _ in range(3)
    )


def make_step(fn: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str) -> Callable[[], None]:
    """One call of ``mode``: the forward (gradients enabled, as in training), the backward of an output
    computed here, or both. Gradients are dropped before each backward, so none accumulates."""

    def drop_grads():
        for t in (q, k, v):
            t.grad = None

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    out = fn(q, k, v) if mode == "bwd" else None
    dout = torch.randn_like(q)  # every provider's output has q's shape

    def step():
        if mode == "fwd":
            fn(q, k, v)
            return
        drop_grads()
        if mode == "bwd":
            out.backward(dout, retain_graph=True)
        else:
            fn(q, k, v).backward(dout)

    return step


def graph_ms(step: Callable[[], None], stream: torch.cuda.Stream, rep_ms: float = 50.0,
             warmup_s: float = 0.5) -> float:
    """Median GPU milliseconds per call of ``step``, captured N times into one CUDA graph and replayed
    (triton.testing.do_bench_cudagraph's method, on a stream we choose, so a backward captures on the
    stream its forward ran on)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(stream)
    for _ in range(5):
        step()
    end.record(stream)
    end.synchronize()
    calls = max(1, min(1000, int(rep_ms / max(start.elapsed_time(end) / 5, 1e-3))))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for _ in range(calls):
            step()
    began = time.perf_counter()
    while time.perf_counter() - began < warmup_s:  # the clock drops while the host compiles and captures
        graph.replay()
        stream.synchronize()
    times = []
    for _ in range(10):
        start.record(stream)
        graph.replay()
        end.record(stream)
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def host_us(step: Callable[[], None], calls: int = 20, rounds: int = 5) -> float:
    """Median host microseconds per eager call of ``step``, ``calls`` calls back to back without a sync
    (the GPU queue stays far from full, so the host does not wait for the GPU)."""
    times = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        began = time.perf_counter()
        for _ in range(calls):
            step()
        times.append((time.perf_counter() - began) / calls * 1e6)
    torch.cuda.synchronize()
    return statistics.median(times)


def time_mode(fn: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str) -> tuple[float, float]:
    """(GPU ms per call under CUDA graphs, host us per eager call) of fn's forward, backward or both."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step = make_step(fn, q, k, v, mode)
        for _ in range(3):  # compile, tune, pick backends: outside the timed and captured calls
            step()
        stream.synchronize()
        host = host_us(step)
        ms = graph_ms(step, stream)
    torch.cuda.current_stream().wait_stream(stream)
    return ms, host


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}"[:160]


def run_benchmarks(
    shapes: Sequence[tuple[int, int, int, int]],
    modes: Sequence[str],
    providers: Sequence[str],
    dtype: str = "bf16",
    causal: bool = True,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    device: str = "cuda",
    baseline: str = BASELINE,
    dropout_p: float = 0.0,
) -> list[Result]:
    """Times every (shape, provider, mode); failures become results with ms=None and a note.

    Each result's ratio is the baseline provider's time over its own at the same shape and mode.
    """
    results: list[Result] = []
    for B, H, T, D in shapes:
        q, k, v = make_inputs(B, H, T, D, DTYPES[dtype], device=device, seed=seed)
        for provider in providers:
            try:
                fn, ctx = make_provider(provider, q, k, causal, dropout_p)
                failure = None
            except Exception as e:  # reported as n/a
                fn, ctx, failure = None, None, _short(e)
            for mode in modes:
                r = Result(provider, B, H, T, D, mode, causal, dtype, dropout_p)
                if failure is not None:
                    r.note = failure
                else:
                    try:
                        with ctx():
                            r.ms, r.host_us = time_mode(fn, q, k, v, mode)
                        r.tflops = attention_flops(B, H, T, T, D, causal, mode) / (r.ms * 1e-3) / 1e12
                    except Exception as e:  # out of memory, no kernel for this shape, ...
                        r.note = _short(e)
                    finally:
                        for t in (q, k, v):
                            t.grad = None
                        if isinstance(r.note, str) and "OutOfMemory" in r.note:
                            torch.cuda.empty_cache()
                results.append(r)
                if log is not None:
                    log(format_row(r))
            del fn
            torch.cuda.empty_cache()
    add_ratios(results, baseline)
    return results


def add_ratios(results: list[Result], baseline: str = BASELINE) -> None:
    """Sets each result's ratio to the baseline's ms / its ms at the same shape, mode, dtype and causal."""
    base = {(r.shape, r.mode, r.dtype, r.causal): r.ms for r in results if r.provider == baseline and r.ms}
    for r in results:
        b = base.get((r.shape, r.mode, r.dtype, r.causal))
        r.ratio = b / r.ms if (b and r.ms) else None


# ---------------------------------------------------------------------------------------------------------
# Table, CSV, JSON
# ---------------------------------------------------------------------------------------------------------

_COLUMNS = (
    ("provider", 15), ("shape (B,H,T,D)", 17), ("mode", 8), ("ms", 9), ("TFLOP/s", 8), ("host us", 8),
    ("x base", 7),
)


def _num(x: float | None, digits: int) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def format_row(r: Result) -> str:
    cells = (
        r.provider,
        ",".join(map(str, r.shape)),
        r.mode,
        _num(r.ms, 3),
        _num(r.tflops, 1),
        _num(r.host_us, 1),
        _num(r.ratio, 2),
    )
    line = "  ".join(
        c.ljust(w) if i < 3 else c.rjust(w) for i, (c, (_, w)) in enumerate(zip(cells, _COLUMNS))
    )
    return line + (f"  {r.note}" if r.ms is None and r.note else "")


def format_table(results: Sequence[Result], baseline: str = BASELINE) -> str:
    """The results as a fixed-width text table, one row per (provider, shape, mode): GPU ms under CUDA
    graphs, TFLOP/s, host us per eager call, and "x <baseline>", the baseline's ms over this row's (above 1
    is faster)."""
    names = [*(n for n, _ in _COLUMNS[:-1]), f"x {baseline}"]
    header = "  ".join(
        n.ljust(w) if i < 3 else n.rjust(w) for i, (n, (_, w)) in enumerate(zip(names, _COLUMNS))
    )
    return "\n".join([header, "-" * len(header), *(format_row(r) for r in results)])


def before_after(results: Sequence[Result], baseline: str = BASELINE) -> str:
    """A markdown table of ours against the "before" checkout at each shape and mode: both GPU times, both
    ratios to the baseline, and the change of ours' ratio; a drop of more than BEFORE_TOLERANCE is flagged."""
    by = {(r.provider, r.shape, r.mode): r for r in results}
    lines = [f"| shape (B, H, T, D) | mode | before ms | ours ms | before x {baseline} | ours x {baseline} | change |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        if r.provider != "ours" or ("before", r.shape, r.mode) not in by:
            continue
        old = by["before", r.shape, r.mode]
        change = r.ratio - old.ratio if r.ratio is not None and old.ratio is not None else None
        flag = " (drop)" if change is not None and change < -BEFORE_TOLERANCE else ""
        lines.append(f"| {', '.join(map(str, r.shape))} | {r.mode} | {_num(old.ms, 3)} | {_num(r.ms, 3)} | "
                     f"{_num(old.ratio, 2)} | {_num(r.ratio, 2)} | {_num(change, 2)}{flag} |")
    return "\n".join(lines)


def environment() -> dict:
    """What the numbers were measured on."""
    import triton

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "command": "python -m kernels.bench " + " ".join(sys.argv[1:]),
    }


def write_results(
    results: Sequence[Result], out_dir: str | Path, stem: str = "bench", meta: dict | None = None
):
    """Writes <stem>.csv and <stem>.json under out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [asdict(r) for r in results]
    csv_path, json_path = out / f"{stem}.csv", out / f"{stem}.json"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[name for name in Result.__dataclass_fields__])
        writer.writeheader()
        writer.writerows(rows)
    json_path.write_text(json.dumps({"meta": meta or {}, "results": rows}, indent=1) + "\n")
    return csv_path, json_path


# ---------------------------------------------------------------------------------------------------------
# Sequence-length sweep and block-size heatmap
# ---------------------------------------------------------------------------------------------------------


def sweep_shapes(
    d_values: Sequence[int] = SWEEP_D, t_values: Sequence[int] = SWEEP_T
) -> list[tuple[int, int, int, int]]:
    """(B, H, T, D) with B*T = SWEEP_TOKENS and H*D = SWEEP_HIDDEN."""
    return [(max(1, SWEEP_TOKENS // T), SWEEP_HIDDEN // D, T, D) for D in d_values for T in t_values]


def plot_sweep(results: Sequence[Result], out_dir: str | Path, title: str = "") -> list[Path]:
    """One PNG per (D, mode): TFLOP/s against T, one line per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for D in sorted({r.D for r in results}):
        for mode in [m for m in MODES if any(r.mode == m for r in results)]:
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for provider in dict.fromkeys(r.provider for r in results):
                pts = sorted(
                    (r.T, r.tflops) for r in results if (r.D, r.mode, r.provider) == (D, mode, provider)
                )
                pts = [(t, y) for t, y in pts if y is not None]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=provider)
            ax.set_xscale("log", base=2)
            ax.set_xlabel(f"sequence length T (B*T = {SWEEP_TOKENS}, H*D = {SWEEP_HIDDEN})")
            ax.set_ylabel("TFLOP/s")
            causal = "causal" if all(r.causal for r in results) else "non-causal"
            ax.set_title(f"{mode}, D={D}, {causal} {title}".strip())
            ax.grid(True, alpha=0.3)
            ax.legend()
            fig.tight_layout()
            path = Path(out_dir) / f"sweep_d{D}_{mode}.png"
            fig.savefig(path, dpi=120)
            plt.close(fig)
            paths.append(path)
    return paths


def forced_config_fn() -> Callable | None:
    """kernels.flash_attention.forced_config if our kernel offers it, else None."""
    try:
        module = importlib.import_module("kernels.flash_attention")
    except Exception:
        return None
    return getattr(module, "forced_config", None)


def run_heatmap(
    shape: tuple[int, int, int, int],
    dtype: str,
    causal: bool,
    modes: Sequence[str] = ("fwd", "bwd"),
    seed: int = 0,
    blocks: Sequence[int] = HEATMAP_BLOCKS,
    log: Callable[[str], None] | None = None,
    dropout_p: float = 0.0,
) -> list[dict] | None:
    """TFLOP/s of our kernel for every (BLOCK_M, BLOCK_N); None when the kernel cannot force a config.
    Tiles of 64 x 128 elements and up run 8 warps, smaller ones 4 (as the default tiles do); 2 stages.
    With dropout, key blocks below 32 cannot run (the mask is drawn 32 keys at a time)."""
    forced = forced_config_fn()
    if forced is None:
        return None
    fa = importlib.import_module("kernels.flash_attention").flash_attention
    B, H, T, D = shape
    q, k, v = make_inputs(B, H, T, D, DTYPES[dtype], seed=seed)
    cells = []
    for mode in modes:
        for bm in blocks:
            for bn in blocks:
                cell = {"mode": mode, "block_m": bm, "block_n": bn, "ms": None, "tflops": None, "note": ""}
                try:
                    with forced(block_m=bm, block_n=bn, num_warps=8 if bm * bn >= 64 * 128 else 4):
                        attend = lambda q, k, v: fa(q, k, v, causal=causal, dropout_p=dropout_p)
                        cell["ms"] = time_mode(attend, q, k, v, mode)[0]
                    cell["tflops"] = attention_flops(B, H, T, T, D, causal, mode) / (cell["ms"] * 1e-3) / 1e12
                except Exception as e:  # a block pair the kernel cannot run
                    cell["note"] = _short(e)
                    torch.cuda.empty_cache()
                for t in (q, k, v):
                    t.grad = None
                cells.append(cell)
                if log is not None:
                    log(
                        f"heatmap {mode} BLOCK_M={bm} BLOCK_N={bn}: {_num(cell['tflops'], 1)} TFLOP/s {cell['note']}"
                    )
    return cells


def plot_heatmap(cells: Sequence[dict], shape: tuple[int, int, int, int], out_dir: str | Path) -> Path:
    """One panel per mode: TFLOP/s over BLOCK_M (rows) x BLOCK_N (columns); blank cells could not run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(c["mode"] for c in cells))
    bms = sorted({c["block_m"] for c in cells})
    bns = sorted({c["block_n"] for c in cells})
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        grid = [[math.nan] * len(bns) for _ in bms]
        for c in cells:
            if c["mode"] == mode and c["tflops"] is not None:
                grid[bms.index(c["block_m"])][bns.index(c["block_n"])] = c["tflops"]
        im = ax.imshow(grid, cmap="viridis", origin="lower")
        for i in range(len(bms)):
            for j in range(len(bns)):
                text = "n/a" if math.isnan(grid[i][j]) else f"{grid[i][j]:.0f}"
                ax.text(j, i, text, ha="center", va="center", color="w", fontsize=8)
        ax.set_xticks(range(len(bns)), [str(b) for b in bns])
        ax.set_yticks(range(len(bms)), [str(b) for b in bms])
        ax.set_xlabel("BLOCK_N (keys)")  # in every kernel: dK/dV programs hold the keys, the others the queries
        ax.set_ylabel("BLOCK_M (queries)")
        ax.set_title(f"ours {mode}, TFLOP/s, (B,H,T,D) = {','.join(map(str, shape))}")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    path = Path(out_dir) / "heatmap.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_unfused_steps(shapes, dtype: str, causal: bool, seed: int = 0) -> list[dict]:
    """Per-step forward times of the unfused pipeline (scores, softmax, P @ V), when it offers them."""
    try:
        step_times = importlib.import_module("kernels.unfused").step_times
    except Exception:
        return []
    rows = []
    for B, H, T, D in shapes:
        q, k, v = make_inputs(B, H, T, D, DTYPES[dtype], seed=seed)
        row = {"B": B, "H": H, "T": T, "D": D}
        try:
            with torch.no_grad():
                row.update(step_times(q, k, v, causal=causal))
        except Exception as e:
            row["note"] = _short(e)
        rows.append(row)
        del q, k, v
        torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


def parse_shape(text: str) -> tuple[int, int, int, int]:
    """'B,H,T,D' -> (B, H, T, D), all positive."""
    try:
        shape = tuple(int(x) for x in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) <= 0:
        raise argparse.ArgumentTypeError(f"shape must be four positive integers B,H,T,D, got {text!r}")
    return shape


def _choices(allowed: Sequence[str], what: str) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"{what} must be a comma list of {', '.join(allowed)}; got {text!r}"
            )
        return items

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m kernels.bench",
        description="Time causal attention (forward, backward, both) for our kernels and PyTorch's.",
        epilog=f"Providers: {', '.join(PROVIDERS)}. The ratio column needs the baseline among the providers.",
    )
    p.add_argument(
        "--shapes",
        nargs="+",
        type=parse_shape,
        default=list(DEFAULT_SHAPES),
        metavar="B,H,T,D",
        help="shapes to time (default: the five project shapes)",
    )
    p.add_argument(
        "--modes",
        type=_choices(MODES, "--modes"),
        default=None,
        help="comma list of fwd,bwd,fwd_bwd (default: all three; the sweep uses fwd,bwd)",
    )
    p.add_argument(
        "--providers",
        type=_choices(PROVIDERS, "--providers"),
        default=None,
        help=f"comma list (default: all; the sweep uses {','.join(SWEEP_PROVIDERS)})",
    )
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    p.add_argument("--no-causal", dest="causal", action="store_false", help="full (non-causal) attention")
    p.add_argument("--dropout", type=float, default=0.0, help="attention dropout probability (training's)")
    p.add_argument("--out", default="bench/results", help="folder for CSV, JSON and PNG files")
    p.add_argument("--sweep", action="store_true", help="also TFLOP/s against T = 256..16384, D = 64 and 128")
    p.add_argument("--no-table", action="store_true", help="skip the shape table (with --sweep or --heatmap)")
    p.add_argument(
        "--sweep-d",
        type=_choices(tuple(map(str, SWEEP_D)), "--sweep-d"),
        default=None,
        help="head dims of the sweep (default: 64,128)",
    )
    p.add_argument("--heatmap", action="store_true", help="also our kernel over a BLOCK_M x BLOCK_N grid")
    p.add_argument(
        "--heatmap-shape",
        type=parse_shape,
        default=HEATMAP_SHAPE,
        metavar="B,H,T,D",
        help=f"shape of the heatmap (default: {','.join(map(str, HEATMAP_SHAPE))})",
    )
    p.add_argument("--baseline", choices=PROVIDERS, default=BASELINE, help="provider of the ratio column")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.add_argument("--before", metavar="PATH", default=None,
                   help="another checkout: its kernels/flash_attention.py is the 'before' provider, and the "
                   "table run writes before_after.md (ours against it, as ratios to the baseline)")
    p.add_argument("--decode", action="store_true",
                   help="also the decode benchmark (kernels/bench_decode.py): one new token against a KV cache")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not torch.cuda.is_available():
        print(f"kernels.bench needs a CUDA GPU; none found (torch {torch.__version__}). Nothing was timed.")
        return 1

    out = Path(args.out)
    if not 0.0 <= args.dropout < 1.0:
        print(f"--dropout {args.dropout} is out of range; allowed: 0 <= p < 1")
        return 2
    global BEFORE_PATH
    BEFORE_PATH = args.before
    meta = {**environment(), "dtype": args.dtype, "causal": args.causal, "baseline": args.baseline}
    meta["dropout"] = args.dropout
    meta["before"] = args.before
    print(
        f"{meta['gpu']}  torch {meta['torch']}  triton {meta['triton']}  {args.dtype}  "
        f"{'causal' if args.causal else 'non-causal'}{f'  dropout {args.dropout}' if args.dropout else ''}",
        flush=True,
    )

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    if not args.no_table:
        providers = args.providers or [p for p in PROVIDERS if p != "before" or args.before]
        results = run_benchmarks(
            args.shapes,
            args.modes or list(MODES),
            providers,
            args.dtype,
            args.causal,
            args.seed,
            log,
            baseline=args.baseline,
            dropout_p=args.dropout,
        )
        print(format_table(results, args.baseline))
        paths = [*write_results(results, out, "bench", meta)]
        if "before" in providers and "ours" in providers:
            table = before_after(results, args.baseline)
            print(f"\nbefore ({args.before}) and after, GPU time under CUDA graphs\n{table}")
            (out / "before_after.md").write_text(table + "\n")
            paths.append(out / "before_after.md")
        if "unfused" in providers:
            steps = run_unfused_steps(args.shapes, args.dtype, args.causal, args.seed)
            if steps:
                print("\nunfused forward, ms per step")
                for row in steps:
                    shape = ",".join(str(row[x]) for x in "BHTD")
                    times = "  ".join(
                        f"{name} {_num(ms, 3)}"
                        for name, ms in row.items()
                        if name not in ("B", "H", "T", "D", "note")
                    )
                    print(f"  {shape:<17} {times}  {row.get('note', '')}")
                (out / "unfused_steps.json").write_text(
                    json.dumps({"meta": meta, "steps": steps}, indent=1) + "\n"
                )
        print(f"wrote {', '.join(map(str, paths))}")

    if args.sweep:
        d_values = [int(d) for d in args.sweep_d] if args.sweep_d else list(SWEEP_D)
        sweep = run_benchmarks(
            sweep_shapes(d_values),
            args.modes or ["fwd", "bwd"],
            args.providers or list(SWEEP_PROVIDERS),
            args.dtype,
            args.causal,
            args.seed,
            log,
            baseline=args.baseline,
            dropout_p=args.dropout,
        )
        print("\nsequence-length sweep\n" + format_table(sweep, args.baseline))
        stem = "sweep" if d_values == list(SWEEP_D) else "sweep_d" + "_".join(map(str, d_values))
        paths = [*write_results(sweep, out, stem, meta), *plot_sweep(sweep, out, f"({meta['gpu']})")]
        print(f"wrote {', '.join(map(str, paths))}")

    if args.decode:
        from kernels.bench_decode import run_decode_bench

        rows = run_decode_bench()
        out.mkdir(parents=True, exist_ok=True)
        (out / "decode.json").write_text(json.dumps(rows, indent=1))
    if args.heatmap:
        cells = run_heatmap(
            args.heatmap_shape, args.dtype, args.causal, seed=args.seed, log=log, dropout_p=args.dropout
        )
        if cells is None:
            print(
                "\nheatmap unavailable: kernels.flash_attention has no forced_config(block_m=..., block_n=...)"
            )
        else:
            out.mkdir(parents=True, exist_ok=True)
            (out / "heatmap.json").write_text(
                json.dumps({"meta": meta, "shape": args.heatmap_shape, "cells": cells}, indent=1) + "\n"
            )
            best = {
                m: max(
                    (c for c in cells if c["mode"] == m and c["tflops"]),
                    key=lambda c: c["tflops"],
                    default=None,
                )
                for m in ("fwd", "bwd")
            }
            for m, c in best.items():
                if c:
                    print(
                        f"best {m}: BLOCK_M={c['block_m']} BLOCK_N={c['block_n']} {c['tflops']:.1f} TFLOP/s"
                    )
            print(f"wrote {out / 'heatmap.json'}, {plot_heatmap(cells, args.heatmap_shape, out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
