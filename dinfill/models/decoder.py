"""One lean decoder for the Qwen2, Llama and Starcoder2 families, causal or bidirectional.

Why not transformers' modelling code: the samplers need things it does not offer cheaply
(a static K/V cache that can hold the *prefix and suffix* of a diffusion canvas while only the
middle is recomputed, logits at a handful of positions instead of ``[B, L, 151936]``, fixed shapes
for CUDA graphs, and an attention backend switch to our Triton kernel). The modules keep the HF
parameter names (``model.layers.N.self_attn.q_proj`` ...) so checkpoints load with no renaming.

Family differences are flags on :class:`~dinfill.models.config.ModelConfig`
(norm = RMSNorm | LayerNorm, mlp = SwiGLU | GELU-tanh, biases, RoPE linear scaling, sliding window).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinfill.models.attention import AttentionPlan, attend, plan
from dinfill.models.config import ModelConfig


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


class Rotary(nn.Module):
    """RoPE tables (fp32) indexed by position ids; linear scaling divides the frequencies."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        D = config.head_dim
        # same expression as transformers, so fp32 rounding matches bit for bit
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
        inv_freq = inv_freq / config.rope_scaling_factor
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        freqs = position_ids.float().unsqueeze(-1) * self.inv_freq  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
        return emb.cos().to(dtype).unsqueeze(1), emb.sin().to(dtype).unsqueeze(1)  # (B, 1, T, D)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    """Grouped-query self-attention with optional static cache; the kernel is chosen by ``attend``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        H, D = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, D
        self.q_proj = nn.Linear(H, config.num_heads * D, bias=config.attention_bias)
        self.k_proj = nn.Linear(H, config.num_kv_heads * D, bias=config.attention_bias)
        self.v_proj = nn.Linear(H, config.num_kv_heads * D, bias=config.attention_bias)
        self.o_proj = nn.Linear(config.num_heads * D, H, bias=config.o_bias)
        self.window = config.sliding_window

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, ctx: _Context, layer: int) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, Hq, T, D)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if ctx.cache is not None:
            ctx.cache.k[layer].index_copy_(2, ctx.cache_pos, k)  # write this call's columns
            ctx.cache.v[layer].index_copy_(2, ctx.cache_pos, v)
            k, v = ctx.cache.k[layer], ctx.cache.v[layer]  # (B, Hkv, max_len, D)
        if ctx.plan is None:  # first layer of the call: decide backend and build masks once
            ctx.plan = plan(ctx.key_mask, ctx.causal, ctx.q_cols, k.shape[2], self.window, B)
        out = attend(q, k, v, ctx.plan)  # (B, Hq, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU (gate/up/down) or Starcoder2's GELU-tanh (c_fc/c_proj)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        H, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.kind = config.mlp
        if self.kind == "swiglu":
            self.gate_proj = nn.Linear(H, inner, bias=bias)
            self.up_proj = nn.Linear(H, inner, bias=bias)
            self.down_proj = nn.Linear(inner, H, bias=bias)
        else:
            self.c_fc = nn.Linear(H, inner, bias=bias)
            self.c_proj = nn.Linear(inner, H, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "swiglu":
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
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
