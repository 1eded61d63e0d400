"""Micro-benchmarks of the model-level hot paths: one forward, one AR decode step, one diffusion step.

On CUDA they run at the real open-dcoder-0.5B shape (24 layers, hidden 896, vocab 151936, bf16) with
random weights; each test times dinfill's path with pytest-benchmark and its reference on the same
inputs in the same process (transformers for the forward and the decode step, the plain reference loop
for the diffusion step), so every number comes with a ratio, and with the achieved FLOP/s and bytes/s of
the work model (:mod:`dinfill.bench.roofline`) against the device peak. Each test appends one JSON line
to the results file (``$DINFILL_BENCH_RESULTS``, default ``bench/results.jsonl``).

Without CUDA the same functions run once on a tiny fp32 shape (``tiny-llama`` with a 1031-token
vocabulary) as a smoke test: ``pytest bench/test_bench_model.py --benchmark-disable``.
"""

from __future__ import annotations

import inspect

import pytest
import torch

import dinfill
from dinfill.bench import report, roofline
from dinfill.bench.forward import decode_step

ON_GPU = torch.cuda.is_available()
# real shape on the GPU, a tiny one (small vocabulary, so the CPU run stays fast) elsewhere
SHAPE = "open-dcoder-0.5b" if ON_GPU else "tiny-llama"
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
CANVAS, MIDDLE = (256, 16) if ON_GPU else (48, 5)  # HumanEval-like canvas and middle (tokens)


def _median_s(fn) -> float:
    """Median seconds of ``fn`` (CUDA events through triton's do_bench on a GPU, wall clock otherwise)."""
    if ON_GPU:
        import triton

        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e-3
    return roofline.median_seconds(fn, DEVICE, repeats=2)


@pytest.fixture(scope="module")
def model():
    return dinfill.load_model(SHAPE, device=DEVICE, dtype=DTYPE, random_weights=True, kind="diffusion")


@pytest.fixture(scope="module")
def hf(model):
    from dinfill.sampler.autoregressive import hf_twin

    return hf_twin(model)


def _record(benchmark, name: str, ours_s: float, ref_s: float, ref_name: str, work: roofline.Work, **shape) -> dict:
    """Ratio + roofline numbers into ``benchmark.extra_info``, one line in the results file, one printed line."""
    env = report.environment(DEVICE)
    peaks = roofline.device_peaks(env["device"]) if ON_GPU else None
    rec = {
        "type": "micro",
        "bench": name,
        "shape": {"model": SHAPE, "dtype": str(DTYPE).replace("torch.", ""), **shape},
        "ours_s": ours_s,
        "reference": ref_name,
        "reference_s": ref_s,
        "speedup": ref_s / ours_s,
        "roofline": roofline.achieved(work, ours_s, peaks),
        "env": env,
    }
    benchmark.extra_info.update({k: v for k, v in rec.items() if k not in ("env",)})
    report.append_records(report.default_results_path(), [rec])
    roof = rec["roofline"]
    print(
        f"\n[{name}] {ours_s * 1e3:.3f} ms vs {ref_name} {ref_s * 1e3:.3f} ms: {rec['speedup']:.2f}x; "
        f"{roof['flop_per_s'] / 1e12:.2f} TFLOP/s, {roof['bytes_per_s'] / 1e9:.1f} GB/s"
        + (f" ({100 * roof['bandwidth_of_peak']:.0f}% of peak bandwidth)" if "bandwidth_of_peak" in roof else "")
    )
    return rec


def _bench(benchmark, fn) -> None:
    """Run ``fn`` under pytest-benchmark (several rounds on a GPU, one call in the CPU smoke run)."""
    rounds, warmup = (20, 2) if ON_GPU else (1, 0)
    benchmark.pedantic(lambda: (fn(), roofline.sync(DEVICE)), rounds=rounds, warmup_rounds=warmup)


@pytest.mark.parametrize("batch", [4])
def test_forward(benchmark, model, hf, batch):
    """A causal forward with full logits, dinfill's decoder against transformers on the same weights."""
    V = model.config.vocab_size
    ids = torch.randint(0, V, (batch, CANVAS), device=DEVICE)
    with torch.inference_mode():
        ours = lambda: model(ids, causal=True)  # noqa: E731
        theirs = lambda: hf(ids).logits  # noqa: E731
        if not ON_GPU:  # the smoke run also proves both compute the same thing
            torch.testing.assert_close(ours(), theirs(), rtol=1e-4, atol=1e-4)
        _bench(benchmark, ours)
        t_ours, t_ref = _median_s(ours), _median_s(theirs)
    itemsize = torch.empty((), dtype=DTYPE).element_size()
    work = roofline.forward_work(
        model.config, batch=batch, queries=CANVAS, logits_rows=batch * CANVAS, itemsize=itemsize, causal=True
    )
    rec = _record(benchmark, "forward", t_ours, t_ref, "transformers", work, batch=batch, tokens=CANVAS)
    assert rec["speedup"] > 0


@pytest.mark.parametrize("batch", [1, 8] if ON_GPU else [2])
def test_ar_decode_step(benchmark, model, hf, batch):
    """One decode step (one token against a cache of ``CANVAS`` tokens), eager and (on CUDA) graph-replayed."""
    V, P = model.config.vocab_size, CANVAS
    prompt = torch.randint(0, V, (batch, P), device=DEVICE)
    cur = torch.randint(0, V, (batch, 1), device=DEVICE)
    with torch.inference_mode():
        ours = decode_step(model, prompt, cur)
        step = ours
        if ON_GPU:  # the AR sampler replays its decode step as a CUDA graph (the same capture): time that too
            from dinfill.sampler.graphs import Graph, side_stream

            with side_stream(emulate=False):
                ours()
            step = Graph(ours, emulate=False).replay

        from transformers import DynamicCache

        hf_cache = DynamicCache()
        # transformers renames past_key_values to cache (5.x deprecation); pass whichever this version takes
        cache_kw = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
        hf(prompt, use_cache=True, **{cache_kw: hf_cache})
        ones = torch.ones(batch, P + 1, dtype=torch.long, device=DEVICE)

        def theirs():
            out = hf(cur, attention_mask=ones, use_cache=True, **{cache_kw: hf_cache}).logits
            hf_cache.crop(-1)  # drop the token just added: every call is the same step
            return out

        _bench(benchmark, step)
        t_ours, t_eager, t_ref = _median_s(step), _median_s(ours), _median_s(theirs)
    itemsize = torch.empty((), dtype=DTYPE).element_size()
    work = roofline.forward_work(model.config, batch=batch, queries=1, keys=P + 1, logits_rows=batch, itemsize=itemsize)
    rec = _record(
        benchmark, "ar_decode_step", t_ours, t_ref, "transformers", work, batch=batch, cached=P, eager_s=t_eager,
        cuda_graph=ON_GPU,
    )  # fmt: skip
    assert rec["speedup"] > 0


@pytest.mark.parametrize("batch", [1, 32] if ON_GPU else [2])
def test_diffusion_step(benchmark, model, batch):
    """One diffusion step (p2, T 0.6, top-p 0.95): logits at the middle rows + fused step, against one step
    of the reference loop (full forward, full logits, torch sampling) on the same canvas."""
    from dinfill.bench.gpu_check import kernel_op
    from dinfill.sampler.reference_loop import reference_generate

    fused_step = kernel_op("fused_step")

    V = model.config.vocab_size
    mask_id = V - 1
    lo = CANVAS - MIDDLE - 8  # the middle sits before an 8-token suffix
    x = torch.randint(0, V - 1, (batch, CANVAS), device=DEVICE)
    x[:, lo : lo + MIDDLE] = mask_id
    am = torch.ones_like(x, dtype=torch.bool)
    positions = torch.arange(lo, lo + MIDDLE, device=DEVICE).expand(batch, MIDDLE).contiguous()  # (B, M)
    hidden = positions - 1  # logit shift: column j is predicted by the hidden state of j - 1
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    sampling = dict(temperature=0.6, top_p=0.95)
    with torch.inference_mode():

        def ours():
            canvas = x.clone()
            logits = model(canvas, causal=False, attention_mask=am, logits_index=hidden)  # (B, M, V)
            return fused_step(logits, canvas, positions, mask_id=mask_id, select="p2", fraction=0.5, **sampling)

        def reference():
            return reference_generate(model, x, mask_id=mask_id, steps=1, alg="p2", attention_mask=am, generator=gen,
                                      **sampling)  # fmt: skip

        _bench(benchmark, ours)
        t_ours, t_ref = _median_s(ours), _median_s(reference)
    itemsize = torch.empty((), dtype=DTYPE).element_size()
    rows = batch * MIDDLE
    work = roofline.forward_work(model.config, batch=batch, queries=CANVAS, logits_rows=rows, itemsize=itemsize)
    work = work + roofline.Work(0.0, rows * V * itemsize)  # the fused step reads each logits row once
    rec = _record(
        benchmark, "diffusion_step", t_ours, t_ref, "reference loop (1 step)", work, batch=batch, canvas=CANVAS,
        middle=MIDDLE,
    )  # fmt: skip
    assert rec["speedup"] > 0
