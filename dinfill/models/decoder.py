"""One lean decoder for the Qwen2, Llama and Starcoder2 families, causal or bidirectional.

Why not transformers' modelling code: the samplers need things it does not offer cheaply
(a static K/V cache that can hold the *prefix and suffix* of a diffusion canvas while only the
middle is recomputed, logits at a handful of positions instead of ``[B, L, 151936]``, fixed shapes
for CUDA graphs, and fused Triton kernels). State dicts keep the HF parameter names
(``model.layers.N.self_attn.q_proj`` ...) so checkpoints load with no renaming.

Family differences are flags on :class:`~dinfill.models.config.ModelConfig`
(norm = RMSNorm | LayerNorm, mlp = SwiGLU | GELU-tanh, biases, RoPE linear scaling, sliding window).

Two forward paths share the weights:

* **torch** (the CPU, and ``DINFILL_BACKEND=torch``): plain torch ops, the same math op for op as
  transformers' modelling code, so its logits are the reference the rest is tested against.
* **fused** (``DINFILL_BACKEND=triton``, the default on CUDA): per layer one add+norm launch, one
  q/k/v GEMM, one RoPE + cache-write launch, attention, the output GEMM, one add+norm, one gate/up
  GEMM, one activation launch and the down GEMM: 9 device ops (10 when attention splits its keys),
  where the torch path launches about 40. The embedding look-up rides in the first add+norm, the
  final residual add, the row selection of ``logits_index`` and the final norm in the last one;
  RoPE reads cos/sin from a table built once at load. No host syncs, static shapes: CUDA-graph safe.
  ``DINFILL_GEMV=triton`` (experimental, default ``cublas``) runs forwards of at most 16 tokens
  (decode) with Triton GEMVs that fold the norms, the activation and the residual adds in: 6 ops
  per layer. It stays off until a GPU run measures it faster than cuBLAS.

Fused weights: q/k/v are one ``qkv_proj`` and gate/up one ``gate_up_proj`` (one GEMM each on the
fused path; the torch path multiplies by row-block views of them, bit for bit what separate
Linears compute). State dicts still use the HF names (``...self_attn.q_proj.weight``): saving splits
the fused tensors into views, loading concatenates, so checkpoints load and ``load_state_dict`` of an
HF state dict works, with no second copy of any weight in memory.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinfill.backend import use_triton
from dinfill.models.attention import AttentionPlan, attend, plan
from dinfill.models.config import ModelConfig

_SKINNY_MAX_ROWS = 16  # DINFILL_GEMV=triton applies to forwards of at most this many tokens (decode)


class KVCache:
    """Static per-layer key/value buffers ``(B, Hkv, max_len, D)`` (gpt-fast style: fixed shapes).

    A forward with ``cache=`` writes the keys/values of its tokens at columns ``cache_pos`` and attends
    over all ``max_len`` columns; which columns are real is the caller's ``attention_mask``.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device, dtype: torch.dtype):
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"KVCache needs batch_size >= 1 and max_len >= 1, got {batch_size} and {max_len}")
        shape = (batch_size, config.num_kv_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.batch_size, self.max_len = batch_size, max_len

    def reset(self) -> None:
        """Zero every buffer (not needed for correctness: masks decide what is read)."""
        for t in self.k + self.v:
            t.zero_()


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back, as Qwen2 / Llama do."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def _norm(config: ModelConfig) -> nn.Module:
    if config.norm == "layernorm":
        return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
    return RMSNorm(config.hidden_size, config.norm_eps)


def rope_table(inv_freq: Tensor, positions: int) -> Tensor:
    """The ``(positions, D)`` fp32 RoPE table of the fused path: ``cos(p * inv_freq) | sin(p * inv_freq)``.

    Computed with the torch path's expressions (``position.float() * inv_freq``), so in fp32 the two
    paths rotate by the same angles.
    """
    freqs = torch.arange(positions, device=inv_freq.device).float().unsqueeze(-1) * inv_freq.float()  # (P, D/2)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).contiguous()  # (P, D)


class Rotary(nn.Module):
    """RoPE frequencies; linear scaling divides them.

    The torch path computes cos/sin from ``inv_freq`` every forward, as transformers does. The fused
    path reads a table of every position up to ``max_position_embeddings``, built once here from an
    fp32 copy of the frequencies. Both are stored as their int32 bit patterns so that
    ``model.to(torch.bfloat16)`` (which casts every floating buffer) cannot round them: transformers'
    ``from_pretrained(dtype=bf16)`` keeps its frequencies fp32 too, and a bf16 ``inv_freq`` would turn
    the angle at position 300 by up to ~0.4 rad. :attr:`inv_freq` and :attr:`table` view them back as
    fp32, without a copy.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        D = config.head_dim
        # same expression as transformers, so fp32 rounding matches bit for bit
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
        inv_freq = inv_freq / config.rope_scaling_factor
        self.register_buffer("inv_freq_bits", inv_freq.view(torch.int32), persistent=False)
        table = rope_table(inv_freq, config.max_position_embeddings)  # (P, D) fp32
        self.register_buffer("table_bits", table.view(torch.int32), persistent=False)

    @property
    def inv_freq(self) -> Tensor:
        """The ``(D/2,)`` fp32 frequencies of the torch path (whatever dtype the model was cast to)."""
        return self.inv_freq_bits.view(torch.float32)

    @property
    def table(self) -> Tensor:
        """The ``(max_position_embeddings, D)`` fp32 table (cos | sin) of the fused path."""
        return self.table_bits.view(torch.float32)

    def forward(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        freqs = position_ids.float().unsqueeze(-1) * self.inv_freq  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
        return emb.cos().to(dtype).unsqueeze(1), emb.sin().to(dtype).unsqueeze(1)  # (B, 1, T, D)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _fuse_linears(module: nn.Module, fused: str, parts: tuple[tuple[str, int], ...]) -> None:
    """Let ``module.<fused>`` (one Linear) appear in state dicts as the HF Linears ``parts`` (name, rows).

    Saving replaces ``<fused>.weight`` / ``.bias`` by row-block views named like the parts (no copy);
    loading concatenates the parts' tensors into the fused key before the Linear loads it.
    """
    names, sizes = [name for name, _ in parts], [rows for _, rows in parts]

    def split_on_save(mod, state_dict, prefix, local_metadata):
        fused_keys = {f"{prefix}{fused}.{suffix}" for suffix in ("weight", "bias")}
        mine = [(key, state_dict.pop(key)) for key in [k for k in state_dict if k.startswith(prefix)]]
        whole = dict(mine)
        for key, value in mine:  # re-insert in order, each fused entry as its parts (HF order: weight, bias)
            if key == f"{prefix}{fused}.weight":
                bias = whole.get(f"{prefix}{fused}.bias")
                w_parts = value.split(sizes)
                b_parts = bias.split(sizes) if bias is not None else [None] * len(parts)
                for name, w, b in zip(names, w_parts, b_parts, strict=True):
                    state_dict[f"{prefix}{name}.weight"] = w
                    if b is not None:
                        state_dict[f"{prefix}{name}.bias"] = b
            elif key not in fused_keys:
                state_dict[key] = value

    def cat_on_load(mod, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        for suffix in ("weight", "bias"):
            keys = [f"{prefix}{name}.{suffix}" for name in names]
            if all(k in state_dict for k in keys):
                state_dict[f"{prefix}{fused}.{suffix}"] = torch.cat([state_dict.pop(k) for k in keys])

    if hasattr(module, "register_state_dict_post_hook"):
        module.register_state_dict_post_hook(split_on_save)
    else:  # torch < 2.5
        module._register_state_dict_hook(split_on_save)
    module._register_load_state_dict_pre_hook(cat_on_load, with_module=True)


class Attention(nn.Module):
    """Grouped-query self-attention with optional static cache; the kernel is chosen by ``attend``.

    ``qkv_proj`` holds q_proj, k_proj and v_proj stacked by rows (state dicts show the HF names).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        H, D = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, D
        self.sizes = (config.num_heads * D, config.num_kv_heads * D, config.num_kv_heads * D)
        self.qkv_proj = nn.Linear(H, sum(self.sizes), bias=config.attention_bias)
        self.o_proj = nn.Linear(config.num_heads * D, H, bias=config.o_bias)
        self.window = config.sliding_window
        _fuse_linears(self, "qkv_proj", tuple(zip(("q_proj", "k_proj", "v_proj"), self.sizes, strict=True)))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, ctx: _Context, layer: int) -> Tensor:
        """The torch path: separate q/k/v products on row-block views of the fused weight."""
        B, T, _ = x.shape
        wq, wk, wv = self.qkv_proj.weight.split(self.sizes)  # views, no copy
        bq, bk, bv = self.qkv_proj.bias.split(self.sizes) if self.qkv_proj.bias is not None else (None,) * 3
        q = F.linear(x, wq, bq).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, Hq, T, D)
        k = F.linear(x, wk, bk).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = F.linear(x, wv, bv).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if ctx.cache is not None:
            ctx.cache.k[layer].index_copy_(2, ctx.cache_pos, k)  # write this call's columns
            ctx.cache.v[layer].index_copy_(2, ctx.cache_pos, v)
            k, v = ctx.cache.k[layer], ctx.cache.v[layer]  # (B, Hkv, max_len, D)
        if ctx.plan is None:  # first layer of the call: decide backend and build masks once
            ctx.plan = plan(ctx.key_mask, ctx.causal, ctx.q_cols, k.shape[2], self.window, B, T, x.device)
        out = attend(q, k, v, ctx.plan)  # (B, Hq, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU (``gate_up_proj`` = gate_proj and up_proj stacked by rows, then down_proj) or Starcoder2's
    GELU-tanh (c_fc / c_proj)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        H, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.kind = config.mlp
        self.inner = inner
        if self.kind == "swiglu":
            self.gate_up_proj = nn.Linear(H, 2 * inner, bias=bias)
            self.down_proj = nn.Linear(inner, H, bias=bias)
            _fuse_linears(self, "gate_up_proj", (("gate_proj", inner), ("up_proj", inner)))
        else:
            self.c_fc = nn.Linear(H, inner, bias=bias)
            self.c_proj = nn.Linear(inner, H, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """The torch path (gate and up as separate products on views of the fused weight)."""
        if self.kind == "swiglu":
            wg, wu = self.gate_up_proj.weight.split(self.inner)  # views, no copy
            bg, bu = self.gate_up_proj.bias.split(self.inner) if self.gate_up_proj.bias is not None else (None, None)
            return self.down_proj(F.silu(F.linear(x, wg, bg)) * F.linear(x, wu, bu))
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = _norm(config)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = _norm(config)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, ctx: _Context, layer: int) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


def _token_ids(input_ids: Tensor, logits_index: Tensor) -> Tensor:
    """``input_ids[b, logits_index[b, n]]`` (only for a model without layers)."""
    return torch.gather(input_ids, 1, logits_index)


class _Context:
    """What every layer of one forward call shares (masks, cache, query columns)."""

    __slots__ = ("key_mask", "causal", "q_cols", "cache", "cache_pos", "plan")

    def __init__(self, key_mask, causal, q_cols, cache, cache_pos):
        self.key_mask, self.causal, self.q_cols, self.cache, self.cache_pos = key_mask, causal, q_cols, cache, cache_pos
        self.plan: AttentionPlan | None = None


class Backbone(nn.Module):
    """Embeddings, blocks and final norm (HF's ``model.`` prefix)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = _norm(config)


class Decoder(nn.Module):
    """A decoder-only LM of one of the supported families.

    Call it as ``model(input_ids, causal=..., ...)``; see :meth:`forward`. Attributes set by
    :func:`dinfill.load_model`: ``kind`` (``"diffusion"`` or ``"ar"``), ``kind_source`` (why),
    ``name`` (what was loaded).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = Rotary(config)
        self.kind, self.kind_source, self.name = "ar", "default", "random"

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """Allocate a static :class:`KVCache` for ``batch_size`` rows of ``max_len`` columns."""
        if max_len > self.config.max_position_embeddings:
            raise ValueError(
                f"cache length {max_len} exceeds the model's limit of {self.config.max_position_embeddings} positions"
            )
        return KVCache(self.config, batch_size, max_len, self.device, self.dtype)

    def forward(
        self,
        input_ids: Tensor,
        *,
        causal: bool,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: KVCache | None = None,
        cache_pos: Tensor | None = None,
        logits_index: Tensor | None = None,
        return_hidden: bool = False,
    ) -> Tensor:
        """Run the decoder.

        Parameters
        ----------
        input_ids : Tensor
            ``(B, T)`` token ids (int64 or int32) on the model's device.
        causal : bool
            ``True`` for autoregressive attention, ``False`` for bidirectional (diffusion).
        attention_mask : Tensor, optional
            ``(B, Lk)`` bool or 0/1 over *keys*, 1 = real token; per row one contiguous run of ones
            (left and/or right padding). ``Lk = T`` without a cache, ``cache.max_len`` with one
            (required then). Default: every key is real.
        position_ids : Tensor, optional
            ``(B, T)`` RoPE positions. Default: ``arange(T)``, or ``cache_pos`` with a cache.
        cache : KVCache, optional
            Static cache from :meth:`new_cache`; this call writes its keys/values at ``cache_pos``
            and attends over every column of the cache.
        cache_pos : Tensor, optional
            ``(T,)`` int64 on the model device, contiguous ascending: the cache columns of these tokens.
        logits_index : Tensor, optional
            ``(B, N)`` int64 positions in ``[0, T)``: return only those rows' logits.
        return_hidden : bool
            Return the final-normed hidden states ``(B, T, hidden)`` instead of logits.

        Returns
        -------
        Tensor
            ``(B, T, V)`` logits, ``(B, N, V)`` with ``logits_index``, or ``(B, T, hidden)``.
        """
        B, T = self._check_inputs(input_ids, attention_mask, position_ids, cache, cache_pos, logits_index)
        dev = input_ids.device
        if use_triton(dev):
            return self._forward_fused(
                input_ids, causal, attention_mask, position_ids, cache, cache_pos, logits_index, return_hidden
            )
        if cache is not None:
            q_cols = cache_pos
            if position_ids is None:
                position_ids = cache_pos.unsqueeze(0).expand(B, T)
        else:
            q_cols = torch.arange(T, device=dev)
            if position_ids is None:
                position_ids = q_cols.unsqueeze(0).expand(B, T)
        key_mask = None if attention_mask is None else attention_mask.to(torch.bool)
        ctx = _Context(key_mask, causal, q_cols, cache, cache_pos)

        x = self.model.embed_tokens(input_ids)  # (B, T, H)
        cos, sin = self.rotary(position_ids, x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, ctx, i)
        if logits_index is not None:
            x = torch.gather(x, 1, logits_index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (B, N, H)
        x = self.model.norm(x)
        return x if return_hidden else self.lm_head(x)

    def _forward_fused(
        self, input_ids, causal, attention_mask, position_ids, cache, cache_pos, logits_index, return_hidden
    ) -> Tensor:
        """The fused path (see the module docstring): 9-10 device ops per layer, no host sync."""
        from dinfill.kernels.activation_kernel import activation
        from dinfill.kernels.add_norm_kernel import add_norm
        from dinfill.kernels.rope_cache_kernel import rope_cache
        from dinfill.target import pdl

        cfg = self.config
        B, T = input_ids.shape
        Hq, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        key_mask = None if attention_mask is None else attention_mask.to(torch.bool)
        Lk = T if cache is None else cache.max_len
        layers = self.model.layers
        skinny = len(layers) and B * T <= _SKINNY_MAX_ROWS and os.environ.get("DINFILL_GEMV", "cublas") == "triton"
        if skinny:  # a target the Triton GEMVs cannot serve is refused here, before anything is launched
            from dinfill.kernels.skinny_linear_kernel import check_target

            check_target(input_ids.device, self.model.embed_tokens.weight.dtype)
        pdl(input_ids.device)  # DINFILL_PDL=1 below sm_90 too
        p = plan(key_mask, causal, cache_pos, Lk, cfg.sliding_window, B, T, input_ids.device)  # once per call
        layernorm = cfg.norm == "layernorm"
        table = self.rotary.table  # (P, D) fp32

        def norm(module: nn.Module, x: Tensor, **kw) -> tuple[Tensor | None, Tensor]:
            bias = getattr(module, "bias", None)
            return add_norm(x, module.weight, bias, eps=cfg.norm_eps, layernorm=layernorm, **kw)

        embed = self.model.embed_tokens.weight  # (V, H): the first norm gathers its rows by id
        resid, delta = None, None
        if skinny:
            resid = self._layers_skinny(input_ids, p, table, position_ids, cache, cache_pos)  # decode: 6 ops/layer
            layers = ()
        for i, layer in enumerate(layers):
            if resid is None:
                resid, h = norm(layer.input_layernorm, embed, index=input_ids, index_rows=0)  # (B*T, H)
            else:
                resid, h = norm(layer.input_layernorm, resid, delta=delta, residual_out=resid)
            attn = layer.self_attn
            qkv = F.linear(h, attn.qkv_proj.weight, attn.qkv_proj.bias)  # (B*T, (Hq + 2 Hkv) * D)
            k_cache, v_cache = (cache.k[i], cache.v[i]) if cache is not None else (None, None)
            q, k, v = rope_cache(
                qkv.view(B, T, -1), table, Hq, Hkv, positions=position_ids, cache_pos=cache_pos,
                k_out=k_cache, v_out=v_cache,
            )  # fmt: skip
            o = attend(q, k, v, p).transpose(1, 2).reshape(B * T, Hq * D)  # (B*T, Hq*D), a view
            o = F.linear(o, attn.o_proj.weight, attn.o_proj.bias)  # (B*T, H)
            resid, h = norm(layer.post_attention_layernorm, resid, delta=o, residual_out=resid)
            mlp = layer.mlp
            if mlp.kind == "swiglu":
                a = activation(F.linear(h, mlp.gate_up_proj.weight, mlp.gate_up_proj.bias), "swiglu")  # (B*T, I)
                delta = F.linear(a, mlp.down_proj.weight, mlp.down_proj.bias)  # (B*T, H)
            else:
                a = activation(F.linear(h, mlp.c_fc.weight, mlp.c_fc.bias), "gelu_tanh")
                delta = F.linear(a, mlp.c_proj.weight, mlp.c_proj.bias)
        # last residual add + the rows that need an output + final norm, in one launch
        rows = T if logits_index is None else logits_index.shape[1]
        if resid is None:  # no layers: the final norm gathers the embedding rows itself
            src, kw = embed, dict(index=input_ids if logits_index is None else _token_ids(input_ids, logits_index))
        else:
            src, kw = resid, dict(delta=delta)
            if logits_index is not None:
                kw.update(index=logits_index, index_rows=T)
        _, x = norm(self.model.norm, src, store_residual=False, **kw)  # (B * rows, H)
        x = x.view(B, rows, -1)
        return x if return_hidden else F.linear(x.view(B * rows, -1), self.lm_head.weight).view(B, rows, -1)

    def _layers_skinny(self, input_ids, p, table, position_ids, cache, cache_pos) -> Tensor:
        """The layers of a fused forward of at most 16 tokens with ``DINFILL_GEMV=triton`` (experimental).

        Each projection is one ``skinny_linear`` launch that also runs the norm before it and the
        residual add or activation after it, so a layer is 6 device ops (7 with split-K attention):
        qkv(norm), RoPE + cache, attention, o(+= residual), gate_up(norm, SwiGLU), down(+= residual).
        Returns the residual stream after the last layer, ``(B*T, H)``.
        """
        from dinfill.kernels.rope_cache_kernel import rope_cache
        from dinfill.kernels.skinny_linear_kernel import skinny_linear

        cfg = self.config
        B, T = input_ids.shape
        Hq, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        norm_kind = cfg.norm

        def normed(module: nn.Module) -> dict:
            return dict(norm=norm_kind, norm_weight=module.weight, norm_bias=getattr(module, "bias", None),
                        eps=cfg.norm_eps)  # fmt: skip

        resid = F.embedding(input_ids.reshape(-1), self.model.embed_tokens.weight)  # (B*T, H)
        for i, layer in enumerate(self.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            qkv = skinny_linear(resid, attn.qkv_proj.weight, attn.qkv_proj.bias, **normed(layer.input_layernorm))
            k_cache, v_cache = (cache.k[i], cache.v[i]) if cache is not None else (None, None)
            q, k, v = rope_cache(
                qkv.view(B, T, -1), table, Hq, Hkv, positions=position_ids, cache_pos=cache_pos,
                k_out=k_cache, v_out=v_cache,
            )  # fmt: skip
            o = attend(q, k, v, p).transpose(1, 2).reshape(B * T, Hq * D)  # (B*T, Hq*D)
            skinny_linear(o, attn.o_proj.weight, attn.o_proj.bias, residual=resid)
            post = normed(layer.post_attention_layernorm)
            if mlp.kind == "swiglu":
                a = skinny_linear(resid, mlp.gate_up_proj.weight, mlp.gate_up_proj.bias, act="swiglu", **post)
                skinny_linear(a, mlp.down_proj.weight, mlp.down_proj.bias, residual=resid)
            else:
                a = skinny_linear(resid, mlp.c_fc.weight, mlp.c_fc.bias, act="gelu_tanh", **post)
                skinny_linear(a, mlp.c_proj.weight, mlp.c_proj.bias, residual=resid)
        return resid

    def _check_inputs(self, input_ids, attention_mask, position_ids, cache, cache_pos, logits_index):
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            raise ValueError("input_ids must be a 2-D (batch, length) tensor of token ids")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be int64 or int32 token ids, got {input_ids.dtype}")
        if input_ids.device != self.device:
            raise ValueError(f"input_ids are on {input_ids.device} but the model is on {self.device}: move one of them")
        B, T = input_ids.shape
        if T == 0:
            raise ValueError("input_ids has length 0: nothing to run")
        if input_ids.device.type == "cpu":  # free on the CPU; on CUDA it would sync (the embedding asserts there)
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(
                    f"input_ids hold token id {hi if hi >= self.config.vocab_size else lo}, outside the model's "
                    f"vocabulary of {self.config.vocab_size} ids [0, {self.config.vocab_size}); is the tokenizer the "
                    "model's own?"
                )
        limit = self.config.max_position_embeddings
        if cache is None and T > limit:
            raise ValueError(f"sequence of {T} tokens exceeds the model's limit of {limit} positions; truncate it")
        if cache is not None:
            if cache_pos is None or attention_mask is None:
                raise ValueError(
                    "a forward with cache= needs cache_pos= (its columns) and attention_mask= (B, max_len)"
                )
            if cache.batch_size != B:
                raise ValueError(f"cache was allocated for batch {cache.batch_size}, input has batch {B}")
            if cache_pos.shape != (T,) or cache_pos.dtype != torch.int64 or cache_pos.device != self.device:
                raise ValueError(f"cache_pos must be an int64 tensor of shape ({T},) on {self.device}")
            if T > cache.max_len:
                raise ValueError(
                    f"{T} tokens do not fit in a cache of {cache.max_len} columns; allocate a longer cache"
                )
            if cache_pos.device.type == "cpu" and int(cache_pos[-1]) >= cache.max_len:  # free check on CPU only
                raise ValueError(f"cache_pos reaches column {int(cache_pos[-1])} but the cache has {cache.max_len}")
            if (
                input_ids.device.type == "cpu"
                and T > 1
                and not torch.equal(cache_pos.diff(), torch.ones_like(cache_pos[1:]))
            ):
                raise ValueError("cache_pos must be contiguous ascending (start + arange(T))")
        keys = T if cache is None else cache.max_len
        if attention_mask is not None and tuple(attention_mask.shape) != (B, keys):
            raise ValueError(
                f"attention_mask must have shape ({B}, {keys}) (over keys), got {tuple(attention_mask.shape)}"
            )
        if attention_mask is not None and attention_mask.device != self.device:
            raise ValueError(f"attention_mask is on {attention_mask.device}, the model on {self.device}")
        if position_ids is not None and tuple(position_ids.shape) != (B, T):
            raise ValueError(f"position_ids must have shape ({B}, {T}), got {tuple(position_ids.shape)}")
        if logits_index is not None and (logits_index.dim() != 2 or logits_index.shape[0] != B):
            raise ValueError(f"logits_index must have shape ({B}, N), got {tuple(logits_index.shape)}")
        return B, T
