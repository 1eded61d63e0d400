"""Plain-torch specifications of the Triton kernels.

Written for clarity, not speed: every test compares a kernel against these functions, and nothing
on the runtime's fast path imports this module. Each function upcasts to fp32 by default
(``upcast=True``) so it can serve as the high-precision reference of the style guide's tolerance
rule; ``upcast=False`` computes in the input dtype (the "low-precision torch error" baseline).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    causal_offset: int | Tensor = 0,
    kv_start: Tensor | None = None,
    kv_end: Tensor | None = None,
    window: int | None = None,
    scale: float | None = None,
    upcast: bool = True,
) -> Tensor:
    """Scaled dot-product attention with grouped-query heads and per-sequence key ranges.

    Parameters
    ----------
    q : Tensor
        ``(B, Hq, Lq, D)`` queries.
    k, v : Tensor
        ``(B, Hkv, Lk, D)`` keys and values; ``Hq`` must be a multiple of ``Hkv`` (query head ``h``
        reads key/value head ``h // (Hq // Hkv)``).
    causal : bool
        Query ``i`` sits at key position ``causal_offset + i`` and sees keys at positions ``<=`` it.
    causal_offset : int or Tensor
        Key position of query 0 (a Python int, a 0-dim tensor or a ``(B,)`` tensor).
    kv_start, kv_end : Tensor, optional
        ``(B,)`` integer tensors: only keys ``kv_start[b] <= j < kv_end[b]`` are visible
        (left and right padding). Default: all ``Lk`` keys.
    window : int, optional
        Sliding window (Starcoder2): with ``causal``, query at position ``p`` sees keys ``j > p - window``.
    scale : float, optional
        Softmax scale, default ``1 / sqrt(D)``.
    upcast : bool
        Compute in fp32 and cast the result back (default) or compute in the input dtype.

    Returns
    -------
    Tensor
        ``(B, Hq, Lq, D)`` in ``q``'s dtype. Query rows that see no key at all return zeros.
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    out_dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    k = k.repeat_interleave(Hq // Hkv, dim=1)  # (B, Hq, Lk, D)
    v = v.repeat_interleave(Hq // Hkv, dim=1)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale  # (B, Hq, Lq, Lk)

    dev = q.device
    key_pos = torch.arange(Lk, device=dev).view(1, 1, Lk)  # (1, 1, Lk)
    start = torch.zeros(B, dtype=torch.long, device=dev) if kv_start is None else kv_start.to(dev).long()
    end = torch.full((B,), Lk, dtype=torch.long, device=dev) if kv_end is None else kv_end.to(dev).long()
    visible = (key_pos >= start.view(B, 1, 1)) & (key_pos < end.view(B, 1, 1))  # (B, 1, Lk)
    visible = visible.expand(B, Lq, Lk)
    if causal:
        off = torch.as_tensor(causal_offset, device=dev).long().reshape(-1, 1, 1)  # (B or 1, 1, 1)
        q_pos = off + torch.arange(Lq, device=dev).view(1, Lq, 1)  # (B|1, Lq, 1)
        visible = visible & (key_pos <= q_pos)
        if window is not None:
            visible = visible & (key_pos > q_pos - window)
    visible = visible.unsqueeze(1)  # (B, 1, Lq, Lk)

    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # rows with no visible key: all -inf -> NaN -> 0
    out = torch.einsum("bhqk,bhkd->bhqd", probs, v)
    return out.to(out_dtype)
