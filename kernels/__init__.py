"""Triton attention kernels for minigpt (imports torch and triton only).

`from kernels import flash_attention` gives the function. The function shadows its module of the same
name as an attribute of this package, so reach the module (forced_config, dropout_keep_mask) with
`importlib.import_module("kernels.flash_attention")` or `from kernels.flash_attention import ...`.
"""

from kernels.flash_attention import flash_attention

__all__ = ["flash_attention"]
