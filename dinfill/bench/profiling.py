"""Profiling hooks for benchmarks: NVTX ranges for Nsight Systems and torch.profiler traces.

Why hooks rather than ranges written into the runtime: the model, the samplers and the kernels must
not pay for profiling when it is off, and should not import benchmark code. :func:`instrument`
registers forward pre/post hooks on a loaded model for the ``forward``, ``attention`` and ``lm_head``
ranges (and ``cache refresh`` for a forward that rewrites a whole static cache) and removes them
afterwards. A step's sampling half (the fused step) is not a module, so the sampler opens that range
itself: the diffusion sampler's ``nvtx=True`` emits ``step`` / ``forward`` / ``sampling``, and
:func:`region` is the zero-cost hook any code can use (a no-op unless profiling was switched on).

NVTX needs either a CUDA build of torch (``torch.cuda.nvtx``) or the ``nvtx`` package (CPU builds,
the ``dev`` extra); asking for ``--nvtx`` with neither is an error, never a silent no-op. Ranges
pushed while a CUDA graph is being captured appear once, at capture: replays show as one graph launch
in Nsight Systems, which is what actually runs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = ["RANGES", "nvtx_available", "region", "profiling", "instrument", "torch_profile"]

# The named ranges benchmarks emit (docs: issue "Benchmarks and profiling").
RANGES = ("forward", "attention", "lm_head", "fused step", "cache refresh")

_state = {"nvtx": None, "record": False}  # nvtx: (push, pop) or None; record: torch.profiler labels


def nvtx_available() -> bool:
    """True when NVTX ranges can be emitted (CUDA torch, or the ``nvtx`` package)."""
    return torch.cuda.is_available() or importlib.util.find_spec("nvtx") is not None


def _nvtx_functions():
    if torch.cuda.is_available():
        return torch.cuda.nvtx.range_push, torch.cuda.nvtx.range_pop
    if importlib.util.find_spec("nvtx") is None:
        raise RuntimeError(
            "NVTX ranges need a CUDA build of torch or the 'nvtx' package (pip install nvtx, part of the dev extra)"
        )
    import nvtx

    return (lambda name: nvtx.push_range(name, domain="dinfill")), (lambda: nvtx.pop_range(domain="dinfill"))


@contextlib.contextmanager
def profiling(nvtx: bool | None = None, record: bool | None = None) -> Iterator[None]:
    """Switch the named ranges on (or off) for the duration of the block.

    Parameters
    ----------
    nvtx : bool, optional
        Emit NVTX ranges (raises ``RuntimeError`` when NVTX is unavailable); ``None`` keeps the current setting.
    record : bool, optional
        Emit ``torch.profiler.record_function`` labels (for :func:`torch_profile` traces); ``None`` keeps it.
    """
    saved = dict(_state)
    if nvtx is not None:
        _state["nvtx"] = _nvtx_functions() if nvtx else None
    if record is not None:
        _state["record"] = bool(record)
    try:
        yield
    finally:
        _state.update(saved)


@contextlib.contextmanager
def region(name: str) -> Iterator[None]:
    """A named range (NVTX and/or profiler label) around a block; free when profiling is off.

    For example ``with region("fused step"): fused_step(...)``.
    """
    push_pop, record = _state["nvtx"], _state["record"]
    if push_pop is None and not record:
        yield
        return
    with torch.profiler.record_function(name) if record else contextlib.nullcontext():
        if push_pop is not None:
            push_pop[0](name)
        try:
            yield
        finally:
            if push_pop is not None:
                push_pop[1]()


class _Ranges:
    """Open/close a range from a module's pre/post forward hooks (hooks cannot hold a ``with``)."""

    def __init__(self, name: str, refresh: bool = False):
        self.name, self.refresh = name, refresh
        self.stack: list[contextlib.AbstractContextManager] = []

    def _name_of(self, args: tuple, kwargs: dict) -> str:
        # a forward that rewrites a whole static cache (every column) is a diffusion dual-cache refresh
        cache = kwargs.get("cache")
        if self.refresh and cache is not None and args and args[0].shape[-1] == cache.max_len:
            return "cache refresh"
        return self.name

    def pre(self, _module, args, kwargs=None) -> None:
        cm = region(self._name_of(args, kwargs or {}))
        cm.__enter__()
        self.stack.append(cm)

    def post(self, *_args, **_kwargs) -> None:
        if self.stack:
            self.stack.pop().__exit__(None, None, None)


@contextlib.contextmanager
def instrument(model: torch.nn.Module) -> Iterator[None]:
    """Put ``forward``, ``attention`` and ``lm_head`` ranges on ``model`` (a :class:`dinfill.models.Decoder`).

    A forward that writes every column of a static cache (the diffusion dual cache's full recompute) is
    labelled ``cache refresh`` instead of ``forward``. The hooks only open ranges while :func:`profiling`
    is on; they are removed when the block exits. Inside a captured CUDA graph they fire once, at capture.
    """
    targets = [("forward", model)]
    targets += [("attention", m) for name, m in model.named_modules() if name.endswith("self_attn")]
    if hasattr(model, "lm_head"):
        targets.append(("lm_head", model.lm_head))
    handles = []
    try:
        for name, module in targets:
            ranges = _Ranges(name, refresh=module is model)
            handles.append(module.register_forward_pre_hook(ranges.pre, with_kwargs=True))
            handles.append(module.register_forward_hook(ranges.post))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def torch_profile(directory: str | os.PathLike, label: str, device: torch.device | str = "cpu") -> Iterator[None]:
    """Record a torch.profiler trace of the block into ``directory/<label>.json`` (Chrome / Perfetto format).

    Also writes ``<label>.txt``, the profiler's table of the 30 most expensive ops, and switches the
    :func:`region` labels on so the named ranges appear in the trace.
    """
    from torch.profiler import ProfilerActivity, profile

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU]
    if torch.device(device).type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
    sort_key = "cuda_time_total" if ProfilerActivity.CUDA in activities else "cpu_time_total"
    with profile(activities=activities, record_shapes=True) as prof, profiling(record=True):
        yield
    prof.export_chrome_trace(str(out / f"{safe}.json"))
    (out / f"{safe}.txt").write_text(prof.key_averages().table(sort_by=sort_key, row_limit=30), encoding="utf-8")
