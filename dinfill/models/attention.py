"""Attention dispatch for the runtime: Triton kernel, torch SDPA, or flash-attn.

``DINFILL_BACKEND`` (contract, see :mod:`dinfill.backend`) picks Triton on CUDA by default and torch
SDPA elsewhere. flash-attn is an optional extra: ``DINFILL_ATTENTION=flash`` opts into it for the calls
it can serve exactly (no padding, no cache); every other call falls back to the switch above.
Sliding windows (Starcoder2, 4096) only matter for keys further back than the window: SDPA gets them as
part of its boolean mask (only when the keys are longer than the window), the Triton kernel natively.

The mask work (a boolean mask for SDPA, or per-row key ranges for the kernel) depends only on the
call, not the layer, so :func:`plan` does it once per forward and :func:`attend` reuses it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dinfill.backend import flash_attn_available, use_triton


def key_range(key_mask: Tensor) -> tuple[Tensor, Tensor]:
    """First and one-past-last real key per row of a ``(B, Lk)`` mask holding one contiguous run.

    Computed on the device with no host sync, in four small kernels (the first one of the row by
    argmax, the end as start + count, which holds because the run is contiguous); a row with no real
    key gets the empty range ``[0, 0)``.
    """
    key_mask = key_mask.to(torch.bool)
    start = key_mask.to(torch.uint8).argmax(dim=1)  # (B,) first one (argmax returns the first maximum)
    return start, start + key_mask.sum(dim=1)  # (B,) int64 each


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


@dataclass
class AttentionPlan:
    """How every layer of one forward call runs attention (decided once per call)."""

    backend: str  # "triton" | "flash" | "sdpa"
    causal: bool
    causal_offset: int | Tensor = 0  # key column of query 0: an int, or a 0-dim device tensor (no sync)
    mask: Tensor | None = None  # sdpa: (B, 1, T, Lk) bool, or None for the unmasked fast paths
    kv_start: Tensor | None = None  # triton: (B,) int64
    kv_end: Tensor | None = None
    window: int | None = None  # triton: causal sliding window (keys further back than it are invisible)


def plan(
    key_mask: Tensor | None,
    causal: bool,
    q_cols: Tensor | None,
    Lk: int,
    window: int | None,
    B: int,
    T: int,
    dev: torch.device,
) -> AttentionPlan:
    """Choose the backend and build the masks for a call with ``T`` queries over ``Lk`` keys on ``dev``.

    ``q_cols`` ``(T,)`` holds the key column of each query (contiguous ascending: a cache's
    ``cache_pos``); ``None`` means ``arange(T)``, built only if a mask needs it.
    """
    window = window if (window is not None and causal and window < Lk) else None
    offset = 0 if q_cols is None else q_cols[0]  # a view: read on the device by the Triton kernel
    if window is None and os.environ.get("DINFILL_ATTENTION") == "flash" and key_mask is None and T == Lk:
        if flash_attn_available() and dev.type == "cuda":
            return AttentionPlan("flash", causal, offset)
    if use_triton(dev):
        kv_start, kv_end = (None, None) if key_mask is None else key_range(key_mask)
        return AttentionPlan("triton", causal, offset, kv_start=kv_start, kv_end=kv_end, window=window)
    if key_mask is None and window is None and (not causal or T == Lk):
        return AttentionPlan("sdpa", causal, offset)  # SDPA's own unmasked / is_causal kernels
    if q_cols is None:
        q_cols = torch.arange(T, device=dev)
    return AttentionPlan("sdpa", causal, offset, mask=sdpa_mask(key_mask, causal, q_cols, Lk, window, B))


def attend(q: Tensor, k: Tensor, v: Tensor, p: AttentionPlan) -> Tensor:
    """Attention of ``q (B, Hq, T, D)`` over ``k, v (B, Hkv, Lk, D)`` as planned; returns ``(B, Hq, T, D)``."""
    if p.backend == "triton":
        from dinfill.kernels.attention_fwd import attention

        kw = dict(causal=p.causal, causal_offset=p.causal_offset, kv_start=p.kv_start, kv_end=p.kv_end)
        return attention(q, k, v, window=p.window, **kw)
    if p.backend == "flash" and q.dtype in (torch.float16, torch.bfloat16):
        from flash_attn import flash_attn_func

        return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=p.causal).transpose(1, 2)
    if p.mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=p.causal and q.shape[2] > 1, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=p.mask, enable_gqa=True)
