"""Samplers: masked-diffusion infilling and KV-cached autoregressive FIM.

``diffusion_generate`` / ``ar_generate`` (contract) work on token ids; ``infill`` works on text and
dispatches on ``model.kind`` (``"diffusion"`` or ``"ar"``). Imports are lazy to keep
``import dinfill.sampler`` cheap.
"""

from __future__ import annotations

__all__ = ["diffusion_generate", "ar_generate", "infill"]


def __getattr__(name: str):
    if name == "diffusion_generate":
        from dinfill.sampler.diffusion import diffusion_generate

        return diffusion_generate
    if name == "ar_generate":
        from dinfill.sampler.autoregressive import ar_generate

        return ar_generate
    if name == "infill":
        return _infill
    raise AttributeError(f"module 'dinfill.sampler' has no attribute {name!r}")


def _infill(model, tokenizer, prefixes, suffixes, **options):
    """Fill the middle between each prefix and suffix with ``model`` (diffusion or AR, by ``model.kind``).

    Keyword options go to :func:`dinfill.sampler.diffusion.infill` or
    :func:`dinfill.sampler.autoregressive.infill`; returns one middle string per pair.
    """
    kind = getattr(model, "kind", None)
    if kind == "diffusion":
        from dinfill.sampler.diffusion import infill
    elif kind == "ar":
        from dinfill.sampler.autoregressive import infill
    else:
        raise ValueError(f"model.kind is {kind!r}; expected 'diffusion' or 'ar' (pass kind= to dinfill.load_model)")
    return infill(model, tokenizer, prefixes, suffixes, **options)
