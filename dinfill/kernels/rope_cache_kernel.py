"""RoPE on q and k straight from the fused q/k/v projection, k and v written into the KV cache: one launch.

Why: after one ``qkv = x @ W_qkv^T + b`` GEMM, the torch path needs views, a cos/sin computation,
``cat``/``neg`` for ``rotate_half`` on q and on k, four multiplies, two adds and two ``index_copy_``
into the cache: about fifteen small kernels per layer. Here one program per token reads its
``(Hq + 2 Hkv) * D`` row once, rotates q and k in fp32 with cos/sin rows from a table built once at
load, and writes q in the ``(B, T, Hq, D)`` layout the attention kernel reads (as a transposed view)
and k / v at the token's cache column. Positions and cache columns are device tensors, so a CUDA
graph replays the launch with new ones.

Supports
--------
* ``qkv`` ``(B, T, (Hq + 2 Hkv) * D)`` with a unit last stride, q heads first, then k, then v (the
  order of Qwen2 / Llama / Starcoder2's q_proj, k_proj, v_proj), fp16 / bf16 / fp32.
* Any even head dim (non-power-of-two sizes are masked), any ``Hq``, ``Hkv``.
* A ``(P, D)`` fp32 table: ``[:, :D/2] = cos(p * inv_freq)``, ``[:, D/2:] = sin(p * inv_freq)`` (linear
  RoPE scaling is folded into ``inv_freq``); positions are clamped to ``[0, P)``.
* ``positions`` ``(B, T)`` (default: the token's cache column), ``cache_pos`` ``(T,)`` (default
  ``arange(T)``), and k / v outputs of any strides with a unit last stride: the static cache
  ``(B, Hkv, max_len, D)``, or fresh ``(B, Hkv, T, D)`` buffers when there is no cache.
* A cache column outside ``[0, max_len)`` (it lives on the device, so the launcher cannot check it
  without a sync) writes nothing, instead of another layer's cache or unrelated memory.

Limitations
-----------
* The rotate-half convention (GPT-NeoX / HF Llama), not the interleaved (GPT-J) one.
* One program per token holds all its heads: ``(Hq + 2 Hkv) * D`` up to about 32k elements (several
  tokens per program in the interpreter, where each program costs milliseconds).

Differences from the reference (``dinfill.kernels.reference.rope_cache_ref``)
------------------------------------------------------------------------------
* cos/sin stay fp32 and q/k are rotated in fp32 with one rounding at the end. The decoder's torch
  path (like transformers) rounds cos/sin to the model dtype and rounds after every multiply and
  add, so in bf16 the kernel is closer to the fp32 reference than the torch path is.
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
    pdl_args,
    round_to_bf16,
    rows_per_program,
)

_MAX_ROW = 32768


@triton.jit
def _rope_cache_kernel(
    # pointers
    QKV,
    TABLE,
    POS,
    CACHE_POS,
    Q_OUT,
    K_OUT,
    V_OUT,
    # sizes
    n_tokens,
    T,
    n_pos,
    n_cols,
    # strides
    stride_xb,
    stride_xt,
    stride_pb,
    stride_pt,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_kl,
    stride_vb,
    stride_vh,
    stride_vl,
    # constexprs
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    HALF: tl.constexpr,
    HQ_PAD: tl.constexpr,
    HKV_PAD: tl.constexpr,
    HALF_PAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    HAS_POS: tl.constexpr,
    HAS_CACHE_POS: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """BLOCK_R tokens per program: rotate their q and k heads, copy their v heads, store at their columns."""
    await_producer(USE_PDL)
    DTYPE = Q_OUT.dtype.element_ty
    tok = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,) flat token index
    tok_ok = tok < n_tokens
    b = tok // T
    t = tok % T
    col = t
    if HAS_CACHE_POS:
        col = tl.load(CACHE_POS + t, mask=tok_ok, other=0).to(tl.int64)
    col_ok = tok_ok & (col >= 0) & (col < n_cols)  # a column outside the cache writes nothing
    pos = col
    if HAS_POS:
        pos = tl.load(POS + b * stride_pb + t * stride_pt, mask=tok_ok, other=0).to(tl.int64)
    pos = tl.minimum(tl.maximum(pos, 0), n_pos - 1)  # the table covers [0, n_pos)

    j = tl.arange(0, HALF_PAD)[None, None, :]  # (1, 1, HALF_PAD) index within a half of the head dim
    j_ok = j < HALF
    D = 2 * HALF
    tab = TABLE + pos[:, None, None] * D + j  # (BLOCK_R, 1, HALF_PAD)
    cos = tl.load(tab, mask=tok_ok[:, None, None] & j_ok, other=0.0)  # fp32
    sin = tl.load(tab + HALF, mask=tok_ok[:, None, None] & j_ok, other=0.0)
    row = QKV + (b * stride_xb + t * stride_xt)[:, None, None]  # (BLOCK_R, 1, 1) token rows

    # q heads: (BLOCK_R, HQ_PAD, HALF_PAD) tiles of the first and second half of each head
    hq = tl.arange(0, HQ_PAD)[None, :, None]
    q_ok = tok_ok[:, None, None] & (hq < HQ) & j_ok
    x1 = tl.load(row + hq * D + j, mask=q_ok, other=0.0).to(tl.float32)
    x2 = tl.load(row + hq * D + HALF + j, mask=q_ok, other=0.0).to(tl.float32)
    o1 = x1 * cos - x2 * sin  # fp32; rounded once, by the store
    o2 = x2 * cos + x1 * sin
    if EMULATE_BF16:
        o1 = round_to_bf16(o1)
        o2 = round_to_bf16(o2)
    q_dst = Q_OUT + (b * stride_qb + t * stride_qt)[:, None, None] + hq * stride_qh + j
    tl.store(q_dst, o1.to(DTYPE), mask=q_ok)
    tl.store(q_dst + HALF, o2.to(DTYPE), mask=q_ok)

    # k heads: rotated like q, stored at the cache column
    hk = tl.arange(0, HKV_PAD)[None, :, None]
    k_ok = tok_ok[:, None, None] & (hk < HKV) & j_ok
    x1 = tl.load(row + (HQ + hk) * D + j, mask=k_ok, other=0.0).to(tl.float32)
    x2 = tl.load(row + (HQ + hk) * D + HALF + j, mask=k_ok, other=0.0).to(tl.float32)
    o1 = x1 * cos - x2 * sin
    o2 = x2 * cos + x1 * sin
    if EMULATE_BF16:
        o1 = round_to_bf16(o1)
        o2 = round_to_bf16(o2)
    kv_ok = k_ok & col_ok[:, None, None]
    k_dst = K_OUT + (b * stride_kb + col * stride_kl)[:, None, None] + hk * stride_kh + j
    tl.store(k_dst, o1.to(DTYPE), mask=kv_ok)
    tl.store(k_dst + HALF, o2.to(DTYPE), mask=kv_ok)

    # v heads: copied bit for bit
    v_src = row + (HQ + HKV + hk) * D + j
    v_dst = V_OUT + (b * stride_vb + col * stride_vl)[:, None, None] + hk * stride_vh + j
    tl.store(v_dst, tl.load(v_src, mask=kv_ok, other=0.0), mask=kv_ok)
    tl.store(v_dst + HALF, tl.load(v_src + HALF, mask=kv_ok, other=0.0), mask=kv_ok)


def rope_cache(
    qkv: Tensor,
    table: Tensor,
    num_heads: int,
    num_kv_heads: int,
    *,
    positions: Tensor | None = None,
    cache_pos: Tensor | None = None,
    k_out: Tensor | None = None,
    v_out: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Rotate q and k of a fused projection and write q, k, v where attention reads them (one launch).

    Parameters
    ----------
    qkv : Tensor
        ``(B, T, (Hq + 2 * Hkv) * D)``: q heads, then k heads, then v heads; unit last stride.
    table : Tensor
        ``(P, D)`` fp32 RoPE table (cos in the first half of each row, sin in the second), contiguous.
    num_heads, num_kv_heads : int
        ``Hq`` and ``Hkv``.
    positions : Tensor, optional
        ``(B, T)`` integer RoPE positions (clamped to ``[0, P)``). Default: each token's column.
    cache_pos : Tensor, optional
        ``(T,)`` integer columns of ``k_out`` / ``v_out`` to write (a column outside ``[0, L)`` writes
        nothing). Default: ``arange(T)``.
    k_out, v_out : Tensor, optional
        ``(B, Hkv, L, D)`` destinations (the static KV cache of this layer); fresh ``(B, Hkv, T, D)``
        buffers when ``None`` (then ``cache_pos`` must be ``None``).

    Returns
    -------
    tuple of Tensor
        q ``(B, Hq, T, D)`` (a transposed view of a contiguous ``(B, T, Hq, D)`` buffer), k_out, v_out.
    """
    op = "rope_cache"
    if qkv.dim() != 3:
        raise ValueError(f"{op}: qkv must be 3-D (B, T, (Hq + 2 Hkv) * D), got shape {tuple(qkv.shape)}")
    B, T, width = qkv.shape
    check_float(op, "qkv", qkv)
    check_device(op, *[t for t in (qkv, table, positions, cache_pos, k_out, v_out) if t is not None])
    if num_heads < 1 or num_kv_heads < 1 or width % (num_heads + 2 * num_kv_heads):
        raise ValueError(
            f"{op}: qkv width {width} is not (num_heads + 2 * num_kv_heads) * head_dim for "
            f"num_heads={num_heads}, num_kv_heads={num_kv_heads}"
        )
    D = width // (num_heads + 2 * num_kv_heads)
    if D % 2:
        raise ValueError(f"{op}: head dim {D} is odd; rotate-half RoPE needs an even head dim")
    if width > _MAX_ROW:
        raise ValueError(f"{op}: a token row of {width} elements exceeds {_MAX_ROW}; use DINFILL_BACKEND=torch")
    if table.dtype != torch.float32 or table.dim() != 2 or table.shape[1] != D or not table.is_contiguous():
        raise ValueError(
            f"{op}: table must be a contiguous (P, {D}) float32 tensor (cos | sin), got "
            f"{tuple(table.shape)} {table.dtype}"
        )
    if positions is not None:
        check_int(op, "positions", positions)
        if tuple(positions.shape) != (B, T):
            raise ValueError(f"{op}: positions must have shape ({B}, {T}), got {tuple(positions.shape)}")
    if (k_out is None) != (v_out is None):
        raise ValueError(f"{op}: pass both k_out and v_out (the cache of this layer) or neither")
    if k_out is None:
        if cache_pos is not None:
            raise ValueError(f"{op}: cache_pos needs k_out / v_out (a cache to write into)")
        k_out = torch.empty(B, num_kv_heads, T, D, device=qkv.device, dtype=qkv.dtype)  # (B, Hkv, T, D)
        v_out = torch.empty_like(k_out)
    for name, t in (("k_out", k_out), ("v_out", v_out)):
        if t.dim() != 4 or t.shape[0] != B or t.shape[1] != num_kv_heads or t.shape[3] != D:
            raise ValueError(f"{op}: {name} must be (B={B}, Hkv={num_kv_heads}, L, D={D}), got {tuple(t.shape)}")
        if t.dtype != qkv.dtype or t.stride(-1) != 1:
            raise ValueError(f"{op}: {name} must have qkv's dtype {qkv.dtype} and a unit last stride")
    if cache_pos is not None:
        check_int(op, "cache_pos", cache_pos)
        if tuple(cache_pos.shape) != (T,) or cache_pos.stride(0) != 1:
            raise ValueError(f"{op}: cache_pos must be a contiguous ({T},) tensor, got {tuple(cache_pos.shape)}")
    elif k_out.shape[2] < T:
        raise ValueError(f"{op}: {T} tokens do not fit in k_out / v_out of {k_out.shape[2]} columns")
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    q_buf = torch.empty(B, T, num_heads, D, device=qkv.device, dtype=qkv.dtype)  # (B, T, Hq, D)
    if B * T == 0:
        return q_buf.transpose(1, 2), k_out, v_out
    half = D // 2
    n_tokens = B * T
    block_r = rows_per_program(qkv.device, n_tokens, width)  # tokens per program
    dummy = q_buf  # placeholder pointer for absent operands (never dereferenced)
    with device_context(qkv):
        _rope_cache_kernel[(triton.cdiv(n_tokens, block_r),)](
            qkv, table, positions if positions is not None else dummy,
            cache_pos if cache_pos is not None else dummy, q_buf, k_out, v_out,
            n_tokens, T, table.shape[0], k_out.shape[2],
            qkv.stride(0), qkv.stride(1),
            positions.stride(0) if positions is not None else 0, positions.stride(1) if positions is not None else 0,
            q_buf.stride(0), q_buf.stride(1), q_buf.stride(2),
            k_out.stride(0), k_out.stride(1), k_out.stride(2),
            v_out.stride(0), v_out.stride(1), v_out.stride(2),
            HQ=num_heads, HKV=num_kv_heads, HALF=half, HQ_PAD=triton.next_power_of_2(num_heads),
            HKV_PAD=triton.next_power_of_2(num_kv_heads), HALF_PAD=triton.next_power_of_2(half), BLOCK_R=block_r,
            HAS_POS=positions is not None, HAS_CACHE_POS=cache_pos is not None, EMULATE_BF16=emulate_bf16(qkv),
            **pdl_args(qkv.device),
            num_warps=4,
        )  # fmt: skip
    return q_buf.transpose(1, 2), k_out, v_out
