"""One switch for the whole package: which implementation runs the hot ops.

``DINFILL_BACKEND`` (contract) = ``auto`` (default: Triton on CUDA, plain torch elsewhere),
``triton`` or ``torch``. With ``TRITON_INTERPRET=1`` on a CPU machine, ``triton`` runs every
kernel through Triton's interpreter, so whole sampler runs can be compared with the torch path.
The variable is read at call time (not import time) so tests can flip it with ``monkeypatch``.
"""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "torch")


def requested_backend() -> str:
    """Return the value of ``DINFILL_BACKEND`` after validation (``auto`` when unset)."""
    value = os.environ.get("DINFILL_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"DINFILL_BACKEND={value!r} is not one of {BACKENDS}; unset it or pick one of those")
    return value


def triton_available() -> bool:
    """True when triton is importable (it is a hard dependency on Linux, optional elsewhere)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def compiled_target(device: torch.device | str) -> bool:
    """True when kernels on ``device`` run compiled for a GPU: CUDA, or ``meta`` tensors standing for a GPU
    under :func:`dinfill.target.static_target` (the static GPU model compiles what such a launch would run)."""
    device = torch.device(device)
    if device.type == "cuda":
        return True
    from dinfill.target import static_active

    return device.type == "meta" and static_active() is not None


def use_triton(device: torch.device | str) -> bool:
    """Decide whether a hot op on tensors living on ``device`` goes through a Triton kernel.

    ``auto`` picks Triton for CUDA tensors of a GPU the kernels serve (sm_80 and newer: A100, A10, L4, H100...)
    and torch elsewhere; ``triton`` forces it (CUDA, or the interpreter on the CPU) and raises with a clear
    message, before any launch, when that is impossible; ``torch`` never uses it.
    """
    device = torch.device(device)
    choice = requested_backend()
    if choice == "torch":
        return False
    if choice == "auto":  # a GPU the kernels cannot serve (below sm_80) runs the torch path
        return compiled_target(device) and triton_available() and _servable(device)
    if not triton_available():
        raise RuntimeError("DINFILL_BACKEND=triton but triton is not installed; `pip install triton` or use torch")
    if not compiled_target(device) and not triton_interpreted():
        raise RuntimeError(
            f"DINFILL_BACKEND=triton with tensors on {device.type}: Triton needs CUDA, or TRITON_INTERPRET=1 "
            "(set before triton is imported) to run the kernels in the interpreter on the CPU"
        )
    if not _servable(device):
        from dinfill.target import MIN_ARCH, Unservable, target_for

        t = target_for(device)
        raise Unservable(
            f"DINFILL_BACKEND=triton on {t.name} (sm_{t.arch}): dinfill's Triton kernels need sm_{MIN_ARCH} or newer "
            "(bf16 tensor-core dot products); unset DINFILL_BACKEND (auto runs the torch path there) or set it to torch"
        )
    return True


def _servable(device: torch.device) -> bool:
    """The Triton kernels can run on ``device``: the interpreter / CPU, or a GPU of at least ``MIN_ARCH``."""
    from dinfill.target import MIN_ARCH, target_for

    t = target_for(device)
    return t is None or t.arch >= MIN_ARCH


def flash_attn_available() -> bool:
    """True when the optional flash-attn package imports (an extra; never required)."""
    if importlib.util.find_spec("flash_attn") is None:
        return False
    try:
        import flash_attn  # noqa: F401
    except Exception:  # a broken build (ABI mismatch) counts as absent
        return False
    return True
