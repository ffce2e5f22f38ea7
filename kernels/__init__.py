"""Triton attention kernels for minigpt (imports torch and triton only)."""

from kernels.flash_attention import flash_attention

__all__ = ["flash_attention"]
