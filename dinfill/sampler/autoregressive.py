"""KV-cached autoregressive generation and fill-in-the-middle for the AR baselines.

Why not transformers' ``generate``: its per-token Python (logits processors, stopping criteria,
dynamic cache bookkeeping) dominates the decode step of a 0.5B model, and the comparison must run
the AR baselines through the same lean runtime as the diffusion model. The loop here is the
gpt-fast recipe on our decoder:

* **Static shapes.** Prompts are left-padded to the longest one (``P``); one static KV cache of
  ``P + max_new_tokens - 1`` columns holds the whole run. Prefill writes columns ``[0, P)``; decode
  step ``j`` writes column ``P + j - 1``. Left padding keeps every row's real tokens one contiguous
  run of columns, and each row's RoPE positions count its own real tokens only, so a row's tokens
  do not depend on what else is in the batch (greedy batched == rows alone).
* **No per-token host sync.** Sampling, the stop test and the bookkeeping are device ops on fixed
  buffers (a ``done`` mask; rows that are done keep running and write the pad id). To leave early once
  every row is done (otherwise a batch that ends at token 20 would run all 512 steps) the host reads, before
  launching step ``j``, the "all done" flag of step ``j - 4`` (copied to pinned memory, awaited through an
  event; :class:`~dinfill.sampler.graphs.LaggedFlag`): the device queue stays four steps deep and at most three
  no-op steps run after the last row finished. On the CPU, with no queue to drain, the flag is read after every
  step. Stop *strings* need the decoded text, so they are searched every ``check_every`` steps (a sync).
* **CUDA graphs, captured once per shape bucket.** On CUDA the prefill (one graph per padded prompt width)
  and the decode step (forward, sampling, bookkeeping) are graphs kept across calls in the pool of
  :mod:`dinfill.sampler.graphs`, keyed by the (batch, cache length) bucket; a call pads up to its bucket and
  replays. Everything a graph touches is a static buffer updated in place, the cache column, the stop ids
  and the temperature included. Sampling noise is drawn *outside* the graph with the caller's generator
  (custom generators cannot be used inside a graph on every torch version), and the eager path draws it the
  same way, so graph and eager runs give identical tokens. ``cuda_graph=False`` turns graphs off;
  ``cuda_graph="emulate"`` runs the same bucket / pool bookkeeping without CUDA (the CPU tests use it).

The token-level API is :func:`ar_generate`; :func:`infill` builds the family's FIM prompt
(:mod:`dinfill.sampler.fim`), generates and returns the middles as text; :func:`benchmark` times
this path against transformers' ``generate`` on the same prompts.
"""

from __future__ import annotations

import logging
import numbers
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dinfill.sampler.fim import build_fim_prompts, cut_at_stop, fim_tokens
from dinfill.sampler.graphs import (
    CaptureMeter,
    Graph,
    LaggedFlag,
    bucket_batch,
    bucket_length,
    graph_pool,
    model_key,
    side_stream,
    tensor_bytes,
)
from dinfill.sampler.sampling import check_sampling_args, draw_noise, sample_tokens
from dinfill.sampler.settings import check_option

log = logging.getLogger("dinfill")

__all__ = ["ArOutput", "ArStats", "ar_generate", "infill", "benchmark", "hf_twin"]

# Steps the host may run ahead of the "all rows done" flag on CUDA: the queue stays this deep, and at most
# this many - 1 no-op steps run after the last row finished.
_EXIT_LAG = 4


@dataclass
class ArOutput:
    """The new tokens of each row of an :func:`ar_generate` call.

    Attributes
    ----------
    tokens : Tensor
        ``(B, N)`` int64 on the model's device, ``N = max(lengths)``; entries past a row's length hold
        ``pad_id``.
    lengths : Tensor
        ``(B,)`` int64 (CPU): new tokens per row, *including* the stop token that ended it (as
        transformers' ``generate`` returns it).
    stopped : Tensor
        ``(B,)`` bool (CPU): the row ended on a stop id or stop string (``False``: it ran to
        ``max_new_tokens``).
    steps : int
        Forward passes run after the prefill (early exit makes it less than ``max_new_tokens - 1``).
    cuda_graph : bool
        Whether the decode steps were replayed from a CUDA graph (``False`` when off, on the CPU, when
        emulated, or when capture failed: a failed capture is logged, and this flag lets benchmarks and tests
        see it).
    graph_captured : bool
        Whether this call captured graphs (the first call of a bucket, or of a new prompt width in it);
        ``False`` when it replayed pooled ones or ran eagerly.
    graph_bucket : tuple of int, optional
        ``(batch, prompt, cache)`` padded shape of a pooled (graph or emulated) call, else ``None``.
    """

    tokens: Tensor
    lengths: Tensor
    stopped: Tensor
    steps: int
    cuda_graph: bool = False
    graph_captured: bool = False
    graph_bucket: tuple[int, int, int] | None = None

    def tolist(self, strip_stop: bool = False) -> list[list[int]]:
        """The rows as lists of ids; ``strip_stop=True`` drops the final stop token of stopped rows."""
        rows = self.tokens.cpu().tolist()
        out = []
        for row, n, hit in zip(rows, self.lengths.tolist(), self.stopped.tolist(), strict=True):
            out.append(row[: n - 1] if (strip_stop and hit and n > 0) else row[:n])
        return out


@dataclass
class ArStats:
    """What one :func:`ar_generate` call of :func:`infill` did (``return_stats=True``).

    Attributes
    ----------
    batch_size : int
        Rows in the call.
    prompt_tokens : int
        Padded prompt length ``P`` (the longest prompt).
    new_tokens : int
        New tokens generated over all rows, stop tokens included.
    stopped : int
        Rows that ended on a stop id or stop string (the rest ran to ``max_new_tokens``).
    steps : int
        Decode forward passes after the prefill.
    cuda_graph : bool
        Whether the decode steps were replayed from a CUDA graph.
    time_total_s : float
        Wall time of the call (host clock; on CUDA it includes the final synchronisation of reading lengths).
    """

    batch_size: int
    prompt_tokens: int
    new_tokens: int
    stopped: int
    steps: int
    cuda_graph: bool
    time_total_s: float

    @property
    def forward_passes(self) -> int:
        """Prefill plus decode steps."""
        return self.steps + 1


# --- input handling ------------------------------------------------------------------------------


def _rows_of(prompt_ids: Any, attention_mask: Tensor | None) -> list[list[int]]:
    """Normalise the accepted prompt forms to a list of id lists (one host copy, before the loop)."""
    if isinstance(prompt_ids, Tensor):
        ids = prompt_ids.detach().cpu()
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2:
            raise ValueError(f"prompt_ids tensor must be (B, T) or (T,), got shape {tuple(prompt_ids.shape)}")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"prompt_ids must hold integer token ids, got dtype {ids.dtype}")
        if attention_mask is None:
            return ids.tolist()
        mask = attention_mask.detach().cpu().to(torch.bool)
        if mask.dim() == 1:
            mask = mask.unsqueeze(0)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)} but prompt_ids {tuple(ids.shape)}")
        rows = []
        for b in range(ids.shape[0]):
            real = mask[b].nonzero().flatten()
            if real.numel() and real[-1] - real[0] + 1 != real.numel():
                raise ValueError(f"attention_mask row {b} has holes: padding must be on the left and/or right only")
            rows.append(ids[b, real].tolist())
        return rows
    if attention_mask is not None:
        raise ValueError("attention_mask only goes with a padded prompt_ids tensor; lists need no mask")
    if isinstance(prompt_ids, (list, tuple)):
        if prompt_ids and all(isinstance(t, numbers.Integral) for t in prompt_ids):
            return [[int(t) for t in prompt_ids]]  # a single row
        rows = []
        for b, row in enumerate(prompt_ids):
            if isinstance(row, Tensor):
                row = row.tolist()
            if not isinstance(row, (list, tuple)) or not all(isinstance(t, numbers.Integral) for t in row):
                raise ValueError(f"prompt row {b} must be a list of int token ids, got {type(row).__name__}")
            rows.append([int(t) for t in row])
        return rows
    raise ValueError(f"prompt_ids must be a list of id lists or a (B, T) tensor, got {type(prompt_ids).__name__}")


def _stop_ids_of(model, stop_ids: Sequence[int] | int | None) -> list[int]:
    if stop_ids is None:  # default: the model's eos
        eos = model.config.eos_token_id
        stop_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    elif isinstance(stop_ids, int):
        stop_ids = [stop_ids]
    out: list[int] = []
    for s in stop_ids:
        if not isinstance(s, int) or not 0 <= s < model.config.vocab_size:
            raise ValueError(f"stop id {s!r} is not a token id of this model (vocabulary {model.config.vocab_size})")
        if s not in out:
            out.append(s)
    return out


def _validate(model, rows: list[list[int]], max_new_tokens: int) -> int:
    """Check the request against the model; returns the padded prompt length ``P``."""
    check_option("max_new_tokens", max_new_tokens)
    if not rows:
        raise ValueError("no prompts given: pass at least one row of token ids")
    V, limit = model.config.vocab_size, model.config.max_position_embeddings
    for b, row in enumerate(rows):
        if not row:
            raise ValueError(f"prompt row {b} is empty; every row needs at least one token")
        lo, hi = min(row), max(row)
        if lo < 0 or hi >= V:
            raise ValueError(
                f"prompt row {b} holds token id {lo if lo < 0 else hi} outside the model's vocabulary [0, {V}): "
                "is the tokenizer the model's own?"
            )
    P = max(len(r) for r in rows)
    if P > limit:
        raise ValueError(
            f"prompt of {P} tokens is longer than the model's limit of {limit} positions; shorten the prompt"
        )
    if P + max_new_tokens > limit:
        raise ValueError(
            f"prompt of {P} tokens + max_new_tokens={max_new_tokens} exceeds the model's limit of {limit} "
            f"positions; lower max_new_tokens to at most {limit - P} or shorten the prompt"
        )
    return P


# --- the decode loop -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _ArSpec:
    """The sampling settings that change the captured code (part of a graph bucket's key)."""

    sampled: bool
    top_p: bool
    top_k: int | None


class _Decode:
    """Static buffers and the in-place prefill / decode step of :func:`ar_generate` for one shape.

    Shape: ``B`` rows, a KV cache of ``C`` columns, ``S`` stop-id slots. Everything :meth:`prefill` and
    :meth:`step` read or write is allocated here, so CUDA graphs captured from them replay on the same
    memory across calls: :meth:`load` copies a call in (left-padded prompts of a prompt width ``P``, the
    stop ids, the pad id, the sampling values), padding rows beyond the call's batch are copies of its first
    row marked done from the start (they write the pad id and are never counted). The eager path uses the
    same class at the call's exact shape.
    """

    def __init__(self, model, B: int, C: int, S: int, spec: _ArSpec):
        dev = model.device
        as_long = dict(dtype=torch.long, device=dev)
        self._model = weakref.ref(model)  # the pool must not keep a model alive (its death frees the entry)
        self.B, self.spec = B, spec
        self.cache = model.new_cache(B, C)
        self.mask = torch.zeros(B, C, dtype=torch.bool, device=dev)  # (B, C) real key columns
        self.cur = torch.zeros(B, 1, **as_long)  # (B, 1) token fed this step
        self.pos = torch.zeros(B, 1, **as_long)  # (B, 1) its RoPE position
        self.col = torch.zeros(1, **as_long)  # (1,) its cache column
        self.out_col = torch.zeros(1, **as_long)  # (1,) the output column the next token goes to
        self.out = torch.zeros(B, C, **as_long)  # (B, C) new tokens (C >= max_new_tokens)
        self.lengths = torch.zeros(B, **as_long)
        self.done = torch.zeros(B, dtype=torch.bool, device=dev)
        self.all_done = torch.zeros((), dtype=torch.bool, device=dev)  # the early-exit flag the host reads
        self.stop = torch.full((S,), -1, **as_long)  # (S,) stop ids, -1 = unused slot
        self.pad = torch.zeros((), **as_long)
        self.row0 = torch.zeros(B, 1, **as_long)  # (B, 1) decode steps have one query: logits row 0
        self.temperature = torch.zeros((), dtype=torch.float32, device=dev) if spec.sampled else 0.0
        self.top_p = torch.ones((), dtype=torch.float32, device=dev) if spec.top_p else None
        self.noise = None
        if spec.sampled:
            self.noise = torch.ones(B, model.config.vocab_size, dtype=torch.float32, device=dev)  # (B, V) Exp(1)
        self.prompts: dict[int, dict[str, Tensor]] = {}  # prompt width P -> its static prefill inputs
        self.graphs: dict[Any, Graph] = {}  # "step" and ("prefill", P)
        self.P = 0
        self.rows = 0  # real rows of the loaded call
        self.stopped_by_string = torch.zeros(B, dtype=torch.bool)  # host-side: set by the stop-string check

    @property
    def model(self):
        return self._model()

    def buffers(self) -> list[Tensor]:
        """Every static tensor (for the memory report)."""
        out = [v for v in vars(self).values() if isinstance(v, Tensor)]
        out += [t for p in self.prompts.values() for t in p.values()]
        return out + self.cache.k + self.cache.v

    def _prompt(self, P: int) -> dict[str, Tensor]:
        if P not in self.prompts:
            dev = self.mask.device
            self.prompts[P] = {
                "ids": torch.zeros(self.B, P, dtype=torch.long, device=dev),  # (B, P) left-padded prompts
                "pos": torch.zeros(self.B, P, dtype=torch.long, device=dev),  # (B, P) per-row RoPE positions
                "cols": torch.arange(P, device=dev),  # (P,) cache columns
                "last": torch.full((self.B, 1), P - 1, dtype=torch.long, device=dev),  # (B, 1) logits row
            }
        return self.prompts[P]

    def load(self, rows: list[list[int]], P: int, stops: list[int], pad_id: int, temperature: float, top_p) -> None:
        """Copy one call into the buffers (``P`` >= the longest prompt; ``len(stops)`` <= the stop slots)."""
        n = len(rows)
        ids = torch.full((self.B, P), pad_id, dtype=torch.long)
        lens = torch.ones(self.B, dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, P - len(r) :] = torch.tensor(r, dtype=torch.long)  # left padding
            lens[b] = len(r)
        ids[n:], lens[n:] = ids[0], lens[0]  # padding rows: copies of row 0
        dev = self.mask.device
        lens = lens.to(dev)
        prompt = self._prompt(P)
        prompt["ids"].copy_(ids)
        self.mask.zero_()
        self.mask[:, :P] = torch.arange(P, device=dev) >= (P - lens).view(-1, 1)
        prompt["pos"].copy_((self.mask[:, :P].long().cumsum(dim=1) - 1).clamp(min=0))
        self.P, self.rows = P, n
        self.cur.zero_()
        self.pos.copy_(lens.view(-1, 1))
        self.col.fill_(P)
        self.out_col.zero_()
        self.out.fill_(pad_id)
        self.lengths.zero_()
        self.done.zero_()
        self.done[n:] = True  # padding rows are finished before they start
        self.all_done.fill_(False)
        self.stop.fill_(-1)
        if stops:
            self.stop[: len(stops)].copy_(torch.tensor(stops, dtype=torch.long))
        self.pad.fill_(pad_id)
        if isinstance(self.temperature, Tensor):
            self.temperature.fill_(temperature)
        if isinstance(self.top_p, Tensor):
            self.top_p.fill_(top_p)
        self.stopped_by_string.zero_()

    def draw(self, generator: torch.Generator | None) -> None:
        """Fill the real rows' sampling noise for the next token (outside any graph, with the user's generator).

        Only the call's own rows are drawn, with the call's own shape, so the numbers a row gets do not depend
        on the bucket it was padded into.
        """
        if self.noise is not None:
            draw_noise((self.rows, self.noise.shape[1]), device=self.noise.device, generator=generator,
                       out=self.noise[: self.rows])  # fmt: skip

    def _pick(self, logits: Tensor) -> Tensor:
        return sample_tokens(
            logits, temperature=self.temperature, top_p=self.top_p, top_k=self.spec.top_k, noise=self.noise
        )  # (B,)

    def _record(self, nxt: Tensor) -> None:
        nxt = torch.where(self.done, self.pad, nxt)  # (B,) finished rows write padding
        self.out.index_copy_(1, self.out_col, nxt.view(-1, 1))
        self.lengths += (~self.done).long()
        self.done |= (nxt.view(-1, 1) == self.stop.view(1, -1)).any(dim=1)
        self.all_done.copy_(self.done.all())
        self.cur.copy_(nxt.view(-1, 1))
        self.out_col.add_(1)

    def prefill(self) -> None:
        """The prompt forward of the loaded width ``P``: cache columns ``[0, P)`` and the first token."""
        p = self.prompts[self.P]
        logits = self.model(
            p["ids"], causal=True, attention_mask=self.mask, position_ids=p["pos"], cache=self.cache,
            cache_pos=p["cols"], logits_index=p["last"],
        )  # fmt: skip  # (B, 1, V)
        self._record(self._pick(logits[:, 0]))

    def step(self) -> None:
        """One decode step, all in place: feed ``cur`` at column ``col``, sample, record, advance."""
        self.mask.index_fill_(1, self.col, True)
        logits = self.model(
            self.cur, causal=True, attention_mask=self.mask, position_ids=self.pos, cache=self.cache,
            cache_pos=self.col, logits_index=self.row0,
        )  # fmt: skip  # (B, 1, V)
        self._record(self._pick(logits[:, 0]))
        self.pos += 1
        self.col += 1

    def _buffers(self) -> list[Tensor]:
        return [self.mask, self.cur, self.pos, self.col, self.out_col, self.out, self.lengths, self.done,
                self.all_done]  # fmt: skip

    def save(self) -> list[Tensor]:
        """Copies of the small state buffers (not the KV cache), for :meth:`restore`."""
        return [t.clone() for t in self._buffers()]

    def restore(self, saved: list[Tensor]) -> None:
        """Undo steps run since :meth:`save`. Cache columns they wrote are masked again and rewritten
        by the next real step at the same column, so the KV cache needs no restoring."""
        for t, s in zip(self._buffers(), saved, strict=True):
            t.copy_(s)

    def capture(self, emulate: bool) -> int:
        """Capture what the loaded call needs and the pool lacks: the decode step, the prefill of width ``P``.

        Each warm-up runs a real prefill / step (lazy initialisation: cuBLAS handles, Triton compilation), so
        the state is saved first and restored afterwards. Returns the number of graphs captured; raises when
        a capture fails (the caller falls back to eager).
        """
        todo = [k for k in (("prefill", self.P), "step") if k not in self.graphs]
        if not todo:
            return 0
        pool = getattr(self, "_pool", None)
        if pool is None and not emulate:
            pool = self._pool = torch.cuda.graph_pool_handle()  # one memory pool for the entry's graphs
        for name in todo:
            fn = self.prefill if name != "step" else self.step
            saved = self.save()
            with side_stream(emulate):
                fn()
            self.restore(saved)
            self.graphs[name] = Graph(fn, emulate=emulate, pool=pool)
            self.restore(saved)
        return len(todo)


def _check_stop_strings(state: _Decode, n_out: int, decode: Callable[[list[int]], str], stops, checked) -> None:
    """Truncate rows whose decoded text now contains a stop string to the token that completed it.

    ``checked[b]`` is how many tokens of row ``b`` are known to hold no stop string; rows already
    cut, or unchanged since the last check, are skipped. Rows that ended on a stop id are still
    searched (once), since the string may have appeared between two checks.
    """
    out = state.out[: state.rows, :n_out].cpu()
    lengths = state.lengths[: state.rows].cpu()
    for b in range(state.rows):
        n = int(lengths[b])
        if state.stopped_by_string[b] or checked[b] >= n:
            continue
        row = out[b, :n].tolist()
        if not cut_at_stop(decode(row), stops)[1]:
            checked[b] = n
            continue
        lo, hi = checked[b], n  # text of row[:lo] holds no stop string, row[:hi] does
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if cut_at_stop(decode(row[:mid]), stops)[1] else (mid, hi)
        state.lengths[b] = hi
        state.done[b] = True
        state.out[b, hi:] = state.pad
        state.stopped_by_string[b] = True
        checked[b] = hi
    state.all_done.copy_(state.done.all())


@torch.inference_mode()
def ar_generate(
    model,
    prompt_ids: Sequence[Sequence[int]] | Tensor,
    max_new_tokens: int = 512,
    stop_ids: Sequence[int] | int | None = None,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    *,
    attention_mask: Tensor | None = None,
    stop_strings: Sequence[str] = (),
    tokenizer=None,
    pad_id: int | None = None,
    check_every: int = 16,
    cuda_graph: bool | None = None,
) -> ArOutput:
    """Generate up to ``max_new_tokens`` per row with a static KV cache (contract: ``ar_generate``).

    Parameters
    ----------
    model : dinfill.models.Decoder
        Any decoder from :func:`dinfill.load_model`, run causally.
    prompt_ids : list of lists of int, or Tensor
        Ragged rows of ids; or a ``(B, T)`` integer tensor, with ``attention_mask`` when padded (left
        or right); a flat list or ``(T,)`` tensor is one row.
    max_new_tokens : int
        At least 1; the prompt plus this must fit in ``config.max_position_embeddings``.
    stop_ids : int or sequence of int, optional
        Ids that end a row (kept as the row's last token). ``None``: the model's ``eos_token_id``;
        ``()``: never stop early.
    temperature, top_p, top_k :
        Sampling settings (:mod:`dinfill.sampler.sampling`); ``temperature=0`` is greedy.
    generator : torch.Generator, optional
        Makes sampling reproducible. Best on the model's device; one on another device (e.g. a CPU
        generator with a CUDA model) seeds a fresh generator on the model's device.
    attention_mask : Tensor, optional
        ``(B, T)`` 0/1 mask of a padded ``prompt_ids`` tensor (one contiguous run of ones per row).
    stop_strings : sequence of str
        Also end a row once its decoded text (``tokenizer.decode(..., skip_special_tokens=True)``)
        contains one of these; the row keeps tokens up to the one that completed it. Needs ``tokenizer``.
    tokenizer : transformers tokenizer, optional
        For ``stop_strings``.
    pad_id : int, optional
        Filler for padding and finished rows; default the first stop id, else 0.
    check_every : int
        Decode steps between the host's stop-string checks (each one reads the tokens: a sync). The
        early exit once every row is done needs no such check (see the module docstring).
    cuda_graph : bool or "emulate", optional
        Replay the prefill and the decode step as CUDA graphs kept in the process-wide pool of
        :mod:`dinfill.sampler.graphs` (the call is padded up to its (batch, prompt, cache) bucket; the first
        call of a bucket captures). ``None``: on for CUDA models. ``"emulate"`` runs the same pool, padding
        and replay loop with plain calls, on any device (for tests).

    Returns
    -------
    ArOutput
        Padded new tokens, per-row lengths and stop flags.
    """
    if getattr(model, "kind", None) == "diffusion":  # a diffusion model decoded left to right is garbage
        raise ValueError(
            f"ar_generate needs an AR model, but {getattr(model, 'name', 'this model')!r} is a diffusion model "
            f"({getattr(model, 'kind_source', '?')}); use dinfill.sampler.infill or diffusion_generate, or load it "
            "with dinfill.load_model(..., kind='ar') if it really is an AR checkpoint"
        )
    check_sampling_args(temperature, top_p, top_k)
    if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
        raise ValueError(f"check_every={check_every!r} must be an int >= 1")
    if isinstance(stop_strings, str):
        raise ValueError("stop_strings must be a list of strings, e.g. ['\\n'], not a bare string")
    stop_strings = list(stop_strings)
    if stop_strings:
        if tokenizer is None:
            raise ValueError("stop_strings need the tokenizer to decode the text: pass tokenizer=")
        cut_at_stop("", stop_strings)  # validates the entries
    rows = _rows_of(prompt_ids, attention_mask)
    P = _validate(model, rows, max_new_tokens)
    stops = _stop_ids_of(model, stop_ids)
    if pad_id is None:
        pad_id = stops[0] if stops else 0
    dev = model.device
    if generator is not None and temperature > 0 and torch.device(generator.device).type != dev.type:
        # noise is drawn on the model's device: seed a generator there from the one given (reproducible)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        generator = torch.Generator(device=dev).manual_seed(seed)
    if cuda_graph not in (None, True, False, "emulate"):
        raise ValueError(f"cuda_graph must be None, True, False or 'emulate', got {cuda_graph!r}")
    if cuda_graph is None:
        cuda_graph = dev.type == "cuda" and max_new_tokens > 1
    elif cuda_graph is True and dev.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a model on CUDA (it is on {dev}); pass cuda_graph=False or None")
    emulate = cuda_graph == "emulate"
    pooled = bool(cuda_graph) and max_new_tokens > 1
    sampled = temperature > 0
    spec = _ArSpec(sampled=sampled, top_p=sampled and top_p is not None and top_p < 1,
                   top_k=top_k if sampled else None)  # fmt: skip
    limit = model.config.max_position_embeddings
    state, bucket, captured, graphs = None, None, False, None
    if pooled:
        bucket = _graph_shape(len(rows), P, max_new_tokens, limit)
        Bb, Pb, Cb = bucket
        S = max(8, 1 << max(0, len(stops) - 1).bit_length())  # stop-id slots: 8, 16, 32 ...
        key = ("ar", "emulate" if emulate else "cuda", model_key(model), Bb, Cb, S, spec)
        pool = graph_pool()
        state = pool.lookup(model, key)
        fresh = state is None
        meter = CaptureMeter(dev)
        if fresh:
            state = _Decode(model, Bb, Cb, S, spec)
        state.load(rows, Pb, stops, pad_id, float(temperature), top_p)
        try:
            n_graphs = state.capture(emulate)
        except Exception as err:  # a sync inside the model forward, an unsupported op: fall back to eager
            log.warning("CUDA graph capture of the AR decode failed (%s: %s); running eagerly", type(err), err)
            state.graphs.clear()
            state.load(rows, Pb, stops, pad_id, float(temperature), top_p)
            if not fresh:
                pool.drop(model, key)  # its other graphs may share the broken capture's memory pool
            n_graphs, graphs = 0, None
        else:
            graphs = state.graphs
        seconds, reserved = meter.done()
        static = tensor_bytes(state.buffers())
        if graphs is not None and fresh:
            pool.insert(model, key, state, static_bytes=static, graph_bytes=None if reserved is None else
                        max(0, reserved - static), graphs=n_graphs, capture_s=seconds, kind="ar",
                        bucket=(Bb, Cb))  # fmt: skip
        elif graphs is not None and n_graphs:  # a new prompt width in a known bucket: one more prefill graph
            pool.grow(model, key, graphs=n_graphs, capture_s=seconds, static_bytes=static,
                      graph_bytes=None if reserved is None else max(0, reserved))  # fmt: skip
        captured = graphs is not None and n_graphs > 0
    if state is None:
        state = _Decode(model, len(rows), P + max_new_tokens - 1, max(1, len(stops)), spec)
        state.load(rows, P, stops, pad_id, float(temperature), top_p)
    decode = (lambda ids: tokenizer.decode(ids, skip_special_tokens=True)) if stop_strings else None
    checked = [0] * len(rows)
    use_graph = graphs is not None

    # early exit without draining the queue: on CUDA the host reads the "all done" flag of the step `lag` steps
    # back (copied to pinned memory, awaited through an event); on the CPU it reads the flag directly
    all_done = LaggedFlag(state.all_done, _EXIT_LAG, max_new_tokens, stop_on=True)
    state.draw(generator)
    if use_graph:
        graphs[("prefill", state.P)].replay()
    else:
        state.prefill()
    all_done.record()
    steps = 0
    for j in range(1, max_new_tokens):
        if stop_strings and j % check_every == 0:  # the periodic stop-string check (needs the text: a sync)
            _check_stop_strings(state, j, decode, stop_strings, checked)
        if all_done.should_stop():
            break
        state.draw(generator)
        if use_graph:
            graphs["step"].replay()
        else:
            state.step()
        steps += 1
        all_done.record()
    if stop_strings:
        _check_stop_strings(state, steps + 1, decode, stop_strings, checked)

    n = len(rows)
    lengths = state.lengths[:n].cpu()
    last = state.out[:n].gather(1, (state.lengths[:n] - 1).clamp(min=0).view(-1, 1))  # (n, 1)
    hit_id = ((last == state.stop.view(1, -1)) & (state.stop.view(1, -1) >= 0)).any(1)
    stopped = hit_id.cpu() | state.stopped_by_string[:n]
    width = int(lengths.max())
    return ArOutput(
        tokens=state.out[:n, :width].clone(), lengths=lengths, stopped=stopped, steps=steps,
        cuda_graph=use_graph and not emulate, graph_captured=captured, graph_bucket=bucket,
    )  # fmt: skip


def _graph_shape(B: int, P: int, max_new_tokens: int, limit: int) -> tuple[int, int, int]:
    """The padded ``(batch, prompt, cache)`` of a graph call (the prompt is not padded at the model's limit)."""
    Pb = bucket_length(P, limit)
    Cb = bucket_length(Pb + max_new_tokens - 1, limit)
    if Pb + max_new_tokens - 1 > Cb:  # the prompt bucket leaves no room before the model's limit
        Pb, Cb = P, bucket_length(P + max_new_tokens - 1, limit)
    return bucket_batch(B), Pb, Cb


def graph_bucket(model, prompt_ids, max_new_tokens: int) -> tuple[int, int, int]:
    """The shape bucket ``(batch, prompt, cache)`` a CUDA-graph :func:`ar_generate` call pads up to (no model run)."""
    rows = _rows_of(prompt_ids, None)
    P = _validate(model, rows, max_new_tokens)
    return _graph_shape(len(rows), P, max_new_tokens, model.config.max_position_embeddings)


# --- text level ----------------------------------------------------------------------------------


def infill(
    model,
    tokenizer,
    prefixes: Sequence[str],
    suffixes: Sequence[str],
    *,
    family: str | None = None,
    max_new_tokens: int = 512,
    stop_strings: Sequence[str] = (),
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    batch_size: int | None = None,
    check_every: int = 16,
    cuda_graph: bool | None = None,
    return_stats: bool = False,
) -> list[str] | tuple[list[str], list[ArStats]]:
    """Fill the middle between each prefix and suffix with an AR FIM model.

    Parameters
    ----------
    model : dinfill.models.Decoder
        An AR checkpoint of one of the supported families.
    tokenizer : transformers tokenizer
        The checkpoint's tokenizer; it supplies the FIM sentinel ids and the stop ids.
    prefixes, suffixes : sequence of str
        One suffix per prefix.
    family : str, optional
        ``"qwen2.5-coder"``, ``"deepseek-coder"`` or ``"starcoder2"`` (aliases accepted); default:
        detected from the tokenizer's special tokens (``model.config.model_type`` breaks ties).
    max_new_tokens : int
        Cap on the middle's length in tokens (the published runs used 512).
    stop_strings : sequence of str
        End a row at the first of these (e.g. ``["\\n"]`` for single-line infilling); the returned
        middle is cut *before* it.
    temperature, top_p, top_k, generator :
        As in :func:`ar_generate`.
    seed : int, optional
        Shortcut for a fresh generator on the model's device seeded with this (ignored with ``generator``).
    batch_size : int, optional
        Rows per :func:`ar_generate` call (default: all). Rows are grouped by prompt length to waste
        less padding; the order of the returned list is the input order.
    check_every, cuda_graph :
        As in :func:`ar_generate`.
    return_stats : bool
        Also return one :class:`ArStats` per :func:`ar_generate` call.

    Returns
    -------
    list of str, or (list of str, list of ArStats)
        The middles (special tokens skipped, the stop token excluded). A prompt longer than the model's
        positions minus ``max_new_tokens`` loses the start of its prefix (with a warning), as a diffusion canvas does.
    """
    fim = fim_tokens(tokenizer, family, getattr(model.config, "model_type", None))
    room = model.config.max_position_embeddings - max_new_tokens if isinstance(max_new_tokens, int) else None
    prompts = build_fim_prompts(tokenizer, prefixes, suffixes, fim, max_tokens=room if room and room > 0 else None)
    if generator is None and seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(int(seed))
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size={batch_size!r} must be an int >= 1 (or None for one batch)")
    order = list(range(len(prompts)))
    if batch_size is not None:  # group similar lengths: less padding per chunk
        order.sort(key=lambda i: len(prompts[i]))
    size = batch_size or len(prompts)
    middles: list[str] = [""] * len(prompts)
    stats: list[ArStats] = []
    for start in range(0, len(order), size):
        chunk = order[start : start + size]
        t0 = time.perf_counter()
        out = ar_generate(
            model,
            [prompts[i] for i in chunk],
            max_new_tokens=max_new_tokens,
            stop_ids=list(fim.stop_ids),
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            generator=generator,
            stop_strings=stop_strings,
            tokenizer=tokenizer,
            check_every=check_every,
            cuda_graph=cuda_graph,
        )
        stop_set = set(fim.stop_ids)
        for i, ids in zip(chunk, out.tolist(), strict=True):
            if ids and ids[-1] in stop_set:
                ids = ids[:-1]
            text = tokenizer.decode(ids, skip_special_tokens=True)
            middles[i] = cut_at_stop(text, stop_strings)[0] if stop_strings else text
        stats.append(
            ArStats(
                batch_size=len(chunk), prompt_tokens=max(len(prompts[i]) for i in chunk),
                new_tokens=int(out.lengths.sum()), stopped=int(out.stopped.sum()), steps=out.steps,
                cuda_graph=out.cuda_graph, time_total_s=time.perf_counter() - t0,
            )
        )  # fmt: skip
    return (middles, stats) if return_stats else middles


# --- benchmark against transformers --------------------------------------------------------------


def _hf_config(config) -> Any:
    """A transformers config with the shape of our :class:`~dinfill.models.ModelConfig`."""
    from transformers import LlamaConfig, Qwen2Config, Starcoder2Config

    common = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=config.max_position_embeddings,
        rope_theta=config.rope_theta,
        tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
    )
    if config.model_type == "qwen2":
        return Qwen2Config(**common, rms_norm_eps=config.norm_eps, use_sliding_window=config.sliding_window is not None)
    if config.model_type == "llama":
        scaling = {"rope_type": "linear", "factor": config.rope_scaling_factor}
        return LlamaConfig(
            **common,
            rms_norm_eps=config.norm_eps,
            rope_scaling=scaling if config.rope_scaling_factor != 1.0 else None,
            attention_bias=config.attention_bias,
            mlp_bias=config.mlp_bias,
            head_dim=config.head_dim,
        )
    return Starcoder2Config(
        **common, norm_epsilon=config.norm_eps, sliding_window=config.sliding_window, use_bias=config.attention_bias
    )


def hf_twin(model, attn_implementation: str = "sdpa"):
    """The same weights as a transformers ``*ForCausalLM`` (the baseline of :func:`benchmark`).

    A model loaded from a local checkpoint directory is re-read from it with transformers; a built-in
    shape (random weights) gets a transformers config of the same shape and our state dict, whose
    parameter names are transformers' own.
    """
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    ckpt = Path(str(getattr(model, "name", "")))
    if (ckpt / "config.json").is_file():
        hf = AutoModelForCausalLM.from_pretrained(str(ckpt), attn_implementation=attn_implementation)
    else:
        cfg = _hf_config(model.config)
        cfg._attn_implementation = attn_implementation
        with torch.device(model.device):
            hf = AutoModelForCausalLM.from_config(cfg)
        missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
        missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
        if missing or unexpected:
            raise ValueError(f"state dict does not map onto transformers: missing {missing}, unexpected {unexpected}")
    hf = hf.to(device=model.device, dtype=model.dtype).eval()
    # .to(dtype) also rounds the RoPE frequency buffers; from_pretrained(dtype=bf16) keeps them fp32, and so
    # does our decoder: put the fp32 ones back (same expression as transformers' default / linear RoPE)
    for module in hf.modules():
        for name in ("inv_freq", "original_inv_freq"):
            buf = getattr(module, name, None)
            if isinstance(buf, torch.Tensor) and buf.is_floating_point() and buf.shape == model.rotary.inv_freq.shape:
                setattr(module, name, model.rotary.inv_freq.clone())
    return hf


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn: Callable[[], Any], repeats: int, device: torch.device) -> tuple[float, Any]:
    result, times = None, []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        result = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], result


def benchmark(
    model,
    hf_model=None,
    *,
    batch_size: int = 1,
    prompt_len: int = 128,
    new_tokens: int = 128,
    repeats: int = 3,
    seed: int = 0,
    cuda_graph: bool | None = None,
) -> dict[str, Any]:
    """Greedy tokens/s of :func:`ar_generate` against transformers' ``generate`` on the same prompts.

    Both generate exactly ``new_tokens`` tokens per row (no stop ids) from the same random prompts of
    ``prompt_len`` tokens, greedily; each is warmed up once, then timed ``repeats`` times (median).
    Timing covers the whole call (prefill included, CUDA-graph capture included for ours).

    Parameters
    ----------
    model : dinfill.models.Decoder
    hf_model : transformers model, optional
        The baseline; default :func:`hf_twin` of ``model`` (sdpa attention, default dynamic cache).
    batch_size, prompt_len, new_tokens, repeats, seed :
        Workload and timing settings.
    cuda_graph : bool, optional
        As in :func:`ar_generate`.

    Returns
    -------
    dict
        ``ours_tokens_per_s``, ``hf_tokens_per_s``, ``speedup`` (ours / hf), the median seconds,
        ``weights_gbps`` (parameter bytes read per decoded token / our time per step, a lower bound
        on achieved bandwidth), ``greedy_agreement`` (mean fraction of each row's tokens before the
        first disagreement with transformers) and the settings, device and versions.
    """
    import platform

    import transformers

    if repeats < 1 or batch_size < 1 or prompt_len < 1 or new_tokens < 1:
        raise ValueError("batch_size, prompt_len, new_tokens and repeats must all be >= 1")
    dev = model.device
    hf = hf_model if hf_model is not None else hf_twin(model)
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, model.config.vocab_size, (batch_size, prompt_len), generator=gen)  # (B, P)
    ids_dev = prompts.to(dev)
    ones = torch.ones_like(ids_dev)

    def ours():
        return ar_generate(model, prompts, max_new_tokens=new_tokens, stop_ids=(), cuda_graph=cuda_graph)

    def theirs():
        with torch.inference_mode():
            return hf.generate(
                ids_dev,
                attention_mask=ones,
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                eos_token_id=None,
                pad_token_id=0,
            )

    ours(), theirs()  # warm-up (lazy init, kernel compilation)
    t_ours, out_ours = _median_seconds(ours, repeats, dev)
    t_hf, out_hf = _median_seconds(theirs, repeats, dev)
    a, b = out_ours.tokens.cpu(), out_hf[:, prompt_len:].cpu()  # (B, N) each
    n = min(a.shape[1], b.shape[1])
    same = (a[:, :n] == b[:, :n]).long().cumprod(dim=1).sum(dim=1).float() / new_tokens  # (B,)
    tokens = batch_size * new_tokens
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or "cpu"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model": getattr(model, "name", "?"),
        "dtype": str(model.dtype).replace("torch.", ""),
        "batch_size": batch_size,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "cuda_graph": out_ours.cuda_graph,  # what ran, not what was asked (a failed capture falls back)
        "ours_s": t_ours,
        "hf_s": t_hf,
        "hf_new_tokens": int(b.shape[1]),
        "ours_tokens_per_s": tokens / t_ours,
        "hf_tokens_per_s": batch_size * b.shape[1] / t_hf,
        "speedup": (tokens / t_ours) / (batch_size * b.shape[1] / t_hf),
        "weights_gbps": weight_bytes * new_tokens / t_ours / 1e9,
        "greedy_agreement": float(same.mean()),
    }
