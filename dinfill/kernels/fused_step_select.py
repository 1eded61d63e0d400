"""Second launch of ``fused_step``: per sequence, which rows write their fresh token into the canvas.

The row phase (``fused_step_rows.py``) leaves one token, one selection key and one state per row in
``(N,)`` vectors. Here one program per (sequence, block of ``BLOCK_I`` rows) ranks its rows among the
members of their sequence with a ``(BLOCK_I, BLOCK_J)`` comparison tile (key descending, ascending for
``p2``; ties to the lowest canvas position), turns a count or a fraction into a number of positions,
and writes the chosen ids into ``x`` in place. No host sync, so it is CUDA-graph capturable.

Supports
    selections ``topk`` (count or fraction), ``threshold`` (with at-least-one), ``factor``
    (Fast-dLLM), ``p2`` (re-mask the least confident variable positions), ``bernoulli``; counts and
    fractions as a Python number or a 0-dim / ``(B,)`` tensor; int32 / int64 positions, any strides.
Limitations
    Ranking is O(M^2) per sequence (M = rows per sequence), spread over ``cdiv(M, BLOCK_I)``
    programs: cheap for the diffusion middle (M up to a few thousand). Positions must be unique
    within a sequence.
Differences from the reference
    None in the chosen set: the reference breaks ties the same way (lowest position), and counts
    from fractions are ``trunc(fp32(n) * fraction)`` in fp32 like the published sampler.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from dinfill.kernels._common import device_context
from dinfill.kernels.fused_step_options import SELECTIONS, FusedStepOptions

__all__ = ["launch_select"]

BLOCK_ROWS = 64  # rows per program (a (64, 64) rank tile); a module attribute so tests can shrink it


@triton.jit
def _fused_step_select_kernel(
    # pointers
    x_ptr,
    pos_ptr,
    key_ptr,
    tok_ptr,
    state_ptr,
    count_ptr,
    frac_ptr,
    # sizes and scalar parameters
    M,
    mask_id,
    count_val,
    frac_val,
    tau,
    factor,
    # strides
    stride_xb,
    stride_xl,
    stride_pb,
    stride_pm,
    stride_c,
    stride_f,
    # constexprs
    SELECT: tl.constexpr,  # 0 topk, 1 threshold, 2 factor, 3 p2, 4 bernoulli
    COUNT_MODE: tl.constexpr,  # 0 none, 1 count tensor, 2 count scalar, 3 fraction scalar, 4 fraction tensor
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    mi = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    in_i = mi < M
    ri = b * M + mi  # (BLOCK_I,) flat row ids
    st_i = tl.load(state_ptr + ri, mask=in_i, other=0)
    if SELECT == 3:
        member_i = st_i > 0  # p2: every row is a variable position
    else:
        member_i = st_i == 2  # only rows that are masks right now
    key_i = tl.load(key_ptr + ri, mask=in_i, other=float("-inf"))
    pos_i = tl.load(pos_ptr + b * stride_pb + mi * stride_pm, mask=in_i, other=-1).to(tl.int64)

    # number of members of the sequence and the rank of each of our rows among them
    n = tl.full((), 0, dtype=tl.int32)
    rank = tl.full((BLOCK_I,), 0, dtype=tl.int32)
    for j0 in range(0, M, BLOCK_J):
        mj = j0 + tl.arange(0, BLOCK_J)
        in_j = mj < M
        st_j = tl.load(state_ptr + b * M + mj, mask=in_j, other=0)
        if SELECT == 3:
            member_j = st_j > 0
        else:
            member_j = st_j == 2
        n += tl.sum(member_j.to(tl.int32), axis=0)
        if SELECT != 4:
            key_j = tl.load(key_ptr + b * M + mj, mask=in_j, other=float("-inf"))
            pos_j = tl.load(pos_ptr + b * stride_pb + mj * stride_pm, mask=in_j, other=-1).to(tl.int64)
            tie = (key_j[None, :] == key_i[:, None]) & (pos_j[None, :] < pos_i[:, None])  # (BLOCK_I, BLOCK_J)
            if SELECT == 3:
                ahead = (key_j[None, :] < key_i[:, None]) | tie  # least confident first
            else:
                ahead = (key_j[None, :] > key_i[:, None]) | tie  # most confident first
            rank += tl.sum((ahead & member_j[None, :]).to(tl.int32), axis=1)

    # how many positions: a count, or trunc(fp32(n) * fraction) in fp32 like the reference
    if COUNT_MODE == 1:
        cnt = tl.load(count_ptr + b * stride_c).to(tl.int32)
    elif COUNT_MODE == 2:
        cnt = tl.full((), 0, dtype=tl.int32) + count_val
    elif COUNT_MODE == 3:
        cnt = tl.minimum(n.to(tl.float32) * frac_val, n.to(tl.float32)).to(tl.int32)
    elif COUNT_MODE == 4:
        frac = tl.load(frac_ptr + b * stride_f).to(tl.float32)
        cnt = tl.minimum(n.to(tl.float32) * frac, n.to(tl.float32)).to(tl.int32)
    else:
        cnt = n
    cnt = tl.maximum(tl.minimum(cnt, n), 0)

    tok_i = tl.load(tok_ptr + ri, mask=in_i, other=0)
    value = tok_i
    if SELECT == 0:
        write = member_i & (rank < cnt)
    elif SELECT == 1:
        write = member_i & ((key_i >= tau) | (rank == 0))
    elif SELECT == 2:
        # Fast-dLLM: the n-th most confident (1-based) needs conf >= 1 - f / (n + 1); at least one
        bound = 1.0 - tl.math.div_rn(tl.full((BLOCK_I,), 0, dtype=tl.float32) + factor, (rank + 2).to(tl.float32))
        write = member_i & ((rank == 0) | (key_i >= bound))
    elif SELECT == 3:
        remask = member_i & (rank < cnt)
        value = tl.where(remask, mask_id, tok_i)
        write = remask | (member_i & (st_i == 2))
    else:
        if COUNT_MODE == 4:
            prob = tl.load(frac_ptr + b * stride_f).to(tl.float32)
        else:
            prob = frac_val
        write = member_i & (key_i < prob)
    tl.store(x_ptr + b * stride_xb + pos_i * stride_xl, value, mask=write & in_i)


def _count_mode(opts: FusedStepOptions) -> tuple[int, int, int]:
    """(COUNT_MODE, stride of the count tensor, stride of the fraction tensor)."""
    count, fraction = opts.count, opts.fraction
    stride_f = fraction.stride(0) if isinstance(fraction, Tensor) and fraction.dim() == 1 else 0
    if isinstance(count, Tensor):
        return 1, (count.stride(0) if count.dim() == 1 else 0), stride_f
    if count is not None:
        return 2, 0, stride_f
    if isinstance(fraction, Tensor):
        return 4, 0, stride_f
    if fraction is not None:
        return 3, 0, stride_f
    return 0, 0, stride_f


def launch_select(
    x: Tensor, positions: Tensor, key: Tensor, tok: Tensor, state: Tensor, opts: FusedStepOptions
) -> None:
    """Rank the rows of every sequence and write the chosen tokens into ``x`` (in place).

    Parameters
    ----------
    x : Tensor
        ``(B, L)`` int64 canvas.
    positions : Tensor
        ``(B, M)`` int32/int64 canvas column of each row (outside ``[0, L)``: padding).
    key, tok, state : Tensor
        ``(B*M,)`` fp32 selection key, int64 token and int8 state (0 padding, 1 fixed, 2 mask) of each
        row, as the row phase wrote them.
    opts : FusedStepOptions
        Validated options (``select``, ``count`` / ``fraction``, ``threshold``, ``factor``, ``mask_id``).
    """
    B, M = positions.shape
    N = B * M
    if x.dim() != 2 or x.dtype != torch.int64 or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError("launch_select: need an int64 (B, L) canvas and int32/int64 (B, M) positions")
    for name, t, dtype in (("key", key, torch.float32), ("tok", tok, torch.int64), ("state", state, torch.int8)):
        if t.shape != (N,) or t.dtype != dtype or not t.is_contiguous() or t.device != x.device:
            raise ValueError(f"launch_select: {name} must be a contiguous ({N},) {dtype} tensor on {x.device}")
    count_mode, stride_c, stride_f = _count_mode(opts)
    count, fraction = opts.count, opts.fraction
    with device_context(x):
        _fused_step_select_kernel[(B, triton.cdiv(M, BLOCK_ROWS))](
            x,
            positions,
            key,
            tok,
            state,
            count if isinstance(count, Tensor) else tok,
            fraction if isinstance(fraction, Tensor) else key,
            M,
            opts.mask_id,
            int(count) if count_mode == 2 else 0,
            float(fraction) if count_mode == 3 else 0.0,
            float(opts.threshold),
            float(opts.factor),
            x.stride(0),
            x.stride(1),
            positions.stride(0),
            positions.stride(1),
            stride_c,
            stride_f,
            SELECT=SELECTIONS.index(opts.select),
            COUNT_MODE=count_mode,
            BLOCK_I=BLOCK_ROWS,
            BLOCK_J=BLOCK_ROWS,
            num_warps=4,
        )
