"""End-to-end infilling throughput: diffusion and AR samplers on realistic canvases, against their references.

What one configuration measures (``run_config``): a workload of problems (lengths from
:mod:`dinfill.bench.workload`, random token ids, so random weights work offline) is cut into batches; every
batch goes through the sampler once, timed with a device sync on both sides, after an untimed warm-up: on CUDA
one call of every shape bucket of the workload (:mod:`dinfill.sampler.graphs`: the samplers keep the CUDA
graphs they capture, per bucket, across calls, so the timed pass replays and captures nothing, as a long
evaluation does; the record counts the graphs captured during the timed pass, which should be 0), elsewhere
the first batch (Triton compilation and allocator growth stay out of the numbers). From that come ms per
problem, tokens/s and problems/s (throughput over the whole workload), the batch latency p50/p90, forward
passes, the model / sampling / other split the diffusion sampler reports, peak device memory, and the
achieved FLOP/s and bytes/s of the work model in :mod:`dinfill.bench.roofline` against the device's peak.

``vs="reference"`` runs the baseline on *the same batches in the same process* (all of them, or the first
``reference_limit`` batches when a slow baseline must stay short): for a diffusion model the plain reference
loop (:func:`dinfill.sampler.reference_loop.reference_generate`: full forward and full logits every step,
torch sampling with a full-vocabulary sort for top-p, host syncs), for an AR model transformers' ``generate``
on the same weights (:func:`dinfill.sampler.autoregressive.hf_twin`). The record holds the ratio of times per
problem and the fraction of generated tokens that agree; with greedy settings,
``cache="none"`` and an fp32 model the diffusion tokens must agree exactly.

Tokens counted are the middle positions a problem asked for (its canvas masks for diffusion, its middle's
token count for AR, which generates exactly that many: with random weights a stop token never comes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dinfill.bench import profiling, roofline
from dinfill.bench.workload import Problem, Workload, random_ids

log = logging.getLogger("dinfill")

__all__ = [
    "KINDS",
    "LENGTH_MODES",
    "VS_CHOICES",
    "BenchConfig",
    "Sampling",
    "expand_configs",
    "run_config",
    "percentile",
]

KINDS = ("diffusion", "ar")
LENGTH_MODES = ("oracle", "fixed", "adaptive")
VS_CHOICES = ("none", "reference")
_REFERENCE_ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy", "p2")  # algs the reference loop has
_CANVAS_LIMIT = 2048  # the published evaluation keeps the last 2048 canvas tokens


@dataclass(frozen=True)
class BenchConfig:
    """One point of a benchmark sweep.

    Attributes
    ----------
    kind : str
        ``"diffusion"`` or ``"ar"``; diffusion-only fields are ``None`` for AR.
    batch : int
        Problems per sampler call.
    steps, alg, cache, refresh :
        Diffusion sampler settings (:func:`dinfill.sampler.diffusion.diffusion_generate`).
    length : str
        Middle length: ``oracle`` (each problem's own), ``fixed`` or ``adaptive`` (``middle_tokens`` masks;
        adaptive's trimming happens after generation, so its cost equals fixed's).
    middle_tokens : int or None
        Canvas middle for ``fixed`` / ``adaptive``.
    """

    kind: str
    batch: int
    length: str = "oracle"
    middle_tokens: int | None = None
    steps: int | None = None
    alg: str | None = None
    cache: str | None = None
    refresh: int | None = None

    def label(self) -> str:
        """A short name for tables, plots and trace files."""
        parts = [self.kind, f"B{self.batch}"]
        if self.kind == "diffusion":
            cache = self.cache if self.cache == "none" else f"{self.cache}{self.refresh}"
            parts += [f"s{self.steps}", str(self.alg), cache]
        parts.append(self.length if self.length == "oracle" else f"{self.length}{self.middle_tokens}")
        return "-".join(parts)


@dataclass(frozen=True)
class Sampling:
    """Sampler settings shared by every configuration (defaults: the published setting, T 0.6, top-p 0.95)."""

    temperature: float = 0.6
    top_p: float | None = 0.95
    top_k: int | None = None
    threshold: float = 0.9
    seed: int = 0
    factor: float = 1.0  # parameter of alg="factor"


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def expand_configs(
    kind: str,
    *,
    batches: Sequence[int] = (1,),
    steps: Sequence[int] = (64,),
    algs: Sequence[str] = ("p2",),
    caches: Sequence[str] = ("none",),
    lengths: Sequence[str] = ("oracle",),
    middle_tokens: int = 32,
    refresh: int = 8,
) -> list[BenchConfig]:
    """The cross product of the sweep options, validated, without duplicates (AR ignores diffusion axes)."""
    if kind not in KINDS:
        raise ValueError(f"model kind {kind!r} is not one of {KINDS}")
    for b in batches:
        _positive_int("batch size", b)
    for s in steps:
        _positive_int("steps", s)
    _positive_int("middle tokens", middle_tokens)
    _positive_int("refresh", refresh)
    for mode in lengths:
        if mode not in LENGTH_MODES:
            raise ValueError(f"middle-length mode {mode!r} is not one of {LENGTH_MODES}")
    if kind == "diffusion":
        from dinfill.sampler.diffusion import ALGORITHMS, CACHE_MODES

        for a in algs:
            if a not in ALGORITHMS:
                raise ValueError(f"unknown alg {a!r}; choose from {', '.join(ALGORITHMS)}")
        for c in caches:
            if c not in CACHE_MODES:
                raise ValueError(f"unknown cache mode {c!r}; choose from {', '.join(CACHE_MODES)}")
    out: list[BenchConfig] = []
    for b, mode in itertools.product(batches, lengths):
        mid = None if mode == "oracle" else middle_tokens
        if kind == "ar":
            out.append(BenchConfig("ar", b, mode, mid))
            continue
        for s, a, c in itertools.product(steps, algs, caches):
            out.append(BenchConfig("diffusion", b, mode, mid, s, a, c, refresh if c == "dual" else None))
    return list(dict.fromkeys(out))


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` in [0, 100] of a non-empty sequence (numpy's default rule)."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    roofline.sync(device)
    t0 = time.perf_counter()
    result = fn()
    roofline.sync(device)
    return time.perf_counter() - t0, result


@contextlib.contextmanager
def _count_forwards(model: torch.nn.Module) -> Iterator[list[int]]:
    """Count eager forward calls of ``model`` (used on the reference paths, which never replay graphs)."""
    counter = [0]

    def hook(*_args, **_kwargs) -> None:
        counter[0] += 1

    handle = model.register_forward_pre_hook(hook)
    try:
        yield counter
    finally:
        handle.remove()


# --------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------


@dataclass
class _DiffusionBatch:
    input_ids: Tensor  # (B, W) canvas with masks
    attention_mask: Tensor  # (B, W) bool
    variable: Tensor  # (B, W) bool: the middle positions to generate
    tokens: int  # middle positions in the batch


def _middle_len(p: Problem, cfg: BenchConfig) -> int:
    return p.middle if cfg.length == "oracle" else int(cfg.middle_tokens)


def _diffusion_batches(model, workload: Workload, cfg: BenchConfig, mask_id: int, seed: int) -> list[_DiffusionBatch]:
    """Canvases ``prefix + [MASK] * m + suffix`` of random ids; same seed -> same ids for every config."""
    from dinfill.sampler.canvas import build_row, layout_rows

    vocab = model.config.vocab_size
    limit = min(_CANVAS_LIMIT, model.config.max_position_embeddings)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for p in workload.problems:
        prefix, suffix = random_ids(p.prefix, vocab, mask_id, gen), random_ids(p.suffix, vocab, mask_id, gen)
        rows.append(build_row(prefix, suffix, _middle_len(p, cfg), mask_id, limit))
    layout = "aligned" if cfg.cache == "dual" else "right"
    out = []
    for i in range(0, len(rows), cfg.batch):
        b = layout_rows(rows[i : i + cfg.batch], pad_id=0, layout=layout, limit=limit, device=model.device)
        variable = (b.input_ids == mask_id) & b.attention_mask  # (B, W)
        out.append(_DiffusionBatch(b.input_ids, b.attention_mask, variable, sum(b.middle_len)))
    return out


@dataclass
class _ArBatch:
    prompts: list[list[int]]  # FIM prompts (sentinels + prefix + sentinel + suffix + sentinel)
    new_tokens: list[int]  # tokens each row asked for
    tokens: int


def _ar_batches(model, workload: Workload, cfg: BenchConfig, seed: int) -> list[_ArBatch]:
    """FIM-shaped prompts of random ids (three sentinel slots around prefix and suffix)."""
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    rows, news = [], []
    for p in workload.problems:
        ids = random_ids(p.prefix + p.suffix + 3, vocab, vocab, gen)  # nothing excluded: no mask in AR
        rows.append(ids)
        news.append(_middle_len(p, cfg))
    out = []
    for i in range(0, len(rows), cfg.batch):
        chunk = news[i : i + cfg.batch]
        out.append(_ArBatch(rows[i : i + cfg.batch], chunk, sum(chunk)))
    return out


# --------------------------------------------------------------------------------------------------
# work model of a run (roofline)
# --------------------------------------------------------------------------------------------------


def _diffusion_work(config, stats, itemsize: int) -> roofline.Work:
    """Work of one ``diffusion_generate`` call from its stats: full and window forwards plus the fused steps."""
    B, L, M = stats.batch_size, stats.canvas_len, stats.variable_rows
    rows = B * M
    work = roofline.forward_work(config, batch=B, queries=L, logits_rows=rows, itemsize=itemsize).scaled(
        stats.full_forwards
    )
    lo, hi = stats.window
    if stats.window_forwards:
        win = roofline.forward_work(config, batch=B, queries=hi - lo, keys=L, logits_rows=rows, itemsize=itemsize)
        work = work + win.scaled(stats.window_forwards)
    step_bytes = rows * config.vocab_size * itemsize  # the fused step reads every logits row once
    return work + roofline.Work(0.0, step_bytes * stats.forward_passes)


def _reference_work(config, batch: _DiffusionBatch, forwards: int, itemsize: int) -> roofline.Work:
    B, W = batch.input_ids.shape
    return roofline.forward_work(config, batch=B, queries=W, logits_rows=B * W, itemsize=itemsize).scaled(forwards)


def _ar_work(config, batch: _ArBatch, decode_steps: int, itemsize: int) -> roofline.Work:
    B = len(batch.prompts)
    P = max(len(r) for r in batch.prompts)
    work = roofline.forward_work(config, batch=B, queries=P, logits_rows=B, itemsize=itemsize, causal=True)
    if decode_steps:
        mean_keys = P + (decode_steps + 1) / 2  # keys grow by one per step; the cost is linear in keys
        step = roofline.forward_work(
            config, batch=B, queries=1, keys=max(1, round(mean_keys)), logits_rows=B, itemsize=itemsize
        )
        work = work + step.scaled(decode_steps)
    return work


# --------------------------------------------------------------------------------------------------
# one configuration
# --------------------------------------------------------------------------------------------------


def _latency_metrics(latencies: list[float], tokens: int, problems: int) -> dict[str, float]:
    total = sum(latencies)
    return {
        "total_s": total,
        "tokens": tokens,
        "problems": problems,
        "ms_per_problem": total / problems * 1e3,
        "tokens_per_s": tokens / total,
        "problems_per_s": problems / total,
        "latency_p50_ms": percentile(latencies, 50) * 1e3,
        "latency_p90_ms": percentile(latencies, 90) * 1e3,
    }


def _warm(model, batches, call, bucket) -> None:
    """Untimed calls before timing: on CUDA one per graph bucket of the workload, elsewhere the first batch."""
    if model.device.type != "cuda":
        call(0, batches[0])
        return
    seen = set()
    for i, b in enumerate(batches):
        key = bucket(b)
        if key not in seen:
            seen.add(key)
            call(i, b)


def _run_diffusion(model, batches, cfg: BenchConfig, s: Sampling, mask_id: int, nvtx: bool, warmup: bool):
    from dinfill.sampler.diffusion import diffusion_generate, graph_bucket

    def call(i: int, b: _DiffusionBatch):
        return diffusion_generate(
            model, b.input_ids, attention_mask=b.attention_mask, mask_id=mask_id, steps=cfg.steps, alg=cfg.alg,
            temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, threshold=s.threshold, factor=s.factor,
            cache=cfg.cache,
            refresh=cfg.refresh or 1, seed=s.seed + i, nvtx=nvtx, return_stats=True,
        )  # fmt: skip

    if warmup:
        _warm(model, batches, call, lambda b: graph_bucket(model, b.input_ids, mask_id=mask_id, cache=cfg.cache,
                                                            attention_mask=b.attention_mask))  # fmt: skip
    latencies, outs, stats = [], [], []
    for i, b in enumerate(batches):
        dt, (out, st) = _timed(lambda i=i, b=b: call(i, b), model.device)
        latencies.append(dt)
        outs.append(out)
        stats.append(st)
    return latencies, outs, stats


def _run_diffusion_reference(model, batches, cfg: BenchConfig, s: Sampling, mask_id: int, warmup: bool):
    from dinfill.sampler.reference_loop import reference_generate

    alg = cfg.alg if cfg.alg in _REFERENCE_ALGS else "maskgit_plus"  # threshold / factor exist only in ours

    def call(i: int, b: _DiffusionBatch) -> Tensor:
        gen = torch.Generator(device=model.device).manual_seed(s.seed + i)
        return reference_generate(
            model, b.input_ids, mask_id=mask_id, steps=cfg.steps, alg=alg, temperature=s.temperature,
            top_p=s.top_p, top_k=s.top_k, attention_mask=b.attention_mask, generator=gen,
        )  # fmt: skip

    if warmup:
        call(0, batches[0])
    latencies, outs, forwards = [], [], []
    for i, b in enumerate(batches):
        with _count_forwards(model) as n:
            dt, out = _timed(lambda i=i, b=b: call(i, b), model.device)
        latencies.append(dt)
        outs.append(out)
        forwards.append(n[0])
    return latencies, outs, forwards, alg


def _run_ar(model, batches, s: Sampling, warmup: bool):
    from dinfill.sampler.autoregressive import ar_generate, graph_bucket

    def call(i: int, b: _ArBatch):
        gen = torch.Generator(device=model.device).manual_seed(s.seed + i) if s.temperature > 0 else None
        return ar_generate(
            model, b.prompts, max_new_tokens=max(b.new_tokens), stop_ids=(), temperature=s.temperature,
            top_p=s.top_p, top_k=s.top_k, generator=gen,
        )  # fmt: skip

    if warmup:
        _warm(model, batches, call, lambda b: graph_bucket(model, b.prompts, max(b.new_tokens)))
    latencies, outs = [], []
    for i, b in enumerate(batches):
        dt, out = _timed(lambda i=i, b=b: call(i, b), model.device)
        latencies.append(dt)
        outs.append(out)
    return latencies, outs


def _run_ar_reference(model, hf, batches, s: Sampling, warmup: bool):
    """transformers' ``generate`` on the same left-padded prompts, exactly the same number of new tokens."""
    dev = model.device

    def call(i: int, b: _ArBatch) -> Tensor:
        P, n = max(len(r) for r in b.prompts), max(b.new_tokens)
        ids = torch.zeros(len(b.prompts), P, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, row in enumerate(b.prompts):
            ids[r, P - len(row) :] = torch.tensor(row)
            mask[r, P - len(row) :] = 1
        torch.manual_seed(s.seed + i)
        sample = dict(do_sample=True, temperature=s.temperature, top_p=s.top_p or 1.0, top_k=s.top_k or 0)
        with torch.inference_mode():
            out = hf.generate(
                ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                pad_token_id=0, **(sample if s.temperature > 0 else {"do_sample": False}),
            )  # fmt: skip
        return out[:, P:]

    if warmup:
        call(0, batches[0])
    latencies, outs = [], []
    for i, b in enumerate(batches):
        dt, out = _timed(lambda i=i, b=b: call(i, b), dev)
        latencies.append(dt)
        outs.append(out)
    return latencies, outs


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def run_config(
    model,
    workload: Workload,
    cfg: BenchConfig,
    sampling: Sampling = Sampling(),
    *,
    mask_id: int | None = None,
    vs: str = "none",
    hf_model=None,
    warmup: bool = True,
    nvtx: bool = False,
    profile_dir: str | None = None,
    peaks: roofline.DevicePeaks | None = None,
    ceilings: dict[str, float] | None = None,
    reference_limit: int | None = None,
) -> dict[str, Any]:
    """Benchmark one configuration on ``workload``; returns a results record (without the environment).

    Parameters
    ----------
    model : dinfill.models.Decoder
        Its ``kind`` must equal ``cfg.kind``.
    workload : Workload
        Problems (token lengths); every configuration of a sweep should get the same one.
    cfg : BenchConfig
        The configuration.
    sampling : Sampling
        Temperature, top-p, top-k, threshold and seed.
    mask_id : int, optional
        Diffusion mask id; default ``vocab_size - 1`` (random-weight shapes have no tokenizer).
    vs : str
        ``"none"`` or ``"reference"`` (see the module docstring).
    hf_model : transformers model, optional
        The AR reference (default: :func:`~dinfill.sampler.autoregressive.hf_twin` of ``model``).
    warmup : bool
        Untimed calls before the timed pass of ours: on CUDA one per CUDA-graph bucket of the workload (so the
        timed pass replays pooled graphs), elsewhere the first batch. The baseline gets the first batch.
    nvtx : bool
        Emit NVTX ranges during the timed pass of ours.
    profile_dir : str, optional
        Write a torch.profiler trace of ours' timed pass there.
    peaks, ceilings :
        Device peaks (:func:`dinfill.bench.roofline.device_peaks`) and measured ceilings for the roofline.
    reference_limit : int, optional
        Run the baseline on the first ``reference_limit`` batches only (a slow baseline kept short); its
        ratio is then one of times per problem and its agreement covers those batches.

    Returns
    -------
    dict
        ``{"type": "bench", "config", "workload", "metrics", "roofline", "reference"}``.
    """
    if getattr(model, "kind", None) != cfg.kind:
        raise ValueError(f"configuration is for a {cfg.kind} model but the model's kind is {model.kind!r}")
    if vs not in VS_CHOICES:
        raise ValueError(f"vs={vs!r} is not one of {VS_CHOICES}")
    if reference_limit is not None:
        _positive_int("reference_limit", reference_limit)
    from dinfill.sampler.graphs import graph_pool

    pool = graph_pool()
    dev = model.device
    itemsize = torch.empty((), dtype=model.dtype).element_size()
    mask_id = model.config.vocab_size - 1 if mask_id is None else int(mask_id)
    prof = profiling.torch_profile(profile_dir, cfg.label(), dev) if profile_dir else contextlib.nullcontext()
    ranges = profiling.profiling(nvtx=True) if nvtx else contextlib.nullcontext()
    hooks = profiling.instrument(model) if (nvtx or profile_dir) else contextlib.nullcontext()
    n_problems = len(workload.problems)
    metrics: dict[str, Any] = {}
    reference: dict[str, Any] | None = None

    if cfg.kind == "diffusion":
        batches = _diffusion_batches(model, workload, cfg, mask_id, sampling.seed)
        tokens = sum(b.tokens for b in batches)
        _peak_reset(dev)
        with hooks, ranges, prof:
            lat, outs, stats = _run_diffusion(model, batches, cfg, sampling, mask_id, nvtx, warmup)
        metrics.update(_latency_metrics(lat, tokens, n_problems))
        metrics["graph_captures_timed"] = sum(st.graph_captured for st in stats)
        model_s = sum(st.time_model_s for st in stats)
        sampling_s = sum(st.time_sampling_s for st in stats)
        total = metrics["total_s"]
        metrics.update(
            forward_passes=sum(st.forward_passes for st in stats) / len(stats),
            steps_run=sum(st.steps_run for st in stats) / len(stats),
            model_frac=model_s / total,
            sampling_frac=sampling_s / total,
            other_frac=max(0.0, 1.0 - (model_s + sampling_s) / total),
            peak_mem_mib=_peak_mib(dev),
            cuda_graph=any(st.cuda_graph for st in stats),
            backend=stats[0].backend,
        )
        work = roofline.Work()
        for st in stats:
            work = work + _diffusion_work(model.config, st, itemsize)
        if vs == "reference":
            r_batches = batches[:reference_limit] if reference_limit else batches
            try:  # no warm-up: ours ran first, so the kernels both share are compiled
                r_lat, r_outs, r_fwd, r_alg = _run_diffusion_reference(model, r_batches, cfg, sampling, mask_id, False)
            except torch.cuda.OutOfMemoryError as err:  # full logits of a wide batch: report, keep going
                reference = _reference_failed(err, dev, "reference loop")
            else:
                same = sum(
                    int((o[b.variable] == r[b.variable]).sum())
                    for o, r, b in zip(outs[: len(r_batches)], r_outs, r_batches, strict=True)
                )
                r_work = roofline.Work()
                for b, n in zip(r_batches, r_fwd, strict=True):
                    r_work = r_work + _reference_work(model.config, b, n, itemsize)
                reference = _reference_block(
                    r_lat, sum(b.tokens for b in r_batches), sum(b.input_ids.shape[0] for b in r_batches), metrics,
                    same, r_work, peaks, ceilings,
                )  # fmt: skip
                reference.update(alg=r_alg, forward_passes=sum(r_fwd) / len(r_fwd), baseline="reference loop")
    else:
        batches_ar = _ar_batches(model, workload, cfg, sampling.seed)
        tokens = sum(b.tokens for b in batches_ar)
        _peak_reset(dev)
        with hooks, ranges, prof:
            lat, outs = _run_ar(model, batches_ar, sampling, warmup)
        metrics.update(_latency_metrics(lat, tokens, n_problems))
        metrics.update(
            forward_passes=sum(1 + o.steps for o in outs) / len(outs),
            peak_mem_mib=_peak_mib(dev),
            cuda_graph=any(o.cuda_graph for o in outs),
            graph_captures_timed=sum(o.graph_captured for o in outs),
        )
        work = roofline.Work()
        for b, o in zip(batches_ar, outs, strict=True):
            work = work + _ar_work(model.config, b, o.steps, itemsize)
        if vs == "reference":
            from dinfill.sampler.autoregressive import hf_twin

            hf = hf_model if hf_model is not None else hf_twin(model)
            r_batches = batches_ar[:reference_limit] if reference_limit else batches_ar
            try:
                r_lat, r_outs = _run_ar_reference(model, hf, r_batches, sampling, warmup)
            except torch.cuda.OutOfMemoryError as err:
                reference = _reference_failed(err, dev, "transformers generate")
            else:
                same = 0
                r_work = roofline.Work()
                for b, o, r in zip(r_batches, outs[: len(r_batches)], r_outs, strict=True):
                    ours_t, ref_t = o.tokens.cpu(), r.cpu()
                    for row, n in enumerate(b.new_tokens):
                        same += int((ours_t[row, :n] == ref_t[row, :n]).sum())
                    r_work = r_work + _ar_work(model.config, b, o.steps, itemsize)
                reference = _reference_block(
                    r_lat, sum(b.tokens for b in r_batches), sum(len(b.prompts) for b in r_batches), metrics, same,
                    r_work, peaks, ceilings,
                )  # fmt: skip
                reference.update(baseline="transformers generate")
    metrics["graph_pool"] = pool.summary()
    return {
        "type": "bench",
        "config": dataclasses.asdict(cfg),
        "label": cfg.label(),
        "workload": workload.summary(),
        "sampling": dataclasses.asdict(sampling),
        "model": {"name": getattr(model, "name", None), "dtype": str(model.dtype).replace("torch.", "")},
        "metrics": metrics,
        "roofline": roofline.achieved(work, metrics["total_s"], peaks, ceilings),
        "reference": reference,
        "profiled": bool(nvtx or profile_dir),
    }


def _reference_block(latencies, tokens, problems, ours: dict, same, work, peaks, ceilings) -> dict[str, Any]:
    """The baseline's metrics; ``speedup`` is its time per problem over ours (totals when it ran every batch)."""
    block = _latency_metrics(latencies, tokens, problems)
    block["speedup"] = block["ms_per_problem"] / ours["ms_per_problem"]
    block["agreement"] = same / tokens if tokens else None
    block["exact"] = same == tokens
    block["roofline"] = roofline.achieved(work, block["total_s"], peaks, ceilings)
    return block


def _reference_failed(err: Exception, device: torch.device, baseline: str) -> dict[str, Any]:
    """The reference block of a baseline that ran out of memory (the record says so instead of crashing)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    log.warning("%s ran out of memory: %s", baseline, str(err).splitlines()[0])
    return {"baseline": baseline, "error": f"out of memory: {str(err).splitlines()[0]}", "speedup": None,
            "agreement": None, "tokens_per_s": None, "ms_per_problem": None}  # fmt: skip
