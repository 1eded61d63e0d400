"""One diffusion step after the model: logits rows -> sampled tokens + confidences -> chosen positions.

Why a fused op: the reference sampler spends a step in ~20 passes over the ``(N, V)`` logits (a full
sort per row for top-p, softmax, multinomial, a second sort for the margin, topk over the canvas)
and syncs the host several times. Here a step is two kernel launches and no host sync, so it can be
captured in a CUDA graph:

1. ``fused_step_rows.py``: every row -> token, confidence, selection key. Rows are split across
   programs so a handful of rows still fills the GPU; the top-p / top-k cut is exact by construction
   (exact counts of the largest logit values, a bounded deep path otherwise); one HBM read of the
   logits in the common case. Its module docstring says why, in bytes and passes.
2. ``fused_step_select.py``: per sequence, rank the rows and write the chosen ids into ``x``.

This module holds the public wrapper (validation through one :class:`FusedStepOptions`, dispatch),
the Triton path (the two launches) and the plain torch path (``DINFILL_BACKEND=torch``, the CPU
default), which follows the same rules with ``(N, V)`` temporaries.

Supports / Limitations / Differences from the reference: see ``fused_step_rows.py`` (row phase) and
``fused_step_select.py`` (positions). The torch path finds the top-p / top-k cut from each row's
1024 largest logits (``torch.topk``, O(V log 1024)) and sorts a whole row only when the cut lies
deeper; it samples by Gumbel-max over the kept tokens. The two paths draw different random streams,
so they agree on sampled tokens only in distribution.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dinfill.backend import use_triton
from dinfill.kernels.fused_step_options import CONFIDENCES, SELECTIONS, FusedStepOptions, fail

__all__ = ["fused_step", "fused_step_triton", "fused_step_torch", "FusedStepOptions", "CONFIDENCES", "SELECTIONS"]

_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_TORCH_CANDIDATES = 1024  # torch path: sort only this many of a row's largest logits when its cut lies there


# --------------------------------------------------------------------------------------------------
# Triton path: two launches, no host sync
# --------------------------------------------------------------------------------------------------


def fused_step_triton(
    logits: Tensor,
    x: Tensor,
    positions: Tensor,
    opts: FusedStepOptions,
    *,
    seed: Tensor | None = None,
    offset: Tensor | None = None,
) -> Tensor:
    """The row phase then the selection, both Triton kernels (inputs already validated by :func:`fused_step`).

    ``seed`` / ``offset`` (1-element int64 tensors on ``x.device``) must be set whenever
    ``opts.needs_noise``. Returns the ``(B*M,)`` fp32 confidences.
    """
    from dinfill.kernels.fused_step_rows import launch_rows
    from dinfill.kernels.fused_step_select import launch_select

    conf, key, tok, state = launch_rows(logits, x, positions, opts, seed, offset)
    launch_select(x, positions, key, tok, state, opts)
    return conf


# --------------------------------------------------------------------------------------------------
# torch path (CPU default; same semantics, [N, V] temporaries allowed)
# --------------------------------------------------------------------------------------------------


def _torch_generator(seed: Tensor, offset: Tensor, device: torch.device) -> torch.Generator:
    """A generator derived from seed/offset tensors (the torch path reads them on the host)."""
    mixed = (int(seed.reshape(-1)[0]) * 0x9E3779B97F4A7C15 + int(offset.reshape(-1)[0])) % (1 << 63)
    gen = torch.Generator(device=device)
    gen.manual_seed(mixed)
    return gen


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """``torch.rand`` on ``device`` from a generator that may live on another device."""
    where = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=where).to(device)


def _rows(value, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A scalar or per-row parameter as an ``(n,)`` tensor."""
    if isinstance(value, Tensor):
        return value.to(device=device, dtype=dtype).reshape(-1).expand(n)
    return torch.full((n,), value, dtype=dtype, device=device)


def _cut_from_sorted(sorted_z: Tensor, total: Tensor, p: Tensor | None, k: Tensor | None) -> tuple[Tensor, Tensor]:
    """Cut (smallest kept logit) of each row from its ``n`` largest logits, sorted descending.

    ``total`` is each row's full ``sum(exp(z - max))``. Returns ``(cut, resolved)``: ``resolved`` is
    False where the cut may lie beyond the ``n`` values given (all of them kept by top-p, no
    top-k at or above them); those rows need more values.
    """
    N, n = sorted_z.shape
    cut = torch.full((N,), float("-inf"), device=sorted_z.device)  # (N,)
    resolved = torch.ones(N, dtype=torch.bool, device=sorted_z.device)
    k_bounds = torch.zeros(N, dtype=torch.bool, device=sorted_z.device)  # a top-k cut inside the n values
    if k is not None:
        k_bounds = (k > 0) & (k <= n)
        cut_k = sorted_z.gather(1, (k.clamp(1, n) - 1)[:, None]).squeeze(1)
        cut = torch.where(k > 0, cut_k, cut)
        resolved = k_bounds | (k <= 0)
    if p is not None:
        probs = torch.exp(sorted_z - sorted_z[:, :1]) / total[:, None]  # (N, n) fp32
        cumulative = probs.cumsum(dim=-1)
        n_keep = 1 + (cumulative[:, :-1] <= p[:, None]).sum(dim=-1)  # shifted right: the top-1 always stays
        cut_p = sorted_z.gather(1, (n_keep - 1)[:, None]).squeeze(1)
        cut = torch.maximum(cut, torch.where(p < 1, cut_p, float("-inf")))
        # an unresolved top-p cut is <= the n-th value, so a top-k cut inside the n values still wins
        resolved = (resolved & ((p >= 1) | (n_keep < n))) | k_bounds
    return cut, resolved


def _keep_threshold(z: Tensor, opts: FusedStepOptions) -> tuple[Tensor, Tensor, Tensor] | None:
    """Smallest logit each row keeps after top-p then top-k (``-inf``: no filter), or ``None``.

    Exact like a full sort + cumsum, but sorts only the ``_TORCH_CANDIDATES`` largest logits of a
    row, and the whole row only when its cut lies deeper (a flat distribution).

    Returns
    -------
    tuple of Tensor or None
        ``(cut (N, 1), top values (N, n), their indices (N, n))``; ``None`` when nothing filters.
    """
    N, V = z.shape
    if not (opts.top_p_on or opts.top_k_on):
        return None
    p = _rows(opts.top_p, N, torch.float32, z.device) if opts.top_p_on else None
    k = _rows(opts.top_k, N, torch.int64, z.device) if opts.top_k_on else None
    row_max = z.amax(dim=-1, keepdim=True)  # (N, 1)
    total = torch.exp(z - row_max).sum(dim=-1)  # (N,)
    top, top_idx = torch.topk(z, min(V, _TORCH_CANDIDATES), dim=-1)  # (N, n) descending
    cut, resolved = _cut_from_sorted(top, total, p, k)
    if not bool(resolved.all()):
        rows = (~resolved).nonzero().squeeze(1)
        full = torch.sort(z[rows], dim=-1, descending=True).values  # (r, V)
        p_rows = p[rows] if p is not None else None
        k_rows = k[rows] if k is not None else None
        cut[rows] = _cut_from_sorted(full, total[rows], p_rows, k_rows)[0]
    return cut[:, None], top, top_idx


def _ranks(key: Tensor, pos: Tensor, member: Tensor, descending: bool) -> Tensor:
    """Rank of every row in its sequence: members first, then by key, then by position ascending."""
    B, M = key.shape
    order = torch.argsort(pos, dim=1, stable=True)  # (B, M)
    order = order.gather(1, torch.argsort(key.gather(1, order), dim=1, descending=descending, stable=True))
    order = order.gather(1, torch.argsort((~member).gather(1, order).to(torch.uint8), dim=1, stable=True))
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(M, device=key.device).expand(B, M))
    return rank


def fused_step_torch(
    logits: Tensor,
    x: Tensor,
    positions: Tensor,
    opts: FusedStepOptions,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Vectorised torch implementation of :func:`fused_step` (inputs already validated by it).

    Synchronises with the host (boolean indexing for the writes); meant for the CPU and as the
    switchable plain path, not for CUDA graphs.
    """
    B, L = x.shape
    M = positions.shape[1]
    dev = x.device
    mask_id, select, confidence, temperature = opts.mask_id, opts.select, opts.confidence, opts.temperature
    count, fraction, threshold, factor, alg_temp = opts.count, opts.fraction, opts.threshold, opts.factor, opts.alg_temp
    z = logits.reshape(B * M, -1).float()  # (N, V)
    N, V = z.shape
    temp = _rows(temperature, N, torch.float32, dev)  # (N,)
    sampling = temp > 0
    may_sample = opts.may_sample
    if isinstance(temperature, Tensor):
        z = torch.where(sampling[:, None], z / torch.where(sampling, temp, 1.0)[:, None], z)
    elif temperature > 0:
        z = z / torch.tensor(temperature, dtype=torch.float32, device=dev)  # fp32 divisor, like the kernel
    filtered = _keep_threshold(z, opts)
    if filtered is not None:
        cut, top, top_idx = filtered  # (N, 1), (N, n), (N, n)
        z = z.masked_fill(z < cut, float("-inf"))
    probs = torch.softmax(z, dim=-1)  # (N, V) fp32
    x0 = z.argmax(dim=-1)  # (N,) first maximum on ties
    if may_sample:
        # Gumbel-max over the kept tokens; when every row keeps few, only over its largest candidates
        if filtered is not None and (top.shape[1] == V or bool((cut[:, 0] > top[:, -1]).all())):
            cand = top.masked_fill(top < cut, float("-inf"))  # (N, n): every kept token is among them
            gumbel = -torch.log(-torch.log(_uniform(cand.shape, generator, dev)))
            drawn = top_idx.gather(1, (cand + gumbel).argmax(dim=-1, keepdim=True)).squeeze(1)
        else:
            gumbel = -torch.log(-torch.log(_uniform((N, V), generator, dev)))  # (N, V)
            drawn = (z + gumbel).argmax(dim=-1)
        x0 = torch.where(sampling, drawn, x0)
    if confidence == "prob":
        conf = probs.gather(1, x0[:, None]).squeeze(1)
    elif confidence == "margin":
        top2 = torch.topk(probs, min(2, V), dim=-1).values  # (N, 2)
        conf = top2[:, 0] - (top2[:, 1] if V > 1 else 0.0)
    else:
        conf = (probs * torch.log(probs.clamp_min(1e-10))).sum(dim=-1)

    conf = torch.nan_to_num(conf, nan=float("-inf"))  # a row with no finite logit ranks last, never NaN
    pos = positions.to(torch.int64)  # (B, M)
    valid = (pos >= 0) & (pos < L)
    cur = x.gather(1, pos.clamp(0, max(L - 1, 0)))  # (B, M)
    is_mask = valid & (cur == mask_id)
    member = valid if select == "p2" else is_mask
    conf = conf.masked_fill(~valid.reshape(-1), float("-inf"))
    conf_bm = conf.view(B, M)
    tok = x0.view(B, M)
    n = member.sum(dim=1)  # (B,)
    if count is not None:
        cnt = _rows(count, B, torch.int64, dev)
    elif fraction is not None and select != "bernoulli":
        cnt = (n.float() * _rows(fraction, B, torch.float32, dev)).clamp(max=n.float()).long()  # fp32, trunc
    else:
        cnt = n
    cnt = torch.minimum(cnt.clamp_min(0), n)[:, None]  # (B, 1)

    key = conf_bm
    if select == "topk" and alg_temp > 0:
        key = conf_bm / alg_temp - torch.log(-torch.log(_uniform((B, M), generator, dev)))
    new = cur
    if select == "bernoulli":
        chosen = member & (_uniform((B, M), generator, dev) < _rows(fraction, B, torch.float32, dev)[:, None])
    else:
        rank = _ranks(key, pos, member, descending=select != "p2")
        if select == "topk":
            chosen = member & (rank < cnt)
        elif select == "threshold":
            chosen = member & ((conf_bm >= torch.tensor(threshold, dtype=torch.float32)) | (rank == 0))
        elif select == "factor":
            bound = 1.0 - torch.tensor(factor, dtype=torch.float32, device=dev) / (rank + 2).float()
            chosen = member & ((rank == 0) | (conf_bm >= bound))
        else:
            remask = member & (rank < cnt)
            new = torch.where(remask, mask_id, torch.where(is_mask, tok, cur))
            chosen = None
    if chosen is not None:
        new = torch.where(chosen, tok, cur)
    rows = torch.arange(B, device=dev)[:, None].expand(B, M)
    x[rows[valid], pos[valid]] = new[valid]
    return conf


# --------------------------------------------------------------------------------------------------
# wrapper: validation and dispatch
# --------------------------------------------------------------------------------------------------


def fused_step(
    logits: Tensor,
    x: Tensor,
    positions: Tensor,
    *,
    mask_id: int,
    select: str,
    confidence: str = "prob",
    temperature: float | Tensor = 0.0,
    top_p: float | Tensor | None = None,
    top_k: int | Tensor | None = None,
    count: int | Tensor | None = None,
    fraction: float | Tensor | None = None,
    threshold: float = 0.9,
    factor: float = 1.0,
    alg_temp: float = 0.0,
    generator: torch.Generator | None = None,
    seed: Tensor | None = None,
    offset: Tensor | None = None,
) -> Tensor:
    """Sample every logits row, choose positions per sequence and write the chosen ids into ``x``.

    Row ``r = b * M + m`` predicts canvas column ``positions[b, m]`` of sequence ``b``. Sampling per
    row follows ``sample_tokens`` of sampler-semantics.md (temperature, top-p in fp32 with the
    shift-right rule, top-k with ties kept, fp32 softmax, argmax or an exact sample); then, per
    sequence, ``select`` decides which rows write their token (see below).

    Parameters
    ----------
    logits : Tensor
        ``(B*M, V)`` or ``(B, M, V)``; bf16, fp16 or fp32; unit stride along ``V``.
    x : Tensor
        ``(B, L)`` int64 canvas, **updated in place**.
    positions : Tensor
        ``(B, M)`` int32/int64 canvas column of each row; ``-1`` (any value outside ``[0, L)``)
        marks a padding row, which is ignored. Positions must be unique within a sequence.
    mask_id : int
        Token id of the mask.
    select : str
        ``"topk"``: reveal the ``count`` most confident masked rows (rows whose current token is
        ``mask_id``); with ``alg_temp > 0`` rank by ``conf / alg_temp + Gumbel`` instead.
        ``"threshold"``: every masked row with ``conf >= threshold``, and always the most
        confident one. ``"factor"`` (Fast-dLLM): sort masked rows by confidence, reveal the
        largest ``n >= 1`` with ``conf_(n) >= 1 - factor / (n + 1)``. ``"bernoulli"`` (alg
        ``origin``): each masked row with probability ``fraction``. ``"p2"``: every row is a
        variable position; the ``count`` least confident become ``mask_id``, every other row
        that is currently a mask takes its token, the rest keep theirs.
        Selection ties go to the lowest position; counts are clamped to the eligible rows.
    confidence : str
        ``"prob"`` (probability of the chosen token), ``"margin"`` (top1 - top2) or
        ``"neg_entropy"`` (``sum p log max(p, 1e-10)``), all of the filtered distribution.
    temperature : float or Tensor
        Scalar or ``(B*M,)``; ``0`` = greedy (exact argmax, lowest id on ties).
    top_p : float or Tensor, optional
        Scalar or ``(B*M,)``; ``None`` or ``>= 1`` = off. Ties at the cut are kept.
    top_k : int or Tensor, optional
        Scalar or ``(B*M,)`` integers; ``None`` or ``0`` = off. Ties kept.
    count : int or Tensor, optional
        ``(B,)`` integers (or one int): positions to reveal (``topk``) or re-mask (``p2``).
    fraction : float or Tensor, optional
        Instead of ``count``: a float, 0-dim or ``(B,)`` fp32 tensor. ``topk``: count =
        ``trunc(fp32(n_masked) * fraction)``; ``p2``: ``trunc(fp32(n_rows) * fraction)``;
        ``bernoulli``: the reveal probability.
    threshold : float
        ``tau`` of ``select="threshold"`` (compared in fp32).
    factor : float
        ``f`` of ``select="factor"``.
    alg_temp : float
        ``select="topk"`` only: > 0 perturbs the ranking with Gumbel noise.
    generator : torch.Generator, optional
        Source of randomness (one seed is drawn from it per call).
    seed, offset : Tensor, optional
        1-element int64 tensors on ``x.device`` instead of a generator: Philox key and stream
        (change ``offset`` every call). Without either, the default generator is used.

    Returns
    -------
    Tensor
        ``(B*M,)`` fp32 confidence of each row's fresh sample (not of ``x``'s token, not perturbed
        by ``alg_temp``); padding rows get ``-inf``.

    Notes
    -----
    ``DINFILL_BACKEND`` chooses the Triton kernels (two launches, no host sync, CUDA-graph friendly
    with ``seed`` / ``offset``) or the vectorised torch path. Both follow the same rules; they
    draw different random streams. Values inside per-row / per-sequence tensors are not checked
    (that would need a host sync): a negative ``top_p`` acts as 0 (keep the top token and its
    ties), a non-positive ``top_k`` or ``temperature`` turns that row's top-k / sampling off, a
    negative count as 0. Scalars are checked and rejected with a message.
    """
    if not isinstance(logits, Tensor) or not isinstance(x, Tensor) or not isinstance(positions, Tensor):
        fail("logits, x and positions must be tensors", "pass torch tensors")
    if x.dim() != 2 or x.dtype != torch.int64:
        fail(f"x must be a (B, L) int64 canvas, got {x.dtype} of shape {tuple(x.shape)}", "pass x.long() (2-D)")
    B, L = x.shape
    if positions.dim() != 2 or positions.shape[0] != B or positions.dtype not in (torch.int32, torch.int64):
        fail(
            f"positions must be (B={B}, M) int32/int64, got {positions.dtype} of shape {tuple(positions.shape)}",
            "pass one canvas column per logits row, -1 for padding",
        )
    M = positions.shape[1]
    if logits.dtype not in _FLOAT_DTYPES:
        fail(f"logits dtype {logits.dtype} is not supported", "pass bf16, fp16 or fp32 logits")
    if logits.dim() == 3:
        if tuple(logits.shape[:2]) != (B, M):
            fail(f"logits of shape {tuple(logits.shape)} do not match positions {(B, M)}", "pass (B, M, V) logits")
    elif logits.dim() != 2 or logits.shape[0] != B * M:
        fail(f"logits of shape {tuple(logits.shape)} are not (B*M={B * M}, V)", "pass one logits row per position")
    if logits.shape[-1] < 1:
        fail("the vocabulary is empty", "pass logits with V >= 1")
    for name, t in (("logits", logits), ("positions", positions)):
        if t.device != x.device:
            fail(f"{name} is on {t.device} but x is on {x.device}", f"move {name} to {x.device}")
    N, dev = B * M, x.device
    opts = FusedStepOptions(
        mask_id=mask_id,
        select=select,
        confidence=confidence,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        count=count,
        fraction=fraction,
        threshold=threshold,
        factor=factor,
        alg_temp=alg_temp,
    ).check(N, B, dev)
    if generator is not None and not isinstance(generator, torch.Generator):
        fail(f"generator must be a torch.Generator, got {type(generator).__name__}", "pass torch.Generator()")
    if (seed is None) != (offset is None):
        fail("seed and offset go together", "pass both (1-element int64 tensors) or neither")
    if seed is not None:
        if generator is not None:
            fail("both a generator and seed/offset were given", "pass one source of randomness")
        for name, t in (("seed", seed), ("offset", offset)):
            if not isinstance(t, Tensor) or t.numel() != 1 or t.dtype != torch.int64 or t.device != dev:
                fail(f"{name} must be a 1-element int64 tensor on {dev}", f"pass torch.tensor([v], device='{dev}')")

    if N == 0:
        return torch.empty(0, dtype=torch.float32, device=dev)
    if use_triton(dev):
        if opts.needs_noise and seed is None:
            where = generator.device if generator is not None else dev
            drawn = torch.randint(0, 1 << 62, (2,), generator=generator, device=where).to(dev)
            seed, offset = drawn[:1], drawn[1:]
        return fused_step_triton(logits, x, positions, opts, seed=seed, offset=offset)
    if opts.needs_noise and seed is not None:
        generator = _torch_generator(seed, offset, dev)
    return fused_step_torch(logits, x, positions, opts, generator=generator)
