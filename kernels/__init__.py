"""Triton attention kernels for minigpt (imports torch and triton only).

``kernels.flash_attention`` is the module kernels/flash_attention.py, and calling it calls its function:

    from kernels import flash_attention
    out = flash_attention(q, k, v)              # the same as flash_attention.flash_attention(q, k, v)
    import kernels.flash_attention as fa        # the same object: the module, with forced_config etc.

Why a callable module: in Python a package's attribute and its submodule of the same name are one slot,
and both ``from kernels import flash_attention`` and ``import kernels.flash_attention as fa`` read it. A
function there would hide the module; the module there keeps it, and its ``__call__`` keeps the
function's interface. One exception: TorchDynamo does not call module objects, so code compiled with
``torch.compile(fullgraph=True)`` imports the function itself,
``from kernels.flash_attention import flash_attention``, as ``minigpt.attention`` does.
"""

import types

import kernels.flash_attention as _module


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return self.flash_attention(*args, **kwargs)


_module.__class__ = _CallableModule
__all__ = ["flash_attention"]
