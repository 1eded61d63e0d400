"""Diffusion sampler vs a deliberately plain reference loop on transformers' own model, plus its options.

The reference loop below is written from docs/sampler-semantics.md alone: a full forward of the
transformers Qwen2 model every step (bidirectional through an all-visible 4D float mask), logits for
every column, the logit shift, and per-row Python loops with torch ops. Our sampler goes through the
dinfill runtime, logits at the variable rows only and the fused step; at temperature 0 with an fp32
model the tokens must be identical.
"""

from __future__ import annotations

import json

import pytest
import torch
from tiny import hf_model, save_checkpoint

import dinfill
from dinfill.sampler.diffusion import ALGORITHMS, diffusion_generate, step_fractions

VOCAB = 211
MASK = 210  # last id of the tiny vocabulary


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(transformers model, dinfill model) with the same random weights; untied so masks are rarely predicted."""
    hf = hf_model("qwen2", tie=False, vocab_size=VOCAB, seed=3)
    path = save_checkpoint(hf, tmp_path_factory.mktemp("qwen2-diffusion"))
    ours = dinfill.load_model(str(path), device="cpu", dtype=torch.float32, kind="diffusion")
    return hf, ours


def _canvas(prefix: int, middle: int, suffix: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(3, MASK, (batch, prefix + middle + suffix), generator=g)  # (B, L) never the mask id
    x[:, prefix : prefix + middle] = MASK
    return x


# ---- the reference loop ---------------------------------------------------------------------------


def _ref_sample(logits_row: torch.Tensor, temperature: float, top_p, top_k, measure: str):
    """sample_tokens of the spec for one row at temperature 0: filter, softmax, argmax, confidence."""
    z = logits_row.float().clone()
    if temperature > 0:
        raise NotImplementedError("the plain loop is only used for deterministic comparisons")
    if top_p is not None and top_p < 1:
        values, idx = torch.sort(z, descending=True)
        cum = torch.cumsum(torch.softmax(values, dim=0), dim=0)
        drop = torch.zeros_like(cum, dtype=torch.bool)
        drop[1:] = cum[:-1] > top_p  # a token goes when the mass before it already exceeds top_p
        z[idx[drop]] = torch.finfo(torch.float32).min
    if top_k is not None:
        kth = torch.sort(z, descending=True).values[top_k - 1]
        z[z < kth] = torch.finfo(torch.float32).min
    p = torch.softmax(z, dim=0)
    tok = int(torch.argmax(p))
    if measure == "prob":
        conf = float(p[tok])
    elif measure == "margin":
        top = torch.sort(p, descending=True).values
        conf = float(top[0] - top[1])
    else:
        conf = float((p * torch.log(torch.clamp(p, min=1e-10))).sum())
    return tok, conf


def reference_loop(hf, x, *, steps, alg, eps=1e-3, top_p=None, top_k=None, threshold=0.9, factor=1.0):
    """Plain reference sampler (every alg but origin, which is random even at temperature 0)."""
    x = x.clone()
    B, L = x.shape
    variable = [[j for j in range(L) if x[b, j] == MASK] for b in range(B)]
    measure = {"topk_margin": "margin", "entropy": "neg_entropy"}.get(alg, "prob")
    ts = torch.linspace(1, eps, steps + 1)  # fp32
    visible = torch.zeros(B, 1, L, L)  # additive 4D mask: everything visible (bidirectional)
    for i in range(steps):
        if not (x == MASK).any():
            break
        with torch.no_grad():
            logits = hf(input_ids=x, attention_mask=visible).logits  # (B, L, V)
        shifted = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)  # column j predicted by hidden j-1
        t, s = ts[i], ts[i + 1]
        for b in range(B):
            masked = [j for j in range(L) if x[b, j] == MASK]
            rows = variable[b] if alg == "p2" else masked
            pred = {j: _ref_sample(shifted[b, j], 0.0, top_p, top_k, measure) for j in rows}
            if alg == "p2":
                frac = 1 - (i + 1) / steps
                k = int(torch.tensor(len(rows), dtype=torch.float32) * frac)
                by_conf = sorted(rows, key=lambda j: (pred[j][1], j))  # least confident first
                remask = set(by_conf[:k])
                for j in rows:
                    if j in remask:
                        x[b, j] = MASK
                    elif j in masked:
                        x[b, j] = pred[j][0]
                continue
            if not masked:
                continue
            ranked = sorted(masked, key=lambda j: (-pred[j][1], j))  # most confident first
            last = i == steps - 1
            if alg in ("maskgit_plus", "topk_margin", "entropy"):
                n = len(masked) if last else int(torch.tensor(len(masked), dtype=torch.float32) * (1 - s / t))
                chosen = ranked[:n]
            elif alg == "threshold":
                chosen = ranked if last else [ranked[0]] + [j for j in ranked[1:] if pred[j][1] >= threshold]
            elif alg == "factor":
                n = 1
                for r in range(1, len(ranked) + 1):
                    if pred[ranked[r - 1]][1] >= 1 - factor / (r + 1):
                        n = r
                chosen = ranked if last else ranked[:n]
            else:
                raise ValueError(alg)
            for j in chosen:
                x[b, j] = pred[j][0]
    return x


# ---- exactness ------------------------------------------------------------------------------------

DETERMINISTIC = [a for a in ALGORITHMS if a != "origin"]


@pytest.mark.parametrize("alg", DETERMINISTIC)
@pytest.mark.parametrize("steps", [1, 3, 7, 20])
def test_none_equals_reference_loop(pair, alg, steps):
    hf, ours = pair
    x = _canvas(prefix=11, middle=9, suffix=6)  # steps=20 > middle length 9
    want = reference_loop(hf, x, steps=steps, alg=alg)
    got = diffusion_generate(ours, x, mask_id=MASK, steps=steps, alg=alg, cache="none")
    assert torch.equal(got, want)
    assert not (got == MASK).all()


@pytest.mark.parametrize("alg", DETERMINISTIC)
def test_edges_of_the_canvas(pair, alg):
    """Masks at column 0 (empty prefix: the first row predicts itself) and at the end (empty suffix)."""
    hf, ours = pair
    for x in (_canvas(0, 7, 5, seed=1), _canvas(6, 7, 0, seed=2), _canvas(0, 5, 0, seed=3)):
        want = reference_loop(hf, x, steps=4, alg=alg)
        assert torch.equal(diffusion_generate(ours, x, mask_id=MASK, steps=4, alg=alg), want)


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy", "p2"])
def test_filters_at_temperature_zero(pair, alg):
    """top-p / top-k change the confidences (renormalised filtered distribution) but not the argmax."""
    hf, ours = pair
    x = _canvas(8, 10, 5, seed=4)
    for top_p, top_k in ((0.3, None), (None, 7), (0.5, 9)):
        want = reference_loop(hf, x, steps=5, alg=alg, top_p=top_p, top_k=top_k)
        got = diffusion_generate(ours, x, mask_id=MASK, steps=5, alg=alg, top_p=top_p, top_k=top_k)
        assert torch.equal(got, want), (top_p, top_k)


def test_two_mask_spans(pair):
    """The sampler is canvas-generic: any set of masks, not one middle."""
    hf, ours = pair
    x = _canvas(5, 4, 12, seed=5)
    x[:, 14:17] = MASK
    for alg in ("maskgit_plus", "p2"):
        for cache in ("none", "dual"):
            got = diffusion_generate(ours, x, mask_id=MASK, steps=6, alg=alg, cache=cache, refresh=1)
            assert torch.equal(got, reference_loop(hf, x, steps=6, alg=alg)), (alg, cache)


def test_origin_transitions_follow_the_reference(pair):
    """origin reveals at random even at temperature 0: check every step's transition against the model."""
    hf, ours = pair
    x = _canvas(7, 12, 4, seed=6)
    out, stats = diffusion_generate(ours, x, mask_id=MASK, steps=5, alg="origin", seed=11, history=True,
                                    return_stats=True)  # fmt: skip
    before = x
    visible = torch.zeros(2, 1, x.shape[1], x.shape[1])
    for i, after in enumerate(stats.history):
        masked = before == MASK
        assert torch.equal(after[~masked], before[~masked]), "only masks may change"
        with torch.no_grad():
            logits = hf(input_ids=before, attention_mask=visible).logits
        pred = torch.cat([logits[:, :1], logits[:, :-1]], dim=1).argmax(-1)  # (B, L)
        revealed = masked & (after != MASK)
        assert torch.equal(after[revealed], pred[revealed])
        if i == len(stats.history) - 1:  # probability 1 at the last step: every mask takes its prediction
            assert torch.equal(after[masked], pred[masked])
        before = after
    assert len(stats.history) == stats.steps_run == 5
    assert torch.equal(stats.history[-1], out)
    assert sum(stats.revealed_per_step) == 24 - int((out == MASK).sum())


def test_schedule_is_fp32_like_the_reference():
    frac = step_fractions("maskgit_plus", 64, 1e-3)
    ts = torch.linspace(1, 1e-3, 65)
    for i in (0, 17, 62):
        assert frac[i].item() == (1 - ts[i + 1] / ts[i]).item()
    assert frac[-1].item() == 1.0
    p2 = step_fractions("p2", 64, 1e-3)
    for i in (0, 31, 63):
        n = torch.tensor([37]).float()
        assert int(torch.tensor(37.0) * p2[i]) == int((n * (1 - (i + 1) / 64)).long())
    assert p2[-1].item() == 0.0


# ---- sampling, batching, caching ------------------------------------------------------------------


@pytest.mark.parametrize(
    "alg,opts",
    [
        ("p2", dict(temperature=0.6, top_p=0.95)),
        ("maskgit_plus", dict(temperature=0.8, top_k=20, alg_temp=0.5)),
        ("origin", dict(temperature=1.0)),
        ("threshold", dict(temperature=0.7, top_p=0.9, threshold=0.05)),
    ],
)
def test_seeded_sampling_is_reproducible(pair, alg, opts):
    _, ours = pair
    x = _canvas(9, 14, 7, batch=3, seed=7)
    a = diffusion_generate(ours, x, mask_id=MASK, steps=6, alg=alg, seed=123, **opts)
    b = diffusion_generate(ours, x, mask_id=MASK, steps=6, alg=alg, generator=torch.Generator().manual_seed(123),
                           **opts)  # fmt: skip
    c = diffusion_generate(ours, x, mask_id=MASK, steps=6, alg=alg, seed=124, **opts)
    assert torch.equal(a, b)
    assert not torch.equal(a, c), "a different seed should draw different tokens"
    fixed = x != MASK
    assert torch.equal(a[fixed], x[fixed])


def _padded(rows: list[torch.Tensor], aligned: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch canvases with right padding, or with the middles aligned (left pad + right pad)."""
    starts = [int((r == MASK).nonzero()[0]) for r in rows]
    shift = [max(starts) - s if aligned else 0 for s in starts]
    width = max(len(r) + o for r, o in zip(rows, shift, strict=True))
    ids = torch.full((len(rows), width), 5, dtype=torch.long)  # pad id 5: a real token id, never attended
    am = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, (r, o) in enumerate(zip(rows, shift, strict=True)):
        ids[b, o : o + len(r)], am[b, o : o + len(r)] = r, True
    return ids, am


@pytest.mark.parametrize("alg", DETERMINISTIC)
def test_batched_equals_rows_alone(pair, alg):
    _, ours = pair
    rows = [_canvas(p, m, s, batch=1, seed=10 + p)[0] for p, m, s in ((3, 5, 9), (14, 11, 2), (8, 3, 0))]
    for cache, aligned in (("none", False), ("none", True), ("dual", True), ("dual", False)):
        ids, am = _padded(rows, aligned)
        out = diffusion_generate(ours, ids, attention_mask=am, mask_id=MASK, steps=5, alg=alg, cache=cache, refresh=2)
        for b, r in enumerate(rows):
            alone = diffusion_generate(ours, r[None], mask_id=MASK, steps=5, alg=alg, cache=cache, refresh=2)
            assert torch.equal(out[b][am[b]], alone[0]), (cache, aligned, b)
        assert torch.equal(out[~am], ids[~am]), "padding must never be written"


def test_lengths_equals_attention_mask(pair):
    _, ours = pair
    rows = [_canvas(4, 6, 3, batch=1, seed=20)[0], _canvas(9, 4, 5, batch=1, seed=21)[0]]
    ids, am = _padded(rows, aligned=False)
    a = diffusion_generate(ours, ids, attention_mask=am, mask_id=MASK, steps=4, alg="p2")
    b = diffusion_generate(ours, ids, lengths=am.sum(1), mask_id=MASK, steps=4, alg="p2")
    assert torch.equal(a, b)


@pytest.mark.parametrize("alg", DETERMINISTIC)
@pytest.mark.parametrize("steps", [1, 4, 13])
def test_dual_refresh_1_equals_none(pair, alg, steps):
    _, ours = pair
    x = _canvas(12, 10, 8, seed=8)
    none = diffusion_generate(ours, x, mask_id=MASK, steps=steps, alg=alg, cache="none")
    dual, stats = diffusion_generate(ours, x, mask_id=MASK, steps=steps, alg=alg, cache="dual", refresh=1,
                                     return_stats=True)  # fmt: skip
    assert torch.equal(dual, none)
    assert stats.window_forwards == 0 and stats.full_forwards == stats.steps_run


@pytest.mark.parametrize("alg", ["p2", "maskgit_plus", "threshold"])
def test_dual_larger_refresh_reports_agreement(pair, alg):
    _, ours = pair
    x = _canvas(20, 12, 15, batch=2, seed=9)
    none = diffusion_generate(ours, x, mask_id=MASK, steps=12, alg=alg)
    dual, stats = diffusion_generate(ours, x, mask_id=MASK, steps=12, alg=alg, cache="dual", refresh=4,
                                     return_stats=True)  # fmt: skip
    fixed = x != MASK
    assert torch.equal(dual[fixed], x[fixed])
    # from the column before the middle (19) over its 13 columns, rounded up to a row bucket of 16 (on every
    # path, so that a call padded into a CUDA-graph bucket recomputes the same real columns)
    assert stats.window == (19, 35)
    assert stats.full_forwards == -(-stats.steps_run // 4)
    assert stats.window_forwards == stats.steps_run - stats.full_forwards
    assert stats.tokens_forwarded == 2 * (47 * stats.full_forwards + 16 * stats.window_forwards)
    agreement = float((dual[~fixed] == none[~fixed]).float().mean())
    print(f"dual refresh=4 vs none, alg={alg}: agreement {agreement:.3f}")
    # dual is approximate, but a stale or misplaced cache scrambles most of the middle: require a majority
    assert agreement >= 0.5, f"dual refresh=4 agrees with none on only {agreement:.0%} of the middle"


def test_benchmark_runs_both_loops(pair):
    """The bench entry point: the package's reference loop agrees with ours exactly in exact mode."""
    from dinfill.sampler.diffusion import benchmark, synthetic_canvas

    _, ours = pair
    canvas = synthetic_canvas(VOCAB, MASK, batch_size=2, context=(20, 30), middle=(5, 9), seed=1)
    exact = benchmark(ours, canvas.input_ids, attention_mask=canvas.attention_mask, mask_id=MASK, steps=6,
                      alg="p2", repeats=1, warmup=0)  # fmt: skip
    assert exact["agreement"] == 1.0
    assert exact["speedup"] > 0 and exact["stats"]["steps_run"] >= 1
    fast = benchmark(ours, canvas.input_ids, attention_mask=canvas.attention_mask, mask_id=MASK, steps=6,
                     alg="threshold", cache="dual", refresh=3, repeats=1, warmup=0)  # fmt: skip
    assert fast["reference_alg"] == "maskgit_plus" and 0.0 <= fast["agreement"] <= 1.0
    json.dumps(exact), json.dumps(fast)  # bench records must serialise


# ---- flags and statistics -------------------------------------------------------------------------


def test_stats_and_flags(pair):
    _, ours = pair
    x = _canvas(6, 9, 4, seed=12)
    base, stats = diffusion_generate(ours, x, mask_id=MASK, steps=30, alg="threshold", threshold=0.02,
                                     return_stats=True)  # fmt: skip
    assert stats.steps_run < 30, "early stop once no mask is left"
    assert stats.forward_passes == stats.steps_run == len(stats.revealed_per_step)
    assert sum(stats.revealed_per_step) == 18 - stats.masks_left
    assert stats.time_model_s > 0 and stats.time_sampling_s > 0
    assert stats.cuda_graph is False and stats.backend == "torch"
    json.dumps(stats.to_dict())
    for flags in (dict(cuda_graph=False), dict(nvtx=True), dict(early_stop_lag=1)):
        assert torch.equal(diffusion_generate(ours, x, mask_id=MASK, steps=30, alg="threshold", threshold=0.02,
                                              **flags), base), flags  # fmt: skip


@pytest.mark.parametrize("alg,cache", [("p2", "dual"), ("maskgit_plus", "none"), ("threshold", "dual")])
def test_graph_path_emulated(pair, alg, cache):
    """cuda_graph="emulate": warm-up, capture bookkeeping and replays on the CPU leave the tokens unchanged."""
    _, ours = pair
    x = _canvas(7, 11, 5, seed=14)
    eager = diffusion_generate(ours, x, mask_id=MASK, steps=5, alg=alg, cache=cache, refresh=3, cuda_graph=False)
    graph = diffusion_generate(ours, x, mask_id=MASK, steps=5, alg=alg, cache=cache, refresh=3, cuda_graph="emulate")
    assert torch.equal(graph, eager)
    sampled = [
        diffusion_generate(
            ours,
            x,
            mask_id=MASK,
            steps=5,
            alg=alg,
            cache=cache,
            refresh=3,
            cuda_graph="emulate",
            temperature=0.9,
            seed=s,
        )  # fmt: skip
        for s in (5, 5, 6)
    ]
    assert torch.equal(sampled[0], sampled[1]) and not torch.equal(sampled[0], sampled[2])


@pytest.mark.interpreter_only
def test_triton_backend_path(monkeypatch):
    """DINFILL_BACKEND=triton runs the fused step and attention in Triton's interpreter: same tokens."""
    from dinfill.models import Decoder, ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(model_type="qwen2", vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                      intermediate_size=48, max_position_embeddings=64, attention_bias=True)  # fmt: skip
    model = Decoder(cfg).eval()
    model.kind = "diffusion"
    x = _canvas(4, 5, 3, batch=2, seed=13)
    want = diffusion_generate(model, x, mask_id=MASK, steps=2, alg="maskgit_plus", cache="dual")
    monkeypatch.setenv("DINFILL_BACKEND", "triton")
    got, stats = diffusion_generate(model, x, mask_id=MASK, steps=2, alg="maskgit_plus", cache="dual",
                                    return_stats=True)  # fmt: skip
    assert stats.backend == "triton"
    assert torch.equal(got, want)


# ---- bad input ------------------------------------------------------------------------------------


def test_bad_input(pair, tmp_path):
    hf, ours = pair
    x = _canvas(5, 4, 3)
    cases = [
        (dict(input_ids=x.masked_fill(x == MASK, 7)), "no mask token"),
        (dict(mask_id=VOCAB), "outside the model's vocabulary"),
        (dict(mask_id=-1), "outside the model's vocabulary"),
        (dict(steps=0), r"steps \(--steps\) must be an integer >= 1, got 0"),
        (dict(steps=2.5), r"steps \(--steps\) must be an integer >= 1, got 2.5"),
        (dict(alg="greedy"), r"alg \(--alg\) must be one of origin, .*, got 'greedy'"),
        (dict(cache="prefix"), r"cache \(--cache\) must be one of none, dual, got 'prefix'"),
        (dict(cache="dual", refresh=0), r"refresh \(--refresh\) must be an integer >= 1"),
        (dict(temperature=-1.0), r"temperature \(--temperature\) must be >= 0 .*, got -1.0"),
        (dict(top_p=1.5), r"top_p \(--top-p\) must lie in \(0, 1\] .*, got 1.5"),
        (dict(top_k=0), r"top_k \(--top-k\) must be an integer >= 1 .*, got 0"),
        (dict(eps=0.0), r"eps \(--eps\) must lie in \(0, 1\), got 0.0"),
        (dict(input_ids=torch.full((1, 600), MASK)), "exceeds the model's limit"),
        (dict(attention_mask=torch.tensor([[1, 0] * 6, [1] * 12])), "contiguous run"),
        (dict(attention_mask=torch.tensor([[0] * 12, [1] * 12])), "contiguous run"),
        (dict(attention_mask=torch.ones(2, 18)), "must have shape"),
        (dict(attention_mask=torch.ones(2, 12), lengths=[12, 12]), "not both"),
        (dict(input_ids=x.float()), "int64 or int32"),
    ]
    for kw, msg in cases:
        args = dict(input_ids=x, mask_id=MASK, steps=3, alg="p2") | kw
        with pytest.raises((ValueError, TypeError), match=msg):
            diffusion_generate(ours, **args)
    bad_ids = x.clone()
    bad_ids[0, 0] = VOCAB + 3
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        diffusion_generate(ours, bad_ids, mask_id=MASK, steps=2)
    ar = dinfill.load_model(str(save_checkpoint(hf, tmp_path / "ar")), dtype=torch.float32, kind="ar")
    with pytest.raises(ValueError, match="needs a diffusion model"):
        diffusion_generate(ar, x, mask_id=MASK, steps=2)
