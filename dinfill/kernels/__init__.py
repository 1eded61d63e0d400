"""Hot ops of a diffusion / AR step: Triton kernels with plain-torch fallbacks.

``fused_step`` (the per-step sampling and position choice) and ``attention`` (FlashAttention-2
style forward) are the contract names. They are imported lazily so ``import dinfill.kernels``
does not import triton (slow to import, and absent off Linux) until an op is first used.
``reference`` holds the plain-torch specifications the tests compare against.

``fused_step`` lives in a submodule of the same name. Importing a submodule makes Python set the
package attribute to the *module*, whichever import comes first, so the package swaps it for
the op as it is set: ``dinfill.kernels.fused_step`` is always the function. Reach the module
itself with ``importlib.import_module("dinfill.kernels.fused_step")`` (or ``sys.modules``).
"""

from __future__ import annotations

import importlib
import sys
import types

__all__ = ["fused_step", "attention"]

_LAZY = {"fused_step": "dinfill.kernels.fused_step", "attention": "dinfill.kernels.attention_fwd"}


def __getattr__(name: str):
    if name in _LAZY:
        op = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = op
        return op
    raise AttributeError(f"module 'dinfill.kernels' has no attribute {name!r}")


class _Package(types.ModuleType):
    """This package's module type: a submodule bound under an op's name is replaced by the op."""

    def __setattr__(self, name: str, value) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType) and hasattr(value, name):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
