"""The MLP activation in one launch: ``SiLU(gate) * up`` from a fused gate/up GEMM, or GELU-tanh.

Why: with gate and up fused into one ``(M, 2I)`` GEMM output, SwiGLU is a single elementwise pass
(torch needs a ``silu`` and a ``mul`` kernel, plus a copy for non-contiguous halves); Starcoder2's
``gelu(c_fc(x), approximate="tanh")`` is one pass either way, but running it here keeps every
family on the same fused path. The bias of Starcoder2's ``c_fc`` stays in the GEMM (cuBLAS adds it
in its epilogue with a single rounding, as the torch path does).

Supports
--------
* ``x`` ``(M, 2I)`` for ``"swiglu"`` (gate in columns ``[0, I)``, up in ``[I, 2I)``) or ``(M, I)`` for
  ``"gelu_tanh"``; a unit last stride, any row stride; fp16 / bf16 / fp32; any sizes.

Limitations
-----------
* Forward only.

Differences from the reference (``dinfill.kernels.reference.activation_ref``)
------------------------------------------------------------------------------
* SwiGLU rounds SiLU(gate) to the model dtype before the product, as ``F.silu(g) * u`` does in torch.
* GELU-tanh is evaluated as ``x * sigmoid(2u)`` with ``u = sqrt(2/pi) (x + 0.044715 x^3)``, which
  equals ``0.5 x (1 + tanh(u))`` exactly in real arithmetic and differs by fp32 rounding only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from dinfill.kernels._common import (
    await_producer,
    check_device,
    check_float,
    device_context,
    emulate_bf16,
    pdl_args,
    round_to_bf16,
    rows_per_program,
    silu_or_gelu_tanh,
)

ACTIVATIONS = ("swiglu", "gelu_tanh")
_BLOCK = 1024  # elements per program: 2 KiB of bf16 per operand


@triton.jit
def _activation_kernel(
    # pointers
    X,
    OUT,
    # sizes
    n_rows,
    inner,
    # strides
    stride_xm,
    stride_om,
    # constexprs
    SWIGLU: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """Program (block of rows, block of columns): read gate (and up), write the activation."""
    await_producer(USE_PDL)
    DTYPE = OUT.dtype.element_ty
    m = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,)
    ok = (m < n_rows)[:, None] & (cols < inner)[None, :]
    src = X + m[:, None] * stride_xm + cols[None, :]  # (BLOCK_R, BLOCK)
    g = tl.load(src, mask=ok, other=0.0).to(tl.float32)
    if SWIGLU:
        u = tl.load(src + inner, mask=ok, other=0.0).to(tl.float32)
        act = silu_or_gelu_tanh(g, False)  # F.silu, rounded to the dtype as torch does
        if EMULATE_BF16:
            act = round_to_bf16(act)
        else:
            act = act.to(DTYPE).to(tl.float32)
        y = act * u
    else:
        y = silu_or_gelu_tanh(g, True)
    if EMULATE_BF16:  # elsewhere the store rounds
        y = round_to_bf16(y)
    tl.store(OUT + m[:, None] * stride_om + cols[None, :], y.to(DTYPE), mask=ok)


def activation(x: Tensor, kind: str) -> Tensor:
    """``SiLU(x[:, :I]) * x[:, I:]`` (``kind="swiglu"``) or ``gelu_tanh(x)`` (``"gelu_tanh"``), one launch.

    Parameters
    ----------
    x : Tensor
        ``(M, 2I)`` fused gate/up output for SwiGLU, ``(M, I)`` for GELU-tanh; fp16, bf16 or fp32.
    kind : {"swiglu", "gelu_tanh"}
        The activation.

    Returns
    -------
    Tensor
        ``(M, I)`` in x's dtype.
    """
    op = "activation"
    if kind not in ACTIVATIONS:
        raise ValueError(f"{op}: kind {kind!r} is not one of {ACTIVATIONS}")
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D (rows, features), got shape {tuple(x.shape)}")
    check_float(op, "x", x)
    check_device(op, x)
    M, width = x.shape
    swiglu = kind == "swiglu"
    if swiglu and width % 2:
        raise ValueError(f"{op}: swiglu needs an even width (gate | up), got {width}")
    inner = width // 2 if swiglu else width
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(M, inner, device=x.device, dtype=x.dtype)  # (M, I)
    if out.numel() == 0:
        return out
    block = min(_BLOCK, triton.next_power_of_2(inner))
    block_r = rows_per_program(x.device, M, block)
    with device_context(x):
        _activation_kernel[(triton.cdiv(M, block_r), triton.cdiv(inner, block))](
            x, out, M, inner, x.stride(0), out.stride(0),
            SWIGLU=swiglu, BLOCK_R=block_r, BLOCK=block, EMULATE_BF16=emulate_bf16(x), num_warps=4,
            **pdl_args(x.device),
        )  # fmt: skip
    return out
