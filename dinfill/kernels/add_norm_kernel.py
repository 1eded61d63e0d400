"""Residual add + RMSNorm / LayerNorm in one pass: writes the new residual and the normed activations.

Why: in a pre-norm decoder every sub-layer ends with ``x = x + f(x)`` and the next one starts with
``norm(x)``. As torch ops that is one add plus four or five elementwise / reduction kernels for
RMSNorm (square, mean, rsqrt, multiply, cast, weight multiply) and 1-3 us of launch each; here it
is one launch that reads ``x`` and ``delta`` once and writes both results. Optional row gathering
folds two more ops into the same launch: the embedding look-up before the first layer (rows of
the embedding table picked by token id) and the selection of the rows that need logits after the
last one (``logits_index``).

Supports
--------
* ``x`` ``(R, H)`` with a unit stride along H (row stride free), fp16 / bf16 / fp32, any ``H`` up
  to 65536 (one program per row, the whole row in registers).
* ``delta`` (same shape) added first; RMSNorm (``weight``) or LayerNorm (``weight``, ``bias``).
* ``index`` ``(B, N)`` integer: output row ``b * N + n`` reads input row
  ``b * index_rows + index[b, n]`` (``index_rows=0`` for an embedding table and token ids,
  ``index_rows=T`` to pick ``N`` positions out of each sequence of ``T`` rows); indices are clamped
  to the input rows, so a bad id cannot read out of bounds (the model checks ids on the CPU).
* The new residual written to a caller's buffer (in place into ``x`` or ``delta`` is fine without
  ``index``: each program reads its row before writing it) or not at all (``store_residual=False``).
  Any other overlap with an input (a shifted view, or in place with ``index``, where a program reads
  rows that other programs write) would race on the GPU and is refused.

Limitations
-----------
* A row must fit in one program (``H <= 65536``); no split reduction.
* One row per program on CUDA (several in the interpreter, where each program costs milliseconds).

Differences from the reference (``dinfill.kernels.reference.add_norm_ref``)
----------------------------------------------------------------------------
* Rounds where the decoder's torch path rounds (the sum to the model dtype; for RMSNorm the
  normalised row before the weight multiply, as Qwen2 / Llama do; LayerNorm rounds once at the end,
  as ``torch.nn.functional.layer_norm`` does), so it matches the torch path up to the order of the
  fp32 row sums. ``rsqrt`` is the hardware approximation on CUDA.
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
    check_int,
    device_context,
    emulate_bf16,
    overlaps,
    pdl_args,
    round_to_bf16,
    rows_per_program,
    same_view,
)

_MAX_H = 65536


@triton.jit
def _add_norm_kernel(
    # pointers
    X,
    DELTA,
    IDX,
    W,
    BIAS,
    RES,
    Y,
    # sizes
    n_rows,
    H,
    n_src,
    n_per_batch,
    index_rows,
    eps,
    # strides
    stride_xr,
    stride_dr,
    stride_ib,
    stride_in,
    stride_rr,
    stride_yr,
    # constexprs
    HAS_DELTA: tl.constexpr,
    HAS_IDX: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    STORE_RESIDUAL: tl.constexpr,
    LAYERNORM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """One program per BLOCK_R output rows: gather (optional), add, normalise, store residual and normed rows."""
    await_producer(USE_PDL)
    DTYPE = Y.dtype.element_ty  # the model dtype, where the torch path rounds
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,) output rows
    r_ok = r < n_rows
    if HAS_IDX:
        b = r // n_per_batch
        n = r % n_per_batch
        src = tl.load(IDX + b * stride_ib + n * stride_in, mask=r_ok, other=0).to(tl.int64) + b * index_rows
        src = tl.minimum(tl.maximum(src, 0), n_src - 1)  # never read outside the input
    else:
        src = r
    offs = tl.arange(0, BLOCK_H)
    ok = r_ok[:, None] & (offs < H)[None, :]  # (BLOCK_R, BLOCK_H)
    x = tl.load(X + src[:, None] * stride_xr + offs[None, :], mask=ok, other=0.0).to(tl.float32)
    if HAS_DELTA:
        d = tl.load(DELTA + src[:, None] * stride_dr + offs[None, :], mask=ok, other=0.0).to(tl.float32)
        x = x + d  # the residual stream lives in the model dtype: round there
        if EMULATE_BF16:
            x = round_to_bf16(x)
        else:
            x = x.to(DTYPE).to(tl.float32)
    if STORE_RESIDUAL:
        tl.store(RES + r[:, None] * stride_rr + offs[None, :], x.to(RES.dtype.element_ty), mask=ok)
    w = tl.load(W + offs, mask=offs < H, other=0.0).to(tl.float32)[None, :]  # (1, BLOCK_H)
    if LAYERNORM:
        mean = tl.sum(x, 1) / H  # (BLOCK_R,)
        xc = tl.where(ok, x - mean[:, None], 0.0)
        var = tl.sum(xc * xc, 1) / H
        y = xc * tl.rsqrt(var + eps)[:, None] * w
        if HAS_BIAS:
            y += tl.load(BIAS + offs, mask=offs < H, other=0.0).to(tl.float32)[None, :]
    else:
        ms = tl.sum(x * x, 1) / H  # (BLOCK_R,)
        y = x * tl.rsqrt(ms + eps)[:, None]  # Qwen2/Llama: cast to the dtype, then multiply by the weight
        if EMULATE_BF16:
            y = round_to_bf16(y)
        else:
            y = y.to(DTYPE).to(tl.float32)
        y = y * w
    if EMULATE_BF16:  # elsewhere the store rounds
        y = round_to_bf16(y)
    tl.store(Y + r[:, None] * stride_yr + offs[None, :], y.to(DTYPE), mask=ok)


def add_norm(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    eps: float,
    delta: Tensor | None = None,
    layernorm: bool = False,
    index: Tensor | None = None,
    index_rows: int = 0,
    residual_out: Tensor | None = None,
    store_residual: bool = True,
) -> tuple[Tensor | None, Tensor]:
    """``r = x (+ delta)``, ``y = norm(r)``, in one Triton launch (CUDA, or the interpreter).

    Parameters
    ----------
    x : Tensor
        ``(R, H)`` rows (unit stride along ``H``): the residual stream, or an embedding table when
        ``index`` holds token ids. fp16, bf16 or fp32: the output dtype.
    weight, bias : Tensor
        ``(H,)`` norm weight; ``bias`` only with ``layernorm=True`` (optional there).
    eps : float
        The norm's epsilon.
    delta : Tensor, optional
        ``(R, H)`` added to ``x`` (rounded to the dtype, like ``x + delta`` in torch) before the norm.
    layernorm : bool
        LayerNorm (mean and variance, Starcoder2) instead of RMSNorm (Qwen2, Llama).
    index : Tensor, optional
        ``(B, N)`` integer: output row ``b * N + n`` reads input row ``b * index_rows + index[b, n]``.
    index_rows : int
        See ``index``: 0 for an embedding look-up, ``T`` to pick positions out of ``(B * T, H)`` rows.
    residual_out : Tensor, optional
        ``(rows out, H)`` buffer for the new residual (may be ``x`` itself); allocated when ``None``.
    store_residual : bool
        Write the new residual at all (``False`` after the last layer).

    Returns
    -------
    tuple of (Tensor or None, Tensor)
        The new residual ``(rows out, H)`` (``None`` when not stored) and the normed rows, in x's dtype.
    """
    op = "add_norm"
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D (rows, hidden), got shape {tuple(x.shape)}; flatten (B, T, H) first")
    R, H = x.shape
    check_float(op, "x", x)
    check_device(op, *[t for t in (x, weight, bias, delta, index, residual_out) if t is not None])
    if H > _MAX_H:
        raise ValueError(f"{op}: hidden size {H} exceeds {_MAX_H} (one row per program); use DINFILL_BACKEND=torch")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_float(op, name, t)
            if tuple(t.shape) != (H,) or t.stride(0) != 1:
                raise ValueError(f"{op}: {name} must be a contiguous ({H},) vector, got shape {tuple(t.shape)}")
    if bias is not None and not layernorm:
        raise ValueError(f"{op}: bias is only used by LayerNorm; pass layernorm=True or drop it")
    if delta is not None:
        if delta.shape != x.shape or delta.dtype != x.dtype:
            raise ValueError(f"{op}: delta {tuple(delta.shape)} {delta.dtype} must match x {tuple(x.shape)} {x.dtype}")
    if index is not None:
        check_int(op, "index", index)
        if index.dim() != 2:
            raise ValueError(f"{op}: index must be 2-D (B, N), got shape {tuple(index.shape)}")
        rows_out = index.numel()
    else:
        rows_out = R
    x, delta = (t if t is None or t.stride(-1) == 1 else t.contiguous() for t in (x, delta))
    if store_residual:
        if residual_out is None:
            residual_out = torch.empty(rows_out, H, device=x.device, dtype=x.dtype)
        elif tuple(residual_out.shape) != (rows_out, H) or residual_out.stride(-1) != 1:
            raise ValueError(f"{op}: residual_out must be ({rows_out}, {H}) with unit stride along H")
        for name, t in (("x", x), ("delta", delta)):
            if t is not None and overlaps(residual_out, t) and (index is not None or not same_view(residual_out, t)):
                raise ValueError(
                    f"{op}: residual_out overlaps {name} other than as the very same rows"
                    f"{' (with index, programs read rows other programs write)' if index is not None else ''}; "
                    "pass a separate buffer"
                )
    else:
        residual_out = None
    y = torch.empty(rows_out, H, device=x.device, dtype=x.dtype)  # (rows out, H)
    if rows_out == 0:
        return residual_out, y
    block = triton.next_power_of_2(H)
    rows = rows_per_program(x.device, rows_out, block)
    dummy = y  # placeholder pointer for absent operands (never dereferenced)
    with device_context(x):
        _add_norm_kernel[(triton.cdiv(rows_out, rows),)](
            x, delta if delta is not None else dummy, index if index is not None else dummy, weight,
            bias if bias is not None else dummy, residual_out if residual_out is not None else dummy, y,
            rows_out, H, R, index.shape[1] if index is not None else 1, index_rows, float(eps),
            x.stride(0), delta.stride(0) if delta is not None else 0,
            index.stride(0) if index is not None else 0, index.stride(1) if index is not None else 0,
            residual_out.stride(0) if residual_out is not None else 0, y.stride(0),
            HAS_DELTA=delta is not None, HAS_IDX=index is not None, HAS_BIAS=bias is not None,
            STORE_RESIDUAL=residual_out is not None, LAYERNORM=bool(layernorm), BLOCK_R=rows, BLOCK_H=block,
            EMULATE_BF16=emulate_bf16(x), num_warps=min(16, max(4, block // 512)), **pdl_args(x.device),
        )  # fmt: skip
    return residual_out, y
