"""The CUDA-graph pool of both samplers, on the CPU through ``cuda_graph="emulate"``.

Emulation runs exactly the bookkeeping of the graph path - shape buckets, padding a call up to its bucket,
the LRU pool keyed by model and settings, warm-up and capture counting, static buffers reused across calls,
device-side seeds - but calls the step functions where CUDA would replay a graph. So these tests show, without
a GPU, that a second call of a bucket captures nothing, that padding never changes a token (greedy and sampled
with a seed), that a reused bucket keeps no state from the previous call, and that the pool stays bounded.
"""

from __future__ import annotations

import gc

import pytest
import torch

from dinfill.models import Decoder, ModelConfig
from dinfill.sampler import autoregressive, diffusion
from dinfill.sampler.autoregressive import ar_generate
from dinfill.sampler.diffusion import diffusion_generate
from dinfill.sampler.graphs import (
    bucket_batch,
    bucket_length,
    bucket_rows,
    bucket_steps,
    graph_pool,
    tensor_bytes,
    warmup,
)

VOCAB = 211
MASK = 210

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(kind: str, seed: int = 0, limit: int = 256) -> Decoder:
    """A 2-layer random decoder with block weights scaled up, so its outputs vary from position to position."""
    torch.manual_seed(seed)
    cfg = ModelConfig(model_type="qwen2", vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                      intermediate_size=48, max_position_embeddings=limit, attention_bias=True)  # fmt: skip
    model = Decoder(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(6.0)
    model.kind = kind
    return model


@pytest.fixture(scope="module")
def dmodel() -> Decoder:
    return _model("diffusion")


@pytest.fixture(scope="module")
def amodel() -> Decoder:
    return _model("ar", seed=1, limit=1024)


@pytest.fixture
def pool():
    """The process-wide pool, emptied before and after (its cap restored)."""
    p = graph_pool()
    size = p.max_entries
    p.clear()
    yield p
    p.clear()
    p.resize(size)


def _canvas(B: int, L: int, start: int, masks: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``B`` rows right-padded to ``L``: random ids with ``masks`` masks at ``start``; row b is b columns shorter."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, MASK, (B, L), generator=g)  # (B, L)
    x[:, start : start + masks] = MASK
    am = torch.arange(L).unsqueeze(0) < (L - torch.arange(B)).unsqueeze(1)  # (B, L)
    return x, am


# ---- buckets ------------------------------------------------------------------------------------


def test_bucket_ladders():
    assert [bucket_batch(n) for n in (1, 2, 3, 5, 16, 17, 25, 33, 49)] == [1, 2, 4, 8, 16, 24, 32, 48, 64]
    assert [bucket_length(n) for n in (1, 276, 512, 513, 1025)] == [32, 288, 512, 576, 1152]
    assert bucket_length(500, limit=300) == 300
    assert [bucket_rows(n) for n in (1, 16, 17, 70, 200)] == [8, 16, 24, 80, 224]
    assert [bucket_steps(n) for n in (1, 9, 64, 65)] == [8, 16, 64, 128]
    for f in (bucket_batch, bucket_length, bucket_rows, bucket_steps):
        with pytest.raises(ValueError, match=">= 1"):
            f(0)


def test_pool_rejects_a_bad_size(pool):
    with pytest.raises(ValueError, match="max_entries"):
        pool.resize(0)


# ---- diffusion ------------------------------------------------------------------------------------


@pytest.mark.parametrize("alg,cache", [("p2", "none"), ("threshold", "dual"), ("maskgit_plus", "dual")])
def test_diffusion_second_call_of_a_bucket_captures_nothing(dmodel, pool, alg, cache):
    x, am = _canvas(3, 37, 11, 9, seed=1)  # batch 3 -> bucket 4, canvas 37 -> 64: padded in both
    kw = dict(mask_id=MASK, steps=6, alg=alg, cache=cache, refresh=3, threshold=0.3, attention_mask=am,
              return_stats=True)  # fmt: skip
    eager, _ = diffusion_generate(dmodel, x, cuda_graph=False, **kw)
    first, s1 = diffusion_generate(dmodel, x, cuda_graph="emulate", **kw)
    assert s1.graph_captured and s1.graph_bucket == (4, 64, 16, 16 if cache == "dual" else 0)
    assert diffusion.graph_bucket(dmodel, x, mask_id=MASK, cache=cache, attention_mask=am) == s1.graph_bucket
    assert pool.stats.builds == 1 and pool.stats.graphs == (2 if cache == "none" else 4)
    second, s2 = diffusion_generate(dmodel, x, cuda_graph="emulate", **kw)
    assert not s2.graph_captured and pool.stats.builds == 1 and pool.stats.hits == 1
    assert torch.equal(first, eager) and torch.equal(second, eager)
    assert len(set(eager[x == MASK].tolist())) > 3, "the tiny model should not fill every mask alike"
    assert torch.equal(eager[~am], x[~am]), "padding is never written"


@pytest.mark.parametrize("cache", ["none", "dual"])
def test_diffusion_padded_bucket_equals_unpadded_sampled(dmodel, pool, cache):
    """A seeded sampled call draws the same numbers in a padded bucket as at its own shape."""
    x, am = _canvas(3, 29, 7, 10, seed=2)
    kw = dict(mask_id=MASK, steps=5, alg="p2", cache=cache, refresh=2, temperature=0.9, top_p=0.95, seed=11,
              attention_mask=am)  # fmt: skip
    eager = diffusion_generate(dmodel, x, cuda_graph=False, **kw)
    pooled = [diffusion_generate(dmodel, x, cuda_graph="emulate", **kw) for _ in range(2)]
    assert torch.equal(pooled[0], eager) and torch.equal(pooled[1], eager)
    other = diffusion_generate(dmodel, x, cuda_graph="emulate", **{**kw, "seed": 12})
    assert not torch.equal(other, eager), "another seed draws other tokens"
    assert pool.stats.builds == 1


def test_diffusion_reused_bucket_keeps_no_state(dmodel, pool):
    """Two different calls in one bucket: the second equals its own eager run, whatever the first left behind."""
    a, am_a = _canvas(4, 40, 5, 12, seed=3)
    b, am_b = _canvas(3, 45, 20, 14, seed=4)  # same bucket (4, 64, 16): other content, other window start
    kw = dict(mask_id=MASK, steps=6, alg="p2", cache="dual", refresh=3, temperature=0.7, seed=5)
    diffusion_generate(dmodel, a, attention_mask=am_a, cuda_graph="emulate", **kw)
    got, stats = diffusion_generate(dmodel, b, attention_mask=am_b, cuda_graph="emulate", return_stats=True, **kw)
    assert not stats.graph_captured
    assert diffusion.graph_bucket(dmodel, b, mask_id=MASK, cache="dual", attention_mask=am_b) == stats.graph_bucket
    assert torch.equal(got, diffusion_generate(dmodel, b, attention_mask=am_b, cuda_graph=False, **kw))


def test_graph_bucket_is_the_bucket_of_the_call_on_ragged_rows(dmodel, pool):
    """Middles at different columns, a row without masks: the host-side bucket is the one the call pads to."""
    x, am = _canvas(3, 50, 0, 0, seed=7)
    x[0, 30:41] = MASK  # 11 masks late in row 0
    x[2, 5:8] = MASK  # 3 early in row 2; row 1 has none
    got = {}
    for cache in ("none", "dual"):
        _, st = diffusion_generate(dmodel, x, mask_id=MASK, steps=1, cache=cache, attention_mask=am,
                                   cuda_graph="emulate", return_stats=True)  # fmt: skip
        got[cache] = diffusion.graph_bucket(dmodel, x, mask_id=MASK, cache=cache, attention_mask=am)
        assert st.graph_bucket == got[cache], cache
    # window from column 4 (before row 2's first mask) to 41 (row 0's last): 37 columns -> a bucket of 40
    assert got == {"none": (4, 64, 16, 0), "dual": (4, 64, 16, 40)}


def test_diffusion_new_bucket_captures_and_lru_evicts(dmodel, pool):
    pool.resize(2)
    kw = dict(mask_id=MASK, steps=3, alg="p2", cuda_graph="emulate", return_stats=True)
    shapes = [(1, 30), (5, 30), (1, 70)]  # buckets (1, 32), (8, 32), (1, 96)
    for i, (B, L) in enumerate(shapes):
        _, st = diffusion_generate(dmodel, _canvas(B, L, 4, 6, seed=i)[0], **kw)
        assert st.graph_captured, (B, L)
    assert pool.stats.builds == 3 and pool.stats.evictions == 1 and len(pool) == 2
    _, st = diffusion_generate(dmodel, _canvas(5, 31, 4, 6, seed=9)[0], **kw)  # still pooled
    assert not st.graph_captured
    _, st = diffusion_generate(dmodel, _canvas(1, 30, 4, 6, seed=9)[0], **kw)  # evicted: captures again
    assert st.graph_captured and pool.stats.evictions == 2
    # settings that change the captured code make a new entry; a new temperature value does not
    _, st = diffusion_generate(dmodel, _canvas(1, 30, 4, 6, seed=9)[0], temperature=0.5, seed=1, **kw)
    assert st.graph_captured
    _, st = diffusion_generate(dmodel, _canvas(1, 30, 4, 6, seed=9)[0], temperature=1.5, seed=2, **kw)
    assert not st.graph_captured
    mem = pool.memory()
    assert mem["entries"] == 2 and mem["static_bytes"] > 0 and mem["graph_bytes"] is None  # CPU: not measured
    assert all(e["static_bytes"] > 0 and e["graphs"] == 2 for e in pool.entries())


def test_backend_and_gemv_switches_are_part_of_the_key(dmodel, amodel, pool, monkeypatch):
    """DINFILL_BACKEND / DINFILL_GEMV are read at call time and change the captured code: flipping one between
    two calls of a bucket (a benchmark comparing the paths in one process) must capture, not replay the other."""
    x = _canvas(1, 30, 4, 6, seed=0)[0]
    kw = dict(mask_id=MASK, steps=2, alg="p2", cuda_graph="emulate", return_stats=True)
    ar_kw = dict(max_new_tokens=4, stop_ids=(), cuda_graph="emulate")

    def captured() -> tuple[bool, bool]:
        diffusion_stats = diffusion_generate(dmodel, x, **kw)[1]
        return diffusion_stats.graph_captured, ar_generate(amodel, [[3] * 9], **ar_kw).graph_captured

    monkeypatch.delenv("DINFILL_GEMV", raising=False)
    assert captured() == (True, True) and captured() == (False, False)
    monkeypatch.setenv("DINFILL_GEMV", "triton")
    assert captured() == (True, True)
    monkeypatch.setenv("DINFILL_BACKEND", "torch")  # the CPU's own path, spelled out: still another key
    assert ar_generate(amodel, [[3] * 9], **ar_kw).graph_captured
    assert not ar_generate(amodel, [[3] * 9], **ar_kw).graph_captured


def test_a_bucket_made_under_inference_mode_is_not_reused_outside_it(dmodel, pool):
    """Static buffers allocated inside a caller's ``torch.inference_mode()`` are inference tensors, which cannot
    be updated in place outside it: such an entry is keyed apart instead of failing the next plain call."""
    x = _canvas(1, 30, 4, 6, seed=0)[0]
    kw = dict(mask_id=MASK, steps=2, alg="p2", cuda_graph="emulate", return_stats=True)
    with torch.inference_mode():
        inside, st = diffusion_generate(dmodel, x, **kw)
    assert st.graph_captured
    outside, st = diffusion_generate(dmodel, x, **kw)
    assert st.graph_captured and torch.equal(inside, outside)
    with torch.inference_mode():
        assert not diffusion_generate(dmodel, x, **kw)[1].graph_captured


def test_pool_forgets_a_dead_model(pool):
    model = _model("diffusion", seed=2)
    diffusion_generate(model, _canvas(1, 20, 3, 4, seed=0)[0], mask_id=MASK, steps=2, cuda_graph="emulate")
    assert len(pool) == 1
    del model
    gc.collect()
    assert len(pool) == 0


def test_warmup_captures_before_the_first_call(dmodel, amodel, pool):
    opts = dict(steps=4, alg="p2", temperature=0.6, top_p=0.95, cuda_graph="emulate")
    report = warmup(dmodel, [(2, 40, 8), (1, 60, 16)], **opts)
    assert [r["captured"] for r in report] == [True, True] and pool.stats.builds == 2
    x = _canvas(2, 40, 16, 8, seed=6)[0]
    _, st = diffusion_generate(dmodel, x, mask_id=MASK, seed=3, return_stats=True, **opts)
    assert not st.graph_captured and st.graph_bucket == report[0]["bucket"]
    ar_report = warmup(amodel, [(1, 20, 6)], cuda_graph="emulate")
    assert ar_report[0]["captured"] and ar_report[0]["bucket"] == (1, 32, 64)
    out = ar_generate(amodel, [[5] * 17], max_new_tokens=6, stop_ids=[7], cuda_graph="emulate")
    assert not out.graph_captured
    with pytest.raises(ValueError, match="3 ints"):
        warmup(dmodel, [(1, 40)])
    import dinfill.sampler

    assert dinfill.sampler.warmup is warmup


def test_captured_graph_keeps_no_cycle_to_its_owner(monkeypatch):
    """A captured graph drops ``fn`` (a replay never calls it): the owner (a sampler's step runner, whose
    method ``fn`` is) is then freed by reference counting the moment the pool evicts it, device memory with it,
    instead of waiting for the cyclic GC. The CUDA graph API is stubbed so this runs on the CPU."""
    import contextlib
    import weakref

    from dinfill.sampler.graphs import Graph

    class FakeGraph:
        def replay(self):
            calls.append("replay")

    calls: list[str] = []
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", lambda graph, pool=None: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: None)

    class Owner:  # like _StepRunner / _Decode: holds its graphs, which were captured from its own methods
        def __init__(self):
            self.graphs = {"step": Graph(self.step, emulate=False)}

        def step(self):
            calls.append("captured")

    owner = Owner()
    owner.graphs["step"].replay()
    assert calls == ["captured", "replay"]
    gone = weakref.ref(owner)
    gc.disable()
    try:
        del owner
        assert gone() is None, "a reference cycle keeps an evicted entry (and its graph memory) alive"
    finally:
        gc.enable()


def _stop_step(flag_step: int | None, steps: int, monkeypatch=None, **kw) -> tuple[int | None, int]:
    """Run a loop of ``steps`` steps whose step ``flag_step`` turns the flag; return ``(step it stopped before,
    events made)``. Lagged rings on the CPU use stub CUDA events (a plain copy is already complete)."""
    from dinfill.sampler.graphs import LaggedFlag

    made = []

    class Event:
        def __init__(self):
            made.append(self)
            self.recorded = False

        def record(self):
            self.recorded = True

        def synchronize(self):
            assert self.recorded, "waited on an event of a step that was never recorded"

    if monkeypatch is not None:
        monkeypatch.setattr(torch.cuda, "Event", Event)
    flag = torch.tensor(False)
    lagged = LaggedFlag(flag, steps=steps, stop_on=True, **kw)
    for i in range(steps):
        if lagged.should_stop():
            return i, len(made)
        if i == flag_step:
            flag.fill_(True)  # this step finishes the work
        lagged.record()
    return None, len(made)


def test_lagged_flag_stops_lag_steps_after_the_flag_turns(monkeypatch):
    """The ring of ``lag`` slots: the host sees step i's flag before launching step i + lag, never earlier, with
    ``lag`` events made once (none per step); off CUDA the flag is read after every step."""
    for lag in (1, 3, 4):
        assert _stop_step(5, 20, monkeypatch, lag=lag, lagged=True) == (5 + lag, lag)
    assert _stop_step(0, 20, monkeypatch, lag=4, lagged=True) == (4, 4)
    assert _stop_step(None, 20, monkeypatch, lag=4, lagged=True) == (None, 4)  # never turned: runs every step
    assert _stop_step(5, 8, monkeypatch, lag=50, lagged=True) == (None, 8)  # a lag past the end: no early exit
    assert _stop_step(5, 20, lag=4) == (6, 0)  # CPU: the next step already sees it, no events
    from dinfill.sampler.graphs import LaggedFlag

    alive = torch.tensor(True)  # the diffusion loop's polarity: stop once the flag reads False
    flag = LaggedFlag(alive, 4, 10, stop_on=False)
    flag.record()
    assert not flag.should_stop()
    alive.fill_(False)
    assert flag.should_stop()


def test_tensor_bytes_counts_shared_storage_once():
    t = torch.zeros(10, dtype=torch.float32)
    assert tensor_bytes([t, t[2:], torch.zeros(3, dtype=torch.int64), "not a tensor"]) == 40 + 24


# ---- AR -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "top_p": 0.9}, {"temperature": 1.0, "top_k": 5}])
def test_ar_second_call_of_a_bucket_captures_nothing(amodel, pool, sampling):
    prompts = [[3, 9, 27, 81, 32], [5, 7], [11, 13, 17, 19, 23, 29, 31]]  # batch 3 -> 4, prompt 7 -> 32
    kw = dict(max_new_tokens=12, stop_ids=(), **sampling)

    def gen():
        return torch.Generator().manual_seed(4) if sampling else None

    eager = ar_generate(amodel, prompts, cuda_graph=False, generator=gen(), **kw)
    first = ar_generate(amodel, prompts, cuda_graph="emulate", generator=gen(), **kw)
    assert first.graph_captured and first.graph_bucket == (4, 32, 64) and not first.cuda_graph
    assert autoregressive.graph_bucket(amodel, prompts, 12) == first.graph_bucket
    assert pool.stats.builds == 1 and pool.stats.graphs == 2  # the prefill of width 32 and the decode step
    second = ar_generate(amodel, prompts, cuda_graph="emulate", generator=gen(), **kw)
    assert not second.graph_captured and pool.stats.builds == 1
    assert first.tolist() == eager.tolist() == second.tolist()
    assert len({t for row in eager.tolist() for t in row}) > 5, "the tiny model should not repeat one token"


def test_ar_new_prompt_width_in_a_known_bucket_adds_one_prefill(amodel, pool):
    """Prompt buckets 480 and 512 with 100 new tokens share the cache bucket 640: one entry, two prefills."""
    kw = dict(max_new_tokens=100, stop_ids=(), cuda_graph="emulate")
    a = ar_generate(amodel, [[3 + i % 200 for i in range(460)]], **kw)
    long_prompt = [[5 + i % 199 for i in range(500)]]
    b = ar_generate(amodel, long_prompt, **kw)
    assert a.graph_bucket == (1, 480, 640) and b.graph_bucket == (1, 512, 640)
    assert a.graph_captured and b.graph_captured
    assert pool.stats.builds == 1 and pool.stats.graphs == 3 and pool.entries()[0]["graphs"] == 3
    assert b.tolist() == ar_generate(amodel, long_prompt, max_new_tokens=100, stop_ids=()).tolist()


def test_ar_reused_bucket_stops_and_pads_like_eager(amodel, pool):
    """Rows stopping on stop ids, a batch of another size in the same bucket, stop strings: all equal eager."""
    prompts = [[3, 9, 27], [5, 7, 9, 11], [2]]
    free = ar_generate(amodel, prompts, max_new_tokens=10, stop_ids=(), cuda_graph=False).tolist()
    stops = [free[0][4], free[2][2]]
    kw = dict(max_new_tokens=10, stop_ids=stops)
    eager = ar_generate(amodel, prompts, cuda_graph=False, **kw)
    ar_generate(amodel, [[1, 2, 3, 4]], max_new_tokens=10, stop_ids=(), cuda_graph="emulate")  # bucket (1, ...)
    for batch in (prompts, prompts[:2]):  # 3 and 2 rows: buckets 4 and 2
        got = ar_generate(amodel, batch, cuda_graph="emulate", **kw)
        want = ar_generate(amodel, batch, cuda_graph=False, **kw)
        assert got.tolist() == want.tolist()
        assert torch.equal(got.lengths, want.lengths) and torch.equal(got.stopped, want.stopped)
    assert eager.stopped.any() and eager.lengths.min() < 10
