"""Tiny random transformers checkpoints for tests (built with transformers' own classes).

Used by the runtime tests (our decoder vs transformers) and by the sampler tests (reference loops).
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("qwen2", "llama", "starcoder2")


def hf_config(family: str, vocab_size: int = 211, tie: bool | None = None, **overrides):
    """A small transformers config of ``family`` with odd sizes (vocab 211, 3 layers, GQA)."""
    from transformers import LlamaConfig, Qwen2Config, Starcoder2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if family == "qwen2":
        cfg = Qwen2Config(**common, rope_theta=1000000.0, tie_word_embeddings=True if tie is None else tie)
    elif family == "llama":
        cfg = LlamaConfig(
            **common,
            rope_theta=100000.0,
            rope_scaling={"rope_type": "linear", "factor": 4.0},
            tie_word_embeddings=False if tie is None else tie,
        )
    elif family == "starcoder2":
        cfg = Starcoder2Config(
            **common,
            rope_theta=999999.4420358813,
            sliding_window=4096,
            use_bias=True,
            tie_word_embeddings=True if tie is None else tie,
            norm_epsilon=1e-5,
        )
    else:
        raise ValueError(family)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def qwen_vocab_diffusion_model(max_positions: int):
    """A 2-layer random diffusion Decoder with the real Qwen vocabulary (151936), for tests that run the real
    tokenizer through the sampler; untied, so it rarely predicts the mask id."""
    from dinfill.models import Decoder, ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(model_type="qwen2", vocab_size=151936, hidden_size=32, num_layers=2, num_heads=2,
                      num_kv_heads=1, intermediate_size=48, max_position_embeddings=max_positions,
                      attention_bias=True, eos_token_id=151643)  # fmt: skip
    model = Decoder(cfg).eval()
    model.kind = "diffusion"
    return model


def hf_model(family: str, seed: int = 0, **kw):
    """A random transformers model (fp32, eval, sdpa attention) with non-trivial norms and biases."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = hf_config(family, **kw)
    cfg._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # perturb norms/biases so a wrong mapping cannot hide behind ones and zeros
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def save_checkpoint(model, path: Path, max_shard_size: str | None = None) -> Path:
    """``save_pretrained`` as safetensors (optionally sharded)."""
    kw = {"safe_serialization": True}
    if max_shard_size:
        kw["max_shard_size"] = max_shard_size
    model.save_pretrained(str(path), **kw)
    return path
