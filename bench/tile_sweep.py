"""Per-kernel tile sweep: every (BLOCK_M, BLOCK_N, warps, stages) of each kernel of
kernels/flash_attention.py (the forward, the dQ kernel, the dK/dV kernel, and the dK/dV kernel adding dQ
atomically), each launch timed alone, at the sequence-length sweep's shapes (B*T = 16384 tokens,
H*D = 2048, bf16, causal).

    python bench/tile_sweep.py OUT_DIR [--dims 64,128] [--seqs 256,512,...] [--kinds fwd,dq,...]

The table of kernels/tiles.py is read off its output. A tile is (BLOCK_M queries, BLOCK_N keys, warps,
stages) in every kernel. Compiling over a hundred tiles per head dim one after another takes minutes, so
worker processes compile them first (they fill Triton's on-disk cache; the timing process then loads
them). Writes OUT_DIR/tiles.jsonl: one line per (D, T) with ours / sdpa / flex forward and backward
(GPU ms under CUDA graphs), then one line per (D, T, kind, tile) with its median ms and its largest
difference from the reference (the table tile's result), relative to the reference's largest value: a
wrong tile shows. Prints the fastest correct tile against the table's per kind.
GPU only; run from the repository root with PYTHONPATH=.
"""

import argparse
import itertools
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

import kernels.flash_attention as fa
from kernels import bench, tiles

KINDS = tiles.KERNELS  # fwd, dq, dkdv, dkdv_atomic


def tiles_to_try(kind: str, D: int, chosen: list[tuple] | None = None) -> list[tuple]:
    """(BLOCK_M, BLOCK_N, warps, stages) to try for one kernel and head dim: ``chosen`` if given."""
    if chosen:
        return chosen
    stages = (2, 3, 4) if D <= 64 else (2, 3)
    if kind == "fwd":
        blocks = list(itertools.product((64, 128), (32, 64, 128)))
    else:  # two fp32 accumulators (dK, dV) or a wide one (dQ): up to 128 x 64 blocks
        pairs = itertools.product((16, 32, 64, 128), (32, 64, 128))
        blocks = [(bm, bn) for bm, bn in pairs if bm * bn <= 128 * 64]
    return [(bm, bn, w, s) for (bm, bn), w, s in itertools.product(blocks, (4, 8), stages)]


def inputs(T: int, D: int) -> dict:
    """q, k, v, dO, the forward's out and lse, delta and the gradients of the table's tiles (the reference
    for every tile), at the sweep's shape for T, D."""
    ((B, H, T, D),) = bench.sweep_shapes([D], [T])
    q, k, v = (t.detach() for t in bench.make_inputs(B, H, T, D, torch.bfloat16, seed=T * 1000 + D))
    do = torch.randn_like(q)
    scale = 1.0 / math.sqrt(D)
    out, lse = fa._forward_impl(q, k, v, True, scale, 0.0, None)
    delta = (out.float() * do.float()).sum(-1).contiguous()
    dq, dk, dv = fa._backward_impl(do, q, k, v, out, lse, True, scale, 0.0, None)
    return dict(B=B, H=H, T=T, D=D, q=q, k=k, v=v, do=do, out=out, lse=lse, delta=delta, scale=scale,
                ref=dict(out=out, dq=dq.float(), dk=dk, dv=dv, delta=delta))


def launcher(kind: str, tile: tuple, x: dict):
    """(a function that launches one kernel with this tile, the names of the tensors it writes, them)."""
    bm, bn, warps, stages = tile
    B, H, T, D, scale = x["B"], x["H"], x["T"], x["D"], x["scale"]
    q, k, v, do, out, lse, delta = x["q"], x["k"], x["v"], x["do"], x["out"], x["lse"], x["delta"]
    meta = dict(HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), IS_CAUSAL=True, HAS_DROPOUT=False,
                DOT_PRECISION="tf32", BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
    scalars = (H, 1, T, T, scale, scale * fa.LOG2E, 0.0, 1.0)  # H, GROUP, T, S, scales, dropout p, 1 / keep
    if kind == "fwd":
        o, lse_out = torch.empty_like(out), torch.empty_like(lse)
        return (lambda: fa._attn_fwd[(triton.cdiv(T, bm), B * H)](
            q, k, v, o, lse_out, lse_out, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
            *scalars[:4], scalars[5], 0.0, 1.0, **meta)), ("out",), (o,)
    if kind == "dq":  # it stores the delta it computes (checked too): not into the buffer dK/dV reads
        dq, delta_out = torch.empty_like(q), torch.empty_like(delta)
        return (lambda: fa._attn_bwd_dq[(triton.cdiv(T, bm), B * H)](
            q, k, v, out, do, lse, delta_out, dq, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            *do.stride(), *dq.stride(), *scalars, **meta)), ("dq", "delta"), (dq, delta_out)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    dq = torch.zeros(q.shape, dtype=torch.float32, device="cuda")  # repeated atomic launches keep adding
    return (lambda: fa._attn_bwd_dkdv[(triton.cdiv(T, bn), B * H)](
        q, k, v, do, lse, delta, dq, dk, dv, lse, *q.stride(), *k.stride(), *v.stride(), *do.stride(),
        *dq.stride(), *dk.stride(), *dv.stride(), *scalars, ATOMIC_DQ=kind == "dkdv_atomic", **meta)), \
        ("dk", "dv"), (dk, dv)


def jobs(dims: list[int], kinds: list[str], chosen: list[tuple] | None) -> list[tuple]:
    return [(kind, D, tile) for D in dims for kind in kinds for tile in tiles_to_try(kind, D, chosen)]


def compile_share(dims: list[int], kinds: list[str], chosen: list[tuple] | None, worker: int,
                  workers: int) -> None:
    """Worker process: launch every workers-th job once at T = 256 (same specialization as every T of the
    sweep: all are multiples of 16), so its compiled kernel lands in Triton's cache."""
    xs = {D: inputs(256, D) for D in dims}
    for i, (kind, D, tile) in enumerate(jobs(dims, kinds, chosen)):
        if i % workers == worker:
            try:
                launcher(kind, tile, xs[D])[0]()
            except Exception:  # out of shared memory or registers: the timing pass records it
                pass
    torch.cuda.synchronize()


def time_tiles(kind: str, x: dict, log, chosen: list[tuple] | None = None) -> tuple | None:
    """Time every tile of one kernel at one shape; returns (best tile, its ms)."""
    reference, best = None, None
    for tile in tiles_to_try(kind, x["D"], chosen):
        if tile[0] > x["T"] or tile[1] > x["T"]:
            continue
        record = dict(D=x["D"], T=x["T"], kind=kind, tile=tile)
        try:
            fn, names, written = launcher(kind, tile, x)
            for t in written:
                t.fill_(float("nan"))  # an element a tile fails to write stays NaN
            fn()
            got = [t.float() for t in written]
            if reference is None:  # what the table's tiles computed
                reference = [x["ref"][n].float() for n in names]
            diffs = [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, reference)]
            record["rel_diff"] = max(diffs)
            record["ms"] = do_bench(fn, warmup=25, rep=60, return_mode="median")
        except Exception as e:
            record["error"] = type(e).__name__
        log(record)
        correct = record.get("rel_diff", math.inf) < 2e-2  # bf16 rounding differs between tiles; NaN fails
        if "ms" in record and correct and (best is None or record["ms"] < best[1]):
            best = (tile, record["ms"])
    return best


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--dims", default="128,64")
    p.add_argument("--seqs", default=",".join(map(str, bench.SWEEP_T)))
    p.add_argument("--workers", type=int, default=14)
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--tiles", default="", help="only these tiles, BMxBNxWARPSxSTAGES: 64x128x8x3,...")
    p.add_argument("--peers", default="ours,sdpa,flex", help="providers timed at each shape ('' for none)")
    p.add_argument("--compile-share", nargs=2, type=int, metavar=("I", "N"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    dims = [int(d) for d in args.dims.split(",")]
    kinds = args.kinds.split(",")
    chosen = [tuple(int(n) for n in t.split("x")) for t in args.tiles.split(",") if t]
    if args.compile_share:
        compile_share(dims, kinds, chosen, *args.compile_share)
        return
    start = time.time()
    cmd = [sys.executable, __file__, str(args.out), "--dims", args.dims, "--kinds", args.kinds,
           "--tiles", args.tiles, "--compile-share"]
    procs = [subprocess.Popen([*cmd, str(i), str(args.workers)]) for i in range(args.workers)]
    for proc in procs:
        proc.wait()
    print(f"compiled in {time.time() - start:.0f} s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "tiles.jsonl", "w") as f:
        def log(record):
            f.write(json.dumps(record) + "\n")
            f.flush()

        for D in dims:
            for T in (int(t) for t in args.seqs.split(",")):
                x = inputs(T, D)
                peers = {}
                for name in filter(None, args.peers.split(",")):
                    try:
                        fn, context = bench.make_provider(name, x["q"], x["k"], True)
                    except bench.Unavailable as e:
                        peers[name] = f"unavailable: {e}"
                        continue
                    q, k, v = (x[n].detach().clone().requires_grad_() for n in "qkv")
                    with context():
                        peers[name] = {m: bench.time_mode(fn, q, k, v, m)[0] for m in ("fwd", "bwd")}
                log(dict(D=D, T=T, peers=peers))
                print(f"D={D} T={T} " + json.dumps(peers), flush=True)
                for kind in kinds:
                    best = time_tiles(kind, x, log, chosen)
                    bucket, block_d = max(16, triton.next_power_of_2(T)), max(16, triton.next_power_of_2(D))
                    print(f"  {kind}: fastest {best}, table {tiles.table(kind, bucket, block_d)}", flush=True)
    print(f"total {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
