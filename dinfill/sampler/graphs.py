"""CUDA graphs captured once per shape bucket and kept across sampler calls.

Why: on a machine whose host is slow (the lent H200, docs/gpu.md) a 0.5B forward is launch-bound, so the
samplers replay each step as a CUDA graph. Capturing costs a few eager steps plus instantiation; when every
call captures again (what the samplers did before), a short generation - a real single-line middle is 10-20
tokens - spends most of its time capturing. Here the samplers keep what they captured:

- **Buckets.** A call's shape (batch, canvas or cache length, variable rows, dual-cache window) is rounded up
  to a bucket (:func:`bucket_batch`, :func:`bucket_length`, :func:`bucket_rows`, :func:`bucket_steps`); the
  call is padded up to it (padding rows and columns are never attended to and never generated) and replays
  the bucket's graphs. The first call of a bucket pays the capture, later calls only copy their inputs into
  the bucket's static buffers.
- **What a key holds.** The model (by identity, held through a weak reference: a model that is garbage
  collected takes its entries with it; parameters that were moved or re-allocated give a new key), the shape
  bucket, and every setting that changes the captured code (algorithm, cache mode, backend and GEMV switches,
  dtype, whether the call samples, whether top-p / top-k are on ...). Per-call values (temperature, top-p,
  the random seed, the prompt, the schedule table) live in device tensors that the graphs read, so they never
  force a recapture.
- **Bounded memory.** At most ``max_entries`` buckets are kept; the least recently used one goes first. Each
  entry reports the bytes of its static buffers (exact) and, on CUDA, the device memory its graphs reserved
  (measured around the capture, so approximate: whatever else the allocator did meanwhile is included).
- **Warm-up.** :func:`warmup` runs one call per listed shape so that a benchmark or an evaluation captures
  before it starts timing.

``cuda_graph="emulate"`` in both samplers runs the same bookkeeping (buckets, padding, the pool, capture
counting, replays) with plain calls instead of graphs, on any device: the CPU test-suite uses it to show
that a second call of a bucket captures nothing and gives the same tokens.

Limitations: one pool per process, not thread-safe (like CUDA graph replay itself on one stream); graphs
capture on the current device and stream of the first call of a bucket.
"""

from __future__ import annotations

import contextlib
import os
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "GraphPool",
    "PoolStats",
    "Graph",
    "graph_pool",
    "bucket_batch",
    "bucket_length",
    "bucket_rows",
    "bucket_steps",
    "code_switches",
    "model_key",
    "tensor_bytes",
    "warmup",
]

_DEFAULT_ENTRIES = 16  # buckets kept per process; DINFILL_GRAPH_POOL_SIZE overrides it


# --------------------------------------------------------------------------------------------------
# shape buckets
# --------------------------------------------------------------------------------------------------


def _round_up(n: int, granule: int) -> int:
    return -(-n // granule) * granule


def bucket_batch(n: int) -> int:
    """Batch bucket: exact up to 2, powers of two to 16, then steps of 1.5x / 1.33x (24, 32, 48, 64, 96 ...).

    Batch 1 stays 1: at batch 1 a padded row would double the work of the latency-critical case.
    """
    if n < 1:
        raise ValueError(f"batch size must be >= 1, got {n}")
    b = 1
    while b < n:
        if b < 16:
            b *= 2
        elif b & (b - 1) == 0:
            b = b * 3 // 2  # 16 -> 24, 32 -> 48 ...
        else:
            b = b // 3 * 4  # 24 -> 32, 48 -> 64 ...
    return b


def bucket_length(n: int, limit: int | None = None) -> int:
    """Canvas / prompt / cache length bucket: multiples of 32 to 512, of 64 to 1024, then of 128.

    Fine enough that a 276-token canvas pays 4% of padding (288), coarse enough that a 2048-token range has
    32 buckets. ``limit`` (the model's position limit) caps the result.
    """
    if n < 1:
        raise ValueError(f"length must be >= 1, got {n}")
    b = _round_up(n, 32 if n <= 512 else 64 if n <= 1024 else 128)
    return min(b, limit) if limit is not None else b


def bucket_rows(n: int) -> int:
    """Bucket of the variable rows per sequence (and of the dual-cache window): multiples of 8 to 64, of 16
    to 128, of 32 to 512, then of 64. The published setting's 16 masks stay 16."""
    if n < 1:
        raise ValueError(f"row count must be >= 1, got {n}")
    return _round_up(n, 8 if n <= 64 else 16 if n <= 128 else 32 if n <= 512 else 64)


def bucket_steps(n: int) -> int:
    """Capacity of the per-step tables (schedule, masks left): the next power of two, at least 8."""
    if n < 1:
        raise ValueError(f"steps must be >= 1, got {n}")
    return max(8, 1 << (n - 1).bit_length())


def code_switches() -> tuple[str, str, str]:
    """The environment switches the runtime reads at call time that change what a graph captures:
    ``(DINFILL_BACKEND, DINFILL_GEMV, DINFILL_PDL)``. Part of every pool key, so flipping one between calls (a
    benchmark comparing the paths in one process) captures the other path instead of replaying the first."""
    from dinfill.backend import requested_backend

    return requested_backend(), os.environ.get("DINFILL_GEMV", "cublas"), os.environ.get("DINFILL_PDL", "0")


def model_key(model: torch.nn.Module) -> tuple:
    """The part of a pool key that the model and the process decide, the same for both samplers: the
    :func:`code_switches`, the device, the dtype and where the first and last parameters live (moving or
    re-allocating them gives a new key)."""
    params = list(model.parameters())
    where = (len(params), params[0].data_ptr(), params[-1].data_ptr()) if params else (0,)
    return (*code_switches(), str(model.device), str(model.dtype), where)


def tensor_bytes(tensors: Iterable[Any]) -> int:
    """Bytes held by the tensors among ``tensors`` (views of one storage are counted once)."""
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, Tensor):
            key = (t.device, t.untyped_storage().data_ptr())
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return total


# --------------------------------------------------------------------------------------------------
# one graph
# --------------------------------------------------------------------------------------------------


class Graph:
    """``fn`` captured as a CUDA graph, or (``emulate=True``) a stand-in that calls ``fn`` at each replay.

    Parameters
    ----------
    fn : callable
        Reads and writes static tensors only (no host sync, no allocation that outlives it).
    emulate : bool
        Skip the capture; :meth:`replay` calls ``fn``.
    pool : optional
        A ``torch.cuda.graph_pool_handle()`` shared by the graphs of one bucket: they never run
        concurrently, so their temporaries can share memory.
    """

    def __init__(self, fn: Callable[[], None], *, emulate: bool, pool: Any = None):
        self.fn, self.graph = fn, None
        if not emulate:
            self.graph = torch.cuda.CUDAGraph()
            # the outer context gives the caller its stream back even when a failed capture makes
            # torch.cuda.graph's exit raise before it restores the stream (the AR sampler then runs on eagerly)
            with torch.cuda.stream(torch.cuda.current_stream()), torch.cuda.graph(self.graph, pool=pool):
                fn()
            # a replay never calls fn again; keeping it (a method of the object that holds this graph) would
            # make a reference cycle, so an evicted pool entry's device memory would wait for the cyclic GC
            self.fn = None

    def replay(self) -> None:
        """Run the captured work (or, emulated, ``fn`` itself)."""
        if self.graph is None:
            self.fn()
        else:
            self.graph.replay()


@contextlib.contextmanager
def side_stream(emulate: bool):
    """Warm-up context for a capture: a side stream on CUDA (what ``torch.cuda.graphs`` asks for), else nothing."""
    if emulate:
        yield
        return
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        yield
    torch.cuda.current_stream().wait_stream(side)


# --------------------------------------------------------------------------------------------------
# the pool
# --------------------------------------------------------------------------------------------------


@dataclass
class PoolStats:
    """Counters of a :class:`GraphPool` since it was created (or since :meth:`GraphPool.clear`)."""

    builds: int = 0  # entries created: each one captured its graphs (or, emulated, went through the motions)
    graphs: int = 0  # graphs captured (emulated ones included)
    hits: int = 0  # calls that found their bucket (an AR call may still add the prefill of a new prompt width)
    evictions: int = 0  # entries dropped by the LRU cap
    capture_s: float = 0.0  # host seconds spent building and capturing entries


@dataclass
class _Entry:
    model: weakref.ref
    value: Any
    static_bytes: int = 0
    graph_bytes: int | None = None
    graphs: int = 0
    uses: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class GraphPool:
    """Least-recently-used store of captured graphs and their static buffers, keyed by model and bucket.

    Parameters
    ----------
    max_entries : int
        Buckets kept at once (>= 1); inserting one more drops the least recently used.

    Notes
    -----
    The samplers use the process-wide pool from :func:`graph_pool`; its size comes from
    ``$DINFILL_GRAPH_POOL_SIZE`` (default 16) and can be changed with :meth:`resize`.
    """

    def __init__(self, max_entries: int = _DEFAULT_ENTRIES):
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self._watched: set[int] = set()
        self.max_entries = 1
        self.resize(max_entries)
        self.stats = PoolStats()

    def resize(self, max_entries: int) -> None:
        """Change the cap (evicting the least recently used entries that no longer fit)."""
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"max_entries must be an int >= 1, got {max_entries!r}")
        self.max_entries = max_entries
        self._evict()

    def __len__(self) -> int:
        return len(self._entries)

    def _evict(self) -> None:
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
            self.stats.evictions += 1

    def _forget_model(self, model_id: int) -> None:
        for k in [k for k in self._entries if k[0] == model_id]:
            del self._entries[k]
        self._watched.discard(model_id)

    def lookup(self, model: torch.nn.Module, key: Hashable) -> Any | None:
        """The value stored for ``(model, key)``, marked most recently used; ``None`` when absent."""
        full = (id(model), key)
        entry = self._entries.get(full)
        if entry is None:
            return None
        if entry.model() is not model:  # a dead model's id was reused: the entry is stale
            del self._entries[full]
            return None
        self._entries.move_to_end(full)
        entry.uses += 1
        self.stats.hits += 1
        return entry.value

    def insert(
        self,
        model: torch.nn.Module,
        key: Hashable,
        value: Any,
        *,
        static_bytes: int = 0,
        graph_bytes: int | None = None,
        graphs: int = 0,
        capture_s: float = 0.0,
        **extra: Any,
    ) -> None:
        """Store a freshly captured ``value`` for ``(model, key)`` and evict beyond the cap."""
        full = (id(model), key)
        if id(model) not in self._watched:
            weakref.finalize(model, self._forget_model, id(model))  # the model's death frees its graphs
            self._watched.add(id(model))
        self._entries[full] = _Entry(weakref.ref(model), value, static_bytes, graph_bytes, graphs, 1, extra)
        self._entries.move_to_end(full)
        self.stats.builds += 1
        self.stats.graphs += graphs
        self.stats.capture_s += capture_s
        self._evict()

    def grow(
        self,
        model: torch.nn.Module,
        key: Hashable,
        *,
        graphs: int,
        capture_s: float = 0.0,
        static_bytes: int | None = None,
        graph_bytes: int | None = None,
    ) -> None:
        """Account graphs captured later into an existing entry (the AR prefill of a new prompt width)."""
        entry = self._entries.get((id(model), key))
        if entry is None:
            return
        entry.graphs += graphs
        if static_bytes is not None:
            entry.static_bytes = static_bytes
        if graph_bytes is not None:
            entry.graph_bytes = (entry.graph_bytes or 0) + graph_bytes
        self.stats.graphs += graphs
        self.stats.capture_s += capture_s

    def drop(self, model: torch.nn.Module, key: Hashable) -> None:
        """Remove one entry (a capture into it failed)."""
        self._entries.pop((id(model), key), None)

    def clear(self, model: torch.nn.Module | None = None) -> None:
        """Drop every entry (of ``model`` only, when given) and, without a model, reset the counters."""
        if model is not None:
            self._forget_model(id(model))
            return
        self._entries.clear()
        self.stats = PoolStats()

    def entries(self) -> list[dict[str, Any]]:
        """One dict per entry, least recently used first: key, uses, graphs and memory."""
        return [
            {"key": k[1], "uses": e.uses, "graphs": e.graphs, "static_bytes": e.static_bytes,
             "graph_bytes": e.graph_bytes, **e.extra}
            for k, e in self._entries.items()
        ]  # fmt: skip

    def memory(self) -> dict[str, int | None]:
        """Bytes of the static buffers of all entries, and of their graphs' memory where it was measured."""
        measured = [e.graph_bytes for e in self._entries.values() if e.graph_bytes is not None]
        return {
            "entries": len(self._entries),
            "static_bytes": sum(e.static_bytes for e in self._entries.values()),
            "graph_bytes": sum(measured) if measured else None,
        }

    def summary(self) -> dict[str, Any]:
        """Counters and memory in one JSON-friendly dict (benchmark records carry it)."""
        s = self.stats
        return {"builds": s.builds, "graphs": s.graphs, "hits": s.hits, "evictions": s.evictions,
                "capture_s": s.capture_s, "max_entries": self.max_entries, **self.memory()}  # fmt: skip


def _env_size() -> int:
    raw = os.environ.get("DINFILL_GRAPH_POOL_SIZE")
    if not raw:
        return _DEFAULT_ENTRIES
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"DINFILL_GRAPH_POOL_SIZE={raw!r} is not an integer; set it to the buckets to keep") from None
    if n < 1:
        raise ValueError(f"DINFILL_GRAPH_POOL_SIZE={n} must be >= 1")
    return n


_POOL: GraphPool | None = None


def graph_pool() -> GraphPool:
    """The process-wide pool both samplers use."""
    global _POOL
    if _POOL is None:
        _POOL = GraphPool(_env_size())
    return _POOL


class LaggedFlag:
    """Early exit of a step loop on a device flag without draining the device queue (both samplers' loops).

    Reading a device flag after every step would make the host wait for the queue to empty before it launches
    the next step. Instead, after launching a step, :meth:`record` queues a copy of the 0-dim bool ``flag`` into
    pinned host memory and records an event; before launching step ``i``, :meth:`should_stop` waits for step
    ``i - lag``'s event only and reads that copy. The queue stays ``lag`` steps deep, and at most ``lag - 1``
    steps run after the flag turned (the loops' steps are no-ops by then). The copies go round a ring of ``lag``
    slots and events made once: nothing is allocated per step.

    Off CUDA there is no queue to drain: :meth:`should_stop` reads ``flag`` itself after every step (a host read,
    by design; ``lagged=True`` forces the ring there, for tests).

    Parameters
    ----------
    flag : Tensor
        0-dim bool device flag that the steps update.
    lag : int
        Steps the host may run ahead of the flag (>= 1); more than ``steps`` means no early exit.
    steps : int
        The most steps the loop runs (caps the ring).
    stop_on : bool
        The flag value that ends the loop.
    lagged : bool, optional
        Default: on CUDA only.
    """

    def __init__(self, flag: Tensor, lag: int, steps: int, *, stop_on: bool, lagged: bool | None = None):
        self.flag, self.stop_on, self.recorded = flag, stop_on, 0
        # a lag past the last step is never reached: the same loop with a ring no larger than the steps
        self.lag = max(1, min(lag, steps))
        self._host, self._events = None, []
        if lagged is None:
            lagged = flag.device.type == "cuda"
        if lagged:
            self._host = torch.zeros(self.lag, dtype=torch.bool, pin_memory=flag.is_cuda)  # (lag,) flag copies
            self._events = [torch.cuda.Event() for _ in range(self.lag)]

    def record(self) -> None:
        """Note the flag of the step just launched (lagged: an asynchronous copy and an event, no sync)."""
        if self._host is not None:
            slot = self.recorded % self.lag
            self._host[slot].copy_(self.flag, non_blocking=True)
            self._events[slot].record()
        self.recorded += 1

    def should_stop(self) -> bool:
        """Whether the flag read now (lagged: ``lag`` steps back, waiting for that step only) says stop."""
        if self._host is None:
            return self.recorded > 0 and bool(self.flag) == self.stop_on
        if self.recorded < self.lag:
            return False
        slot = self.recorded % self.lag  # step recorded - lag, the oldest copy in the ring
        self._events[slot].synchronize()
        return bool(self._host[slot]) == self.stop_on


class CaptureMeter:
    """Measures one entry's build: host seconds and, on CUDA, the device memory it reserved."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.t0 = time.perf_counter()
        self.reserved0 = torch.cuda.memory_reserved(device) if self.cuda else 0

    def done(self) -> tuple[float, int | None]:
        """``(seconds, reserved bytes grown since the start or None off CUDA)``."""
        grown = torch.cuda.memory_reserved(self.device) - self.reserved0 if self.cuda else None
        return time.perf_counter() - self.t0, grown


# --------------------------------------------------------------------------------------------------
# warm-up
# --------------------------------------------------------------------------------------------------


def warmup(model, shapes: Sequence[Sequence[int]], **options: Any) -> list[dict[str, Any]]:
    """Capture the graphs of a list of call shapes before timing (one untimed call per shape).

    Parameters
    ----------
    model
        A dinfill model; ``model.kind`` picks the sampler.
    shapes : sequence of tuples
        Diffusion: ``(batch, canvas_len, masks)``, one contiguous run of ``masks`` masks per row in the middle
        of a canvas of random ids. AR: ``(batch, prompt_len, max_new_tokens)`` of random prompt ids.
    **options
        The sampler settings of the calls to come (they are part of the bucket key): for diffusion
        everything :func:`~dinfill.sampler.diffusion.diffusion_generate` takes (``mask_id`` defaults to the
        last vocabulary id), for AR everything :func:`~dinfill.sampler.autoregressive.ar_generate` takes
        (``stop_ids`` defaults to none, so the call runs to ``max_new_tokens``).

    Returns
    -------
    list of dict
        Per shape: ``shape``, ``bucket``, ``captured`` (whether this call built the bucket) and ``seconds``.
    """
    kind = getattr(model, "kind", None)
    if kind not in ("diffusion", "ar"):
        raise ValueError(f"model.kind is {kind!r}; warm-up needs a 'diffusion' or 'ar' model")
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    report = []
    for shape in shapes:
        if len(shape) != 3 or not all(isinstance(v, int) and v >= 1 for v in shape):
            raise ValueError(f"each warm-up shape is 3 ints >= 1, got {shape!r}")
        t0 = time.perf_counter()
        if kind == "diffusion":
            from dinfill.sampler.diffusion import diffusion_generate

            batch, length, masks = shape
            if masks > length:
                raise ValueError(f"warm-up shape {shape}: {masks} masks do not fit a canvas of {length}")
            mask_id = options.get("mask_id", vocab - 1)
            ids = torch.randint(0, vocab - 1, (batch, length), generator=gen)  # (B, L)
            ids = ids + (ids >= mask_id).long()  # never the mask id
            start = (length - masks) // 2
            ids[:, start : start + masks] = mask_id
            opts = {"mask_id": mask_id, **options, "return_stats": True}
            _, stats = diffusion_generate(model, ids, **opts)
            report.append({"shape": tuple(shape), "bucket": stats.graph_bucket, "captured": stats.graph_captured,
                           "seconds": time.perf_counter() - t0})  # fmt: skip
        else:
            from dinfill.sampler.autoregressive import ar_generate

            batch, prompt, new = shape
            rows = torch.randint(0, vocab, (batch, prompt), generator=gen).tolist()
            opts = {"stop_ids": (), **options, "max_new_tokens": new}
            out = ar_generate(model, rows, **opts)
            report.append({"shape": tuple(shape), "bucket": out.graph_bucket, "captured": out.graph_captured,
                           "seconds": time.perf_counter() - t0})  # fmt: skip
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    return report
