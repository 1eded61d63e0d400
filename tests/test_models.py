"""Runtime vs transformers: logits of tiny random checkpoints of each family, fp32, tight tolerance.

The ``pair`` tests run on the torch path for every family tied and untied, and on the fused Triton path
(``DINFILL_BACKEND=triton``: the kernels through Triton's interpreter on the CPU) for each family's default.
"""

from __future__ import annotations

import json

import pytest
import torch
from tiny import FAMILIES, hf_model, save_checkpoint

import dinfill
from dinfill.models import ModelConfig, builtin_config


def _close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    scale = ref.abs().max().item()
    err = (ours - ref).abs().max().item()
    assert err <= 1e-4 * max(scale, 1.0), f"max abs error {err:.3g} vs logit scale {scale:.3g}"


def _all_visible_mask(attn: torch.Tensor) -> torch.Tensor:
    """A 4D float mask that lets every query see every real key (bidirectional reference)."""
    B, L = attn.shape
    m = torch.zeros(B, 1, L, L)
    return m.masked_fill(~attn.bool().view(B, 1, 1, L), torch.finfo(torch.float32).min)


# every family tied and untied on the torch path; on the fused Triton path (the interpreter on the CPU) each
# family at its own default (tying only changes which weight the lm_head GEMM reads)
PAIRS = [(f, t, "torch") for f in FAMILIES for t in (True, False)]
PAIRS += [(f, f != "llama", "triton") for f in FAMILIES]


@pytest.fixture(scope="module", params=PAIRS, ids=lambda p: f"{p[0]}-tied{p[1]}-{p[2]}")
def pair(request, tmp_path_factory):
    family, tie, _ = request.param
    ref = hf_model(family, tie=tie)
    path = save_checkpoint(ref, tmp_path_factory.mktemp(f"{family}{tie}"))
    ours = dinfill.load_model(str(path), device="cpu", dtype=torch.float32)
    return ref, ours


@pytest.fixture(autouse=True)
def _pair_backend(request, monkeypatch):
    """Run the test on the backend its ``pair`` names (DINFILL_BACKEND)."""
    params = getattr(request.node, "callspec", None)
    backend = params.params["pair"][2] if params is not None and "pair" in params.params else None
    if backend == "triton" and torch.cuda.is_available():
        pytest.skip("these tests keep tensors on the CPU; on CUDA the fused path is covered by test_decoder_paths")
    if backend is not None:
        monkeypatch.setenv("DINFILL_BACKEND", backend)
    return backend


def test_causal_logits_match(pair):
    ref, ours = pair
    ids = torch.randint(3, ref.config.vocab_size, (2, 23))
    _close(ours(ids, causal=True), ref(ids).logits)


def test_bidirectional_logits_match(pair):
    ref, ours = pair
    ids = torch.randint(3, ref.config.vocab_size, (2, 17))
    mask4d = _all_visible_mask(torch.ones(2, 17))
    _close(ours(ids, causal=False), ref(ids, attention_mask=mask4d).logits)


def test_padded_batch_equals_rows_alone(pair, _pair_backend):
    if _pair_backend == "triton":
        pytest.skip(
            "16 forwards through the interpreter: the fused path's padding is checked against transformers "
            "(test_padding_matches_transformers) and the torch path (test_decoder_paths) instead"
        )
    _, ours = pair
    torch.manual_seed(1)
    lens, L = [13, 7, 10], 13
    rows = [torch.randint(3, ours.config.vocab_size, (n,)) for n in lens]
    for causal in (True, False):
        for side in ("left", "right"):
            ids = torch.zeros(3, L, dtype=torch.long)
            mask = torch.zeros(3, L, dtype=torch.bool)
            pos = torch.zeros(3, L, dtype=torch.long)
            for b, r in enumerate(rows):
                sl = slice(L - len(r), L) if side == "left" else slice(0, len(r))
                ids[b, sl], mask[b, sl], pos[b, sl] = r, True, torch.arange(len(r))
            out = ours(ids, causal=causal, attention_mask=mask, position_ids=pos)
            for b, r in enumerate(rows):
                sl = slice(L - len(r), L) if side == "left" else slice(0, len(r))
                _close(out[b, sl], ours(r[None], causal=causal)[0])


def test_padding_matches_transformers(pair):
    ref, ours = pair
    ids = torch.randint(3, ref.config.vocab_size, (2, 11))
    attn = torch.ones(2, 11, dtype=torch.long)
    attn[1, 7:] = 0  # right padding on row 1
    got = ours(ids, causal=True, attention_mask=attn)
    want = ref(ids, attention_mask=attn).logits
    _close(got[0], want[0])
    _close(got[1, :7], want[1, :7])


def test_logits_index_and_hidden(pair):
    _, ours = pair
    ids = torch.randint(3, ours.config.vocab_size, (2, 9))
    full = ours(ids, causal=False)
    idx = torch.tensor([[0, 4, 8], [3, 3, 1]])
    sel = ours(ids, causal=False, logits_index=idx)
    assert sel.shape == (2, 3, ours.config.vocab_size)
    _close(sel, torch.stack([full[b, idx[b]] for b in range(2)]))
    hidden = ours(ids, causal=False, return_hidden=True)
    _close(ours.lm_head(hidden), full)


def test_kv_cached_decode_matches_full(pair):
    _, ours = pair
    torch.manual_seed(2)
    P, N, B = 6, 5, 2
    ids = torch.randint(3, ours.config.vocab_size, (B, P + N))
    full = ours(ids, causal=True)
    cache = ours.new_cache(B, P + N + 3)
    mask = torch.zeros(B, P + N + 3, dtype=torch.bool)
    mask[:, :P] = True
    got = [ours(ids[:, :P], causal=True, attention_mask=mask, cache=cache, cache_pos=torch.arange(P))]
    for i in range(P, P + N):
        mask[:, i] = True
        got.append(ours(ids[:, i : i + 1], causal=True, attention_mask=mask, cache=cache, cache_pos=torch.tensor([i])))
    _close(torch.cat(got, dim=1), full)


def test_diffusion_cached_prefix_suffix_equals_full(pair):
    _, ours = pair
    torch.manual_seed(3)
    L, lo, hi = 20, 7, 12  # recompute columns [lo, hi) only
    ids = torch.randint(3, ours.config.vocab_size, (2, L))
    full = ours(ids, causal=False)
    cache = ours.new_cache(2, L)
    mask = torch.ones(2, L, dtype=torch.bool)
    ours(ids, causal=False, attention_mask=mask, cache=cache, cache_pos=torch.arange(L))
    part = ours(ids[:, lo:hi], causal=False, attention_mask=mask, cache=cache, cache_pos=torch.arange(lo, hi))
    _close(part, full[:, lo:hi])


def test_sharded_checkpoint(tmp_path):
    ref = hf_model("qwen2", seed=5)
    save_checkpoint(ref, tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = dinfill.load_model(str(tmp_path), device="cpu")
    ids = torch.randint(3, 211, (1, 10))
    _close(ours(ids, causal=True), ref(ids).logits)


def test_config_keyed_by_model_type(tmp_path):
    cfg = hf_model("llama").config.to_dict()
    ours = ModelConfig.from_hf_dict(cfg)
    assert (ours.model_type, ours.rope_scaling_factor, ours.tie_word_embeddings) == ("llama", 4.0, False)
    with pytest.raises(ValueError, match="supports qwen2, llama, starcoder2"):
        ModelConfig.from_hf_dict({**cfg, "model_type": "gpt2"})
    with pytest.raises(ValueError, match="RoPE scaling"):
        ModelConfig.from_hf_dict({**cfg, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}, "rope_parameters": None})


def test_bad_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a local checkpoint"):
        dinfill.load_model(str(tmp_path / "nope"))
    ref = hf_model("qwen2")
    save_checkpoint(ref, tmp_path / "ok")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        dinfill.load_model(str(tmp_path / "noweights"))
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (tmp_path / "ok" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape"):
        dinfill.load_model(str(tmp_path / "ok"))
    cfg["model_type"] = "mistral"
    (tmp_path / "ok" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported model_type 'mistral'"):
        dinfill.load_model(str(tmp_path / "ok"))


def test_bad_inputs():
    m = dinfill.load_model("tiny-llama", random_weights=True, device="cpu")
    with pytest.raises(TypeError, match="int64 or int32"):
        m(torch.zeros(1, 4), causal=True)
    with pytest.raises(ValueError, match="2-D"):
        m(torch.zeros(4, dtype=torch.long), causal=True)
    with pytest.raises(ValueError, match="exceeds the model's limit"):
        m(torch.zeros(1, m.config.max_position_embeddings + 1, dtype=torch.long), causal=True)
    cache = m.new_cache(1, 8)
    mask = torch.ones(1, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="do not fit"):
        m(torch.zeros(1, 9, dtype=torch.long), causal=True, cache=cache, cache_pos=torch.arange(9), attention_mask=mask)
    with pytest.raises(ValueError, match="reaches column 9"):
        m(
            torch.zeros(1, 2, dtype=torch.long),
            causal=True,
            cache=cache,
            cache_pos=torch.arange(8, 10),
            attention_mask=mask,
        )
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        m(torch.zeros(1, 4, dtype=torch.long), causal=True, attention_mask=torch.ones(1, 5))
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="move one of them"):
            m(torch.zeros(1, 4, dtype=torch.long, device="cuda"), causal=True)


def test_builtin_shapes_and_kinds():
    cfg = builtin_config("open-dcoder-0.5b")
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (24, 896, 14, 2, 64)
    assert 0.48e9 < cfg.num_parameters() < 0.51e9
    m = dinfill.load_model("tiny-dcoder", random_weights=True, device="cpu")
    assert m.kind == "diffusion"
    assert dinfill.load_model("tiny-dcoder", random_weights=True, kind="ar").kind_source == "override"
    from dinfill.models import resolve_kind

    assert resolve_kind("fredzzp/open-dcoder-0.5B")[0] == "diffusion"
    assert resolve_kind("/x/models--fredzzp--open-dcoder-0.5B/snapshots/abc")[0] == "diffusion"
    assert resolve_kind("bigcode/starcoder2-3b")[0] == "ar"
    with pytest.raises(ValueError, match="kind must be one of"):
        resolve_kind("x", "mlm")


def test_real_tokenizer_and_mask_token(shared_dir):
    tok_dir = shared_dir / "tokenizers" / "qwen2.5-coder"
    tok = dinfill.load_tokenizer(str(tok_dir))
    assert tok.convert_tokens_to_ids("<|fim_prefix|>") == 151659
    from dinfill.models import require_mask_token

    with pytest.raises(ValueError, match="no mask token"):
        require_mask_token(tok)
    tok = dinfill.load_tokenizer(str(tok_dir), add_mask_token=True)
    mask_id = require_mask_token(tok, dinfill.load_model("tiny-dcoder", random_weights=True))
    assert mask_id == len(tok) - 1 and mask_id < 151936


def test_triton_attention_backend_equals_torch(monkeypatch):
    """The runtime through the Triton kernel (interpreter on CPU) equals the SDPA path: padding, cache, GQA."""
    m = dinfill.load_model("tiny-llama", random_weights=True, device="cpu")
    ids = torch.randint(0, m.config.vocab_size, (2, 13))
    mask = torch.ones(2, 13, dtype=torch.bool)
    mask[1, :4] = False  # left padding on row 1
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    outs = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("DINFILL_BACKEND", backend)
        full = m(ids, causal=True, attention_mask=mask, position_ids=pos)
        bidir = m(ids, causal=False, attention_mask=mask, position_ids=pos)
        cache = m.new_cache(2, 16)
        cmask = torch.zeros(2, 16, dtype=torch.bool)
        cmask[:, :13] = mask
        m(
            ids[:, :12],
            causal=True,
            attention_mask=cmask,
            position_ids=pos[:, :12],
            cache=cache,
            cache_pos=torch.arange(12),
        )
        step = m(ids[:, 12:], causal=True, attention_mask=cmask, position_ids=pos[:, 12:], cache=cache,
                 cache_pos=torch.tensor([12]))  # fmt: skip
        outs[backend] = (full[0], full[1, 4:], bidir[0], bidir[1, 4:], step)
    for a, b in zip(outs["torch"], outs["triton"], strict=True):
        _close(b, a)


def test_llama_attention_bias_loads(tmp_path):
    """Llama with attention_bias=True has biases on q/k/v *and* o_proj (as in transformers)."""
    ref = hf_model("llama", seed=7, attention_bias=True)
    assert ref.model.layers[0].self_attn.o_proj.bias is not None
    ours = dinfill.load_model(str(save_checkpoint(ref, tmp_path)), device="cpu")
    ids = torch.randint(3, 211, (2, 9))
    _close(ours(ids, causal=True), ref(ids).logits)


def test_qwen2_partial_sliding_window_is_refused():
    cfg = hf_model("qwen2").config.to_dict()
    with pytest.raises(ValueError, match="max_window_layers"):
        ModelConfig.from_hf_dict({**cfg, "use_sliding_window": True, "sliding_window": 64, "max_window_layers": 2})
    full = ModelConfig.from_hf_dict({**cfg, "use_sliding_window": True, "sliding_window": 64, "max_window_layers": 0})
    assert full.sliding_window == 64
