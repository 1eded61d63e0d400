"""A linear layer for a handful of rows (decode), with the norm before it and the residual or activation after it.

Why: at batch 1 a decoder layer's GEMMs are matrix-vector products, bound by reading the weights, and
the small kernels between them (norm, activation, residual add) cost a launch each, about as much time
as a GEMV. Folding them into the GEMVs leaves six launches per layer on the decode path:

    qkv = linear(norm(r))             RoPE + cache write      attention
    r  += linear(attn)                act = swiglu(linear(norm(r)))      r += linear(act)

Each program computes ``BLOCK_N`` outputs for all (at most 16) rows: it streams its ``BLOCK_N`` rows of
the weight once, in ``BLOCK_K``-wide tiles, and multiplies them with the (normalised) input rows on the
tensor cores (``tl.dot`` with the rows padded to 16). The norm prologue recomputes the row statistics
in every program (``M x K`` elements, from L2) instead of a launch of its own.

**Experimental**: selected by ``DINFILL_GEMV=triton`` (default ``cublas``: cuBLAS GEMMs plus the
``add_norm`` / ``activation`` kernels) until a GPU run shows it faster (``dinfill.bench.forward``'s
forward phase times both). Tiles come from the target (:func:`skinny_config`): 16 outputs a program, K tiles of
512 bytes a row (wider ones spill) and as many pipeline stages as the shared memory allows with 8 KB to spare: 4
on A100, A10, L4 and H100 (the SwiGLU variant uses 82 KB). Not tuned on a GPU yet. A target it cannot serve
(below sm_80, or too little shared memory) raises :class:`~dinfill.target.Unservable` when the decoder selects
the GEMV path, before anything is launched.

Supports
--------
* ``x`` ``(M, K)`` with ``M <= 16`` (unit last stride), weight ``(N, K)`` or ``(2I, K)`` for SwiGLU (gate
  rows, then up rows: the fused ``gate_up_proj``), optional bias; fp16 / bf16 / fp32.
* Prologue: none, RMSNorm (Qwen2 / Llama: rounded to the dtype before the weight, as the torch path)
  or LayerNorm with optional bias (Starcoder2).
* Epilogue: none, SwiGLU (``silu(gate) * up``), GELU-tanh, or ``residual += y`` in place (``residual``
  must not overlap ``x``, which every program reads whole: that would race on the GPU).

Limitations
-----------
* At most 16 rows (one tile of ``tl.dot``); more rows belong to cuBLAS.
* No split-K: an ``N = 896`` output (o_proj, down_proj of the 0.5B model) is 56 programs.

Differences from the reference (``dinfill.kernels.reference.skinny_linear_ref``)
--------------------------------------------------------------------------------
* Rounds where the torch path rounds (the normed input, the GEMM output, SiLU, the product, the
  residual sum), so it differs from it by the order of the fp32 sums only.
"""

from __future__ import annotations

import functools

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
    overlaps,
    pdl_args,
    round_to_bf16,
    silu_or_gelu_tanh,
)
from dinfill.target import MIN_ARCH, Target, Unservable, target_for

NORMS = (None, "rmsnorm", "layernorm")
ACTIVATIONS = (None, "swiglu", "gelu_tanh")
MAX_ROWS = 16
_BLOCK_N = 16  # outputs per program (one tl.dot tile)
_SMEM_MARGIN = 8 * 1024  # issue 18's fit rule: leave 8 KB of the per-block limit to what the estimate misses
_TILE_BYTES = 512  # bytes of a row per K tile (see skinny_config)


@triton.jit
def _skinny_linear_kernel(
    # pointers
    X,
    W,
    BIAS,
    NORM_W,
    NORM_B,
    RES,
    OUT,
    # sizes
    M,
    N,
    K,
    eps,
    # strides
    stride_xm,
    stride_wn,
    stride_rm,
    stride_om,
    # constexprs
    HAS_BIAS: tl.constexpr,
    NORM: tl.constexpr,
    HAS_NORM_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    HAS_RES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """One program: BLOCK_N outputs (and their up-projection partners for SwiGLU) of all M rows."""
    await_producer(USE_PDL)
    DTYPE = OUT.dtype.element_ty
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) outputs of this program
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = X + offs_m.to(tl.int64)[:, None] * stride_xm  # (BLOCK_M, 1)
    w_rows = W + offs_n.to(tl.int64)[:, None] * stride_wn  # (BLOCK_N, 1)

    # prologue statistics over the whole row (every program recomputes them)
    mean = tl.zeros([BLOCK_M], tl.float32)
    rstd = tl.zeros([BLOCK_M], tl.float32)
    if NORM == 2:  # LayerNorm: two passes, as the add_norm kernel
        s1 = tl.zeros([BLOCK_M], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = (k0 + offs_k) < K
            x = tl.load(x_rows + (k0 + offs_k)[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            s1 += tl.sum(x.to(tl.float32), 1)
        mean = s1 / K
        s2 = tl.zeros([BLOCK_M], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = (k0 + offs_k) < K
            x = tl.load(x_rows + (k0 + offs_k)[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            xc = tl.where(k_ok[None, :], x.to(tl.float32) - mean[:, None], 0.0)
            s2 += tl.sum(xc * xc, 1)
        rstd = tl.rsqrt(s2 / K + eps)
    elif NORM == 1:  # RMSNorm
        s2 = tl.zeros([BLOCK_M], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = (k0 + offs_k) < K
            x = tl.load(x_rows + (k0 + offs_k)[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            x = x.to(tl.float32)
            s2 += tl.sum(x * x, 1)
        rstd = tl.rsqrt(s2 / K + eps)

    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k  # (BLOCK_K,)
        k_ok = k < K
        h = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        if NORM == 1:  # Qwen2 / Llama: normalise, round to the dtype, multiply by the weight, round
            h = h * rstd[:, None]
            if EMULATE_BF16:
                h = round_to_bf16(h)
            else:
                h = h.to(DTYPE).to(tl.float32)
            h = h * tl.load(NORM_W + k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        elif NORM == 2:
            h = (h - mean[:, None]) * rstd[:, None] * tl.load(NORM_W + k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            if HAS_NORM_BIAS:
                h += tl.load(NORM_B + k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            h = tl.where(k_ok[None, :], h, 0.0)  # the bias must not leak into the padded columns
        if EMULATE_BF16:  # interpreter: bf16 products are exact in fp32, dot in fp32 (see attention_fwd)
            h = round_to_bf16(h)
            w = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        else:
            h = h.to(DTYPE)
            w = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        if ACT == 1:  # the matching up-projection rows sit N rows further down
            w_up = tl.load(w_rows + N * stride_wn + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            if EMULATE_BF16:
                w_up = w_up.to(tl.float32)
            acc_up = tl.dot(h, tl.trans(w_up), acc_up, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if ACT == 1:
            acc_up += tl.load(BIAS + N + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    # the GEMM output in the model dtype, as cuBLAS writes it
    if EMULATE_BF16:
        y = round_to_bf16(acc)
    else:
        y = acc.to(DTYPE).to(tl.float32)
    if ACT != 0:
        y = silu_or_gelu_tanh(y, ACT == 2)
        if ACT == 1:  # SwiGLU: silu(gate) rounded, times up rounded
            if EMULATE_BF16:
                y = round_to_bf16(y) * round_to_bf16(acc_up)
            else:
                y = y.to(DTYPE).to(tl.float32) * acc_up.to(DTYPE).to(tl.float32)
    out_ok = m_ok[:, None] & n_ok[None, :]
    if HAS_RES:  # residual += y, in place (each program owns its columns)
        y += tl.load(RES + offs_m.to(tl.int64)[:, None] * stride_rm + offs_n[None, :], mask=out_ok, other=0.0).to(
            tl.float32
        )
    if EMULATE_BF16:
        y = round_to_bf16(y)
    tl.store(OUT + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :], y.to(DTYPE), mask=out_ok)


def smem_estimate(block_k: int, stages: int, itemsize: int, swiglu: bool, norm: bool) -> int:
    """Shared memory of one program, an upper bound: ``stages - 1`` buffered x (16 rows) and weight tiles (16 rows,
    32 for SwiGLU's gate and up), one more x tile for the normalised copy, the norm weight / bias slices of every
    stage and 2 KB for the epilogue.

    Measured with Triton 3.6 and 3.9 on sm_80 / 86 / 89 / 90 at the seed shapes it bounds the compiled kernels
    (tests/test_kernel_fit.py compares); e.g. SwiGLU at (256, 4) uses 83,456 bytes, estimated 88,064.
    """
    rows = MAX_ROWS + _BLOCK_N * (2 if swiglu else 1)
    return itemsize * block_k * ((stages - 1) * rows + MAX_ROWS + (2 * stages if norm else 0)) + 2048


@functools.lru_cache(maxsize=64)  # a pure function, called per launch
def skinny_config(K: int, dtype: torch.dtype, swiglu: bool, norm: bool, target: Target | None) -> tuple[int, int]:
    """``(block_k, num_stages)`` for a ``skinny_linear`` launch on ``target`` (``None``: the interpreter).

    The K tile is 512 bytes of a row (256 bf16 / fp16, 128 fp32): 512-wide bf16 tiles spill 16-24 B (the
    SwiGLU variant at 255 registers on sm_80 / 86 / 89, measured with Triton 3.6 and 3.9). A GEMV is bound by
    the weight bytes in flight, so the deepest pipeline whose :func:`smem_estimate` stays 8 KB under the
    target's per-block limit: 4 stages on every target of :data:`dinfill.target.TARGETS` (an L4's 99 KB hold
    the SwiGLU variant's 82 KB), fewer or narrower tiles on smaller ones. Raises
    :class:`~dinfill.target.Unservable`, naming the target and its limit, below sm_80 or when not even a
    64-wide 2-stage tile fits.
    """
    itemsize = dtype.itemsize
    widest = max(16, min(triton.next_power_of_2(K), _TILE_BYTES // itemsize))
    if target is None:  # the interpreter: one stage
        return widest, 1
    if target.arch < MIN_ARCH:
        raise Unservable(
            f"skinny_linear (DINFILL_GEMV=triton): {target.name} (sm_{target.arch}) is below sm_{MIN_ARCH}, which "
            "its bf16 tensor-core dots need; unset DINFILL_GEMV (cuBLAS) or use DINFILL_BACKEND=torch"
        )
    budget = target.smem_per_block - _SMEM_MARGIN
    block_k = widest
    while True:
        for stages in (4, 3, 2):
            if smem_estimate(block_k, stages, itemsize, swiglu, norm) <= budget:
                return block_k, stages
        if block_k <= 64:
            break
        block_k //= 2
    need = smem_estimate(block_k, 2, itemsize, swiglu, norm)
    raise Unservable(
        f"skinny_linear (DINFILL_GEMV=triton): no tile fits {target.name} (sm_{target.arch}): the smallest needs "
        f"{need} bytes of shared memory, the limit is {target.smem_per_block} bytes minus {_SMEM_MARGIN} kept free; "
        "unset DINFILL_GEMV (cuBLAS)"
    )


def check_target(device: torch.device, dtype: torch.dtype) -> None:
    """Raise :class:`~dinfill.target.Unservable` now, before any launch, if ``skinny_linear`` cannot run on the
    target of ``device`` (the decoder calls it when ``DINFILL_GEMV=triton`` selects the GEMV path)."""
    skinny_config(4096, dtype, True, True, target_for(device))


def skinny_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    norm: str | None = None,
    norm_weight: Tensor | None = None,
    norm_bias: Tensor | None = None,
    eps: float = 1e-6,
    act: str | None = None,
    residual: Tensor | None = None,
) -> Tensor:
    """``epilogue(norm(x) @ weight.T + bias)`` for at most 16 rows, in one launch (see the module docstring).

    Parameters
    ----------
    x : Tensor
        ``(M, K)`` rows, ``M <= 16``, fp16 / bf16 / fp32, unit last stride.
    weight, bias : Tensor
        ``(N, K)`` and ``(N,)``; for ``act="swiglu"`` ``(2I, K)`` and ``(2I,)`` (gate rows, then up rows).
    norm : {None, "rmsnorm", "layernorm"}
        Normalise each row of ``x`` first, with ``norm_weight`` (and ``norm_bias`` for LayerNorm), ``eps``.
    act : {None, "swiglu", "gelu_tanh"}
        Activation of the output.
    residual : Tensor, optional
        ``(M, N)``: add the output to it in place and return it (no activation then).

    Returns
    -------
    Tensor
        ``(M, N)`` (``(M, I)`` for SwiGLU) in x's dtype; ``residual`` itself when given.
    """
    op = "skinny_linear"
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"{op}: x (M, K) and weight (N, K) must be 2-D, got {tuple(x.shape)}, {tuple(weight.shape)}")
    M, K = x.shape
    check_float(op, "x", x)
    check_device(op, *[t for t in (x, weight, bias, norm_weight, norm_bias, residual) if t is not None])
    if M > MAX_ROWS:
        raise ValueError(f"{op}: {M} rows exceed {MAX_ROWS}; use a GEMM (torch.nn.functional.linear) for more rows")
    if weight.shape[1] != K or weight.dtype != x.dtype or weight.stride(-1) != 1:
        raise ValueError(
            f"{op}: weight {tuple(weight.shape)} {weight.dtype} must be (N, {K}) in {x.dtype} with a unit last stride"
        )
    if norm not in NORMS or act not in ACTIVATIONS:
        raise ValueError(f"{op}: norm must be one of {NORMS} and act one of {ACTIVATIONS}, got {norm!r}, {act!r}")
    if norm is not None and (norm_weight is None or tuple(norm_weight.shape) != (K,)):
        raise ValueError(f"{op}: norm={norm!r} needs norm_weight of shape ({K},)")
    if norm_bias is not None and norm != "layernorm":
        raise ValueError(f"{op}: norm_bias is only used by LayerNorm")
    N = weight.shape[0]
    if act == "swiglu":
        if N % 2:
            raise ValueError(f"{op}: swiglu needs an even number of weight rows (gate | up), got {N}")
        N //= 2
    if bias is not None and (tuple(bias.shape) != (weight.shape[0],) or bias.stride(0) != 1):
        raise ValueError(f"{op}: bias must be a contiguous ({weight.shape[0]},) vector")
    if residual is not None:
        if act is not None:
            raise ValueError(f"{op}: residual and act are exclusive (a block adds the residual after projections)")
        if tuple(residual.shape) != (M, N) or residual.dtype != x.dtype or residual.stride(-1) != 1:
            raise ValueError(f"{op}: residual must be ({M}, {N}) in {x.dtype} with a unit last stride")
        if overlaps(residual, x):  # every program reads all of x while the others write their residual columns
            raise ValueError(f"{op}: residual overlaps x, which every program reads whole; pass a copy of one")
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = residual if residual is not None else torch.empty(M, N, device=x.device, dtype=x.dtype)  # (M, N)
    if out.numel() == 0:
        return out
    emulate = emulate_bf16(x)
    block_n = _BLOCK_N
    block_k, stages = skinny_config(K, x.dtype, act == "swiglu", norm is not None, target_for(x.device))
    dummy = out  # placeholder pointer for absent operands (never dereferenced)
    with device_context(x):
        _skinny_linear_kernel[(triton.cdiv(N, block_n),)](
            x, weight, bias if bias is not None else dummy, norm_weight if norm_weight is not None else dummy,
            norm_bias if norm_bias is not None else dummy, residual if residual is not None else dummy, out,
            M, N, K, float(eps),
            x.stride(0), weight.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
            HAS_BIAS=bias is not None, NORM=NORMS.index(norm), HAS_NORM_BIAS=norm_bias is not None,
            ACT=ACTIVATIONS.index(act), HAS_RES=residual is not None, BLOCK_M=MAX_ROWS, BLOCK_N=block_n,
            BLOCK_K=block_k, DOT_PRECISION="ieee" if x.dtype == torch.float32 or emulate else "tf32",
            EMULATE_BF16=emulate, num_warps=4, num_stages=stages, **pdl_args(x.device),
        )  # fmt: skip
    return out
