"""Small pieces shared by the Triton kernels (attention, add_norm, rope_cache, activation, skinny_linear).

Not an op: device-side helpers (rounding, the SiLU / GELU-tanh formula, the programmatic-dependent-launch
prologue), the host-side checks every launcher repeats (devices, dtypes, and outputs that would alias an
input other programs read), and the interpreter's rows-per-program rule.

Why a rounding helper: the decoder's torch path rounds intermediate results to the model dtype at
fixed points (the residual sum, the normalised activations before the weight multiply, SiLU before
the gate product). The kernels compute in fp32 and round at the same points, so they differ from the
torch path only by the order of fp32 sums. Triton's interpreter (``TRITON_INTERPRET=1`` on the CPU)
truncates fp32 -> bf16 instead of rounding to nearest even (triton-lang/triton#11584), so there the
rounding is done by bit arithmetic; the compiled kernels use the ordinary (round-to-nearest) cast.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

from dinfill.backend import compiled_target, triton_interpreted

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def round_to_bf16(x):
    """fp32 -> nearest-even bf16 value, kept in fp32 (the interpreter's own downcast truncates)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def silu_or_gelu_tanh(x, GELU_TANH: tl.constexpr):
    """``silu(x) = x sigmoid(x)``, or GELU-tanh as ``x sigmoid(2u)``, ``u = sqrt(2/pi) (x + 0.044715 x^3)``
    (``0.5 x (1 + tanh(u))`` in real arithmetic), in fp32; ``exp(-|z|) <= 1`` keeps the sigmoid from overflowing."""
    if GELU_TANH:
        z = 1.5957691216057308 * (x + 0.044715 * x * x * x)  # 2 sqrt(2 / pi) (x + 0.044715 x^3)
    else:
        z = x
    e = tl.exp(-tl.abs(z))
    return x * tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def await_producer(USE_PDL: tl.constexpr):
    """First thing in a kernel launched with programmatic dependent launch (see :func:`dinfill.target.pdl`): wait
    until the previous kernel has finished and its writes are visible, then let the next kernel launch. Before
    any load or store, so no program reads or overwrites what the previous kernel still uses. Nothing without."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


def pdl_args(device: torch.device) -> dict:
    """The launch arguments of :func:`await_producer`'s kernels: ``USE_PDL`` and, when on, ``launch_pdl``."""
    from dinfill.target import pdl

    return {"USE_PDL": True, "launch_pdl": True} if pdl(device) else {"USE_PDL": False}


def emulate_bf16(t: Tensor) -> bool:
    """True when a bf16 tensor is processed by the interpreter (see the module docstring)."""
    return t.dtype == torch.bfloat16 and not compiled_target(t.device)


def tl_dtype(dtype: torch.dtype):
    """The Triton element type of a float torch dtype."""
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dtype]


def check_device(op: str, *tensors: Tensor) -> None:
    """One device for all tensors, and CUDA unless the interpreter is on; messages name the fix."""
    dev = tensors[0].device
    for t in tensors[1:]:
        if t.device != dev:
            raise ValueError(f"{op}: all tensors must be on one device, got {dev} and {t.device}; move them")
    if not compiled_target(dev) and not triton_interpreted():
        raise RuntimeError(
            f"{op}: tensors are on {dev.type}; the Triton kernel needs CUDA, or TRITON_INTERPRET=1 set before "
            "triton is imported (slow), or run the model with DINFILL_BACKEND=torch"
        )


def check_float(op: str, name: str, t: Tensor) -> None:
    """A float16 / bfloat16 / float32 tensor, or a clear TypeError."""
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}; supported: float16, bfloat16, float32 (cast first)")


def check_int(op: str, name: str, t: Tensor) -> None:
    """An integer tensor, or a clear TypeError."""
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{op}: {name} must be an integer tensor, got {t.dtype}")


def overlaps(a: Tensor, b: Tensor) -> bool:
    """True when the memory spans of ``a`` and ``b`` intersect (conservative: interleaved views count).

    The kernels' programs run concurrently on a GPU: an output that overlaps an input another program
    reads is a race there, while the interpreter (one program after another) may still give plausible
    results. Launchers use this to refuse such aliasing with a clear message.
    """
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    if a.device.type == "meta" and not _same_storage(a, b):  # meta tensors all start at address 0
        return False

    def span(t: Tensor) -> tuple[int, int]:
        last = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride(), strict=True))
        return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def same_view(a: Tensor, b: Tensor) -> bool:
    """``a`` and ``b`` are the very same elements in the same order (an in-place update of one row by its
    own program is safe; any other overlap is not)."""
    same = a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
    return same and (a.device.type != "meta" or _same_storage(a, b))


def _same_storage(a: Tensor, b: Tensor) -> bool:
    """Views of one storage (what an address comparison tells apart on a real device)."""
    return a.untyped_storage()._cdata == b.untyped_storage()._cdata


def rows_per_program(device: torch.device, n_rows: int, row_elems: int) -> int:
    """Rows one program handles: one on CUDA (a row keeps its warps busy); in the interpreter, whose cost is
    per program and per operation rather than per element, a power of two of rows up to ~4096 elements' worth."""
    if compiled_target(device):
        return 1
    fit = max(1, 4096 // row_elems)
    return min(triton.next_power_of_2(n_rows), 1 << (fit.bit_length() - 1))  # both powers of two (tl.arange)


def device_context(t: Tensor):
    """``torch.cuda.device(t.device)`` for CUDA tensors not on the current device, else a no-op context."""
    if t.device.type == "cuda" and t.device.index is not None and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
