"""Decode benchmark: one new token per sequence against a KV cache, our kernel against SDPA's backends.

    python -m kernels.bench_decode [--batch 1 16] [--seqlens 256 1024 4096 16384] [--kv_heads 12 4]
                                   [--heads 12] [--head_dim 64] [--json FILE]

At each point (batch B, cache length S, kv heads H_kv) q is (B, H, 1, D) and the caches (B, H_kv, S, D),
bf16, every sequence S tokens long, so the whole cache is read: SDPA gets the full caches and no mask,
which is its fastest form (ours still reads the lengths from a device tensor, as in a decode step).

Providers
    ours            kernels.decode.decode_attention (split-KV, grouped heads packed in one tile)
    sdpa            F.scaled_dot_product_attention as PyTorch picks (enable_gqa when H_kv < H)
    sdpa-flash      SDPA forced to one backend (torch.nn.attention.sdpa_kernel); n/a where it
    sdpa-efficient  refuses the inputs
    sdpa-cudnn

Method: every provider runs under CUDA graphs in one process (triton.testing.do_bench_cudagraph: a graph of
many calls, replayed; the mean time per call). Each call cycles through copies of the inputs that together
exceed the L2 cache four times (at most 64 copies), so K and V come from HBM, as in a model whose layers
each read their own cache; at the smallest points 64 copies are less than that and some reads hit L2.
Bandwidth: the bytes of K and V read, 2 * B * H_kv * S * D * 2, over the time. "ours / best" is the best
SDPA backend's time over ours: above 1, ours is faster.
"""

import argparse
import json
import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
import triton
import triton.testing

from kernels.decode import decode_attention

PROVIDERS = ("ours", "sdpa", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn")
SDPA_BACKENDS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION",
                 "sdpa-cudnn": "CUDNN_ATTENTION"}
MAX_COPIES = 64


def make_provider(name: str, H: int, H_kv: int) -> Callable:
    """fn(q, k, v, lengths) -> out for a provider name."""
    if name == "ours":
        return lambda q, k, v, lengths: decode_attention(q, k, v, lengths)
    gqa = H != H_kv

    def sdpa(q, k, v, lengths):
        if name == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[name])):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)

    return sdpa


def time_provider(fn: Callable, inputs: list[tuple]) -> float:
    """Mean seconds per call under a CUDA graph, the calls cycling through the copies in `inputs`."""
    def all_copies():
        for q, k, v, lengths in inputs:
            fn(q, k, v, lengths)

    ms = triton.testing.do_bench_cudagraph(all_copies, rep=50)
    return ms * 1e-3 / len(inputs)


def run_point(B: int, H: int, H_kv: int, S: int, D: int, providers=PROVIDERS, seed: int = 0) -> dict:
    """Times and bandwidths of every provider at one point; None where a provider refuses the inputs."""
    dtype, device = torch.bfloat16, torch.device("cuda")
    kv_bytes = 2 * B * H_kv * S * D * 2  # K and V in bf16
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    copies = max(1, min(MAX_COPIES, math.ceil(4 * l2 / kv_bytes)))
    g = torch.Generator(device).manual_seed(seed)
    inputs = []
    for _ in range(copies):
        q = torch.randn(B, H, 1, D, generator=g, device=device, dtype=dtype)
        k = torch.randn(B, H_kv, S, D, generator=g, device=device, dtype=dtype)
        v = torch.randn(B, H_kv, S, D, generator=g, device=device, dtype=dtype)
        inputs.append((q, k, v, torch.full((B,), S, dtype=torch.int32, device=device)))
    row = dict(B=B, H=H, H_kv=H_kv, S=S, D=D, copies=copies, kv_bytes=kv_bytes)
    reference = None
    for name in providers:
        fn = make_provider(name, H, H_kv)
        try:
            with warnings.catch_warnings():  # SDPA explains at length why a backend refuses
                warnings.simplefilter("ignore")
                out = fn(*inputs[0])
                seconds = time_provider(fn, inputs)
        except RuntimeError:
            row[name] = None
            continue
        if reference is None:
            reference = out.float()
        err = (out.float() - reference).abs().max().item()
        if not err < 2e-2:  # bf16 outputs of magnitude < 1: anything larger is a wrong answer
            raise AssertionError(f"{name} differs from {providers[0]} by {err:.3g} at B={B} H_kv={H_kv} S={S}")
        row[name] = seconds
    del inputs
    torch.cuda.empty_cache()
    sdpa = {name: row[name] for name in providers if name != "ours" and row.get(name) is not None}
    row["best_sdpa"] = min(sdpa, key=sdpa.get) if sdpa else None
    return row


def format_table(rows: list[dict]) -> str:
    """A Markdown table: microseconds per call and GB/s of K and V read."""
    us = lambda s: "n/a" if s is None else f"{s * 1e6:.1f}"
    cols = ["B", "H_kv", "S", "ours us", "ours GB/s"] + [f"{p} us" for p in PROVIDERS[1:]]
    cols += ["best SDPA", "its GB/s", "ours / best"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        best = r["best_sdpa"]
        best_s = r[best] if best else None
        cells = [r["B"], r["H_kv"], r["S"], us(r["ours"]), f"{r['kv_bytes'] / r['ours'] / 1e9:.0f}"]
        cells += [us(r.get(p)) for p in PROVIDERS[1:]]
        cells += [best or "n/a", f"{r['kv_bytes'] / best_s / 1e9:.0f}" if best_s else "n/a",
                  f"{best_s / r['ours']:.2f}" if best_s else "n/a"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def run_decode_bench(
    batches=(1, 16), seqlens=(256, 1024, 4096, 16384), kv_heads=(12, 4), heads: int = 12, head_dim: int = 64,
    print_fn: Callable = print,
) -> list[dict]:
    """Every point of the grid; prints the table as it grows (for `python -m kernels.bench --decode`)."""
    if not torch.cuda.is_available():
        raise RuntimeError("the decode benchmark needs a CUDA GPU")
    rows = []
    for B in batches:
        for H_kv in kv_heads:
            for S in seqlens:
                rows.append(run_point(B, heads, H_kv, S, head_dim))
    props = torch.cuda.get_device_properties(0)
    print_fn(f"{props.name}, torch {torch.__version__}, triton {triton.__version__}; H={heads}, D={head_dim}, "
             f"bf16, one new token, CUDA graphs")
    print_fn(format_table(rows))
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m kernels.bench_decode", description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--seqlens", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    p.add_argument("--kv_heads", type=int, nargs="+", default=[12, 4])
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args(argv)
    for name in ("batch", "seqlens", "kv_heads"):
        if min(getattr(args, name)) < 1:
            p.error(f"--{name} {getattr(args, name)}: every value must be >= 1")
    if any(args.heads % h for h in args.kv_heads):
        p.error(f"--kv_heads {args.kv_heads}: each must divide --heads {args.heads}")
    rows = run_decode_bench(args.batch, args.seqlens, args.kv_heads, args.heads, args.head_dim)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
