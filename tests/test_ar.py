"""KV-cached AR generation and FIM infilling against transformers' ``generate`` on tiny random models.

One tiny checkpoint per family (Qwen2 / Llama with linear RoPE scaling as DeepSeek-Coder / Starcoder2),
saved with ``save_pretrained`` and loaded with ``dinfill.load_model``, each driven by a tokenizer with
that family's FIM tokens (test_fim.fim_tokenizer). Block weights are scaled up 16x: plain random
initialisation makes tiny models repeat one token forever, which would make "equal outputs" weak.
"""

from __future__ import annotations

import pytest
import torch
from test_fim import PAIRS, fim_tokenizer
from tiny import hf_model, save_checkpoint

import dinfill
import dinfill.sampler
from dinfill.sampler.autoregressive import ar_generate, benchmark, hf_twin, infill
from dinfill.sampler.fim import build_fim_prompts, fim_tokens

FAMILIES = ("qwen2", "llama", "starcoder2")
NEW = 20  # new tokens per row in the comparisons


pytestmark = pytest.mark.usefixtures("one_thread")


def _hf_generate(ref, rows, max_new, eos=None):
    """transformers' greedy ``generate``, one row at a time (no padding), new tokens only."""
    outs = []
    for r in rows:
        ids = torch.tensor([r])
        with torch.inference_mode():
            g = ref.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new, eos_token_id=eos,
                pad_token_id=0,
            )  # fmt: skip
        outs.append(g[0, len(r) :].tolist())
    return outs


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request, tmp_path_factory):
    """(family, transformers model, our model, tokenizer, FIM prompts of PAIRS)."""
    family = request.param
    tmp = tmp_path_factory.mktemp(family)
    tok = fim_tokenizer(family, tmp)
    vocab = 151936 if family == "qwen2" else len(tok) + 5  # Qwen's real size; odd sizes for the others
    ref = hf_model(family, seed=3, vocab_size=vocab)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(16.0)
    ours = dinfill.load_model(str(save_checkpoint(ref, tmp / "ckpt")), device="cpu", dtype=torch.float32)
    prompts = build_fim_prompts(tok, [p for p, _ in PAIRS], [s for _, s in PAIRS], fim_tokens(tok))
    return family, ref, ours, tok, prompts


def test_greedy_equals_transformers_generate(setup):
    _, ref, ours, _, prompts = setup
    out = ar_generate(ours, prompts, max_new_tokens=NEW, stop_ids=())
    want = _hf_generate(ref, prompts, NEW)
    assert out.tolist() == want
    assert out.lengths.tolist() == [NEW] * len(prompts) and not out.stopped.any()
    assert len({t for row in want for t in row}) > 10  # the outputs are not one repeated token


def test_infill_equals_transformers_with_family_stop_ids(setup):
    family, ref, ours, tok, prompts = setup
    fim = fim_tokens(tok)
    # make the first row's 6th greedy token a stop id as far as both sides know: same cut on both
    free = _hf_generate(ref, prompts[:1], NEW)[0]
    stops = list(fim.stop_ids) + [free[5]]
    want = _hf_generate(ref, prompts, NEW, eos=stops)
    got = ar_generate(ours, prompts, max_new_tokens=NEW, stop_ids=stops)
    assert got.tolist() == want
    assert got.stopped[0] and got.lengths[0] == free.index(free[5]) + 1
    texts = infill(ours, tok, [p for p, _ in PAIRS], [s for _, s in PAIRS], max_new_tokens=NEW)
    plain = _hf_generate(ref, prompts, NEW, eos=list(fim.stop_ids))
    expected = [tok.decode([t for t in r if t not in fim.stop_ids], skip_special_tokens=True) for r in plain]
    assert texts == expected
    # the package-level dispatcher sends an AR model here
    one = dinfill.sampler.infill(ours, tok, [PAIRS[0][0]], [PAIRS[0][1]], max_new_tokens=NEW, preset="greedy")
    assert one == texts[:1]


def test_batched_equals_rows_alone(setup):
    _, _, ours, _, prompts = setup
    batched = ar_generate(ours, prompts, max_new_tokens=NEW, stop_ids=()).tolist()
    alone = [ar_generate(ours, [p], max_new_tokens=NEW, stop_ids=()).tolist()[0] for p in prompts]
    assert batched == alone
    # a right-padded tensor with a mask is re-packed to the same rows
    P = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), P, dtype=torch.long)
    mask = torch.zeros(len(prompts), P, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, : len(p)], mask[b, : len(p)] = torch.tensor(p), 1
    assert ar_generate(ours, ids, attention_mask=mask, max_new_tokens=NEW, stop_ids=()).tolist() == batched


def test_rows_stop_independently_and_loop_exits_early(setup):
    _, _, ours, _, prompts = setup
    free = ar_generate(ours, prompts, max_new_tokens=NEW, stop_ids=()).tolist()
    stop = free[1][3]  # row 1 stops at its 4th token (or earlier if that id came before)
    out = ar_generate(ours, prompts, max_new_tokens=NEW, stop_ids=[stop], check_every=2)
    for b, row in enumerate(free):
        n = row.index(stop) + 1 if stop in row else NEW
        assert out.lengths[b] == n and bool(out.stopped[b]) == (stop in row)
        assert out.tolist()[b] == row[:n]
        assert out.tolist(strip_stop=True)[b] == (row[: n - 1] if stop in row else row)
        assert (out.tokens[b, n:] == stop).all()  # finished rows are padded with the first stop id
    # every row stopping on its first token: on the CPU the host reads the "all done" flag before every step
    # (on CUDA it reads the flag of a few steps back), so no decode step runs after the prefill
    firsts = sorted({row[0] for row in free})
    out = ar_generate(ours, prompts, max_new_tokens=NEW, stop_ids=firsts, check_every=4)
    assert out.lengths.tolist() == [1] * len(prompts) and out.steps == 0


def test_stop_strings(setup):
    family, _, ours, tok, prompts = setup
    free = ar_generate(ours, prompts, max_new_tokens=NEW, stop_ids=()).tolist()
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    # a stop string that first appears inside row 0's text, somewhere after its first few tokens
    text0 = decode(free[0])
    k = next(i for i in range(4, NEW) if decode(free[0][:i]) != decode(free[0][: i - 1]))
    stop = decode(free[0][:k])[-2:]
    for check_every in (1, 3, 64):  # found during the loop, between checks, or only at the end
        out = ar_generate(
            ours, prompts, max_new_tokens=NEW, stop_ids=(), stop_strings=[stop], tokenizer=tok, check_every=check_every
        )
        for b, row in enumerate(free):
            ns = [i for i in range(1, NEW + 1) if stop in decode(row[:i])]
            n = ns[0] if ns else NEW
            assert out.tolist()[b] == row[:n] and bool(out.stopped[b]) == bool(ns)
    middles = infill(
        ours, tok, [p for p, _ in PAIRS], [s for _, s in PAIRS], max_new_tokens=NEW, stop_strings=[stop], check_every=5
    )
    fim = fim_tokens(tok)
    for b, row in enumerate(free):
        n = next((i for i, t in enumerate(row) if t in fim.stop_ids), NEW)
        assert middles[b] == decode(row[:n]).split(stop)[0]
    assert middles[0] == text0.split(stop)[0] and len(middles[0]) < len(text0)


def test_seeded_sampling_is_reproducible(setup):
    _, _, ours, _, prompts = setup
    kw = dict(max_new_tokens=6, stop_ids=(), temperature=1.0, top_p=0.95)
    a = ar_generate(ours, prompts, generator=torch.Generator().manual_seed(11), **kw).tolist()
    b = ar_generate(ours, prompts, generator=torch.Generator().manual_seed(11), **kw).tolist()
    c = ar_generate(ours, prompts, generator=torch.Generator().manual_seed(12), **kw).tolist()
    assert a == b and a != c
    greedy = ar_generate(ours, prompts, max_new_tokens=6, stop_ids=()).tolist()
    assert ar_generate(ours, prompts, generator=torch.Generator(), **{**kw, "top_k": 1}).tolist() == greedy
    texts = [infill(ours, setup[3], ["def f("], [")\n"], max_new_tokens=8, temperature=0.6, seed=5) for _ in "ab"]
    assert texts[0] == texts[1]


def test_bad_inputs(setup, tmp_path):
    family, _, ours, tok, prompts = setup
    plain = fim_tokenizer("plain", tmp_path)
    expected = {"qwen2": "qwen2.5-coder", "llama": "deepseek-coder", "starcoder2": "starcoder2"}[family]
    with pytest.raises(ValueError, match=f"no FIM tokens of family '{expected}'"):
        infill(ours, plain, ["a"], ["b"])
    limit = ours.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"prompt of {limit + 1} tokens is longer than the model's limit"):
        ar_generate(ours, [[5] * (limit + 1)], max_new_tokens=1)
    with pytest.raises(ValueError, match="lower max_new_tokens to at most 12"):
        ar_generate(ours, [[5] * (limit - 12)], max_new_tokens=13)
    for bad in (0, -3, 2.0):
        with pytest.raises(ValueError, match=r"max_new_tokens \(--max-new-tokens\) must be an integer >= 1"):
            ar_generate(ours, prompts, max_new_tokens=bad)
    with pytest.raises(ValueError, match="row 1 is empty"):
        ar_generate(ours, [[5], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        ar_generate(ours, [[ours.config.vocab_size]], max_new_tokens=2)
    with pytest.raises(ValueError, match="need the tokenizer"):
        ar_generate(ours, prompts, max_new_tokens=2, stop_strings=["\n"])
    with pytest.raises(ValueError, match="not a bare string"):
        ar_generate(ours, prompts, max_new_tokens=2, stop_strings="\n", tokenizer=tok)
    with pytest.raises(ValueError, match="temperature"):
        ar_generate(ours, prompts, max_new_tokens=2, temperature=-0.5)
    with pytest.raises(ValueError, match="cuda_graph=True needs a model on CUDA"):
        ar_generate(ours, prompts, max_new_tokens=2, cuda_graph=True)
    with pytest.raises(ValueError, match="has holes"):
        ar_generate(ours, torch.ones(1, 4, dtype=torch.long), attention_mask=torch.tensor([[1, 0, 1, 1]]))


def test_rehearsed_steps_leave_no_trace(setup):
    """The CUDA-graph path runs a warm-up step and restores the state; on the CPU, check that invariant."""
    from dinfill.sampler.autoregressive import _ArSpec, _Decode

    _, _, ours, _, prompts = setup
    want = ar_generate(ours, prompts, max_new_tokens=8, stop_ids=()).tolist()
    P = max(len(p) for p in prompts)
    with torch.inference_mode():
        state = _Decode(ours, len(prompts), P + 7, 1, _ArSpec(sampled=False, top_p=False, top_k=None))
        state.load(prompts, P, [], 0, 0.0, None)
        state.prefill()
        saved = state.save()
        state.step()
        state.step()  # writes cache columns P and P + 1 with tokens that will be fed again
        state.restore(saved)
        for _ in range(7):
            state.step()
    assert state.out[:, :8].tolist() == want


def test_single_token_and_default_eos(setup):
    _, _, ours, _, prompts = setup
    free = ar_generate(ours, prompts, max_new_tokens=NEW, stop_ids=()).tolist()
    one = ar_generate(ours, prompts, max_new_tokens=1, stop_ids=())
    assert one.tolist() == [r[:1] for r in free] and one.steps == 0
    # stop_ids=None stops on config.eos_token_id (2 in the tiny configs)
    out = ar_generate(ours, prompts, max_new_tokens=NEW)
    for b, row in enumerate(free):
        n = row.index(2) + 1 if 2 in row else NEW
        assert out.tolist()[b] == row[:n]


def test_benchmark_and_hf_twin_of_a_builtin_shape():
    torch.manual_seed(0)
    model = dinfill.load_model("tiny-starcoder2", random_weights=True, device="cpu", seed=1)
    twin = hf_twin(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 13))
    with torch.inference_mode():
        diff = (twin(ids).logits - model(ids, causal=True)).abs().max().item()
    assert diff < 1e-4
    res = benchmark(model, twin, batch_size=2, prompt_len=9, new_tokens=6, repeats=1)
    assert res["greedy_agreement"] == 1.0 and res["hf_new_tokens"] == 6
    assert res["ours_tokens_per_s"] > 0 and res["speedup"] == pytest.approx(
        res["ours_tokens_per_s"] / res["hf_tokens_per_s"]
    )


def test_hf_twin_of_a_checkpoint_dir(setup):
    _, ref, ours, _, prompts = setup
    twin = hf_twin(ours)  # re-read from the directory ours was loaded from
    ids = torch.tensor([prompts[0]])
    with torch.inference_mode():
        assert torch.equal(twin(ids).logits, ref(ids).logits)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (bench/gpu_check.sh runs this)")
def test_cuda_graph_decode_equals_eager():
    """The captured decode step replays to the same tokens as the eager loop, and the graph really ran."""
    model = dinfill.load_model("tiny-llama", random_weights=True, device="cuda", dtype=torch.float32)
    prompts = [[5, 9, 11, 3], [7, 2], [1, 2, 3, 4, 5, 6]]
    kw = dict(
        max_new_tokens=24, stop_ids=(), temperature=0.7, top_k=20, generator=torch.Generator("cuda").manual_seed(3)
    )
    graph = ar_generate(model, prompts, cuda_graph=True, **kw)
    kw["generator"] = torch.Generator("cuda").manual_seed(3)
    eager = ar_generate(model, prompts, cuda_graph=False, **kw)
    assert graph.cuda_graph and not eager.cuda_graph
    assert torch.equal(graph.tokens, eager.tokens)


def test_cpu_run_reports_no_graph(setup):
    out = ar_generate(setup[2], [[5, 9, 11]], max_new_tokens=3, stop_ids=())
    assert out.cuda_graph is False
