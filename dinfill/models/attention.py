"""Attention dispatch for the runtime: Triton kernel, torch SDPA, or flash-attn.

``DINFILL_BACKEND`` (contract, see :mod:`dinfill.backend`) picks Triton on CUDA by default and torch
SDPA elsewhere. flash-attn is an optional extra: ``DINFILL_ATTENTION=flash`` opts into it for the calls
it can serve exactly (no padding, no cache); every other call falls back to the switch above.
Sliding windows (Starcoder2, 4096) only matter for keys further back than the window, so the
Triton kernel (which has no window) is used whenever the key length fits in the window.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from dinfill.backend import flash_attn_available, use_triton


def key_range(key_mask: Tensor) -> tuple[Tensor, Tensor]:
    """First and one-past-last real key per row of a ``(B, Lk)`` mask holding one contiguous run.

    Computed on the device with no host sync (argmax of the mask from both ends).
    """
    m = key_mask.to(torch.int8)
    Lk = m.shape[1]
    start = m.argmax(dim=1)  # (B,) first one
    end = Lk - m.flip(1).argmax(dim=1)  # (B,) one past the last one
    return start.to(torch.int32), end.to(torch.int32)


def sdpa_mask(key_mask: Tensor | None, causal: bool, q_cols: Tensor, Lk: int, window: int | None, B: int) -> Tensor:
    """The boolean ``(B, 1, T, Lk)`` visibility mask for torch SDPA (True = attend).

    Query rows that would see no key (padding queries) are opened to every key so they stay finite.
    """
    dev = q_cols.device
    k_cols = torch.arange(Lk, device=dev)  # (Lk,)
    vis = torch.ones(B, 1, q_cols.shape[0], Lk, dtype=torch.bool, device=dev)
    if key_mask is not None:
        vis = vis & key_mask.view(B, 1, 1, Lk)
    if causal:
        vis = vis & (k_cols.view(1, 1, 1, Lk) <= q_cols.view(1, 1, -1, 1))
        if window is not None:
            vis = vis & (k_cols.view(1, 1, 1, Lk) > q_cols.view(1, 1, -1, 1) - window)
    return vis | ~vis.any(dim=-1, keepdim=True)


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_mask: Tensor | None,
    causal: bool,
    q_cols: Tensor,
    window: int | None,
) -> Tensor:
    """Attention of ``q (B, Hq, T, D)`` over ``k, v (B, Hkv, Lk, D)``; query ``i`` sits at key column ``q_cols[i]``.

    ``q_cols`` is contiguous ascending, so a causal mask is "key column <= q_cols[0] + i".
    """
    B, _, T, _ = q.shape
    Lk = k.shape[2]
    window = window if (window is not None and causal and window < Lk) else None
    if window is None and os.environ.get("DINFILL_ATTENTION") == "flash" and key_mask is None and T == Lk:
        if flash_attn_available() and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            from flash_attn import flash_attn_func

            out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
            return out.transpose(1, 2)
    if window is None and use_triton(q.device):
        from dinfill.kernels.attention import attention

        kv_start, kv_end = (None, None) if key_mask is None else key_range(key_mask)
        return attention(q, k, v, causal=causal, causal_offset=q_cols[0], kv_start=kv_start, kv_end=kv_end)
    if key_mask is None and window is None and (not causal or T == Lk):
        # plain cases SDPA handles with its fastest kernels (no materialised mask)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal and T > 1, enable_gqa=True)
    mask = sdpa_mask(key_mask, causal, q_cols, Lk, window, B)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
