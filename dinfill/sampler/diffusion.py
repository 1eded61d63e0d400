"""Masked-diffusion sampling for Open-dCoder: the published algorithms, exact, on a fast step loop.

What the reference loop (Open-dLLM ``_mdm_sample``) spends its time on, and what this module does instead:

- a full forward over the whole canvas every step -> ``cache="dual"`` keeps the prefix and suffix keys and
  values and recomputes only a window of columns (the middle plus the column before it, whose hidden state
  predicts the first middle token), refreshing the whole cache every ``refresh`` steps;
- logits for every column -> logits only for the *variable* rows (columns that were masks at the start),
  taken through the logit shift (row at column ``j`` reads the hidden state of ``j - 1``);
- ~20 passes over ``[N, V]`` in torch ops plus host syncs -> one :func:`dinfill.kernels.fused_step` call
  that samples, scores, selects and writes the canvas in place;
- a Python loop that syncs every step -> a loop with static shapes and no host sync: the variable rows form
  a fixed ``(B, M)`` layout, the per-step fraction is read from a device table by a device step counter,
  and on CUDA the forward and the sampling of a step are replayed as captured CUDA graphs. (This holds on
  the Triton path, the CUDA default. The torch path of ``fused_step``, used on the CPU or with
  ``DINFILL_BACKEND=torch``, reads a few values on the host each step and runs without graphs.)

Exactness: with ``cache="none"``, an fp32 model and deterministic settings, the tokens equal the reference
loop's (tested against a plain loop on transformers' own model). ``cache="dual"`` with ``refresh=1`` runs a
full forward every step and equals ``"none"``; larger ``refresh`` is an approximation whose agreement the
benchmark reports.

Design choices worth knowing:

- Rows finish independently and a finished row is never touched again (every selection rule is a no-op on
  a row without masks, and p2's re-mask count only shrinks), so steps after a row is done cannot change it.
- Early stop without stalling the GPU: the host reads the "masks left" flag of step ``i - lag`` (copied to
  pinned memory, awaited through an event; :class:`~dinfill.sampler.graphs.LaggedFlag`) before launching
  step ``i``. The device queue stays ``lag`` steps deep, and at most ``lag - 1`` no-op steps run after the
  batch is done. On the CPU the flag is read every step (there is no queue to drain).
- ``threshold`` / ``factor`` (Fast-dLLM parallel decoding) use ``steps`` as a budget: the last step
  reveals every mask left, like the last step of every other algorithm.
- Nothing is suppressed (as in the reference): a model may predict the mask id itself, and such a position
  stays a mask; with trained weights this does not happen, with random tied-embedding ones it does.
- Logits are computed for all ``M`` variable rows every step (static shapes, no compaction sync), also for
  the maskgit family whose revealed rows no longer need them; the fused step ignores those rows.
- Ties between equal confidences go to the lowest canvas column (the fused step's rule); the reference's
  ``torch.topk`` order among ties is unspecified.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from dinfill.backend import use_triton
from dinfill.models.loading import require_mask_token
from dinfill.sampler.canvas import (
    BOUNDARY_WINDOW,
    BoundaryRow,
    boundary_row,
    build_row,
    end_token_ids,
    layout_rows,
    middle_lengths,
    search_lengths,
    text_problems,
    tokenize_rows,
    trim_at_end,
)
from dinfill.sampler.graphs import (
    CaptureMeter,
    Graph,
    LaggedFlag,
    bucket_batch,
    bucket_length,
    bucket_rows,
    bucket_steps,
    graph_pool,
    model_key,
    side_stream,
    tensor_bytes,
)
from dinfill.sampler.settings import check_option

__all__ = [
    "ALGORITHMS",
    "CACHE_MODES",
    "DiffusionStats",
    "diffusion_generate",
    "infill",
    "step_fractions",
    "benchmark",
    "boundary_scores",
    "graph_bucket",
]

# alg -> (fused_step selection rule, confidence measure); see docs/sampler-semantics.md
ALGORITHMS: dict[str, tuple[str, str]] = {
    "origin": ("bernoulli", "prob"),
    "maskgit_plus": ("topk", "prob"),
    "topk_margin": ("topk", "margin"),
    "entropy": ("topk", "neg_entropy"),
    "p2": ("p2", "prob"),
    "threshold": ("threshold", "prob"),
    "factor": ("factor", "prob"),
}
CACHE_MODES = ("none", "dual")
_BUDGET_ALGS = ("threshold", "factor")  # steps is a budget; the last step reveals everything left


@dataclass
class DiffusionStats:
    """What one :func:`diffusion_generate` call did (returned with ``return_stats=True``).

    ``revealed_per_step`` is the net number of masks that disappeared from the batch at each step run
    (p2 can re-mask, so a step's count is net). Times are measured with CUDA events on the GPU (no sync in
    the loop; read once at the end) and ``time.perf_counter`` on the CPU.
    """

    alg: str
    cache: str
    refresh: int
    steps: int
    steps_run: int = 0
    forward_passes: int = 0
    full_forwards: int = 0
    window_forwards: int = 0
    batch_size: int = 0
    canvas_len: int = 0
    variable_rows: int = 0  # M: the static number of logit rows per sequence
    window: tuple[int, int] = (0, 0)  # columns recomputed by a dual-cache step
    tokens_forwarded: int = 0  # sum over forwards of batch * columns (for FLOP estimates)
    revealed_per_step: list[int] = field(default_factory=list)
    masks_left: int = 0
    time_model_s: float = 0.0
    time_sampling_s: float = 0.0
    time_total_s: float = 0.0
    cuda_graph: bool = False
    graph_captured: bool = False  # this call built its bucket's graphs (False: replayed pooled ones, or no graphs)
    graph_bucket: tuple[int, int, int, int] | None = None  # (batch, canvas, rows, window) padded shape, or None
    backend: str = "torch"
    history: list[Tensor] | None = None
    # length="search": holes (input index of each hole of this call), candidates (lengths), rows_per_hole, chosen
    # (length per hole), scores and middles (token ids, per hole and candidate) and scoring_forwards (its one extra
    # forward, also counted in forward_passes)
    length_search: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON records (without the history)."""
        d = asdict(self)
        d.pop("history")
        d["window"] = list(self.window)
        d["graph_bucket"] = list(self.graph_bucket) if self.graph_bucket is not None else None
        return d


def step_fractions(alg: str, steps: int, eps: float, device: torch.device | str = "cpu") -> Tensor:
    """Per-step fraction table ``(steps,)`` fp32, computed exactly as the reference does.

    ``maskgit_plus`` / ``topk_margin`` / ``entropy`` / ``origin`` (and the budgeted ``threshold`` / ``factor``,
    for their forced last step): ``1 - s / t`` from ``ts = linspace(1, eps, steps + 1)`` in fp32 tensor
    arithmetic, with 1 at the last step. ``p2``: ``1 - kappa`` with ``kappa = (i + 1) / steps`` computed in
    Python (double) and rounded once to fp32, which is what multiplying an fp32 tensor by a Python float does.
    """
    if alg == "p2":
        return torch.tensor([1.0 - (i + 1) / steps for i in range(steps)], dtype=torch.float32, device=device)
    ts = torch.linspace(1, eps, steps + 1, dtype=torch.float32, device=device)  # (steps + 1,)
    frac = 1 - ts[1:] / ts[:-1]  # (steps,) fp32, elementwise like the reference's scalar ops
    frac[-1] = 1.0
    return frac


# --------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------


def _check_model(model) -> None:
    kind = getattr(model, "kind", None)
    if kind != "diffusion":
        raise ValueError(
            f"diffusion sampling needs a diffusion model (model.kind == 'diffusion'), got kind={kind!r}; "
            "load it with dinfill.load_model(..., kind='diffusion') or use ar_generate for an AR model"
        )


def _check_options(*, mask_id: int, vocab: int, **options: Any) -> None:
    """The mask id against the vocabulary; every other option with the check of
    :class:`~dinfill.sampler.settings.SamplerSettings`
    (tensor temperature / top-p / top-k values are checked by shape in :func:`_check_value_tensor`)."""
    if isinstance(mask_id, bool) or not isinstance(mask_id, int):
        raise TypeError(f"mask_id must be an int token id, got {mask_id!r} (tokenizer.mask_token_id)")
    if not 0 <= mask_id < vocab:
        raise ValueError(
            f"mask_id={mask_id} is outside the model's vocabulary [0, {vocab}); the tokenizer's mask token must be "
            "an id the model embeds (dinfill.load_tokenizer(..., add_mask_token=True) adds one)"
        )
    for name, value in options.items():
        if not isinstance(value, Tensor):
            check_option(name, value)


def _prepare_canvas(model, input_ids, attention_mask, lengths, mask_id) -> tuple[Tensor, Tensor]:
    """Validate the canvas and return ``(x int64 (B, L), key mask bool (B, L))`` on the model device."""
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.numel() == 0:
        raise ValueError("input_ids must be a non-empty 2-D (batch, length) tensor of token ids")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must hold int64 or int32 token ids, got {input_ids.dtype}")
    dev = model.device
    B, L = input_ids.shape
    limit = model.config.max_position_embeddings
    if L > limit:
        raise ValueError(
            f"canvas of {L} columns exceeds the model's limit of {limit} positions; keep its last {limit} tokens "
            "(dinfill.sampler.diffusion.infill truncates the prefix for you)"
        )
    x = input_ids.to(dev, torch.int64).clone()  # (B, L) updated in place by the sampler
    if attention_mask is not None and lengths is not None:
        raise ValueError("pass attention_mask= or lengths=, not both")
    if lengths is not None:
        lengths = torch.as_tensor(lengths, device=dev).long().reshape(-1)
        if lengths.shape != (B,):
            raise ValueError(f"lengths must have one entry per row ({B}), got shape {tuple(lengths.shape)}")
        am = torch.arange(L, device=dev).unsqueeze(0) < lengths.unsqueeze(1)  # (B, L) right padding
    elif attention_mask is not None:
        if tuple(attention_mask.shape) != (B, L):
            raise ValueError(f"attention_mask must have shape ({B}, {L}), got {tuple(attention_mask.shape)}")
        am = attention_mask.to(dev).bool()
    else:
        am = torch.ones(B, L, dtype=torch.bool, device=dev)
    real = am.sum(1)  # (B,)
    runs = (am[:, 1:] & ~am[:, :-1]).sum(1) + am[:, 0].long()  # (B,) starts of runs of ones
    if bool((real == 0).any()) or bool((runs != 1).any()):
        raise ValueError(
            "attention_mask must hold exactly one contiguous run of ones per row (left and/or right padding only)"
        )
    vocab = model.config.vocab_size
    ids = x[am]
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(
            f"input_ids hold token ids outside the model's vocabulary [0, {vocab}): "
            f"min {int(ids.min())}, max {int(ids.max())}; was the canvas built with another tokenizer?"
        )
    if not bool((ids == mask_id).any()):
        raise ValueError(
            f"the canvas holds no mask token (id {mask_id}) among its real tokens: nothing to generate; put "
            "[MASK] * m where the middle goes (or check mask_id)"
        )
    return x, am


def _variable_layout(x: Tensor, am: Tensor, mask_id: int) -> tuple[Tensor, Tensor]:
    """Static ``(B, Mb)`` map of variable columns (masks at the start), ``-1`` padded, and their hidden index.

    ``Mb`` is the row bucket of the largest count ``M`` (:func:`~dinfill.sampler.graphs.bucket_rows`), on every
    path, so that logits row ``b * Mb + m`` (which keys its random stream) is the same whether or not a call
    is later padded into a CUDA-graph bucket. The hidden index applies the logit shift: the row at column
    ``j`` reads the hidden state of ``j - 1``, or its own when ``j`` is the row's first real column.
    Returns ``(positions, hidden)``.
    """
    B, L = x.shape
    var = (x == mask_id) & am  # (B, L)
    n_var = var.sum(1)  # (B,)
    Mb = bucket_rows(int(n_var.max()))
    cols = torch.arange(L, device=x.device).unsqueeze(0).expand(B, L)  # (B, L)
    order = torch.where(var, cols, cols + L).argsort(dim=1)[:, :Mb]  # (B, <=Mb) variable columns first, ascending
    if order.shape[1] < Mb:  # a canvas narrower than the row bucket
        order = torch.cat([order, order.new_zeros(B, Mb - order.shape[1])], dim=1)
    valid = torch.arange(Mb, device=x.device).unsqueeze(0) < n_var.unsqueeze(1)  # (B, Mb)
    positions = torch.where(valid, order, -1)  # (B, Mb)
    first_real = am.to(torch.int8).argmax(dim=1, keepdim=True)  # (B, 1)
    hidden = torch.maximum(order - 1, first_real)  # (B, Mb); always >= (first variable column - 1)
    lowest = hidden[valid].min()  # padding rows read a column inside every window (their logits are ignored)
    hidden = torch.where(valid, hidden, lowest)
    return positions.contiguous(), hidden.contiguous()


def _window(positions: Tensor, hidden: Tensor, cache: str) -> tuple[int, int]:
    """``(lo, W)``: the columns ``[lo, lo + W)`` a dual-cache step recomputes (``W = 0`` without the cache).

    From the column before the first variable one over the span to the last variable column, rounded up to a
    row bucket on every path, so that a call padded into a graph bucket recomputes exactly the real columns
    the unpadded call does. Two host reads, once per call.
    """
    lo, hi = int(hidden.min()), int(positions.max()) + 1
    return lo, bucket_rows(hi - lo) if cache == "dual" else 0


# --------------------------------------------------------------------------------------------------
# instrumentation: NVTX ranges and a model/sampling timer without host syncs
# --------------------------------------------------------------------------------------------------


class _Ranges:
    """NVTX ranges (for Nsight Systems) when asked; a no-op otherwise."""

    def __init__(self, enabled: bool, device: torch.device):
        self._push = self._pop = None
        if not enabled:
            return
        try:
            import nvtx as _nvtx

            self._push, self._pop = (
                (lambda name: _nvtx.push_range(name, domain="dinfill")),
                (lambda: _nvtx.pop_range(domain="dinfill")),
            )
        except ImportError:
            if device.type != "cuda":
                raise RuntimeError("nvtx=True needs the `nvtx` package (pip install nvtx) or a CUDA device") from None
            self._push, self._pop = torch.cuda.nvtx.range_push, torch.cuda.nvtx.range_pop

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self._push is None:
            yield
            return
        self._push(name)
        try:
            yield
        finally:
            self._pop()


class _Timer:
    """Accumulates time per phase: CUDA events on the GPU (resolved once at the end), perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.totals: dict[str, float] = {}
        self._events: list[tuple[str, Any, Any]] = []

    @contextlib.contextmanager
    def __call__(self, phase: str):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((phase, start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.totals[phase] = self.totals.get(phase, 0.0) + time.perf_counter() - t0

    def resolve(self) -> dict[str, float]:
        """Seconds per phase (synchronises once on CUDA)."""
        if self._events:
            self._events[-1][2].synchronize()
            for phase, start, end in self._events:
                self.totals[phase] = self.totals.get(phase, 0.0) + start.elapsed_time(end) / 1e3
            self._events.clear()
        return self.totals


# --------------------------------------------------------------------------------------------------
# the step machinery
# --------------------------------------------------------------------------------------------------


def _fused_step_fn() -> Callable[..., Tensor]:
    from dinfill.kernels import fused_step

    return fused_step


@dataclass(frozen=True)
class _SamplingSpec:
    """The sampling settings that change the captured code (part of a graph bucket's key).

    Their values (temperature, top-p, top-k, the seed) are loaded into device tensors per call instead.
    ``threshold``, ``factor`` and ``alg_temp`` are Python floats of :func:`fused_step` and therefore keyed.
    """

    sampled: bool
    top_p: bool
    top_k: bool
    needs_rng: bool
    threshold: float
    factor: float
    alg_temp: float


class _StepRunner:
    """Static buffers of one shape plus the two halves of a step: ``forward(kind)`` and ``sample(kind)``.

    Both halves only read and write tensors allocated here, so on CUDA each is captured once as a graph and
    replayed, across calls: :meth:`load` copies a call's canvas, layout, schedule and sampling values into
    the buffers (padding the call up to the buffers' shape). The eager path runs the same methods on buffers
    of the call's exact shape. ``kind`` is ``"plain"`` (no cache), ``"full"`` (full forward that rewrites the
    dual cache) or ``"window"`` (only the ``W`` window columns against the cached keys/values).
    """

    def __init__(self, model, B, L, M, W, *, dual, steps_cap, mask_id, select, confidence, spec: _SamplingSpec):
        dev = model.device
        as_long = dict(dtype=torch.long, device=dev)
        self._model = weakref.ref(model)  # the pool must not keep a model alive (its death frees the entry)
        self.mask_id, self.select, self.confidence = mask_id, select, confidence
        self.shape = (B, L, M, W)
        self.x = torch.zeros(B, L, **as_long)  # (B, L) the canvas, updated in place by the sampler
        self.am = torch.zeros(B, L, dtype=torch.bool, device=dev)  # (B, L) real key columns
        self.pos_ids = torch.zeros(B, L, **as_long)  # (B, L) real RoPE positions per row
        self.positions = torch.full((B, M), -1, **as_long)  # (B, M) variable columns, -1 = padding row
        self.hidden = torch.zeros(B, M, **as_long)  # (B, M) hidden column each row reads (logit shift)
        self.valid = torch.zeros(B, M, dtype=torch.bool, device=dev)
        self.gather_cols = torch.zeros(B, M, **as_long)
        self.hidden_win = torch.zeros(B, M, **as_long)  # (B, M) the same index inside the window
        self.cols_full = torch.arange(L, device=dev)  # (L,)
        self.cols_win = torch.arange(W, device=dev)  # (W,) window columns lo + arange(W), loaded per call
        self.fractions = torch.zeros(steps_cap, dtype=torch.float32, device=dev)  # per-step schedule table
        self.step_idx = torch.zeros(1, **as_long)  # device step counter
        self.left_hist = torch.zeros(steps_cap, **as_long)  # masks left after step i
        self.alive = torch.ones((), dtype=torch.bool, device=dev)
        rows = B * M
        self.sampling: dict[str, Any] = {
            "temperature": torch.zeros(rows, dtype=torch.float32, device=dev) if spec.sampled else 0.0,
            "top_p": torch.ones(rows, dtype=torch.float32, device=dev) if spec.top_p else None,
            "top_k": torch.zeros(rows, **as_long) if spec.top_k else None,
            "threshold": spec.threshold,
            "factor": spec.factor,
            "alg_temp": spec.alg_temp,
        }
        if spec.needs_rng:  # a Philox key and a stream offset that every step advances on the device
            self.sampling.update(seed=torch.zeros(1, **as_long), offset=torch.zeros(1, **as_long))
        self.cache = model.new_cache(B, L) if dual else None
        self.logits: dict[str, Tensor] = {}
        self.graphs: dict[str, tuple[Graph, Graph]] | None = None
        self._fused_step = _fused_step_fn()

    @property
    def model(self):
        return self._model()

    def buffers(self) -> list[Tensor]:
        """Every static tensor (for the memory report)."""
        out = [v for v in vars(self).values() if isinstance(v, Tensor)]
        out += [t for t in self.sampling.values() if isinstance(t, Tensor)]
        if self.cache is not None:
            out += self.cache.k + self.cache.v
        return out

    def load(self, x, am, positions, hidden, lo: int, fractions: Tensor, values: dict[str, Any]) -> None:
        """Copy one call into the buffers: real rows and columns first, padding after.

        Padding columns are masked keys holding token 0; padding batch rows are copies of row 0 (so every
        row stays well formed) with no variable rows, so nothing in them is ever written or counted.
        """
        B, L = x.shape
        Bb, Lb, Mb, W = self.shape
        self.x[:B, :L].copy_(x)
        self.x[:B, L:].zero_()
        self.am[:B, :L].copy_(am)
        self.am[:B, L:] = False
        if Bb > B:
            self.x[B:].copy_(self.x[:1].expand(Bb - B, Lb))
            self.am[B:].copy_(self.am[:1].expand(Bb - B, Lb))
        self.pos_ids.copy_((self.am.long().cumsum(1) - 1).clamp(min=0))
        self.positions.fill_(-1)
        self.positions[:B].copy_(positions)
        self.hidden.fill_(lo)
        self.hidden[:B].copy_(hidden)
        self.valid.copy_(self.positions >= 0)
        self.gather_cols.copy_(self.positions.clamp(min=0))
        self.hidden_win.copy_(self.hidden - lo)
        self.cols_win.copy_(torch.arange(lo, lo + W, device=x.device))
        self.fractions.zero_()
        self.fractions[: fractions.shape[0]].copy_(fractions)
        self.step_idx.zero_()
        self.left_hist.zero_()
        self.alive.fill_(True)
        for name in ("temperature", "top_p", "top_k"):
            buf = self.sampling[name]
            if isinstance(buf, Tensor):
                value = values[name]
                per_row = buf.view(Bb, Mb)
                per_row.fill_(0 if name != "top_p" else 1)  # padding rows: greedy, unfiltered
                if isinstance(value, Tensor) and value.dim() == 1:  # (B,) one value per sequence
                    per_row[:B].copy_(value.to(buf.dtype).view(B, 1).expand(B, Mb))
                else:
                    per_row[:B].fill_(value)
        if "seed" in self.sampling:
            self.sampling["seed"].copy_(values["seed"])
            self.sampling["offset"].zero_()

    def forward(self, kind: str) -> None:
        m = self.model
        if kind == "plain":
            out = m(self.x, causal=False, attention_mask=self.am, position_ids=self.pos_ids, logits_index=self.hidden)
        elif kind == "full":
            out = m(
                self.x, causal=False, attention_mask=self.am, position_ids=self.pos_ids, cache=self.cache,
                cache_pos=self.cols_full, logits_index=self.hidden,
            )  # fmt: skip
        else:  # the window's columns come from a device tensor, so one graph serves every window start
            out = m(
                self.x.index_select(1, self.cols_win), causal=False, attention_mask=self.am,
                position_ids=self.pos_ids.index_select(1, self.cols_win), cache=self.cache, cache_pos=self.cols_win,
                logits_index=self.hidden_win,
            )  # fmt: skip
        self.logits[kind] = out  # (B, M, V) in the model dtype

    def sample(self, kind: str, final: bool = False) -> None:
        select = "topk" if final else self.select
        frac = None  # threshold / factor decide from the confidences alone
        if select in ("topk", "p2", "bernoulli"):
            frac = self.fractions.index_select(0, self.step_idx).reshape(())  # 0-dim fp32, read on the device
        self._fused_step(
            self.logits[kind], self.x, self.positions, mask_id=self.mask_id, select=select,
            confidence=self.confidence, fraction=frac, **self.sampling,
        )  # fmt: skip
        if "offset" in self.sampling:
            self.sampling["offset"].add_(1)  # a fresh Philox stream for the next step (captured with the step)
        left = ((self.x.gather(1, self.gather_cols) == self.mask_id) & self.valid).sum()  # masks left in the batch
        self.left_hist.index_copy_(0, self.step_idx, left.reshape(1))
        self.alive.copy_(left > 0)
        self.step_idx.add_(1)

    # ---- CUDA graphs -----------------------------------------------------------------------------

    def _mutable(self) -> list[Tensor]:
        state = [self.x, self.step_idx, self.left_hist, self.alive]
        return state + [t for t in self.sampling.values() if isinstance(t, Tensor)]

    def capture(self, kinds: Sequence[str], emulate: bool = False) -> int:
        """Warm up (on a side stream on CUDA), capture ``forward``/``sample`` per kind, restore the state.

        Needs a loaded call (the warm-up runs real steps on it). ``emulate=True`` runs the same bookkeeping
        without CUDA: the "graphs" call the methods on replay. Returns the number of graphs.
        """
        saved = [t.clone() for t in self._mutable()]
        with side_stream(emulate):
            for kind in kinds:
                for _ in range(2):  # the first call may compile / allocate; the second runs like a replay
                    self.forward(kind)
                    self.step_idx.zero_()  # keep the step counter inside the schedule table
                    self.sample(kind)
        pool = None if emulate else torch.cuda.graph_pool_handle()  # the bucket's graphs share one memory pool
        graphs = {}
        for kind in kinds:
            # the forward graph's output (self.logits[kind]) lives in the pool; the sample graph reads it
            g_fwd = Graph(lambda kind=kind: self.forward(kind), emulate=emulate, pool=pool)
            g_smp = Graph(lambda kind=kind: self.sample(kind), emulate=emulate, pool=pool)
            graphs[kind] = (g_fwd, g_smp)
        for t, s in zip(self._mutable(), saved, strict=True):
            t.copy_(s)
        self.graphs = graphs
        return 2 * len(kinds)


def _resolve_rng(generator, seed, device: torch.device, needs_rng: bool) -> Tensor | None:
    """The ``(1,)`` int64 Philox key of a call, drawn on the device (no sync) from the generator or seed.

    Every path (eager, emulated, CUDA graphs) samples from this key plus a step offset, so the same seed gives
    the same tokens on all of them, and a logits row's stream depends only on its row index.
    """
    if generator is not None and seed is not None:
        raise ValueError("pass generator= or seed=, not both")
    if generator is not None and torch.device(generator.device).type != device.type:
        raise ValueError(
            f"generator lives on {generator.device} but the model on {device}: create it with "
            f"torch.Generator(device={str(device)!r})"
        )
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(int(seed))
    if not needs_rng:
        return None
    return torch.randint(0, 2**62, (1,), generator=generator, device=device)  # (1,) int64, stays on the device


def _check_value_tensor(name: str, value: Any, B: int, device: torch.device) -> None:
    """A tensor-valued temperature / top-p / top-k is 0-dim or one value per sequence ``(B,)``."""
    if isinstance(value, Tensor) and (value.dim() > 1 or (value.dim() == 1 and value.shape[0] != B)):
        raise ValueError(
            f"{name} tensor has shape {tuple(value.shape)}; pass a float, a 0-dim tensor or one value per "
            f"sequence ({B},)"
        )
    if isinstance(value, Tensor) and value.device != device:
        raise ValueError(f"{name} is on {value.device} but the model on {device}; move it to {device}")


@torch.no_grad()
def diffusion_generate(
    model,
    input_ids: Tensor,
    *,
    mask_id: int,
    steps: int = 64,
    alg: str = "p2",
    temperature: float | Tensor = 0.0,
    top_p: float | Tensor | None = None,
    top_k: int | Tensor | None = None,
    alg_temp: float = 0.0,
    eps: float = 1e-3,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    cache: str = "none",
    refresh: int = 8,
    threshold: float = 0.9,
    factor: float = 1.0,
    attention_mask: Tensor | None = None,
    lengths: Tensor | Sequence[int] | None = None,
    cuda_graph: bool | str = True,
    nvtx: bool = False,
    early_stop_lag: int = 4,
    history: bool = False,
    return_stats: bool = False,
) -> Tensor | tuple[Tensor, DiffusionStats]:
    """Fill every mask of a canvas with a masked-diffusion LM (contract).

    Parameters
    ----------
    model
        A dinfill model with ``model.kind == "diffusion"`` (``dinfill.load_model(..., kind="diffusion")``).
    input_ids : Tensor
        ``(B, L)`` int64/int32 canvas; every ``mask_id`` among the real tokens is a position to generate.
    mask_id : int
        The mask token id (``tokenizer.mask_token_id``); must lie inside the model's vocabulary.
    steps : int
        Diffusion steps (>= 1). For ``threshold`` / ``factor`` the step budget.
    alg : str
        ``origin``, ``maskgit_plus``, ``topk_margin``, ``entropy``, ``p2`` (the reference algorithms) or
        ``threshold`` / ``factor`` (Fast-dLLM parallel decoding); see docs/sampler-semantics.md.
    temperature, top_p, top_k : float or Tensor
        Token sampling: ``temperature == 0`` is greedy; top-p then top-k filtering. Scalars, 0-dim tensors
        or one value per sequence ``(B,)`` (a tensor temperature always samples; its zero rows are greedy).
    alg_temp : float
        Gumbel noise on the top-k selection keys (``maskgit_plus`` family); 0 = deterministic. Ignored by the
        other algorithms, as in the reference.
    eps : float
        End of the time schedule ``linspace(1, eps, steps + 1)``.
    generator, seed
        Randomness for sampling, ``origin``'s reveal draws and ``alg_temp``: a ``torch.Generator`` on the model
        device, or a seed to make one (one Philox key is drawn from it per call). Same seed, same inputs ->
        same tokens, with or without CUDA graphs.
    cache : str
        ``"none"`` (exact) or ``"dual"`` (prefix/suffix K/V cached, only a window of columns recomputed).
    refresh : int
        Dual cache: steps between full forwards that rewrite the cache (1 = every step = exact).
    threshold, factor : float
        Parameters of ``alg="threshold"`` (confidence >= tau) and ``alg="factor"``.
    attention_mask, lengths
        Padded batches: a ``(B, L)`` key mask (one contiguous run of ones per row) or per-row real lengths
        (right padding). Padding is never attended to and never generated.
    cuda_graph : bool or "emulate"
        On CUDA with the Triton fused step, replay each step's forward and sampling as CUDA graphs kept in
        the process-wide pool of :mod:`dinfill.sampler.graphs`: the call is padded up to its shape bucket and
        the first call of a bucket captures (ignored elsewhere). ``"emulate"`` runs the same pool, padding,
        warm-up, capture bookkeeping and replay loop with plain calls instead of graphs, on any device (for
        tests).
    nvtx : bool
        Emit NVTX ranges ``step`` / ``forward`` / ``fused step`` for Nsight Systems.
    early_stop_lag : int
        On CUDA, how many steps the host may run ahead of the "masks left" flag (>= 1).
    history : bool
        Keep a copy of the canvas after every step (in ``stats.history``; debugging, costs memory).
    return_stats : bool
        Also return a :class:`DiffusionStats`.

    Returns
    -------
    Tensor or (Tensor, DiffusionStats)
        The finished canvas, same shape, dtype and device as ``input_ids``.
    """
    t_start = time.perf_counter()
    _check_model(model)
    vocab = model.config.vocab_size
    _check_options(
        mask_id=mask_id, steps=steps, alg=alg, temperature=temperature, top_p=top_p, top_k=top_k, alg_temp=alg_temp,
        eps=eps, cache=cache, refresh=refresh, threshold=threshold, factor=factor, vocab=vocab,
    )  # fmt: skip
    if isinstance(early_stop_lag, bool) or not isinstance(early_stop_lag, int) or early_stop_lag < 1:
        raise ValueError(f"early_stop_lag must be an int >= 1, got {early_stop_lag!r}")
    if cuda_graph not in (True, False, "emulate"):
        raise ValueError(f"cuda_graph must be True, False or 'emulate', got {cuda_graph!r}")
    x, am = _prepare_canvas(model, input_ids, attention_mask, lengths, mask_id)
    dev = x.device
    B, L = x.shape
    for name, value in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k)):
        _check_value_tensor(name, value, B, dev)
    positions, hidden = _variable_layout(x, am, mask_id)  # (B, Mb) each
    Mb = positions.shape[1]
    select, confidence = ALGORITHMS[alg]
    lo, W = _window(positions, hidden, cache)  # the dual-cache window
    backend = "triton" if use_triton(dev) else "torch"
    # graphs need the Triton fused step: the torch path reads seeds and indexes with masks on the host
    emulate = cuda_graph == "emulate"
    use_graphs = emulate or (cuda_graph is True and dev.type == "cuda" and backend == "triton")
    sampled = isinstance(temperature, Tensor) or temperature > 0
    spec = _SamplingSpec(
        sampled=sampled,
        top_p=isinstance(top_p, Tensor) or (top_p is not None and top_p < 1),
        top_k=isinstance(top_k, Tensor) or top_k is not None,
        needs_rng=sampled or alg == "origin" or (alg_temp > 0 and select == "topk"),
        threshold=float(threshold),
        factor=float(factor),
        alg_temp=float(alg_temp) if select == "topk" else 0.0,
    )
    values = {"temperature": temperature, "top_p": top_p, "top_k": top_k,
              "seed": _resolve_rng(generator, seed, dev, spec.needs_rng)}  # fmt: skip
    steps_cap = bucket_steps(steps)
    kinds = ["plain"] if cache == "none" else ["full", "window"]
    limit = model.config.max_position_embeddings
    fractions = step_fractions(alg, steps, eps, dev)
    captured, bucket = False, None
    if use_graphs:
        bucket = _graph_shape(B, L, Mb, lo, W, limit)
        Bb, Lb, _, Wb = bucket
        # buffers made under a caller's inference_mode are inference tensors that cannot be updated outside it
        key = ("diffusion", "emulate" if emulate else "cuda", model_key(model), bucket, cache, steps_cap, select,
               confidence, mask_id, spec, torch.is_inference_mode_enabled())  # fmt: skip
        pool = graph_pool()
        runner = pool.lookup(model, key)
        if runner is None:
            meter = CaptureMeter(dev)
            runner = _StepRunner(model, Bb, Lb, Mb, Wb, dual=cache == "dual", steps_cap=steps_cap, mask_id=mask_id,
                                 select=select, confidence=confidence, spec=spec)  # fmt: skip
            runner.load(x, am, positions, hidden, lo, fractions, values)
            n_graphs = runner.capture(kinds, emulate=emulate)
            seconds, reserved = meter.done()
            static = tensor_bytes(runner.buffers())
            pool.insert(model, key, runner, static_bytes=static, graph_bytes=None if reserved is None else
                        max(0, reserved - static), graphs=n_graphs, capture_s=seconds, kind="diffusion",
                        bucket=bucket)  # fmt: skip
            captured = True
        else:
            runner.load(x, am, positions, hidden, lo, fractions, values)
    else:
        runner = _StepRunner(model, B, L, Mb, min(W, L - lo), dual=cache == "dual", steps_cap=steps_cap,
                             mask_id=mask_id, select=select, confidence=confidence, spec=spec)  # fmt: skip
        runner.load(x, am, positions, hidden, lo, fractions, values)
    graphs = runner.graphs if use_graphs else None
    W_real = min(W, L - lo)
    stats = DiffusionStats(
        alg=alg, cache=cache, refresh=refresh if cache == "dual" else 1, steps=steps, batch_size=B, canvas_len=L,
        variable_rows=Mb, window=(lo, lo + W_real) if cache == "dual" else (0, L),
        cuda_graph=use_graphs and not emulate, graph_captured=captured, graph_bucket=bucket,
    )  # fmt: skip
    stats.backend = backend
    ranges, timer = _Ranges(nvtx, dev), _Timer(dev)
    snapshots: list[Tensor] | None = [] if history else None

    # early stop: lagged flag copies on CUDA (no pipeline drain), a direct read on the CPU
    alive = LaggedFlag(runner.alive, early_stop_lag, steps, stop_on=False)
    for i in range(steps):
        if alive.should_stop():
            break
        kind = "plain" if cache == "none" else ("full" if i % refresh == 0 else "window")
        final = alg in _BUDGET_ALGS and i == steps - 1
        with ranges("step"):
            with ranges("forward"), timer("model"):
                if graphs is not None:
                    graphs[kind][0].replay()
                else:
                    runner.forward(kind)
            with ranges("fused step"), timer("sampling"):
                if graphs is not None and not final:
                    graphs[kind][1].replay()
                else:
                    runner.sample(kind, final=final)
        stats.steps_run += 1
        stats.forward_passes += 1
        stats.full_forwards += kind != "window"
        stats.window_forwards += kind == "window"
        stats.tokens_forwarded += B * (W_real if kind == "window" else L)
        alive.record()
        if snapshots is not None:
            snapshots.append(runner.x[:B, :L].clone())

    times = timer.resolve()
    left = runner.left_hist[: stats.steps_run].tolist()
    n_var = int((positions >= 0).sum())
    stats.revealed_per_step = [a - b for a, b in zip([n_var] + left[:-1], left, strict=True)]
    stats.masks_left = left[-1] if left else n_var
    stats.time_model_s = times.get("model", 0.0)
    stats.time_sampling_s = times.get("sampling", 0.0)
    stats.history = [s.to(input_ids.device) for s in snapshots] if snapshots is not None else None
    out = runner.x[:B, :L].to(device=input_ids.device, dtype=input_ids.dtype, copy=True)
    stats.time_total_s = time.perf_counter() - t_start
    return (out, stats) if return_stats else out


def _graph_shape(B: int, L: int, Mb: int, lo: int, W: int, limit: int) -> tuple[int, int, int, int]:
    """The padded ``(batch, canvas, rows, window)`` of a graph call: the canvas bucket must hold the window."""
    Lb = bucket_length(max(L, lo + W), limit)
    return bucket_batch(B), Lb, Mb, min(W, Lb - lo)


def graph_bucket(
    model,
    input_ids: Tensor,
    *,
    mask_id: int,
    cache: str = "none",
    attention_mask: Tensor | None = None,
) -> tuple[int, int, int, int]:
    """The shape bucket ``(batch, canvas, rows, window)`` a CUDA-graph call of this canvas pads up to.

    Computed on the host without running the model: benchmarks use it to warm up every bucket of a workload
    once before timing (two canvases with one bucket and the same settings share their graphs).
    """
    x = input_ids.detach().cpu().long()
    B, L = x.shape
    am = torch.ones(B, L, dtype=torch.bool) if attention_mask is None else attention_mask.detach().cpu().bool()
    if not bool(((x == mask_id) & am).any()):
        raise ValueError(f"the canvas holds no mask token (id {mask_id}): it has no graph bucket")
    positions, hidden = _variable_layout(x, am, mask_id)  # (B, Mb) each: the layout the call itself builds
    lo, W = _window(positions, hidden, cache)
    return _graph_shape(B, L, positions.shape[1], lo, W, model.config.max_position_embeddings)


# --------------------------------------------------------------------------------------------------
# text level
# --------------------------------------------------------------------------------------------------


def infill(
    model,
    tokenizer,
    prefixes: Sequence[str] | str,
    suffixes: Sequence[str] | str,
    *,
    middles: Sequence[str] | str | None = None,
    length: str = "oracle",
    middle_tokens: int | None = None,
    steps: int = 64,
    alg: str = "p2",
    max_length: int = 2048,
    batch_size: int = 32,
    cache: str = "none",
    mask_id: int | None = None,
    skip_special_tokens: bool = True,
    return_stats: bool = False,
    **options,
) -> list[str] | tuple[list[str], list[DiffusionStats]]:
    """Fill the middle between each prefix and suffix and return the decoded middles (contract).

    The canvas is ``tokenizer(prefix, add_special_tokens=True) + [MASK] * m + tokenizer(suffix,
    add_special_tokens=False)``, kept to its last ``min(max_length, model limit)`` tokens; the middle is sliced
    at its true column after that truncation and decoded with ``skip_special_tokens``.

    Parameters
    ----------
    model, tokenizer
        A diffusion model and its tokenizer (with a mask token: ``dinfill.load_tokenizer(..., add_mask_token=True)``).
    prefixes, suffixes : sequence of str (or one str)
        The code before and after the hole; empty strings are valid.
    middles : sequence of str, optional
        True middles, needed by ``length="oracle"``.
    length : str
        ``"oracle"`` (``m`` = token length of the true middle), ``"fixed"`` (``m = middle_tokens``),
        ``"adaptive"`` (``middle_tokens`` masks, the result cut at the first end token: eos, pad, mask or any
        special token; see :mod:`dinfill.sampler.canvas`) or ``"search"`` (an adaptive canvas for every length
        of :func:`~dinfill.sampler.canvas.search_lengths`, all candidates of a hole decoded in one batch, the one
        kept whose middle gives the context tokens around the hole the highest log-probability; see
        :func:`boundary_scores`). Its cost: the same number of diffusion steps, over ``len(candidates)`` rows per
        hole, plus one scoring forward.
    middle_tokens : int, optional
        Middle length for ``fixed``; maximum for ``adaptive`` and ``search`` (default 64 there).
    steps, alg
        See :func:`diffusion_generate`.
    max_length : int
        Canvas limit in tokens (the reference keeps the last 2048).
    batch_size : int
        Problems per model batch; problems are grouped by canvas length to limit padding (with ``search`` each
        problem brings its candidates: ``batch_size * len(candidates)`` rows per call).
    cache : str
        ``"none"`` or ``"dual"`` (then the batch uses the aligned layout: all middles start at one column).
    mask_id : int, optional
        Overrides ``tokenizer.mask_token_id`` (either is checked by
        :func:`~dinfill.models.loading.require_mask_token`: a trained checkpoint accepts only its own).
    skip_special_tokens : bool
        Passed to ``tokenizer.decode``.
    return_stats : bool
        Also return the :class:`DiffusionStats` of every batch.
    **options
        Everything else :func:`diffusion_generate` accepts (temperature, top_p, top_k, alg_temp, eps,
        generator, seed, refresh, threshold, factor, cuda_graph, nvtx ...).

    Returns
    -------
    list[str] or (list[str], list[DiffusionStats])
        One middle per problem, in input order.
    """
    _check_model(model)
    prefixes, suffixes, middles = text_problems(prefixes, suffixes, middles)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    mask_id = require_mask_token(tokenizer, model, mask_id)
    if length in ("adaptive", "search") and middle_tokens is None:
        middle_tokens = 64  # HumanEval-Infill single-line middles are far shorter; multi-line ones mostly fit
    limit = min(int(max_length), int(model.config.max_position_embeddings))
    lens = middle_lengths(tokenizer, len(prefixes), length=length, middles=middles, middle_tokens=middle_tokens)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad_id = 0 if pad_id is None or pad_id >= model.config.vocab_size else int(pad_id)  # never attended to
    if length == "search":
        texts, all_stats = _search_infill(
            model, tokenizer, prefixes, suffixes, search_lengths(lens[0]) if lens else [], steps=steps, alg=alg,
            limit=limit, batch_size=batch_size, cache=cache, mask_id=mask_id, pad_id=pad_id,
            skip_special_tokens=skip_special_tokens, options=options,
        )  # fmt: skip
        return (texts, all_stats) if return_stats else texts
    rows = tokenize_rows(tokenizer, prefixes, suffixes, lens, mask_id=mask_id, limit=limit)
    ends = end_token_ids(tokenizer, mask_id) if length == "adaptive" else None

    texts = [""] * len(rows)  # an empty oracle middle stays empty
    todo = sorted((i for i, r in enumerate(rows) if r.middle_len > 0), key=lambda i: len(rows[i].ids))
    all_stats: list[DiffusionStats] = []
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        batch = layout_rows(
            [rows[i] for i in chunk], pad_id=pad_id, layout="aligned" if cache == "dual" else "right", limit=limit,
            device=model.device,
        )  # fmt: skip
        out, stats = diffusion_generate(
            model, batch.input_ids, attention_mask=batch.attention_mask, mask_id=mask_id, steps=steps, alg=alg,
            cache=cache, return_stats=True, **options,
        )  # fmt: skip
        all_stats.append(stats)
        for i, mid in zip(chunk, batch.middles(out), strict=True):
            if ends is not None:
                mid = trim_at_end(mid, ends)
            texts[i] = tokenizer.decode(mid, skip_special_tokens=skip_special_tokens)
    return (texts, all_stats) if return_stats else texts


@torch.no_grad()
def boundary_scores(model, rows: Sequence[BoundaryRow], *, pad_id: int, chunk: int = 32) -> list[float]:
    """Mean log-probability of each row's scored tokens, the score ``length="search"`` ranks candidates by.

    Each row is one finished candidate laid out by :func:`~dinfill.sampler.canvas.boundary_row` (the context
    tokens touching the middle masked); the model predicts them in one bidirectional forward through the logit
    shift (column ``j`` reads the output of ``j - 1``; column 0 its own). Rows are right-padded (padding is
    never attended to, so a row scores the same in any batch) and run ``chunk`` at a time: a forward per
    ``chunk`` rows, each reading ``V`` logits for its scored columns only.

    Returns
    -------
    list[float]
        One score per row; ``-inf`` for a row with nothing to score (no prefix and no suffix).
    """
    dev = model.device
    scores: list[float] = []
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        width = max(len(r.ids) for r in part)
        n_cols = max(1, max(len(r.columns) for r in part))
        ids = torch.full((len(part), width), pad_id, dtype=torch.long)  # (R, W)
        am = torch.zeros(len(part), width, dtype=torch.bool)  # (R, W)
        index = torch.zeros(len(part), n_cols, dtype=torch.long)  # (R, N) the output column of each scored one
        target = torch.zeros(len(part), n_cols, dtype=torch.long)  # (R, N)
        valid = torch.zeros(len(part), n_cols, dtype=torch.bool)  # (R, N)
        for r, row in enumerate(part):
            ids[r, : len(row.ids)] = torch.tensor(row.ids, dtype=torch.long)
            am[r, : len(row.ids)] = True
            n = len(row.columns)
            index[r, :n] = torch.tensor([max(c - 1, 0) for c in row.columns], dtype=torch.long)  # the logit shift
            target[r, :n] = torch.tensor(row.targets, dtype=torch.long)
            valid[r, :n] = True
        logits = model(ids.to(dev), causal=False, attention_mask=am.to(dev), logits_index=index.to(dev))  # (R, N, V)
        logp = logits.float().log_softmax(-1).gather(-1, target.to(dev).unsqueeze(-1)).squeeze(-1).cpu()  # (R, N)
        for r, row in enumerate(part):
            n = len(row.columns)
            scores.append(float(logp[r, :n].mean()) if n else float("-inf"))
    return scores


def _search_infill(
    model,
    tokenizer,
    prefixes: list[str],
    suffixes: list[str],
    candidates: list[int],
    *,
    steps: int,
    alg: str,
    limit: int,
    batch_size: int,
    cache: str,
    mask_id: int,
    pad_id: int,
    skip_special_tokens: bool,
    options: dict[str, Any],
) -> tuple[list[str], list[DiffusionStats]]:
    """``length="search"``: decode every candidate length of each hole in one batch, score, keep the best.

    The rule (docs/sampler-semantics.md, "Unknown middle lengths"): each candidate is an adaptive canvas (its
    middle cut at the first end token); its score is :func:`boundary_scores` of its finished middle; a hole
    keeps its highest-scoring candidate with a non-empty middle (all empty: the empty middle), ties going to
    the shorter candidate. Everything is a function of the decoded tokens, so a seed fixes the choice.
    """
    ends = end_token_ids(tokenizer, mask_id)
    p_ids = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prefixes]
    s_ids = [tokenizer(s, add_special_tokens=False)["input_ids"] for s in suffixes]
    k = len(candidates)
    texts = [""] * len(prefixes)
    all_stats: list[DiffusionStats] = []
    todo = sorted(range(len(prefixes)), key=lambda i: len(p_ids[i]) + len(s_ids[i]))
    truncated = 0
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        rows = [build_row(p_ids[i], s_ids[i], n, mask_id, limit) for i in chunk for n in candidates]  # hole-major
        truncated += sum(r.truncated > 0 for r in rows[::k])
        batch = layout_rows(rows, pad_id=pad_id, layout="aligned" if cache == "dual" else "right", limit=limit,
                            device=model.device)  # fmt: skip
        out, stats = diffusion_generate(
            model, batch.input_ids, attention_mask=batch.attention_mask, mask_id=mask_id, steps=steps, alg=alg,
            cache=cache, return_stats=True, **options,
        )  # fmt: skip
        middles = [trim_at_end(m, ends) for m in batch.middles(out)]
        scoring = [
            boundary_row(p_ids[i], middles[h * k + c], s_ids[i], mask_id=mask_id, limit=limit)
            for h, i in enumerate(chunk)
            for c in range(k)
        ]
        scores = boundary_scores(model, scoring, pad_id=pad_id, chunk=len(scoring))
        chosen = []
        for h, i in enumerate(chunk):
            own = list(range(h * k, (h + 1) * k))
            filled = [j for j in own if middles[j]] or own  # a hole is assumed non-empty unless every candidate is
            best = max(filled, key=lambda j: (scores[j], -j))  # ties: the shorter candidate
            chosen.append(candidates[best - h * k])
            texts[i] = tokenizer.decode(middles[best], skip_special_tokens=skip_special_tokens)
        # the scoring forward is part of the cost: counted like any full forward
        stats.forward_passes += 1
        stats.full_forwards += 1
        stats.tokens_forwarded += sum(len(r.ids) for r in scoring)
        stats.length_search = {
            "holes": list(chunk),  # the input index of each hole below (holes run grouped by length)
            "candidates": list(candidates),
            "rows_per_hole": k,
            "chosen": chosen,
            "scores": [scores[h * k : (h + 1) * k] for h in range(len(chunk))],
            "middles": [middles[h * k : (h + 1) * k] for h in range(len(chunk))],
            "scoring_forwards": 1,
            "window": BOUNDARY_WINDOW,
        }
        all_stats.append(stats)
    if truncated:  # said, not silent, as tokenize_rows does for the other modes
        logging.getLogger("dinfill").warning(
            "%d of %d canvas(es) exceed %d tokens: their prefixes lose their first tokens", truncated, len(todo), limit
        )
    return texts, all_stats


# --------------------------------------------------------------------------------------------------
# benchmark: the reference loop against ours, same inputs, same process
# --------------------------------------------------------------------------------------------------


def benchmark(
    model,
    input_ids: Tensor,
    *,
    mask_id: int,
    steps: int = 64,
    alg: str = "p2",
    reference_alg: str | None = None,
    attention_mask: Tensor | None = None,
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
    **options,
) -> dict[str, Any]:
    """Time the plain reference loop and :func:`diffusion_generate` on the same canvas and return the ratio.

    Parameters
    ----------
    model
        A diffusion model.
    input_ids : Tensor
        ``(B, L)`` canvas (see :func:`synthetic_canvas` for HumanEval-Infill-like random ones).
    mask_id, steps, alg
        As in :func:`diffusion_generate`.
    reference_alg : str, optional
        Algorithm of the reference loop; default ``alg`` when the reference has it, else ``maskgit_plus``
        (``threshold`` / ``factor`` exist only here).
    attention_mask : Tensor, optional
        Key mask of a padded batch (given to both loops).
    repeats, warmup : int
        Timed and untimed calls of each side; the median is reported.
    seed : int
        Seed of both loops' randomness (they never share a random stream, so sampled runs differ).
    **options
        Passed to :func:`diffusion_generate` (cache, refresh, threshold, temperature, top_p ...).

    Returns
    -------
    dict
        ``reference_s``, ``ours_s`` (median seconds per call), ``speedup`` (reference / ours), ``tokens_per_s``
        for both (generated middle tokens per second), ``agreement`` (fraction of generated tokens equal
        between the two outputs), ``stats`` (ours, last call) and the configuration.
    """
    from dinfill.sampler.reference_loop import reference_generate

    _check_model(model)
    if reference_alg is None:
        reference_alg = alg if alg in ("origin", "maskgit_plus", "topk_margin", "entropy", "p2") else "maskgit_plus"
    ref_keys = ("temperature", "top_p", "top_k", "alg_temp", "eps")
    ref_options = {k: v for k, v in options.items() if k in ref_keys}
    dev = model.device
    input_ids = input_ids.to(dev)
    am = attention_mask.to(dev) if attention_mask is not None else None
    real = am.bool() if am is not None else torch.ones_like(input_ids, dtype=torch.bool)
    generated = int(((input_ids == mask_id) & real).sum())

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def run_reference() -> Tensor:
        g = torch.Generator(device=dev).manual_seed(seed)
        return reference_generate(
            model, input_ids, mask_id=mask_id, steps=steps, alg=reference_alg, attention_mask=am, generator=g,
            **ref_options,
        )  # fmt: skip

    def run_ours() -> tuple[Tensor, DiffusionStats]:
        return diffusion_generate(
            model, input_ids, mask_id=mask_id, steps=steps, alg=alg, attention_mask=am, seed=seed, return_stats=True,
            **options,
        )  # fmt: skip

    def timed(fn):
        for _ in range(warmup):
            fn()
        times, result = [], None
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            result = fn()
            sync()
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2], result

    ref_s, ref_out = timed(run_reference)
    ours_s, (our_out, stats) = timed(run_ours)
    var = (input_ids == mask_id) & real
    agreement = float((ref_out[var] == our_out[var]).float().mean()) if generated else math.nan
    return {
        "alg": alg,
        "reference_alg": reference_alg,
        "steps": steps,
        "batch_size": int(input_ids.shape[0]),
        "canvas_len": int(input_ids.shape[1]),
        "generated_tokens": generated,
        "options": {
            k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v)) for k, v in options.items()
        },
        "reference_s": ref_s,
        "ours_s": ours_s,
        "speedup": ref_s / ours_s,
        "reference_tokens_per_s": generated / ref_s,
        "ours_tokens_per_s": generated / ours_s,
        "agreement": agreement,
        "stats": stats.to_dict(),
        "device": str(dev),
        "dtype": str(model.dtype).replace("torch.", ""),
    }


def synthetic_canvas(
    vocab_size: int,
    mask_id: int,
    *,
    batch_size: int = 1,
    context: tuple[int, int] = (150, 400),
    middle: tuple[int, int] = (8, 40),
    layout: str = "right",
    seed: int = 0,
    device=None,
):
    """Random HumanEval-Infill-like canvases for benchmarks (random weights make content irrelevant).

    Each row draws a prefix+suffix length uniformly from ``context`` (split at a random point) and a middle
    length from ``middle`` (both inclusive), with token ids uniform in ``[0, vocab_size)`` except ``mask_id``.

    Returns
    -------
    CanvasBatch
        See :class:`dinfill.sampler.canvas.CanvasBatch` (``input_ids``, ``attention_mask``, middles).
    """
    from dinfill.sampler.canvas import build_row

    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch_size):
        n_ctx = int(torch.randint(context[0], context[1] + 1, (1,), generator=g))
        n_mid = int(torch.randint(middle[0], middle[1] + 1, (1,), generator=g))
        n_pre = int(torch.randint(0, n_ctx + 1, (1,), generator=g))
        ids = torch.randint(0, vocab_size - 1, (n_ctx,), generator=g)
        ids = ids + (ids >= mask_id).long()  # skip the mask id
        toks = ids.tolist()
        rows.append(build_row(toks[:n_pre], toks[n_pre:], n_mid, mask_id, limit=n_ctx + n_mid))
    return layout_rows(rows, pad_id=0, layout=layout, device=device)
