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

from dinfill.kernels.fused_step_options import CONFIDENCES, SELECTIONS, FusedStepOptions


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


# --------------------------------------------------------------------------------------------------
# fused diffusion step: sample_tokens + choice of positions (sampler-semantics.md, written literally)
# --------------------------------------------------------------------------------------------------


def top_p_logits_ref(logits: Tensor, top_p: float) -> Tensor:
    """Nucleus filter of sampler-semantics.md step 2, computed in fp32, ties kept.

    Sort descending, softmax, cumulative sum; a token is removed when the cumulative probability
    *before* it exceeds ``top_p`` (the "shift right by one" rule, so the top-1 token always stays).
    The kept tokens form a prefix of the sorted row; the reference's order among equal logits is
    unspecified, so we keep every token equal to the last kept value (ties kept, like top-k).

    Parameters
    ----------
    logits : Tensor
        ``(n, V)`` fp32 logits (already divided by the temperature).
    top_p : float
        Probability mass to keep.

    Returns
    -------
    Tensor
        ``(n, V)`` fp32 logits with the removed tokens set to ``finfo(fp32).min``.
    """
    sorted_logits, _ = torch.sort(logits, dim=-1, descending=True, stable=True)  # (n, V)
    cumulative = torch.cumsum(torch.softmax(sorted_logits, dim=-1), dim=-1)  # (n, V)
    remove = cumulative > top_p
    remove[..., 1:] = remove[..., :-1].clone()  # shift right: the token that crosses top_p stays
    remove[..., 0] = False
    last_kept = sorted_logits.masked_fill(remove, float("inf")).amin(dim=-1, keepdim=True)  # (n, 1)
    return logits.masked_fill(logits < last_kept, torch.finfo(torch.float32).min)


def top_k_logits_ref(logits: Tensor, top_k: int) -> Tensor:
    """Top-k filter of sampler-semantics.md step 3: remove tokens below the k-th largest value (ties kept)."""
    kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]  # (n, 1)
    return logits.masked_fill(logits < kth, torch.finfo(torch.float32).min)


def sample_tokens_ref(
    logits: Tensor,
    *,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    confidence: str = "prob",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """``sample_tokens`` of sampler-semantics.md, step by step, for rows sharing one set of parameters.

    Parameters
    ----------
    logits : Tensor
        ``(n, V)`` logits in any float dtype; upcast to fp32 before anything else.
    temperature : float
        ``0`` = greedy (argmax, lowest id on ties), otherwise divide and sample.
    top_p : float, optional
        Nucleus mass (``None`` or ``>= 1``: off), see :func:`top_p_logits_ref`.
    top_k : int, optional
        Keep the ``top_k`` largest values, ties kept (``None`` or ``0``: off).
    confidence : str
        ``prob`` (probability of the chosen token), ``margin`` (top1 - top2) or ``neg_entropy``.
    generator : torch.Generator, optional
        Source of randomness for the multinomial draw.

    Returns
    -------
    tuple of Tensor
        ``(confidence (n,) fp32, x0 (n,) int64)``.
    """
    logits = logits.float()
    if temperature > 0:
        logits = logits / torch.tensor(temperature, dtype=torch.float32)
    if top_p is not None and top_p < 1:
        logits = top_p_logits_ref(logits, top_p)
    if top_k:
        logits = top_k_logits_ref(logits, top_k)
    probs = torch.softmax(logits, dim=-1)  # (n, V) fp32
    if temperature > 0:
        x0 = torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (n,)
    else:
        x0 = probs.argmax(dim=-1)  # first maximum on ties
    if confidence == "prob":
        conf = probs.gather(-1, x0[:, None]).squeeze(-1)
    elif confidence == "margin":
        top2 = torch.sort(probs, dim=-1, descending=True).values[:, :2]  # (n, 2)
        conf = top2[:, 0] - (top2[:, 1] if probs.shape[-1] > 1 else 0.0)
    elif confidence == "neg_entropy":
        conf = (probs * torch.log(probs.clamp_min(1e-10))).sum(dim=-1)
    else:
        raise ValueError(f"confidence={confidence!r} is not one of {CONFIDENCES}")
    conf = torch.nan_to_num(conf, nan=float("-inf"))  # rule: a row with no finite logit has confidence -inf
    return conf, x0


def _per_row(value, n: int, dtype: torch.dtype) -> list:
    """Expand a scalar / ``None`` / per-row tensor parameter into a Python list of ``n`` values."""
    if isinstance(value, Tensor):
        return value.to(dtype).reshape(-1).expand(n).tolist()
    if value is not None and dtype == torch.float32:
        value = torch.tensor(value, dtype=dtype).item()  # the kernels see the fp32-rounded value
    return [value] * n


def _fp32_count(n: int, fraction: float) -> int:
    """``trunc(fp32(n) * fp32(fraction))``: the fp32 product the reference sampler truncates."""
    product = torch.tensor(float(n), dtype=torch.float32) * torch.tensor(fraction, dtype=torch.float32)
    return int(product.item())


def fused_step_ref(
    logits: Tensor,
    x: Tensor,
    positions: Tensor,
    options: FusedStepOptions | None = None,
    *,
    generator: torch.Generator | None = None,
    **fields,
) -> Tensor:
    """Specification of :func:`dinfill.kernels.fused_step`: sample every row, then choose positions.

    The step's options come as the :class:`FusedStepOptions` the kernels receive, or as its fields
    given as keyword arguments (``mask_id=..., select=...``), meaning what they mean for
    :func:`dinfill.kernels.fused_step`. Randomness comes from ``generator`` (no seed/offset tensors
    here). Sampled outputs match the kernel in distribution only.
    Ties among selection keys go to the lowest canvas position (Python's stable sort on
    ``(-key, position)``). Rows with scalar parameters are sampled as one batch (the reference
    op sequence the benchmarks time); per-row tensors are handled one row at a time.

    Returns
    -------
    Tensor
        ``(B*M,)`` fp32 confidences; padding rows (position outside ``[0, L)``) get ``-inf``.
    """
    opts = options if options is not None else FusedStepOptions(**fields)
    mask_id, select, confidence, temperature = opts.mask_id, opts.select, opts.confidence, opts.temperature
    top_p, top_k, count, fraction = opts.top_p, opts.top_k, opts.count, opts.fraction
    threshold, factor, alg_temp = opts.threshold, opts.factor, opts.alg_temp
    B, L = x.shape
    M = positions.shape[1]
    logits = logits.reshape(B * M, -1)
    if not any(isinstance(v, Tensor) for v in (temperature, top_p, top_k)):
        conf, x0 = sample_tokens_ref(
            logits, temperature=float(temperature), top_p=top_p, top_k=top_k, confidence=confidence, generator=generator
        )
    else:
        temps = _per_row(temperature, B * M, torch.float32)
        top_ps = _per_row(top_p, B * M, torch.float32)
        top_ks = _per_row(top_k, B * M, torch.int64)
        rows = [
            sample_tokens_ref(
                logits[r : r + 1], temperature=t, top_p=p, top_k=k, confidence=confidence, generator=generator
            )
            for r, (t, p, k) in enumerate(zip(temps, top_ps, top_ks, strict=True))
        ]
        conf = torch.cat([c for c, _ in rows])
        x0 = torch.cat([t for _, t in rows])

    counts = _per_row(count, B, torch.int64)
    fractions = _per_row(fraction, B, torch.float32)
    for b in range(B):
        rows = [(b * M + m, int(p)) for m, p in enumerate(positions[b].tolist()) if 0 <= p < L]
        padding = [b * M + m for m, p in enumerate(positions[b].tolist()) if not 0 <= p < L]
        conf[padding] = float("-inf")
        if select == "p2":
            # every row is a variable position; the `k` least confident become masks again
            k = counts[b] if count is not None else _fp32_count(len(rows), fractions[b])
            ranked = sorted(rows, key=lambda rp: (conf[rp[0]].item(), rp[1]))
            remask = {r for r, _ in ranked[: max(0, min(k, len(rows)))]}
            for r, p in rows:
                if r in remask:
                    x[b, p] = mask_id
                elif x[b, p] == mask_id:
                    x[b, p] = x0[r]
            continue
        cands = [(r, p) for r, p in rows if x[b, p] == mask_id]
        if not cands:
            continue
        if select == "bernoulli":
            u = torch.rand(len(cands), generator=generator, device=x.device)
            chosen = [rp for rp, ui in zip(cands, u.tolist(), strict=True) if ui < fractions[b]]
        elif select == "topk":
            k = counts[b] if count is not None else _fp32_count(len(cands), fractions[b])
            k = max(0, min(k, len(cands)))
            if alg_temp > 0 and k > 0:
                # Dream / Open-dLLM: sample k positions without replacement from softmax(conf / alg_temp)
                weights = torch.softmax(torch.stack([conf[r] for r, _ in cands]) / alg_temp, dim=0)
                picked = torch.multinomial(weights, k, replacement=False, generator=generator).tolist()
                chosen = [cands[i] for i in picked]
            else:
                chosen = sorted(cands, key=lambda rp: (-conf[rp[0]].item(), rp[1]))[:k]
        elif select == "threshold":
            ranked = sorted(cands, key=lambda rp: (-conf[rp[0]].item(), rp[1]))
            tau = torch.tensor(threshold, dtype=torch.float32)
            chosen = [ranked[0]] + [rp for rp in ranked[1:] if conf[rp[0]] >= tau]
        elif select == "factor":
            ranked = sorted(cands, key=lambda rp: (-conf[rp[0]].item(), rp[1]))
            n_reveal = 1
            for n in range(1, len(ranked) + 1):
                bound = 1.0 - torch.tensor(factor, dtype=torch.float32) / (n + 1)  # fp32, like the kernels
                if conf[ranked[n - 1][0]] >= bound:
                    n_reveal = n
            chosen = ranked[:n_reveal]
        else:
            raise ValueError(f"select={select!r} is not one of {SELECTIONS}")
        for r, p in chosen:
            x[b, p] = x0[r]
    return conf


# --------------------------------------------------------------------------------------------------
# decoder layer pieces (issue 10): add + norm, RoPE + cache write, MLP activation
# Each reference has two modes: ``upcast=True`` computes in fp32 with no intermediate rounding (the
# high-precision reference of the tolerance rule); ``upcast=False`` rounds where the decoder's torch
# path rounds (the "low-precision torch" baseline, which the Triton kernels mirror).
# --------------------------------------------------------------------------------------------------


def _gather_rows(x: Tensor, index: Tensor | None, index_rows: int) -> Tensor:
    """Rows ``b * index_rows + index[b, n]`` of ``x`` in ``(b, n)`` order, or ``x`` itself."""
    if index is None:
        return x
    B = index.shape[0]
    src = torch.arange(B, device=x.device).view(B, 1) * index_rows + index.long()  # (B, N)
    return x[src.reshape(-1)]


def add_norm_ref(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    eps: float,
    delta: Tensor | None = None,
    layernorm: bool = False,
    index: Tensor | None = None,
    index_rows: int = 0,
    upcast: bool = True,
) -> tuple[Tensor, Tensor]:
    """Specification of ``dinfill.kernels.add_norm_kernel``: ``r = x (+ delta)``, ``y = norm(r)``.

    Parameters
    ----------
    x, delta : Tensor
        ``(R, H)`` rows (``delta`` optional).
    weight, bias : Tensor
        ``(H,)`` norm parameters (``bias`` for LayerNorm only).
    eps : float
        The norm's epsilon.
    layernorm : bool
        LayerNorm (Starcoder2) instead of RMSNorm (Qwen2 / Llama).
    index : Tensor, optional
        ``(B, N)``: output row ``b * N + n`` is input row ``b * index_rows + index[b, n]``.
    index_rows : int
        See ``index``.
    upcast : bool
        fp32 throughout (default), or round like the decoder's torch path (``RMSNorm`` casts the
        normalised row to the dtype before the weight multiply; ``F.layer_norm`` rounds once).

    Returns
    -------
    tuple of Tensor
        The new residual and the normed rows, both in x's dtype.
    """
    dtype = x.dtype
    x = _gather_rows(x, index, index_rows)
    if delta is not None:
        delta = _gather_rows(delta, index, index_rows)
    H = x.shape[-1]
    if upcast:
        r = x.float() if delta is None else x.float() + delta.float()
        if layernorm:
            y = torch.nn.functional.layer_norm(r, (H,), weight.float(), None if bias is None else bias.float(), eps)
        else:
            y = weight.float() * (r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + eps))
        return r.to(dtype), y.to(dtype)
    r = x if delta is None else x + delta  # rounded to the dtype, as the residual stream is
    if layernorm:
        y = torch.nn.functional.layer_norm(r, (H,), weight.to(dtype), None if bias is None else bias.to(dtype), eps)
    else:
        rf = r.float()
        y = weight.to(dtype) * (rf * torch.rsqrt(rf.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
    return r, y


def rope_cache_ref(
    qkv: Tensor,
    inv_freq: Tensor,
    num_heads: int,
    num_kv_heads: int,
    *,
    positions: Tensor | None = None,
    cache_pos: Tensor | None = None,
    k_cache: Tensor | None = None,
    v_cache: Tensor | None = None,
    upcast: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Specification of ``dinfill.kernels.rope_cache_kernel``: rotate-half RoPE on q and k of a fused projection.

    Parameters
    ----------
    qkv : Tensor
        ``(B, T, (Hq + 2 Hkv) * D)``: q heads, k heads, v heads.
    inv_freq : Tensor
        ``(D / 2,)`` fp32 inverse frequencies (already divided by a linear scaling factor).
    num_heads, num_kv_heads : int
        ``Hq``, ``Hkv``.
    positions : Tensor, optional
        ``(B, T)`` RoPE positions; default the token's cache column.
    cache_pos : Tensor, optional
        ``(T,)`` cache columns; default ``arange(T)``.
    k_cache, v_cache : Tensor, optional
        ``(B, Hkv, L, D)``: written in place at ``cache_pos`` and returned; otherwise k, v are returned
        as new ``(B, Hkv, T, D)`` tensors.
    upcast : bool
        fp32 cos/sin and arithmetic with one rounding (default), or the decoder's torch path: cos/sin
        rounded to the dtype, ``q * cos + rotate_half(q) * sin`` in the dtype.

    Returns
    -------
    tuple of Tensor
        q ``(B, Hq, T, D)``, k and v (the caches when given).
    """
    B, T, width = qkv.shape
    D = width // (num_heads + 2 * num_kv_heads)
    dev, dtype = qkv.device, qkv.dtype
    cols = torch.arange(T, device=dev) if cache_pos is None else cache_pos.long()
    pos = cols.view(1, T).expand(B, T) if positions is None else positions.long()
    freqs = pos.float().unsqueeze(-1) * inv_freq.float().to(dev)  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
    cos, sin = emb.cos().unsqueeze(1), emb.sin().unsqueeze(1)  # (B, 1, T, D)
    q, k, v = qkv.split([num_heads * D, num_kv_heads * D, num_kv_heads * D], dim=-1)
    q = q.reshape(B, T, num_heads, D).transpose(1, 2)  # (B, Hq, T, D)
    k = k.reshape(B, T, num_kv_heads, D).transpose(1, 2)  # (B, Hkv, T, D)
    v = v.reshape(B, T, num_kv_heads, D).transpose(1, 2)

    def rotate_half(t: Tensor) -> Tensor:
        return torch.cat((-t[..., D // 2 :], t[..., : D // 2]), dim=-1)

    if upcast:
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(dtype)
    else:
        cos, sin = cos.to(dtype), sin.to(dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
    if k_cache is None:
        return q, k.contiguous(), v.contiguous()
    k_cache.index_copy_(2, cols, k)
    v_cache.index_copy_(2, cols, v)
    return q, k_cache, v_cache


def activation_ref(x: Tensor, kind: str, *, upcast: bool = True) -> Tensor:
    """Specification of ``dinfill.kernels.activation_kernel``.

    ``kind="swiglu"``: ``silu(x[:, :I]) * x[:, I:]``; ``"gelu_tanh"``: ``gelu(x, approximate="tanh")``.
    ``upcast=True`` computes in fp32 and rounds once; ``False`` runs the torch ops in x's dtype.
    """
    dtype = x.dtype
    if upcast:
        x = x.float()
    if kind == "swiglu":
        gate, up = x.chunk(2, dim=-1)
        y = torch.nn.functional.silu(gate) * up
    elif kind == "gelu_tanh":
        y = torch.nn.functional.gelu(x, approximate="tanh")
    else:
        raise ValueError(f"kind must be 'swiglu' or 'gelu_tanh', got {kind!r}")
    return y.to(dtype)


def skinny_linear_ref(
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
    upcast: bool = True,
) -> Tensor:
    """Specification of ``dinfill.kernels.skinny_linear``: ``epilogue(norm(x) @ weight.T + bias)``.

    ``norm`` is ``None``, ``"rmsnorm"`` or ``"layernorm"`` (as :func:`add_norm_ref`, without the add);
    ``act`` is ``None``, ``"swiglu"`` (``weight`` holds gate rows then up rows) or ``"gelu_tanh"``;
    ``residual`` (``(M, N)``) is added to the output (returned as a new tensor here). ``upcast=True``
    computes in fp32 and rounds once; ``False`` runs the decoder's torch path in x's dtype.
    """
    dtype = x.dtype
    if upcast:
        x, weight = x.float(), weight.float()
        bias, norm_weight, norm_bias = (None if t is None else t.float() for t in (bias, norm_weight, norm_bias))
    h = x
    if norm is not None:
        h = add_norm_ref(x, norm_weight, norm_bias, eps=eps, layernorm=norm == "layernorm", upcast=upcast)[1]
    y = torch.nn.functional.linear(h, weight, bias)
    if act is not None:
        y = activation_ref(y, act, upcast=upcast)  # y is fp32 already with upcast: no extra rounding
    if residual is not None:
        y = (residual.float() if upcast else residual) + y
    return y.to(dtype)
