"""One decoder forward: dinfill against transformers (CPU/GPU), and the GPU forward phase of issue 10.

``python -m dinfill.bench.forward [--family qwen2] [--batch 4] [--length 256]`` builds a small random
transformers model (so no weights are needed), saves it, loads it with ``dinfill.load_model`` and times
both forwards (median of repeats, after warm-up), printing the ratio. It also checks that both produce
the same logits, so the number compares like with like.

``python -m dinfill.bench.forward --phase`` runs :func:`forward_phase`: on CUDA, the open-dcoder-0.5B
shape with random bf16 weights, one forward per shape replayed as a CUDA graph on the fused path, on
the torch path and under ``torch.compile`` (same run), with kernel counts, the roofline floor and the
issue's targets. Without CUDA it runs the same code on a tiny shape and counts device ops instead of
timing (:class:`DeviceOpCounter`: kernel-launching aten ops plus Triton launches).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def compare_forward(
    family: str = "qwen2",
    batch: int = 4,
    length: int = 256,
    hidden: int = 256,
    layers: int = 4,
    repeats: int = 5,
    device: str = "cpu",
) -> dict:
    """Median forward seconds of transformers and dinfill on one random checkpoint; returns a dict with the ratio."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Starcoder2Config

    import dinfill
    from dinfill.bench.roofline import median_seconds

    cls = {"qwen2": Qwen2Config, "llama": LlamaConfig, "starcoder2": Starcoder2Config}[family]
    cfg = cls(
        vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 128), max_position_embeddings=4096,
    )  # fmt: skip
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(cfg).eval().to(device)
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp, safe_serialization=True)
        ours = dinfill.load_model(tmp, device=device, dtype=torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (batch, length), device=device)
    with torch.inference_mode():
        err = (ours(ids, causal=True) - ref(ids).logits).abs().max().item()
        t_ref = median_seconds(lambda: ref(ids), ids.device, repeats)
        t_ours = median_seconds(lambda: ours(ids, causal=True), ids.device, repeats)
    return {
        "family": family, "batch": batch, "length": length, "device": device, "max_abs_logit_diff": err,
        "transformers_s": t_ref, "dinfill_s": t_ours, "speedup": t_ref / t_ours,
    }  # fmt: skip


# --------------------------------------------------------------------------------------------------
# device ops of a forward, counted on any device (the CPU included)
# --------------------------------------------------------------------------------------------------

# aten ops that never launch a kernel: allocation and aliasing (views are recognised from their schema)
NO_KERNEL = {
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "alias", "lift_fresh",
    "split", "split_with_sizes", "unbind", "chunk", "sym_size", "sym_stride", "sym_numel", "_unsafe_view",
    "_reshape_alias",
}  # fmt: skip
SYNC_OPS = {"_local_scalar_dense", "equal", "is_nonzero", "nonzero", "item"}  # the host waits for their result


class DeviceOpCounter(TorchDispatchMode):
    """Counts the device ops of the code run inside it: kernel-launching aten ops and Triton launches.

    Use as ``with DeviceOpCounter() as c: model(...)``. aten ops are seen through a ``TorchDispatchMode``
    (views and allocations excluded); Triton launches by wrapping ``JITFunction.run`` (and, in the
    interpreter, ``InterpretedFunction.run``) while the context is open; the tensor traffic the
    interpreter itself causes during a launch is not counted. The model's input validation
    (``Decoder._check_inputs``: free on the CPU, skipped on CUDA) is counted apart in ``validation``.

    Attributes
    ----------
    aten, triton, validation, syncs : collections.Counter
        Counts by op / kernel name; ``syncs`` are the aten ops among them that make the host wait.
    """

    def __init__(self):
        super().__init__()
        self.aten: Counter[str] = Counter()
        self.triton: Counter[str] = Counter()
        self.validation: Counter[str] = Counter()
        self.syncs: Counter[str] = Counter()
        self._paused = 0
        self._in_validation = 0
        self._undo: list = []

    @property
    def total(self) -> int:
        """Device ops: aten kernels plus Triton launches (validation excluded)."""
        return sum(self.aten.values()) + sum(self.triton.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self._paused and not func.is_view and name not in NO_KERNEL:
            if self._in_validation:
                self.validation[name] += 1
            else:
                self.aten[name] += 1
                if name in SYNC_OPS:
                    self.syncs[name] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._patch()
        try:
            return super().__enter__()
        except BaseException:
            self._unpatch()
            raise

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._unpatch()

    def _patch(self) -> None:
        from dinfill.models.decoder import Decoder

        counter = self
        classes = []
        with contextlib.suppress(ImportError):
            from triton.runtime.jit import JITFunction

            classes.append(JITFunction)
        with contextlib.suppress(ImportError):
            from triton.runtime.interpreter import InterpretedFunction

            classes.append(InterpretedFunction)
        for cls in classes:
            own = cls.__dict__.get("run")  # restored as it was (None: inherited, so delete the override)
            real = cls.run

            def run(fn, *args, _real=real, **kwargs):
                if not kwargs.get("warmup", False):
                    counter.triton[getattr(getattr(fn, "fn", None), "__name__", "kernel")] += 1
                counter._paused += 1
                try:
                    return _real(fn, *args, **kwargs)
                finally:
                    counter._paused -= 1

            cls.run = run
            self._undo.append((cls, "run", own))
        real_check = Decoder.__dict__["_check_inputs"]

        def check(model, *args, **kwargs):
            counter._in_validation += 1
            try:
                return real_check(model, *args, **kwargs)
            finally:
                counter._in_validation -= 1

        Decoder._check_inputs = check
        self._undo.append((Decoder, "_check_inputs", real_check))

    def _unpatch(self) -> None:
        while self._undo:
            cls, name, value = self._undo.pop()
            if value is None:
                delattr(cls, name)
            else:
                setattr(cls, name, value)


# --------------------------------------------------------------------------------------------------
# issue 10's forward phase
# --------------------------------------------------------------------------------------------------

FORWARD_SHAPES = ((1, 1), (1, 276), (32, 276))  # (batch, tokens): one decode step, a diffusion canvas
FORWARD_TARGETS_MS = {(1, 1): 0.5, (1, 276): 0.7, (32, 276): 10.0}  # issue 10, H200, bf16, 0.5B shape
LOGITS_ROWS = 16  # a canvas forward returns logits at its 16 masked positions only
DECODE_CACHE = 276  # a decode step attends over a cache of this many earlier tokens
_COMPILE_S = 25.0  # what one torch.compile of a new shape costs on the H200 host (17-18 s measured), with slack


def decode_step(model, prompt: torch.Tensor, cur: torch.Tensor):
    """A thunk running one causal decode step of ``cur`` (B, 1) against a static cache filled here with ``prompt``.

    The cache has one column beyond the prompt (B, P), which every call writes again, so each call is the same
    step; logits for the one row. The prefill runs in the caller's grad mode.
    """
    (batch, cached), dev = prompt.shape, prompt.device
    cache = model.new_cache(batch, cached + 1)
    mask = torch.ones(batch, cached + 1, dtype=torch.bool, device=dev)  # (B, P + 1) every column real
    col = torch.full((1,), cached, dtype=torch.long, device=dev)
    last = torch.zeros(batch, 1, dtype=torch.long, device=dev)
    model(prompt, causal=True, attention_mask=mask, cache=cache, cache_pos=torch.arange(cached, device=dev))

    def step():
        return model(cur, causal=True, attention_mask=mask, cache=cache, cache_pos=col, logits_index=last)

    return step


def _forward_inputs(model, batch: int, tokens: int, rows: int, cached: int):
    """A thunk running one forward of the shape, plus its work (roofline) and a description.

    ``tokens == 1``: a causal decode step against a cache holding ``cached`` earlier tokens (filled
    once here), logits for the one row. Otherwise: a bidirectional canvas of ``tokens``, logits at its
    last ``rows`` positions (the masked middle of a diffusion step).
    """
    from dinfill.bench.roofline import forward_work

    dev, V = model.device, model.config.vocab_size
    g = torch.Generator().manual_seed(batch * 1000 + tokens)
    itemsize = torch.empty((), dtype=model.dtype).element_size()
    if tokens == 1:
        prompt = torch.randint(0, V, (batch, cached), generator=g).to(dev)
        cur = torch.randint(0, V, (batch, 1), generator=g).to(dev)
        with torch.no_grad():
            fn = decode_step(model, prompt, cur)
        work = forward_work(model.config, batch=batch, queries=1, keys=cached + 1, logits_rows=batch, itemsize=itemsize)
        return fn, work, f"decode, cache {cached}"
    x = torch.randint(0, V, (batch, tokens), generator=g).to(dev)
    idx = torch.arange(tokens - rows, tokens, device=dev).expand(batch, rows).contiguous()  # (B, rows)

    def fn():
        return model(x, causal=False, logits_index=idx)

    work = forward_work(model.config, batch=batch, queries=tokens, logits_rows=batch * rows, itemsize=itemsize)
    return fn, work, f"bidirectional, logits at {rows} rows"


def _graph_ms(fn, replays: int = 20, groups: int = 5) -> float:
    """Median GPU milliseconds of ``fn`` replayed from a CUDA graph (warm-up on a side stream first).

    The samplers' :class:`~dinfill.sampler.graphs.Graph` captures it, so a failed capture gives the caller its
    stream back (the phase then goes on with the next variant).
    """
    from dinfill.sampler.graphs import Graph, side_stream

    with side_stream(emulate=False):
        for _ in range(3):
            fn()
    graph = Graph(fn, emulate=False)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(groups):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / replays)
    del graph
    return statistics.median(times)


def _graph_output(fn) -> torch.Tensor:
    """A copy of ``fn``'s output as one CUDA-graph replay computes it: kernels back to back, as they are timed, so
    launches that overlap (programmatic dependent launch) are compared where they do overlap."""
    from dinfill.sampler.graphs import Graph, side_stream

    with side_stream(emulate=False):
        fn()
    held: list = []
    graph = Graph(lambda: held.append(fn()), emulate=False)
    graph.replay()
    torch.cuda.synchronize()
    out = held[0].clone()
    del graph
    return out


def _profiled_kernels(fn) -> int:
    """CUDA kernels (profiler device events, memsets included) of one eager call of ``fn``."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def _pdl_capable(device: torch.device) -> bool:
    """Programmatic dependent launch exists on ``device`` (sm_90 and newer: see :func:`dinfill.target.pdl`)."""
    from dinfill.target import PDL_MIN_ARCH

    major, minor = torch.cuda.get_device_capability(device) if torch.cuda.is_available() else (0, 0)
    return 10 * major + minor >= PDL_MIN_ARCH


@contextlib.contextmanager
def _env(name: str, value: str):
    """Set an environment variable (read at call time by the runtime) for the duration of the block."""
    import os

    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _backend(name: str):
    return _env("DINFILL_BACKEND", name)


def forward_phase(
    shapes: tuple[tuple[int, int], ...] | None = None,
    *,
    device: torch.device | str | None = None,
    small: bool = False,
    seed: int = 0,
    budget_s: float | None = None,
    compile: bool = True,
    results: str | Path | None = None,
    model=None,
) -> dict[str, Any]:
    """Issue 10's forward phase: one forward per shape on the fused path, the torch path and torch.compile.

    Parameters
    ----------
    shapes : tuple of (batch, tokens), optional
        Default :data:`FORWARD_SHAPES` on CUDA (``(1, 1)`` is a decode step against a 276-token cache,
        the others a bidirectional canvas with logits at 16 rows), tiny ones with ``small`` or on the CPU.
    device : torch.device or str, optional
        Default CUDA when available, else the CPU.
    small : bool
        Tiny shape (``tiny-dcoder``, fp32) and short sequences: the CPU dry run of ``gpu_check``.
    seed : int
        Seed of the random weights.
    budget_s : float, optional
        Seconds this phase may take (default 60). ``torch.compile`` (about 20 s per shape on the H200
        host) runs for the first shape always and for the others while they still fit; the rest say
        ``compile_skipped``. All three 0.5B shapes with compile take about 80 s.
    compile : bool
        Measure ``torch.compile`` of the torch path at all.
    results : str or Path, optional
        Append one JSON record per shape here (device, versions, git revision, date).
    model : Decoder, optional
        Reuse a loaded model instead of building the open-dcoder-0.5B shape with random weights.

    Returns
    -------
    dict
        ``rows`` (one dict per shape, below), ``ok`` (no variant raised; on the CPU also every fused forward
        within 10 device ops per layer + 6; on CUDA a missed speed target is ``met: False``, not a failure, as
        everywhere in gpu_check), ``detail`` (one line), ``seconds``.
        Row keys: ``shape`` ("B1 x 1"), ``batch``, ``tokens``, ``mode``; on CUDA ``fused_ms`` /
        ``torch_ms`` / ``compiled_ms`` (GPU ms of the forward replayed from a CUDA graph; ``torch_ms``
        is the pre-fusion path, ``compiled_ms`` the torch path under ``torch.compile``),
        ``fused_kernels`` / ``torch_kernels`` / ``compiled_kernels`` (profiler CUDA events of one call),
        ``compile_s`` or ``compile_skipped`` / ``compile_error``; for shapes of at most 16 tokens also
        ``fused_gemv_ms`` / ``fused_gemv_kernels`` / ``fused_gemv_ops`` (the experimental
        ``DINFILL_GEMV=triton`` path) and ``gemv_vs_cublas`` (> 1: it is faster), and on sm_90+
        ``fused_gemv_pdl_ms`` / ``_kernels`` / ``_ops`` (that path with ``DINFILL_PDL=1``), ``pdl_vs_gemv``
        (> 1: PDL is faster) and ``pdl_equal`` (its logits equal the GEMV path's bit for bit; not ok otherwise);
        ``floor_ms`` (``max(bytes / bandwidth,
        FLOPs / peak)`` on the measured H200-class ceilings), ``of_floor`` (floor / fused time),
        ``floor_bound`` (``"bytes"`` or ``"flops"``: which ceiling sets it), ``vs_compile`` (compiled / fused
        time), ``target_ms``, ``met`` (fused time within it), ``ok``;
        everywhere ``fused_ops`` / ``torch_ops`` (device ops counted by :class:`DeviceOpCounter`),
        ``ops_per_layer_budget``, and ``<variant>_error`` for a variant that raised (the row is then not ok;
        the other variants and shapes are still measured).
    """
    import dinfill
    from dinfill.backend import triton_interpreted
    from dinfill.bench import report, roofline

    t0 = time.perf_counter()
    budget_s = 60.0 if budget_s is None else float(budget_s)
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = dev.type == "cuda"
    tiny = small or not on_gpu
    if model is None:
        shape, dtype = ("tiny-dcoder", torch.float32) if tiny else ("open-dcoder-0.5b", torch.bfloat16)
        model = dinfill.load_model(shape, device=dev, dtype=dtype, random_weights=True, kind="diffusion", seed=seed)
    if shapes is None:
        shapes = ((1, 1), (1, 24), (2, 24)) if tiny else FORWARD_SHAPES
    rows_n, cached = (4, 20) if tiny else (LOGITS_ROWS, DECODE_CACHE)
    fused_ok = on_gpu or triton_interpreted()  # the fused path needs CUDA or Triton's interpreter
    pdl_ok = on_gpu and _pdl_capable(dev)
    peaks = roofline.device_peaks(roofline.device_name(dev)) if on_gpu else None
    budget_ops = 10 * model.config.num_layers + 6  # issue 10: <= 10 per layer; 6 per forward (key range, norm, head)

    rows, thunks = [], []
    for batch, tokens in shapes:
        with _env("DINFILL_PDL", "0"):  # the prefill of a decode row: a user's DINFILL_PDL is for the variants below
            fn, work, mode = _forward_inputs(model, batch, tokens, min(rows_n, tokens), cached)
        row: dict[str, Any] = {"shape": f"B{batch} x {tokens}", "batch": batch, "tokens": tokens, "mode": mode}
        row["target_ms"] = FORWARD_TARGETS_MS.get((batch, tokens)) if not tiny else None
        variants = (
            [("fused", "triton", "cublas"), ("torch", "torch", "cublas")]
            if fused_ok
            else [("torch", "torch", "cublas")]
        )
        if fused_ok and batch * tokens <= 16:  # the experimental Triton GEMVs (DINFILL_GEMV=triton) apply
            variants.insert(1, ("fused_gemv", "triton", "triton"))
            if pdl_ok:  # and on sm_90+, the same launched with programmatic dependent launch (DINFILL_PDL=1)
                variants.insert(2, ("fused_gemv_pdl", "triton", "triton"))
        outputs = {}
        with torch.no_grad():  # not inference_mode: torch.compile later reads these inputs
            for label, backend, gemv in variants:
                try:
                    pdl = "1" if label.endswith("_pdl") else "0"
                    with _backend(backend), _env("DINFILL_GEMV", gemv), _env("DINFILL_PDL", pdl):
                        out = fn()  # warm-up (compiles the kernels) outside the count
                        with DeviceOpCounter() as counter:
                            fn()
                        row[f"{label}_ops"] = counter.total
                        if on_gpu:
                            row[f"{label}_ms"] = round(_graph_ms(fn), 4)
                            row[f"{label}_kernels"] = _profiled_kernels(fn)
                        if label.startswith("fused_gemv"):  # compared below, on a GPU as a graph replays them
                            outputs[label] = _graph_output(fn) if on_gpu else out
                except Exception as err:  # a failed capture or kernel: say so in this row, measure the rest
                    row[f"{label}_error"] = f"{type(err).__name__}: {str(err)[:200]}"
                    row["ok"] = False
        if "fused_gemv_ms" in row and "fused_ms" in row:
            row["gemv_vs_cublas"] = round(row["fused_ms"] / row["fused_gemv_ms"], 3)  # > 1: the Triton GEMVs win
        if "fused_gemv_pdl" in outputs and "fused_gemv" in outputs:
            # PDL changes when kernels start, never what they compute: the logits of a graph replay (where launches
            # overlap) must equal the GEMV path's bit for bit
            row["pdl_equal"] = bool(torch.equal(outputs["fused_gemv_pdl"], outputs["fused_gemv"]))
            if not row["pdl_equal"]:
                row["ok"] = False
            if "fused_gemv_pdl_ms" in row and "fused_gemv_ms" in row:
                row["pdl_vs_gemv"] = round(row["fused_gemv_ms"] / row["fused_gemv_pdl_ms"], 3)  # > 1: PDL wins
        row["ops_per_layer_budget"] = budget_ops
        if on_gpu and "fused_ms" in row:
            floor = roofline.achieved(work, row["fused_ms"] * 1e-3, peaks)
            if "floor_s" in floor:
                row["floor_ms"] = round(floor["floor_s"] * 1e3, 4)
                row["of_floor"] = round(floor["of_floor"], 3)
                row["floor_bound"] = floor["floor_bound"]
        rows.append(row)
        thunks.append(fn)

    # torch.compile last: the slow part, run for as many shapes as the budget holds
    for row, fn in zip(rows, thunks, strict=True):
        if not (on_gpu and compile) or "fused_ms" not in row:
            row["compile_skipped"] = "needs CUDA" if not on_gpu else "compile=False" if not compile else "no fused time"
            continue
        if row is not rows[0] and time.perf_counter() - t0 + _COMPILE_S > budget_s:  # the first shape always
            row["compile_skipped"] = f"budget: {budget_s:.0f} s"
            continue
        try:
            with _backend("torch"), torch.no_grad():
                compiled = torch.compile(fn, dynamic=False)
                t = time.perf_counter()
                compiled()
                row["compile_s"] = round(time.perf_counter() - t, 1)
                row["compiled_ms"] = round(_graph_ms(compiled), 4)
                row["compiled_kernels"] = _profiled_kernels(compiled)
                row["vs_compile"] = round(row["compiled_ms"] / row["fused_ms"], 3)
        except Exception as err:  # report and keep going: the fused numbers stand on their own
            row["compile_error"] = f"{type(err).__name__}: {str(err)[:200]}"

    for row in rows:
        if row.get("ok") is False:  # a variant failed (its error is in the row)
            continue
        if on_gpu:  # a speed target is reported (met / missed), not a failure: gpu_check's convention
            row["ok"] = True
            if row.get("target_ms") is not None:
                row["met"] = row["fused_ms"] <= row["target_ms"]
        elif "fused_ops" in row:
            row["ok"] = row["fused_ops"] <= budget_ops
    if results is not None:
        env = report.environment(dev)
        records = [{"type": "forward_phase", "model": model.name, "dtype": str(model.dtype)[6:], **r, "env": env}
                   for r in rows]  # fmt: skip
        report.append_records(results, records)
    ok = all(r.get("ok", True) for r in rows)
    timed = [r for r in rows if "fused_ms" in r]
    if timed:
        missed = {True: "", False: ", missed", None: ""}
        detail = "; ".join(
            f"{r['shape']}: {r['fused_ms']:.3f} ms (target {r['target_ms']}{missed[r.get('met')]})" for r in timed
        )
    else:
        detail = "; ".join(f"{r['shape']}: {r.get('fused_ops', '-')} fused ops vs {r.get('torch_ops', '-')} torch"
                           for r in rows)  # fmt: skip
    return {"rows": rows, "ok": ok, "detail": detail, "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: print one line per family (or the forward phase's table with ``--phase``)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", action="append", choices=("qwen2", "llama", "starcoder2"))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--phase", action="store_true", help="run forward_phase (issue 10) instead")
    p.add_argument("--budget-s", type=float, default=60.0)
    args = p.parse_args(argv)
    if args.phase:
        out = forward_phase(device=args.device, budget_s=args.budget_s)
        for row in out["rows"]:
            print(row)
        print(("OK" if out["ok"] else "FAILED") + f" in {out['seconds']} s: {out['detail']}")
        return 0
    for fam in args.family or ["qwen2", "llama", "starcoder2"]:
        r = compare_forward(fam, args.batch, args.length, device=args.device)
        print(
            f"{fam:11s} B={r['batch']} L={r['length']} {r['device']}: transformers {r['transformers_s'] * 1e3:.1f} ms, "
            f"dinfill {r['dinfill_s'] * 1e3:.1f} ms, ratio {r['speedup']:.2f}x "
            f"(max |logit diff| {r['max_abs_logit_diff']:.1e})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
