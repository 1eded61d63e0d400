"""Hot ops of a diffusion / AR step: Triton kernels with plain-torch fallbacks.

``fused_step`` (the per-step sampling and position choice) and ``attention`` (FlashAttention-2
style forward) are the contract names. They are imported lazily so ``import dinfill.kernels``
does not import triton (slow to import, and absent off Linux) until an op is first used.
``reference`` holds the plain-torch specifications the tests compare against.

The ops live in ``fused_step_kernel.py``, ``attention_fwd.py`` and the decoder's ``add_norm_kernel.py``,
``rope_cache_kernel.py``, ``activation_kernel.py``, ``skinny_linear_kernel.py``: a submodule named like its op
would be bound over the op as a package attribute as soon as anything imported the submodule.
"""

from __future__ import annotations

import importlib

__all__ = ["fused_step", "attention", "add_norm", "rope_cache", "activation", "skinny_linear"]

_LAZY = {
    "fused_step": "dinfill.kernels.fused_step_kernel",
    "attention": "dinfill.kernels.attention_fwd",
    # the decoder's fused path (issue 10)
    "add_norm": "dinfill.kernels.add_norm_kernel",
    "rope_cache": "dinfill.kernels.rope_cache_kernel",
    "activation": "dinfill.kernels.activation_kernel",
    "skinny_linear": "dinfill.kernels.skinny_linear_kernel",  # experimental (DINFILL_GEMV=triton)
}


def __getattr__(name: str):
    if name in _LAZY:
        op = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = op  # later look-ups skip this function
        return op
    raise AttributeError(f"module 'dinfill.kernels' has no attribute {name!r}")
