"""Plain-torch token sampling shared by the samplers: temperature, top-p, top-k, then argmax or a draw.

Steps 1-5 of ``sample_tokens`` in docs/sampler-semantics.md, in this order: divide by the
temperature, top-p (nucleus) filter, top-k filter, softmax, argmax or sample. Two choices matter:

* Everything is computed in fp32 (the reference does top-p's cumulative sum in bf16 for bf16
  logits; the spec asks for fp32).
* Sampling is the exponential race ``argmax(p / E)`` with ``E ~ Exp(1)`` i.i.d. per vocabulary
  entry, which picks token ``i`` with probability exactly ``p_i`` (zero-probability tokens never
  win), needs no host synchronisation (``torch.multinomial`` may sync) and lets the noise be drawn
  separately from the arithmetic: the AR decode step draws it outside its CUDA graph with the
  caller's ``torch.Generator`` and replays the graph on it, so eager and graph runs give the same
  tokens.

* The filter order is the spec's (top-p, then top-k), which transformers' ``generate`` reverses
  (top-k, then top-p). With only one of the two set, or at temperature 0, they agree; with both set the
  kept sets can differ, so a sampled comparison against ``generate`` should set just one of them.

Greedy (``temperature == 0``) is exact argmax of the raw logits, which is what transformers'
``generate`` does; filters never change it because top-p and top-k always keep the top-1 token.
The diffusion sampler uses its fused Triton kernel instead; these helpers are its plain reference
for the filtering part and the whole sampling step of the AR path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dinfill.sampler.settings import check_option

__all__ = [
    "check_sampling_args",
    "filter_logits",
    "sampling_probs",
    "draw_noise",
    "sample_from_probs",
    "sample_tokens",
]


def check_sampling_args(temperature: float, top_p: float | None, top_k: int | None) -> None:
    """Raise ``ValueError`` naming the bad argument and the allowed range (the checks of
    :class:`~dinfill.sampler.settings.SamplerSettings`).

    Parameters
    ----------
    temperature : float
        ``0`` for greedy, ``> 0`` to sample.
    top_p : float or None
        Nucleus mass in ``(0, 1]``; ``None`` or ``1.0`` disables it.
    top_k : int or None
        Number of highest logits kept, ``>= 1``; ``None`` disables it.
    """
    for name, value in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k)):
        check_option(name, value)


def filter_logits(
    logits: Tensor, *, temperature: float | Tensor = 0.0, top_p: float | Tensor | None = None, top_k: int | None = None
) -> Tensor:
    """Steps 1-3: temperature, then top-p, then top-k; removed entries become ``-inf``.

    Parameters
    ----------
    logits : Tensor
        ``(N, V)`` floating logits (any float dtype; computed in fp32).
    temperature : float or Tensor
        Divides the logits when ``> 0``; ``0`` leaves them as they are. A 0-dim tensor (the CUDA-graph
        path: the value lives on the device) always divides and must be positive.
    top_p : float or Tensor, optional
        Keep the smallest prefix of the descending-sorted distribution whose cumulative probability
        reaches ``top_p``: a token is removed when the cumulative probability *before* it already
        exceeds ``top_p``, so the top-1 token is always kept. ``None`` or ``>= 1`` disables it; a 0-dim
        tensor always filters (a value of 1 keeps everything).
    top_k : int, optional
        Remove tokens whose logit is below the ``k``-th largest (ties with it are kept).

    Returns
    -------
    Tensor
        ``(N, V)`` fp32 filtered logits (a new tensor).
    """
    out = logits.float()  # (N, V)
    if isinstance(temperature, Tensor) or temperature > 0:
        out = out / temperature  # a tensor temperature (0-dim, on the device) is a sampling one: never read here
    if isinstance(top_p, Tensor) or (top_p is not None and top_p < 1.0):
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)  # (N, V) each
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)  # (N, V) fp32
        drop_sorted = torch.zeros_like(cum, dtype=torch.bool)
        drop_sorted[:, 1:] = cum[:, :-1] > top_p  # shift right by one: the top-1 always stays
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)  # back to vocab order
        out = out.masked_fill(drop, float("-inf"))
    if top_k is not None and top_k < out.shape[-1]:
        kth = torch.topk(out, top_k, dim=-1).values[:, -1:]  # (N, 1) k-th largest
        out = out.masked_fill(out < kth, float("-inf"))
    return out


def sampling_probs(
    logits: Tensor, *, temperature: float | Tensor = 0.0, top_p: float | Tensor | None = None, top_k: int | None = None
) -> Tensor:
    """Step 4: ``softmax`` of :func:`filter_logits` in fp32, shape ``(N, V)``."""
    return torch.softmax(filter_logits(logits, temperature=temperature, top_p=top_p, top_k=top_k), dim=-1)


def draw_noise(
    shape: tuple[int, ...] | torch.Size,
    *,
    device: torch.device | str,
    generator: torch.Generator | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Draw the ``Exp(1)`` noise of the exponential race (fp32), optionally into ``out`` in place.

    A draw that rounds to exactly zero is raised to the smallest normal float, so ``p / E`` never
    becomes ``0 / 0`` (``argmax`` would pick the NaN); this changes the distribution by far less
    than fp32 rounding already does.
    """
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=device)
    out.exponential_(1.0, generator=generator)
    return out.clamp_min_(torch.finfo(torch.float32).tiny)


def sample_from_probs(probs: Tensor, noise: Tensor) -> Tensor:
    """Step 5 (sampling): ``argmax(probs / noise)`` per row, shape ``(N,)`` long.

    With ``noise`` i.i.d. ``Exp(1)`` (see :func:`draw_noise`) the result is distributed exactly as
    ``probs``; no host synchronisation, so it can live inside a CUDA graph.
    """
    return (probs / noise).argmax(dim=-1)  # (N,)


def sample_tokens(
    logits: Tensor,
    *,
    temperature: float | Tensor = 0.0,
    top_p: float | Tensor | None = None,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
) -> Tensor:
    """Steps 1-5: pick one token per row, greedily or by sampling.

    Parameters
    ----------
    logits : Tensor
        ``(N, V)`` logits, any float dtype.
    temperature, top_p, top_k :
        See :func:`filter_logits`; ``temperature == 0`` is greedy (argmax of the raw logits, first
        index on ties, like ``torch.argmax`` and transformers' ``generate``); a tensor temperature samples.
    generator : torch.Generator, optional
        Source of the sampling noise (on ``logits``' device); ignored when greedy or when ``noise``
        is given.
    noise : Tensor, optional
        ``(N, V)`` pre-drawn ``Exp(1)`` noise from :func:`draw_noise`.

    Returns
    -------
    Tensor
        ``(N,)`` long token ids.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, V), got shape {tuple(logits.shape)}")
    if not isinstance(temperature, Tensor) and temperature == 0:
        return logits.argmax(dim=-1)  # (N,)
    probs = sampling_probs(logits, temperature=temperature, top_p=top_p, top_k=top_k)  # (N, V) fp32
    if noise is None:
        noise = draw_noise(probs.shape, device=probs.device, generator=generator)
    return sample_from_probs(probs, noise)
