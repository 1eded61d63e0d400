"""The published diffusion sampling loop, rebuilt plainly on a dinfill model: the benchmarks' baseline.

It keeps the reference's cost structure on purpose: a full forward over the whole canvas every step,
logits for every column, top-p by sorting the full vocabulary, boolean-mask indexing and ``.item()`` calls
that synchronise the host several times a step. Semantics follow docs/sampler-semantics.md (including its
fixes: top-p in fp32, padding keys masked out), so at temperature 0 its tokens match
:func:`dinfill.sampler.diffusion.diffusion_generate` with ``cache="none"``.

Not used by the fast path; the test-suite has its own independent reference loop on transformers' model.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _sample_tokens(logits: Tensor, temperature: float, top_p, top_k, conf_kind: str, generator):
    """Steps 1-6 of ``sample_tokens``: returns ``(confidence (n,), x0 (n,))``."""
    logits = logits.float()
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        ordered, order = torch.sort(logits, dim=-1, descending=True)  # (n, V)
        cum = torch.softmax(ordered, dim=-1).cumsum(dim=-1)
        drop = cum > top_p
        drop[..., 1:] = drop[..., :-1].clone()  # keep the token that crosses top_p
        drop[..., 0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), torch.finfo(logits.dtype).min)
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]  # (n, 1)
        logits = logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)
    probs = torch.softmax(logits, dim=-1)  # (n, V)
    if temperature > 0:
        x0 = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    else:
        x0 = probs.argmax(dim=-1)
    if conf_kind == "margin":
        top2 = torch.topk(probs, 2, dim=-1).values  # (n, 2)
        conf = top2[:, 0] - top2[:, 1]
    elif conf_kind == "neg_entropy":
        conf = (probs * probs.clamp(min=1e-10).log()).sum(dim=-1)
    else:
        conf = probs.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
    return conf, x0


@torch.no_grad()
def reference_generate(
    model,
    input_ids: Tensor,
    *,
    mask_id: int,
    steps: int,
    alg: str = "p2",
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    alg_temp: float = 0.0,
    eps: float = 1e-3,
    attention_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Run the reference loop (``origin``, ``maskgit_plus``, ``topk_margin``, ``entropy``, ``p2``).

    Parameters
    ----------
    model
        A dinfill diffusion model (called with ``causal=False`` and full logits).
    input_ids : Tensor
        ``(B, L)`` canvas.
    attention_mask : Tensor, optional
        ``(B, L)`` key mask for padded batches.
    Others
        As in :func:`dinfill.sampler.diffusion.diffusion_generate`.

    Returns
    -------
    Tensor
        ``(B, L)`` finished canvas.
    """
    conf_kind = {"topk_margin": "margin", "entropy": "neg_entropy"}.get(alg, "prob")
    if alg not in ("origin", "maskgit_plus", "topk_margin", "entropy", "p2"):
        raise ValueError(f"the reference loop has no alg {alg!r}")
    x = input_ids.clone()
    B, L = x.shape
    real = attention_mask.bool() if attention_mask is not None else torch.ones_like(x, dtype=torch.bool)
    positions = (real.long().cumsum(1) - 1).clamp(min=0)  # (B, L)
    first = real.long().argmax(dim=1)  # (B,) first real column per row
    fixed = (x != mask_id) | ~real
    ts = torch.linspace(1, eps, steps + 1, device=x.device)
    rows = torch.arange(B, device=x.device)
    for i in range(steps):
        masked = (x == mask_id) & real
        if not masked.any():
            break
        logits = model(x, causal=False, attention_mask=attention_mask, position_ids=positions)  # (B, L, V)
        shifted = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)  # (B, L, V) prediction for column j
        shifted[rows, first] = logits[rows, first]  # a row's first real column predicts itself
        t, s = ts[i], ts[i + 1]
        if alg == "origin":
            p = 1 - s / t if i < steps - 1 else 1
            reveal = torch.rand(int(masked.sum()), device=x.device, generator=generator) < p
            cand = shifted[masked]  # (n, V)
            new = torch.full((cand.shape[0],), mask_id, dtype=torch.long, device=x.device)
            if reveal.any():
                new[reveal] = _sample_tokens(cand[reveal], temperature, top_p, top_k, conf_kind, generator)[1]
            x[masked] = new
        elif alg == "p2":
            conf, x0 = _sample_tokens(shifted.reshape(B * L, -1), temperature, top_p, top_k, conf_kind, generator)
            conf, x0 = conf.view(B, L).masked_fill(fixed, float("inf")), x0.view(B, L)
            n_remask = ((~fixed).sum(1, keepdim=True).float() * (1 - (i + 1) / steps)).long()  # (B, 1)
            order = conf.argsort(dim=1)  # lowest confidence first
            remask = torch.zeros_like(masked)
            remask.scatter_(1, order, torch.arange(L, device=x.device).unsqueeze(0) < n_remask)
            x[remask] = mask_id
            take = masked & ~remask
            x[take] = x0[take]
        else:
            conf, x0 = _sample_tokens(shifted[masked], temperature, top_p, top_k, conf_kind, generator)
            n_reveal = masked.sum(1)
            if i < steps - 1:
                n_reveal = (n_reveal.float() * (1 - s / t)).long()
            full = torch.full((B, L), float("-inf"), device=x.device)
            full[masked] = conf
            k = int(n_reveal.max().item())
            if k == 0:
                continue
            if alg_temp > 0:
                u = torch.rand(full.shape, device=x.device, generator=generator).clamp(1e-20, 1 - 1e-20)
                full = full / alg_temp - torch.log(-torch.log(u))
            top = torch.topk(full, k, dim=1).indices  # (B, k)
            keep = torch.arange(k, device=x.device).unsqueeze(0) < n_reveal.unsqueeze(1)  # (B, k)
            proposal = torch.full_like(x, mask_id)
            proposal[masked] = x0
            b_idx = rows.unsqueeze(1).expand(B, k)[keep]
            x[b_idx, top[keep]] = proposal[b_idx, top[keep]]
    return x
