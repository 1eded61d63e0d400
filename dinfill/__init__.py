"""dinfill: fast code infilling with masked-diffusion and autoregressive FIM language models.

The public entry points are imported lazily so that ``import dinfill`` stays cheap (the CLI and the
sandboxed evaluator import it in every worker) and does not pull transformers unless needed.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["load_model", "load_tokenizer", "__version__"]


def __getattr__(name: str):
    if name in ("load_model", "load_tokenizer"):
        from dinfill import models

        return getattr(models, name)
    raise AttributeError(f"module 'dinfill' has no attribute {name!r}")
