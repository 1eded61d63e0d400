"""What test_fused_step.py and test_fused_step_sampling.py share: where the op runs, and how a test calls it there.

The op runs on CUDA when there is one (compiled kernels, whose Triton has no interpreter switched on), else on
the CPU (the interpreter, or the torch path). Inputs are built and checked on the CPU; :func:`step` moves them to
``DEV`` and back.
"""

from __future__ import annotations

import torch

from dinfill.kernels import fused_step
from dinfill.kernels.reference import top_k_logits_ref, top_p_logits_ref

MASK = 100_000  # outside every test vocabulary, so a revealed token never looks like a mask
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def i64(v: int) -> torch.Tensor:
    """A 1-element int64 tensor (a seed or offset), on the CPU."""
    return torch.tensor([v], dtype=torch.int64)


def on_dev(value):
    """``value`` on ``DEV`` if it is a tensor, else ``value`` itself."""
    return value.to(DEV) if isinstance(value, torch.Tensor) else value


def step(logits, x, positions, **kw):
    """``fused_step`` on DEV: tensor arguments travel there, the CPU canvas ``x`` is updated in place like the
    op's own, and the confidences come back to the CPU (a no-op round trip on the CPU itself)."""
    x_dev = x.to(DEV)
    conf = fused_step(on_dev(logits), x_dev, on_dev(positions), **{k: on_dev(v) for k, v in kw.items()})
    x.copy_(x_dev)
    return conf.cpu()


def kept_distribution(base: torch.Tensor, temperature: float, top_p=None, top_k=None) -> torch.Tensor:
    """``(V,)`` float64 probabilities of the reference's filtered distribution (0 outside the kept set)."""
    z = base.float()[None] / torch.tensor(temperature, dtype=torch.float32)
    if top_p is not None and top_p < 1:
        z = top_p_logits_ref(z, top_p)
    if top_k:
        z = top_k_logits_ref(z, top_k)
    return torch.softmax(z.double(), dim=-1)[0]
