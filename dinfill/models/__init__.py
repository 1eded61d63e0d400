"""The model runtime: config, weights, one decoder for three families, static KV caches."""

from dinfill.models.config import BUILTIN_SHAPES, ModelConfig, builtin_config
from dinfill.models.decoder import Decoder, KVCache
from dinfill.models.loading import KNOWN_KINDS, load_model, load_tokenizer, require_mask_token, resolve_kind

__all__ = [
    "BUILTIN_SHAPES",
    "KNOWN_KINDS",
    "Decoder",
    "KVCache",
    "ModelConfig",
    "builtin_config",
    "load_model",
    "load_tokenizer",
    "require_mask_token",
    "resolve_kind",
]
