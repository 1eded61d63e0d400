"""Samplers: masked-diffusion infilling and KV-cached autoregressive FIM.

``diffusion_generate`` / ``ar_generate`` (contract) work on token ids; :func:`infill` works on text, for both
kinds of model (``model.kind``), with one set of options (:class:`~dinfill.sampler.settings.SamplerSettings`,
the published setting by default) validated the same way for both. Imports are lazy to keep
``import dinfill.sampler`` cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dinfill.sampler.settings import FIELD_KINDS, FIELDS, PRESETS, SamplerSettings, settings_for

__all__ = ["diffusion_generate", "ar_generate", "infill", "SamplerSettings", "settings_for", "PRESETS"]

# Keyword options of infill beyond the sampler settings, per kind: they go to the kind's own infill unchanged.
_EXTRAS: dict[str, tuple[str, ...]] = {
    "diffusion": ("mask_id", "max_length", "skip_special_tokens", "cuda_graph", "nvtx", "early_stop_lag", "history"),
    "ar": ("family", "check_every", "cuda_graph"),
}
_DEFAULT_BATCH = 32  # problems per model call, both kinds (the published diffusion evaluation's batch)


def __getattr__(name: str):
    if name == "diffusion_generate":
        from dinfill.sampler.diffusion import diffusion_generate

        return diffusion_generate
    if name == "ar_generate":
        from dinfill.sampler.autoregressive import ar_generate

        return ar_generate
    if name == "warmup":  # capture the CUDA graphs of a list of call shapes before timing (dinfill.sampler.graphs)
        from dinfill.sampler.graphs import warmup

        return warmup
    raise AttributeError(f"module 'dinfill.sampler' has no attribute {name!r}")


def _check_options(kind: str, options: dict[str, Any]) -> None:
    """Unknown keywords and keywords of the other kind, reported against ``infill``."""
    other = "ar" if kind == "diffusion" else "diffusion"
    for name in options:
        if (name in FIELDS and kind in FIELD_KINDS[name]) or name in _EXTRAS[kind]:
            continue
        if (name in FIELDS and other in FIELD_KINDS[name]) or name in _EXTRAS[other]:
            raise TypeError(
                f"infill(): {name}= applies to {'diffusion' if other == 'diffusion' else 'AR'} models only, and "
                f"{'this is an AR model' if kind == 'ar' else 'this is a diffusion model'}"
            )
        known = sorted(set(FIELDS) | set(_EXTRAS["diffusion"]) | set(_EXTRAS["ar"]))
        raise TypeError(f"infill() got an unexpected keyword argument {name!r}; the options are {', '.join(known)}")


def infill(
    model,
    tokenizer,
    prefixes: Sequence[str] | str,
    suffixes: Sequence[str] | str,
    *,
    middles: Sequence[str] | str | None = None,
    settings: SamplerSettings | None = None,
    preset: str | None = None,
    generator=None,
    seed: int | None = None,
    batch_size: int = _DEFAULT_BATCH,
    return_stats: bool = False,
    **options: Any,
) -> list[str] | tuple[list[str], list[Any]]:
    """Fill the middle between each prefix and suffix, with a diffusion or an AR model (by ``model.kind``).

    Both kinds accept the same inputs and check them the same way, all before any work (and before the
    early return of an empty request): a bare string is one problem, ``[]`` gives ``[]``, every option is
    validated, unknown keywords are reported against ``infill``.

    Parameters
    ----------
    model
        From :func:`dinfill.load_model` (``model.kind`` is ``"diffusion"`` or ``"ar"``).
    tokenizer
        The model's tokenizer. A diffusion model needs its mask token (a trained Open-dCoder: ``<M>``, id 151665;
        see :func:`dinfill.models.loading.require_mask_token`).
    prefixes, suffixes : str or sequence of str
        The code before and after each hole; one suffix per prefix.
    middles : str or sequence of str, optional
        The true middles: needed by diffusion ``length="oracle"`` (the published setting); ignored by AR models.
    settings : SamplerSettings, optional
        Sampler options; default: ``SamplerSettings.preset(preset, model.kind)``. Keyword options override it.
    preset : str, optional
        ``"published"`` (the default), ``"fast"`` or ``"greedy"`` (see :mod:`dinfill.sampler.settings`); not
        together with ``settings``.
    generator : torch.Generator, optional
        Randomness for sampling (on the model's device). Not together with ``seed``.
    seed : int, optional
        Seed of a fresh generator on the model's device (same seed, same inputs, same middles).
    batch_size : int
        Problems per model call (default 32); problems are grouped by length to limit padding.
    return_stats : bool
        Also return per-call statistics: :class:`~dinfill.sampler.diffusion.DiffusionStats` or
        :class:`~dinfill.sampler.autoregressive.ArStats`.
    **options
        Any :class:`SamplerSettings` field that applies to the model's kind (``temperature``, ``top_p``, ``top_k``,
        ``stop``; diffusion: ``steps``, ``alg``, ``length``, ``middle_tokens``, ``cache``, ...; AR:
        ``max_new_tokens``), plus kind-specific extras: diffusion ``mask_id``, ``max_length``,
        ``skip_special_tokens``, ``cuda_graph``, ``nvtx``, ``early_stop_lag``, ``history``; AR ``family``,
        ``check_every``, ``cuda_graph``. ``stop_strings`` is accepted as an alias of ``stop``.

    Returns
    -------
    list of str, or (list of str, list of stats)
        One middle per problem, in input order, cut before the first stop string.

    Notes
    -----
    Prompts longer than the model allows are handled the same way for both kinds: the start of the prefix is
    dropped (the code next to the hole is kept) and a warning says how many were cut. The diffusion canvas
    keeps its last ``min(max_length=2048, model limit)`` tokens, as the published evaluation did; an AR
    prompt keeps ``model limit - max_new_tokens`` tokens.
    """
    kind = getattr(model, "kind", None)
    if kind not in ("diffusion", "ar"):
        raise ValueError(f"model.kind is {kind!r}; expected 'diffusion' or 'ar' (pass kind= to dinfill.load_model)")
    if "stop_strings" in options:  # the AR sampler's own name
        if "stop" in options:
            raise TypeError("infill(): pass stop= or stop_strings=, not both")
        options["stop"] = options.pop("stop_strings")
    _check_options(kind, options)
    fields = {k: v for k, v in options.items() if k in FIELDS}
    extras = {k: v for k, v in options.items() if k not in FIELDS}
    if settings is not None and not isinstance(settings, SamplerSettings):
        raise TypeError(f"infill(): settings must be a SamplerSettings, got {type(settings).__name__}")
    if settings is not None and preset is not None:
        raise TypeError("infill(): pass settings= or preset=, not both (settings_for(kind, preset) combines them)")
    base = settings if settings is not None else SamplerSettings.preset(preset or "published", kind)
    chosen = base.replace(**fields).for_kind(kind)  # validates every option

    from dinfill.sampler.canvas import text_problems

    prefixes, suffixes, middles = text_problems(prefixes, suffixes, middles)
    if generator is not None and seed is not None:
        raise ValueError("infill(): pass generator= or seed=, not both")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"infill(): seed must be an int, got {seed!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"infill(): batch_size must be an int >= 1, got {batch_size!r}")
    limit = model.config.max_position_embeddings
    stop = chosen.pop("stop")
    if kind == "diffusion":
        from dinfill.models.loading import require_mask_token

        extras["mask_id"] = require_mask_token(tokenizer, model, extras.get("mask_id"))
        if chosen["length"] == "oracle" and middles is None:
            raise ValueError(
                "infill(): length='oracle' (the published setting) needs middles= (the true middles, for their "
                "length); or pass length='adaptive' / 'fixed' with middle_tokens="
            )
        if chosen["length"] != "oracle":
            middles = None  # only the oracle reads them
    else:
        from dinfill.sampler.fim import fim_tokens

        fim_tokens(tokenizer, extras.get("family"), getattr(model.config, "model_type", None))  # the FIM format exists
        if chosen["max_new_tokens"] >= limit:
            raise ValueError(
                f"infill(): max_new_tokens={chosen['max_new_tokens']} leaves no room for a prompt in the model's "
                f"{limit} positions; lower it"
            )
    if not prefixes:
        return ([], []) if return_stats else []

    if kind == "diffusion":
        from dinfill.sampler.diffusion import infill as kind_infill

        kwargs = dict(chosen, middles=middles)
    else:
        from dinfill.sampler.autoregressive import infill as kind_infill

        kwargs = dict(chosen, stop_strings=list(stop))
    kwargs.update(extras, generator=generator, seed=seed, batch_size=batch_size, return_stats=True)
    texts, stats = kind_infill(model, tokenizer, prefixes, suffixes, **kwargs)
    if stop and kind == "diffusion":  # AR decoding already stopped and cut there
        from dinfill.sampler.fim import cut_at_stop

        texts = [cut_at_stop(t, stop)[0] for t in texts]
    return (texts, stats) if return_stats else texts
