"""Tile sizes of the FlashAttention kernels (kernels/flash_attention.py): a static table.

A tile is (BLOCK_M queries, BLOCK_N keys, num_warps, num_stages), in every kernel: the forward and the dQ
kernel hold BLOCK_M queries and stream BLOCK_N keys, the dK/dV kernel holds BLOCK_N keys and streams
BLOCK_M queries. The table is looked up by kernel, padded head dim and the power-of-two bucket of the
longer sequence. Its entries come from a per-kernel sweep on an H100 (bench/tile_sweep.py; bench/NOTES.md
v8, v9, v12): the fastest tile, or one within 3% of it. Short sequences take small tiles, so that more
programs keep the SMs busy. Every key block is a multiple of 32 keys (dropout draws its mask 32 keys at a
time). A tile that would not fit the GPU's shared memory gives up pipeline stages, then rows.
"""

import contextlib
import functools
import os

import torch

KERNELS = ("fwd", "dq", "dkdv", "dkdv_atomic")
# Triton's interpreter ignores warps and stages. Unequal blocks, so that a BLOCK_M / BLOCK_N mix-up in a
# kernel's index math shows in the CPU tests.
INTERPRETER = {"fwd": (64, 32, 4, 1), "dq": (64, 32, 4, 1), "dkdv": (32, 64, 4, 1), "dkdv_atomic": (32, 64, 4, 1)}
_forced = None


def table(kernel: str, bucket: int, block_d: int) -> tuple[int, int, int, int]:
    """The H100 tile of ``kernel`` for sequences up to ``bucket`` and the padded head dim ``block_d``."""
    wide = block_d > 64
    if kernel == "fwd":
        if bucket >= 2048:
            return (128, 128, 8, 3) if wide else (128, 64, 8, 4 if bucket >= 4096 else 3)
        return (64, 64, 4, 3) if bucket >= 1024 or (bucket >= 512 and not wide) else (64, 32, 4, 3)
    if kernel == "dq":
        if bucket >= (1024 if wide else 2048):
            return (128, 64, 8, 3)
        return (64, 64, 4, 2) if wide else (64, 32, 4, 3)
    if kernel == "dkdv":
        if wide:
            return (64, 128, 8, 3) if bucket >= 4096 else (64, 64, 4, 2)
        return (32, 64, 4, 3)
    if kernel == "dkdv_atomic":  # 128 keys held: half the atomic traffic of 64 (NOTES v12)
        return (64, 128, 8, 3)
    raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")


def shared_memory(kernel: str, block_m: int, block_n: int, block_d: int, stages: int) -> int:
    """Elements a kernel stages in shared memory, roughly: the rows it holds, plus ``stages`` copies of the
    two tiles it streams (K and V, or Q and dO)."""
    if kernel == "fwd":
        return block_m * block_d + 2 * stages * block_n * block_d
    if kernel == "dq":
        return 2 * block_m * block_d + 2 * stages * block_n * block_d
    return 2 * block_n * block_d + 2 * stages * block_m * block_d


def fit(kernel: str, tile: tuple, block_d: int, element_size: int, limit: int) -> tuple[int, int, int, int]:
    """``tile``, with fewer stages, then fewer streamed and held rows, until it fits ``limit`` bytes."""
    bm, bn, warps, stages = tile
    while shared_memory(kernel, bm, bn, block_d, stages) * element_size > limit:
        if stages > 1:
            stages -= 1
        elif bn > 32 and (kernel not in ("dkdv", "dkdv_atomic") or bm <= 16):
            bn //= 2
        elif bm > 16:
            bm //= 2
        else:
            break
    return (bm, bn, warps, stages)


@functools.cache
def _pick(kernel: str, bucket: int, block_d: int, element_size: int, device_index: int) -> tuple:
    limit = torch.cuda.get_device_properties(device_index).shared_memory_per_block_optin
    return fit(kernel, table(kernel, bucket, block_d), block_d, element_size, limit)


def pick(kernel: str, q: torch.Tensor, S: int, block_d: int) -> dict:
    """The launch arguments of ``kernel``'s tile for queries ``q`` (B, H, T, D) against S keys."""
    if _forced is not None:
        tile = _forced
    elif os.environ.get("TRITON_INTERPRET", "0") == "1":
        tile = INTERPRETER[kernel]
    else:
        bucket = max(16, 1 << (max(q.shape[2], S) - 1).bit_length())
        tile = _pick(kernel, bucket, block_d, q.element_size(), q.get_device())
    return dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), tile))


@contextlib.contextmanager
def forced_config(block_m: int, block_n: int, num_warps: int = 4, num_stages: int = 2):
    """Run every kernel with one tile (BLOCK_M queries, BLOCK_N keys) inside the block: for tests and for
    benchmarks that map speed against tile shape."""
    global _forced
    saved, _forced = _forced, (block_m, block_n, num_warps, num_stages)
    try:
        yield
    finally:
        _forced = saved
