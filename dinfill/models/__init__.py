"""The model runtime: config, weights, one decoder for three families, static KV caches.

Names are imported lazily: :mod:`dinfill.models.kinds` and :mod:`dinfill.models.config` need no torch, so the
command line can decide a checkpoint's kind and validate its options before torch is even imported.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "BUILTIN_SHAPES": "dinfill.models.config",
    "ModelConfig": "dinfill.models.config",
    "builtin_config": "dinfill.models.config",
    "Decoder": "dinfill.models.decoder",
    "KVCache": "dinfill.models.decoder",
    "KNOWN_CHECKPOINTS": "dinfill.models.kinds",
    "KNOWN_KINDS": "dinfill.models.kinds",
    "detect_kind": "dinfill.models.kinds",
    "resolve_kind": "dinfill.models.kinds",
    "load_model": "dinfill.models.loading",
    "load_tokenizer": "dinfill.models.loading",
    "require_mask_token": "dinfill.models.loading",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dinfill.models' has no attribute {name!r}")
