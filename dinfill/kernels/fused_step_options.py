"""The options of one fused diffusion step, defined and validated once.

``fused_step`` takes its options as keyword arguments (the public API). They are turned into one
:class:`FusedStepOptions` right away, checked against the batch, and that object is what the Triton
path, the torch path and the reference (:func:`dinfill.kernels.reference.fused_step_ref`) receive,
so the four places that used to repeat the parameter list cannot drift apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["FusedStepOptions", "CONFIDENCES", "SELECTIONS", "fail"]

CONFIDENCES = ("prob", "margin", "neg_entropy")
SELECTIONS = ("topk", "threshold", "factor", "p2", "bernoulli")


def fail(problem: str, fix: str) -> None:
    """Raise the ``ValueError`` every fused_step input check uses: the problem, then the fix."""
    raise ValueError(f"fused_step: {problem}; {fix}")


def _check_number(name: str, value, *, integer: bool = False, minimum: float | None = None) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        fail(f"{name} must be a Python {'int' if integer else 'float'}, got {type(value).__name__}", "pass a number")
    if not math.isfinite(value) or (minimum is not None and value < minimum):
        fail(f"{name}={value!r} is out of range", f"pass a finite value >= {minimum}")


def _check_param(name: str, value, n: int, device: torch.device, *, integer: bool, minimum: float | None) -> None:
    """A scalar, or a 0-dim / (n,) tensor on ``device`` with the right kind of dtype."""
    if not isinstance(value, Tensor):
        _check_number(name, value, integer=integer, minimum=minimum)
        return
    if value.device != device:
        fail(f"{name} is on {value.device} but x is on {device}", f"move {name} to {device}")
    if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != n):
        fail(f"{name} has shape {tuple(value.shape)}, expected () or ({n},)", f"pass one value per {name} slot")
    if integer:
        good = not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool)
    else:
        good = value.is_floating_point()
    if not good:
        fail(f"{name} has dtype {value.dtype}", f"pass {'an integer' if integer else 'a floating-point'} tensor")


@dataclass(frozen=True, eq=False)  # fields may be tensors: identity, not element-wise, equality
class FusedStepOptions:
    """Everything :func:`dinfill.kernels.fused_step` needs besides the tensors and the randomness.

    Field meanings are those of the keyword arguments of :func:`dinfill.kernels.fused_step`.
    Per-row parameters (``temperature``, ``top_p``, ``top_k``) are a Python number or a 0-dim /
    ``(B*M,)`` tensor; per-sequence ones (``count``, ``fraction``) a number or a 0-dim / ``(B,)``
    tensor. Values *inside* tensors are not checked (that would need a host sync).
    """

    mask_id: int
    select: str
    confidence: str = "prob"
    temperature: float | Tensor = 0.0
    top_p: float | Tensor | None = None
    top_k: int | Tensor | None = None
    count: int | Tensor | None = None
    fraction: float | Tensor | None = None
    threshold: float = 0.9
    factor: float = 1.0
    alg_temp: float = 0.0

    def check(self, n_rows: int, batch: int, device: torch.device | str) -> FusedStepOptions:
        """Validate against a batch of ``batch`` sequences holding ``n_rows`` logits rows on ``device``.

        Returns ``self`` so a call reads ``FusedStepOptions(...).check(N, B, dev)``; raises a
        ``ValueError`` naming the problem and the fix.
        """
        device = torch.device(device)
        if isinstance(self.mask_id, bool) or not isinstance(self.mask_id, int):
            fail(f"mask_id must be an int, got {type(self.mask_id).__name__}", "pass the tokenizer's mask token id")
        if self.select not in SELECTIONS:
            fail(f"select={self.select!r} is not one of {SELECTIONS}", "pick one of them")
        if self.confidence not in CONFIDENCES:
            fail(f"confidence={self.confidence!r} is not one of {CONFIDENCES}", "pick one of them")
        _check_param("temperature", self.temperature, n_rows, device, integer=False, minimum=0.0)
        if self.top_p is not None:
            _check_param("top_p", self.top_p, n_rows, device, integer=False, minimum=0.0)
        if self.top_k is not None:
            _check_param("top_k", self.top_k, n_rows, device, integer=True, minimum=0)
        for name, value in (("threshold", self.threshold), ("factor", self.factor)):
            _check_number(name, value)
        _check_number("alg_temp", self.alg_temp, minimum=0.0)
        select, count, fraction = self.select, self.count, self.fraction
        if self.alg_temp > 0 and select != "topk":
            fail(f"alg_temp is only used by select='topk', not {select!r}", "leave alg_temp=0")
        if count is not None and fraction is not None:
            fail("both count and fraction were given", "pass one of them")
        if select in ("topk", "p2") and count is None and fraction is None:
            fail(f"select={select!r} needs count or fraction", "pass count=(B,) ints or fraction=float")
        if select == "bernoulli" and fraction is None:
            fail("select='bernoulli' needs fraction (the reveal probability)", "pass fraction=1 - s/t")
        if select in ("threshold", "factor", "bernoulli") and count is not None:
            fail(f"count is not used by select={select!r}", "leave count=None")
        if select in ("threshold", "factor") and fraction is not None:
            fail(f"fraction is not used by select={select!r}", "leave fraction=None")
        if count is not None:
            _check_param("count", count, batch, device, integer=True, minimum=None)
        if fraction is not None:
            _check_param("fraction", fraction, batch, device, integer=False, minimum=0.0)
        return self

    # ---- derived facts the three implementations share ----------------------------------------

    @property
    def may_sample(self) -> bool:
        """Some row may sample (a temperature tensor, or a positive scalar temperature)."""
        return isinstance(self.temperature, Tensor) or self.temperature > 0

    @property
    def top_p_on(self) -> bool:
        """Some row may apply top-p (a tensor, or a scalar below 1)."""
        return isinstance(self.top_p, Tensor) or (self.top_p is not None and self.top_p < 1)

    @property
    def top_k_on(self) -> bool:
        """Some row may apply top-k (a tensor, or a positive scalar)."""
        return isinstance(self.top_k, Tensor) or bool(self.top_k)

    @property
    def row_noise(self) -> int:
        """Per-row random selection key: 0 none, 1 ``conf / alg_temp + Gumbel`` (topk), 2 a uniform (bernoulli)."""
        return 1 if (self.select == "topk" and self.alg_temp > 0) else 2 if self.select == "bernoulli" else 0

    @property
    def needs_noise(self) -> bool:
        """The call consumes randomness (sampling, a Gumbel-perturbed ranking or Bernoulli reveals)."""
        return self.may_sample or self.row_noise != 0
