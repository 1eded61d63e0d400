"""The decoder's two forward paths: the torch path bit for bit as before, the fused path against it.

* The torch path (CPU, ``DINFILL_BACKEND=torch``) must give exactly the logits it gave before q/k/v and
  gate/up were fused: :func:`frozen_forward` is a plain copy of that layer math (separate q/k/v and
  gate/up weights, RMSNorm as five ops, RoPE with ``rotate_half``, SDPA with the same masks), and the
  tests compare with ``torch.equal`` across the three families and every forward mode.
* Fused weights keep the HF names in state dicts (no second copy in memory), so checkpoints, random
  initialisation and ``load_state_dict`` of a transformers state dict behave as before.
* The fused path (``DINFILL_BACKEND=triton``; Triton's interpreter on the CPU) is compared with the
  torch path in fp32 (tight) and, in bf16, with the style guide's tolerance rule at the model level.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny import FAMILIES, hf_config, hf_model

import dinfill
from dinfill.models import ModelConfig
from dinfill.models.decoder import Decoder

ON_CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if ON_CUDA else "cpu")  # the fused path needs CUDA or the interpreter (CPU)


# ------------------------------------------------------------------------------------------------
# a frozen copy of the torch path's math as it was before the fused weights (do not "improve" it)
# ------------------------------------------------------------------------------------------------


def _rms(x, w, eps):
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return w * x.to(dtype)


def _norm(cfg, sd, name, x):
    if cfg.norm == "layernorm":
        return F.layer_norm(x, (cfg.hidden_size,), sd[f"{name}.weight"], sd[f"{name}.bias"], cfg.norm_eps)
    return _rms(x, sd[f"{name}.weight"], cfg.norm_eps)


def _lin(sd, name, x):
    return F.linear(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"))


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _sdpa_mask(key_mask, causal, q_cols, Lk, window, B):
    k_cols = torch.arange(Lk)
    vis = torch.ones(B, 1, q_cols.shape[0], Lk, dtype=torch.bool)
    if key_mask is not None:
        vis = vis & key_mask.view(B, 1, 1, Lk)
    if causal:
        vis = vis & (k_cols.view(1, 1, 1, Lk) <= q_cols.view(1, 1, -1, 1))
        if window is not None:
            vis = vis & (k_cols.view(1, 1, 1, Lk) > q_cols.view(1, 1, -1, 1) - window)
    return vis | ~vis.any(dim=-1, keepdim=True)


def frozen_forward(cfg, sd, inv_freq, ids, *, causal, attention_mask=None, position_ids=None, cache=None,
                   cache_pos=None, logits_index=None):  # fmt: skip
    """Logits of the decoder as computed before issue 10 (CPU; ``cache`` = dict of per-layer k / v lists)."""
    B, T = ids.shape
    Hq, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    if cache is not None:
        q_cols = cache_pos
        position_ids = cache_pos.unsqueeze(0).expand(B, T) if position_ids is None else position_ids
    else:
        q_cols = torch.arange(T)
        position_ids = q_cols.unsqueeze(0).expand(B, T) if position_ids is None else position_ids
    key_mask = None if attention_mask is None else attention_mask.to(torch.bool)
    x = F.embedding(ids, sd["model.embed_tokens.weight"])
    freqs = position_ids.float().unsqueeze(-1) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(x.dtype).unsqueeze(1), emb.sin().to(x.dtype).unsqueeze(1)
    mask = None
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        h = _norm(cfg, sd, p + "input_layernorm", x)
        q = _lin(sd, p + "self_attn.q_proj", h).view(B, T, Hq, D).transpose(1, 2)
        k = _lin(sd, p + "self_attn.k_proj", h).view(B, T, Hkv, D).transpose(1, 2)
        v = _lin(sd, p + "self_attn.v_proj", h).view(B, T, Hkv, D).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if cache is not None:
            cache["k"][i].index_copy_(2, cache_pos, k)
            cache["v"][i].index_copy_(2, cache_pos, v)
            k, v = cache["k"][i], cache["v"][i]
        Lk = k.shape[2]
        window = cfg.sliding_window if (cfg.sliding_window is not None and causal and cfg.sliding_window < Lk) else None
        if key_mask is None and window is None and (not causal or T == Lk):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal and T > 1, enable_gqa=True)
        else:
            mask = _sdpa_mask(key_mask, causal, q_cols, Lk, window, B) if mask is None else mask
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        x = x + _lin(sd, p + "self_attn.o_proj", out.transpose(1, 2).reshape(B, T, Hq * D))
        h = _norm(cfg, sd, p + "post_attention_layernorm", x)
        if cfg.mlp == "swiglu":
            m = _lin(sd, p + "mlp.down_proj", F.silu(_lin(sd, p + "mlp.gate_proj", h)) * _lin(sd, p + "mlp.up_proj", h))
        else:
            m = _lin(sd, p + "mlp.c_proj", F.gelu(_lin(sd, p + "mlp.c_fc", h), approximate="tanh"))
        x = x + m
    if logits_index is not None:
        x = torch.gather(x, 1, logits_index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    x = _norm(cfg, sd, "model.norm", x)
    head = sd["model.embed_tokens.weight"] if cfg.tie_word_embeddings else sd["lm_head.weight"]
    return F.linear(x, head)


# ------------------------------------------------------------------------------------------------
# models: the three families, odd sizes, biases and norms perturbed so no mapping hides behind 0 / 1
# ------------------------------------------------------------------------------------------------


def _config(family: str, **over) -> ModelConfig:
    cfg = hf_config(family, **over).to_dict()
    return ModelConfig.from_hf_dict(cfg)


def _model(cfg: ModelConfig, seed: int = 0) -> Decoder:
    torch.manual_seed(seed)
    m = Decoder(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("norm.weight") else 0.0))
            else:
                p.copy_(torch.randn_like(p) * 0.05)
    return m.eval().requires_grad_(False)


CONFIGS = {
    "qwen2": dict(),  # q/k/v biases, tied head, RMSNorm, SwiGLU
    "llama": dict(attention_bias=True),  # linear RoPE scaling x4, untied, o_proj bias, head dim 12
    "starcoder2": dict(sliding_window=8),  # LayerNorm + bias, GELU-tanh, a window shorter than the sequences
}


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    cfg = _config(request.param, **CONFIGS[request.param])
    model = _model(cfg)
    sd = {k: v.clone() for k, v in model.state_dict().items()}  # separate storage: "today's" weights
    return request.param, model, sd


def _frozen(model, sd, ids, **kw):
    return frozen_forward(model.config, sd, model.rotary.inv_freq, ids, **kw)


def _cases(model):
    """(name, kwargs for the model, kwargs for the frozen copy, needs_cache) of every forward mode."""
    g = torch.Generator().manual_seed(4)
    V = model.config.vocab_size
    ids = torch.randint(3, V, (2, 13), generator=g)
    mask = torch.ones(2, 13, dtype=torch.bool)
    mask[1, :4] = False  # left padding on row 1
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    idx = torch.tensor([[0, 12, 5], [7, 7, 12]])
    return ids, [
        ("causal", dict(causal=True)),
        ("bidirectional", dict(causal=False)),
        ("padded-causal", dict(causal=True, attention_mask=mask, position_ids=pos)),
        ("padded-bidirectional", dict(causal=False, attention_mask=mask, position_ids=pos)),
        ("logits-index", dict(causal=False, logits_index=idx)),
    ]


@pytest.mark.skipif(ON_CUDA, reason="bit-identity of the CPU torch path (on CUDA the default is the fused path)")
def test_torch_path_bit_identical_to_frozen_math(family_model, monkeypatch):
    """Every uncached mode: exactly the logits of the pre-fusion layer math."""
    monkeypatch.setenv("DINFILL_BACKEND", "torch")
    _, model, sd = family_model
    ids, cases = _cases(model)
    for name, kw in cases:
        got, want = model(ids, **kw), _frozen(model, sd, ids, **kw)
        assert torch.equal(got, want), f"{name}: torch path differs from the frozen math"


@pytest.mark.skipif(ON_CUDA, reason="bit-identity of the CPU torch path (on CUDA the default is the fused path)")
def test_torch_path_bit_identical_with_cache(family_model, monkeypatch):
    """AR prefill + decode and a diffusion window over cached prefix/suffix: exactly the pre-fusion logits."""
    monkeypatch.setenv("DINFILL_BACKEND", "torch")
    _, model, sd = family_model
    cfg = model.config
    g = torch.Generator().manual_seed(5)
    B, L = 2, 16
    ids = torch.randint(3, cfg.vocab_size, (B, L), generator=g)
    cache = model.new_cache(B, L)
    shape = (B, cfg.num_kv_heads, L, cfg.head_dim)
    frozen = {
        "k": [torch.zeros(shape) for _ in range(cfg.num_layers)],
        "v": [torch.zeros(shape) for _ in range(cfg.num_layers)],
    }
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[:, :11] = True
    calls = [  # prefill 11, decode 2 (causal); then a bidirectional full pass and a window [5, 9) (diffusion)
        (True, slice(0, 11), None), (True, slice(11, 12), 12), (True, slice(12, 13), 13),
        (False, slice(0, L), L), (False, slice(5, 9), L),
    ]  # fmt: skip
    for causal, cols, visible in calls:
        if visible is not None:
            mask[:, :visible] = True
        cache_pos = torch.arange(cols.start, cols.stop)
        kw = dict(causal=causal, attention_mask=mask.clone(), cache_pos=cache_pos)
        got = model(ids[:, cols], cache=cache, **kw)
        want = _frozen(model, sd, ids[:, cols], cache=frozen, **kw)
        assert torch.equal(got, want), f"causal={causal} cols={cols}: torch path differs from the frozen math"
    for i in range(cfg.num_layers):
        assert torch.equal(cache.k[i], frozen["k"][i]) and torch.equal(cache.v[i], frozen["v"][i])


# ------------------------------------------------------------------------------------------------
# fused weights under HF names
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_state_dict_has_hf_names_and_shares_memory(family):
    ref = hf_model(family, seed=3)
    ours = Decoder(ModelConfig.from_hf_dict(ref.config.to_dict()))
    want = {k for k in ref.state_dict() if not k.endswith("rotary_emb.inv_freq")}
    sd = ours.state_dict()
    assert set(sd) == want, f"names differ: {sorted(set(sd) ^ want)[:6]}"
    assert not any("qkv_proj" in k or "gate_up_proj" in k for k in sd)
    # the HF-named entries are views of the fused parameters: no second copy of any weight
    storages = {p.untyped_storage().data_ptr() for p in ours.parameters()}
    assert {t.untyped_storage().data_ptr() for t in sd.values()} <= storages
    fused = ours.model.layers[0].self_attn.qkv_proj.weight
    assert sd["model.layers.0.self_attn.q_proj.weight"].data_ptr() == fused.data_ptr()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    # a transformers state dict loads strictly and gives transformers' logits
    missing, unexpected = ours.load_state_dict(ref.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    ids = torch.randint(3, ref.config.vocab_size, (2, 9))
    with torch.no_grad():
        err = (ours.eval()(ids, causal=True) - ref(ids).logits).abs().max().item()
    assert err < 1e-4
    # and round-trips: our state dict loads into transformers' model
    missing, unexpected = ref.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}


def test_random_weights_unchanged_by_fusion():
    """``random_weights=True`` draws the same numbers as before the fusion (q, k, v drawn back to back)."""
    for shape in ("tiny-llama", "tiny-starcoder2"):
        model = dinfill.load_model(shape, random_weights=True, device="cpu", seed=3)
        gen = torch.Generator().manual_seed(3)
        seen = set()
        for name, value in model.state_dict().items():  # HF order: q, k, v weights follow each other
            if value.untyped_storage().data_ptr() in seen and name == "lm_head.weight":
                continue  # tied head: the embedding, drawn once
            seen.add(value.untyped_storage().data_ptr())
            if name.endswith("bias"):
                want = torch.zeros(value.shape)
            elif "norm" in name:
                want = torch.ones(value.shape)
            else:
                want = torch.randn(value.shape, generator=gen) * 0.02
            assert torch.equal(value, want), f"{shape}: {name} differs from the pre-fusion initialisation"


# ------------------------------------------------------------------------------------------------
# the fused path against the torch path
# ------------------------------------------------------------------------------------------------


def _close(got, want, what):
    scale = want.abs().max().item()
    err = (got.float() - want.float()).abs().max().item()
    assert err <= 1e-4 * max(scale, 1.0), f"{what}: max abs error {err:.3g} vs logit scale {scale:.3g}"


def _on_dev(kw: dict) -> dict:
    return {k: v.to(DEV) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}


def test_fused_path_equals_torch_path(family_model, monkeypatch):
    """fp32, left padding with explicit positions (the other modes run against transformers in test_models):
    both paths within 1e-4 of the logit scale on real rows (padding rows differ: the torch path opens them)."""
    _, model, _ = family_model
    ids, cases = _cases(model)
    model, ids = model.to(DEV), ids.to(DEV)
    for name, kw in cases:
        if not name.startswith("padded"):
            continue
        kw = _on_dev(kw)
        monkeypatch.setenv("DINFILL_BACKEND", "torch")
        want = model(ids, **kw)
        monkeypatch.setenv("DINFILL_BACKEND", "triton")
        got = model(ids, **kw)
        if "attention_mask" in kw:
            _close(got[0], want[0], name)
            _close(got[1, 4:], want[1, 4:], name)
        else:
            _close(got, want, name)


def test_fused_path_with_cache(family_model, monkeypatch):
    """Prefill + decode and a cached diffusion window: fused logits and cache contents equal the torch path's.

    Starcoder2 only (the others run these modes against transformers in test_models): its window of 8 is
    shorter than the cache, so the kernel's sliding window is exercised in prefill and decode."""
    family, model, _ = family_model
    if family != "starcoder2":
        pytest.skip("prefill/decode/window of this family run against transformers in tests/test_models.py")
    cfg = model.config
    g = torch.Generator().manual_seed(6)
    B, L = 2, 16
    ids = torch.randint(3, cfg.vocab_size, (B, L), generator=g).to(DEV)
    model = model.to(DEV)
    cols = lambda a, b: torch.arange(a, b, device=DEV)  # noqa: E731
    outs = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("DINFILL_BACKEND", backend)
        cache = model.new_cache(B, L)
        mask = torch.zeros(B, L, dtype=torch.bool, device=DEV)
        mask[:, :11] = True
        got = [model(ids[:, :11], causal=True, attention_mask=mask.clone(), cache=cache, cache_pos=cols(0, 11))]
        mask[:, 11] = True
        got.append(model(ids[:, 11:12], causal=True, attention_mask=mask.clone(), cache=cache, cache_pos=cols(11, 12)))
        mask[:] = True
        model(ids, causal=False, attention_mask=mask, cache=cache, cache_pos=cols(0, L))
        got.append(model(ids[:, 5:9], causal=False, attention_mask=mask, cache=cache, cache_pos=cols(5, 9)))
        outs[backend] = (got, cache)
    for i, (a, b) in enumerate(zip(outs["torch"][0], outs["triton"][0], strict=True)):
        _close(b, a, f"call {i}")
    for i in range(cfg.num_layers):
        _close(outs["triton"][1].k[i], outs["torch"][1].k[i], f"k cache {i}")
        _close(outs["triton"][1].v[i], outs["torch"][1].v[i], f"v cache {i}")


def test_skinny_gemv_path_equals_torch_path(family_model, monkeypatch):
    """DINFILL_GEMV=triton (experimental): prefill on the regular fused path, then decode steps and a short
    bidirectional forward (<= 16 tokens) through skinny_linear; fp32 logits and caches equal the torch path's."""
    _, model, _ = family_model
    cfg = model.config
    g = torch.Generator().manual_seed(8)
    B, L = 2, 14
    ids = torch.randint(3, cfg.vocab_size, (B, L), generator=g).to(DEV)
    model = model.to(DEV)
    cols = lambda a, b: torch.arange(a, b, device=DEV)  # noqa: E731
    outs = {}
    for backend, gemv in (("torch", "cublas"), ("triton", "triton")):
        monkeypatch.setenv("DINFILL_BACKEND", backend)
        monkeypatch.setenv("DINFILL_GEMV", gemv)
        cache = model.new_cache(B, L)
        mask = torch.zeros(B, L, dtype=torch.bool, device=DEV)
        mask[:, :11] = True
        model(ids[:, :11], causal=True, attention_mask=mask.clone(), cache=cache, cache_pos=cols(0, 11))
        got = []
        for t in (11, 12):
            mask[:, t] = True
            got.append(model(ids[:, t : t + 1], causal=True, attention_mask=mask.clone(), cache=cache,
                             cache_pos=cols(t, t + 1)))  # fmt: skip
        got.append(model(ids[:, :7], causal=False, logits_index=torch.tensor([[0, 6], [3, 3]], device=DEV)))
        outs[backend] = (got, cache)
    for i, (a, b) in enumerate(zip(outs["torch"][0], outs["triton"][0], strict=True)):
        _close(b, a, f"call {i}")
    for i in range(cfg.num_layers):
        _close(outs["triton"][1].k[i], outs["torch"][1].k[i], f"k cache {i}")


@pytest.mark.parametrize("family", ["qwen2", "starcoder2"])
def test_fused_path_bf16_tolerance_rule(family, monkeypatch):
    """bf16 at the model level: |fused - fp32| <= 2 |torch bf16 - fp32| + atol, on the same rounded weights."""
    model32 = _model(_config(family, **CONFIGS[family]), seed=1)
    model16 = _model(_config(family, **CONFIGS[family]), seed=1).to(torch.bfloat16)
    model32.load_state_dict({k: v.float() for k, v in model16.state_dict().items()})  # same rounded weights
    model32, model16 = model32.to(DEV), model16.to(DEV)
    ids = torch.randint(3, model32.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(7)).to(DEV)
    monkeypatch.setenv("DINFILL_BACKEND", "torch")
    ref, low = model32(ids, causal=True), model16(ids, causal=True).float()
    monkeypatch.setenv("DINFILL_BACKEND", "triton")
    got = model16(ids, causal=True).float()
    monkeypatch.setenv("DINFILL_GEMV", "triton")  # 16 tokens or fewer: the experimental GEMV path
    got_gemv = model16(ids[:, :9], causal=True).float()
    ref9, low9 = ref[:, :9], low[:, :9]  # causal: the first 9 positions do not see the rest
    for name, out, r, lo in (("fused", got, ref, low), ("fused+gemv", got_gemv, ref9, low9)):
        err, torch_err = (out - r).abs().max().item(), (lo - r).abs().max().item()
        bound = 2 * torch_err + 1e-2 * r.abs().max().item()
        assert err <= bound, f"{name} bf16 error {err:.3g} > {bound:.3g} (torch bf16 error {torch_err:.3g})"
        assert bound < 0.1 * r.abs().max().item(), "tolerance too loose to mean anything"


def test_fused_path_rejects_bad_ids(monkeypatch):
    """The fused embedding gather clamps ids for memory safety; the model refuses bad ids first (CPU)."""
    monkeypatch.setenv("DINFILL_BACKEND", "triton")
    if ON_CUDA:
        pytest.skip("the id check is free on the CPU only (on CUDA it would sync the host)")
    model = _model(_config("qwen2"))
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        model(torch.tensor([[1, 211]]), causal=True)


def test_rope_table_survives_dtype_casts():
    """The fused path's table stays fp32 (bit pattern in an int32 buffer) under model.to(bf16)."""
    cfg = _config("llama")
    model = Decoder(cfg).to(torch.bfloat16)
    table = model.rotary.table
    assert table.dtype == torch.float32 and table.shape == (cfg.max_position_embeddings, cfg.head_dim)
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim)) / cfg.rope_scaling_factor
    p = 300
    assert torch.allclose(table[p, : cfg.head_dim // 2], torch.cos(p * inv), atol=1e-6)
    assert torch.allclose(table[p, cfg.head_dim // 2 :], torch.sin(p * inv), atol=1e-6)
    assert math.isclose(cfg.rope_scaling_factor, 4.0)


def test_rope_frequencies_stay_fp32_like_from_pretrained():
    """``model.to(bf16)`` must not round the torch path's RoPE frequencies (nor the transformers twin's).

    transformers' ``from_pretrained(dtype=bf16)`` builds its rotary buffers in fp32 and keeps them; a bf16
    ``inv_freq`` turns the angle at position 300 by up to ~0.4 rad. Both our decoder and ``hf_twin`` keep fp32.
    """
    from dinfill.sampler.autoregressive import hf_twin

    model = dinfill.load_model("tiny-qwen2", random_weights=True, dtype="bf16", kind="ar", device="cpu")
    want = Decoder(model.config).rotary.inv_freq  # built in fp32, never cast
    assert model.rotary.inv_freq.dtype == torch.float32 and torch.equal(model.rotary.inv_freq, want)
    twin = hf_twin(model)
    freqs = [m.inv_freq for m in twin.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]
    assert freqs and all(f.dtype == torch.float32 and torch.equal(f, want) for f in freqs)
    # the two bf16 models agree on long positions (where a bf16 inv_freq on one side would show)
    ids = torch.randint(0, model.config.vocab_size, (1, 300))
    ours = model(ids, causal=True)[0, -8:].float()
    theirs = twin(ids).logits[0, -8:].float()
    assert (ours - theirs).abs().max() <= 0.05 * theirs.abs().max()
