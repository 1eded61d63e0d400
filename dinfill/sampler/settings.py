"""One settings object for both samplers, its named presets, and the argparse helper every subcommand uses.

Why one object: ``dinfill infill``, ``eval``, ``bench``, ``sweep`` and the Python API used to declare the
sampler options each on its own, and they drifted (different defaults, spellings and checks). Here every
option has one default and one check, with messages that read well both from Python and from the command
line (``top_p (--top-p) must lie in (0, 1]...``). Nothing in this module imports torch, so a command can
validate every option before it loads a model.

The defaults are the **published setting** of the comparison this package reproduces
(docs/eval-protocol.md): diffusion 64 steps, ``p2``, temperature 0.6, top-p 0.95, the true middle length
(``oracle``); AR temperature 0.6 and 512 new tokens. The one option whose published value depends on the
kind is top-p: the diffusion runs used 0.95, the AR runs none, so the ``published`` preset switches it off
for AR models. Named presets:

``published``
    The published setting of the model's kind (the default everywhere).
``fast``
    Diffusion: dual cache (refresh every 8 steps) and Fast-dLLM threshold decoding (confidence >= 0.9, ``steps``
    becomes a budget); an approximation whose agreement with the exact mode ``dinfill bench`` reports.
    AR: the published setting (the AR path has no approximate mode).
``greedy``
    Temperature 0 and no top-p: deterministic output, the setting of the exactness tests.

Ranges checked: temperature >= 0; top-p in (0, 1] (1 = off) or None; top-k >= 1 or None; steps, refresh,
middle_tokens, max_new_tokens >= 1; alg, cache and length from their lists; alg_temp >= 0; eps in (0, 1);
threshold in (0, 1]; factor > 0; stop strings non-empty.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from functools import partial
from typing import Any

__all__ = [
    "ALGORITHMS",
    "CACHE_MODES",
    "KINDS",
    "LENGTH_MODES",
    "PRESETS",
    "SamplerSettings",
    "add_sampler_arguments",
    "axis_values",
    "check_option",
    "given_sampler_options",
    "length_setting",
    "settings_for",
    "settings_from_args",
]

KINDS = ("diffusion", "ar")
# the same names as dinfill.sampler.diffusion.ALGORITHMS / CACHE_MODES and canvas.LENGTH_STRATEGIES (a test
# checks it); repeated here so that validating them does not import torch
ALGORITHMS = ("origin", "maskgit_plus", "topk_margin", "entropy", "p2", "threshold", "factor")
CACHE_MODES = ("none", "dual")
LENGTH_MODES = ("oracle", "fixed", "adaptive", "search")


@dataclass(frozen=True)
class SamplerSettings:
    """Every sampler option of dinfill with its default (the published setting); validated on creation.

    Attributes
    ----------
    temperature : float
        0 = greedy; > 0 samples. Both kinds. Default 0.6.
    top_p : float or None
        Nucleus mass in (0, 1]; None or 1 = off. Both kinds. Default 0.95 (the ``published`` preset turns it off
        for AR models, as in the published AR runs).
    top_k : int or None
        Keep the k largest logits; None = off. Both kinds.
    stop : tuple of str
        Stop strings: a middle ends before the first of them. AR decoding also stops there; a diffusion middle
        is cut after generation. (Post-processing rules for scoring are separate: ``--postprocess``.)
    steps : int
        Diffusion steps (a budget for ``threshold`` / ``factor``). Default 64.
    alg : str
        Diffusion algorithm, one of :data:`ALGORITHMS`. Default ``p2``.
    alg_temp : float
        Gumbel noise on the maskgit-family selection; 0 = deterministic.
    eps : float
        End of the diffusion time schedule ``linspace(1, eps, steps + 1)``.
    length : str
        Diffusion middle length: ``oracle`` (the true middle's, needs the middles), ``fixed``, ``adaptive`` or
        ``search`` (candidate lengths decoded in one batch, one chosen by the model's own scores; see
        :mod:`dinfill.sampler.canvas`).
    middle_tokens : int
        Masks in the canvas for ``fixed``; the maximum for ``adaptive`` and ``search``. Default 64.
    cache : str
        ``none`` (exact) or ``dual`` (prefix/suffix K/V cached).
    refresh : int
        Dual cache: steps between full refreshes (1 = exact).
    threshold : float
        Confidence bound of ``alg="threshold"``.
    factor : float
        Parameter of ``alg="factor"``.
    max_new_tokens : int
        AR budget per middle. Default 512.
    """

    temperature: float = 0.6
    top_p: float | None = 0.95
    top_k: int | None = None
    stop: tuple[str, ...] = ()
    steps: int = 64
    alg: str = "p2"
    alg_temp: float = 0.0
    eps: float = 1e-3
    length: str = "oracle"
    middle_tokens: int = 64
    cache: str = "none"
    refresh: int = 8
    threshold: float = 0.9
    factor: float = 1.0
    max_new_tokens: int = 512

    def __post_init__(self) -> None:
        _stops("stop", self.stop)  # before tuple(), which would split a bare string into its characters
        object.__setattr__(self, "stop", tuple(self.stop))
        self.validate()

    # -- checks ------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad option, its allowed range and the value given."""
        for name in FIELDS:
            check_option(name, getattr(self, name))

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str = "published", kind: str = "diffusion") -> SamplerSettings:
        """The settings of a named preset (:data:`PRESETS`) for a model of ``kind``."""
        if name not in PRESETS:
            raise ValueError(f"unknown sampler preset {name!r}; choose one of {', '.join(PRESETS)}")
        _check_kind(kind)
        return cls(**PRESETS[name].get(kind, {}))

    def replace(self, **changes: Any) -> SamplerSettings:
        """A copy with ``changes`` applied (validated; unknown names are a ``TypeError`` naming them)."""
        unknown = sorted(set(changes) - set(FIELDS))
        if unknown:
            raise TypeError(f"unknown sampler option(s) {unknown}; the options are {', '.join(FIELDS)}")
        return dataclasses.replace(self, **changes)

    # -- views ---------------------------------------------------------------------------------------
    def for_kind(self, kind: str) -> dict[str, Any]:
        """The options that apply to a model of ``kind``, by name (JSON-friendly: ``stop`` as a list).

        ``top_p`` of 1 is reported as None (both mean no nucleus filtering).
        """
        _check_kind(kind)
        out = {name: getattr(self, name) for name in FIELDS if kind in FIELD_KINDS[name]}
        if out.get("top_p") is not None and out["top_p"] >= 1:
            out["top_p"] = None
        out["stop"] = list(self.stop)
        return out

    def to_dict(self) -> dict[str, Any]:
        """Every field (JSON-friendly)."""
        d = dataclasses.asdict(self)
        d["stop"] = list(self.stop)
        return d


FIELDS: tuple[str, ...] = tuple(f.name for f in fields(SamplerSettings))
_BOTH = ("diffusion", "ar")
# which kinds of model each option applies to
FIELD_KINDS: dict[str, tuple[str, ...]] = {
    name: (_BOTH if name in ("temperature", "top_p", "top_k", "stop") else ("ar",) if name == "max_new_tokens" else
           ("diffusion",))
    for name in FIELDS
}  # fmt: skip

# name -> kind -> overrides of the class defaults
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # docs/eval-protocol.md: diffusion 64 steps, p2, T 0.6, top-p 0.95, oracle length; AR T 0.6, 512 new tokens
    "published": {"diffusion": {}, "ar": {"top_p": None}},
    # Fast-dLLM: dual cache + confidence-threshold parallel decoding (approximate; bench reports agreement)
    "fast": {"diffusion": {"cache": "dual", "refresh": 8, "alg": "threshold", "threshold": 0.9}, "ar": {"top_p": None}},
    # deterministic
    "greedy": {"diffusion": {"temperature": 0.0, "top_p": None}, "ar": {"temperature": 0.0, "top_p": None}},
}


def length_setting(spec: str, middle_tokens: int | None = None) -> dict[str, Any]:
    """Parse a middle-length setting written ``MODE`` or ``MODE:N`` (``oracle``, ``fixed:32``, ``adaptive:64``,
    ``search:64``) into the sampler options ``length`` and ``middle_tokens``.

    Parameters
    ----------
    spec : str
        The setting. ``oracle`` takes no ``N``; the other modes take ``N`` (masks for ``fixed``, the maximum for
        ``adaptive`` and ``search``) or, without it, ``middle_tokens``.
    middle_tokens : int, optional
        ``N`` for a mode written without one (default: the class default, 64).

    Raises
    ------
    ValueError
        For an unknown mode, ``oracle:N``, or an ``N`` that is not an integer >= 1.
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"a middle-length setting is MODE or MODE:N ({', '.join(LENGTH_MODES)}), got {spec!r}")
    mode, sep, count = spec.partition(":")
    _choice("length", mode, LENGTH_MODES)
    if mode == "oracle":
        if sep:
            raise ValueError(f"length oracle takes the true middle's length, not a count: write 'oracle', not {spec!r}")
        return {"length": "oracle"}
    if sep:
        if not count.isdigit():
            raise ValueError(f"{spec!r}: the count after ':' must be an integer >= 1 (as in {mode}:32)")
        middle_tokens = int(count)
    if middle_tokens is None:
        middle_tokens = SamplerSettings.middle_tokens
    check_option("middle_tokens", middle_tokens)
    return {"length": mode, "middle_tokens": middle_tokens}


def settings_for(kind: str, preset: str = "published", **overrides: Any) -> SamplerSettings:
    """The settings of ``preset`` for ``kind`` with ``overrides`` applied (all validated).

    Parameters
    ----------
    kind : {"diffusion", "ar"}
    preset : str
        One of :data:`PRESETS`.
    **overrides
        Any :class:`SamplerSettings` field.

    Raises
    ------
    TypeError
        For a name that is not a sampler option.
    ValueError
        For a value out of range (the message names the option and its range).
    """
    return SamplerSettings.preset(preset, kind).replace(**overrides)


# -- messages and checks -------------------------------------------------------------------------------
def _name(field: str) -> str:
    """``top_p (--top-p)``: the keyword and the flag, so one message serves Python and the command line."""
    return f"{field} (--{field.replace('_', '-')})"


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"model kind must be one of {KINDS}, got {kind!r}")


def _number(field: str, value: Any, *, lo=None, hi=None, lo_open=False, hi_open=False, rule: str) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        raise ValueError(f"{_name(field)} {rule}, got {value!r}")


def _integer(field: str, value: Any, *, rule: str = "must be an integer >= 1") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{_name(field)} {rule}, got {value!r}")


def _choice(field: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{_name(field)} must be one of {', '.join(choices)}, got {value!r}")


def _stops(field: str, value: Any) -> None:
    if isinstance(value, str):
        raise ValueError(f"{_name(field)} must be a list of strings, e.g. ['\\n'], not the string {value!r}")
    for s in value:
        if not isinstance(s, str) or not s:
            raise ValueError(f"{_name(field)} strings must be non-empty strings, got {s!r}")


# field -> its check, called as check(field, value); None is also allowed for top_p and top_k (= off)
_CHECKS: dict[str, Callable[[str, Any], None]] = {
    "temperature": partial(_number, lo=0.0, rule="must be >= 0 (0 = greedy, > 0 samples)"),
    "top_p": partial(_number, lo=0.0, hi=1.0, lo_open=True, rule="must lie in (0, 1] (1 turns it off)"),
    "top_k": partial(_integer, rule="must be an integer >= 1 (leave it unset to turn it off)"),
    "stop": _stops,
    "steps": _integer,
    "alg": partial(_choice, choices=ALGORITHMS),
    "alg_temp": partial(_number, lo=0.0, rule="must be >= 0 (0 = deterministic selection)"),
    "eps": partial(_number, lo=0.0, hi=1.0, lo_open=True, hi_open=True, rule="must lie in (0, 1)"),
    "length": partial(_choice, choices=LENGTH_MODES),
    "middle_tokens": _integer,
    "cache": partial(_choice, choices=CACHE_MODES),
    "refresh": partial(_integer, rule="must be an integer >= 1 (steps between full refreshes; 1 = exact)"),
    "threshold": partial(_number, lo=0.0, hi=1.0, lo_open=True, rule="must lie in (0, 1]"),
    "factor": partial(_number, lo=0.0, lo_open=True, rule="must be > 0"),
    "max_new_tokens": _integer,
}


def check_option(name: str, value: Any) -> None:
    """Check one sampler option: the check :class:`SamplerSettings` runs, for callers that take options one by one
    (``diffusion_generate``, ``ar_generate``), so that every entry point accepts and refuses the same values.

    Raises
    ------
    ValueError
        Naming the option (keyword and flag), its allowed range and the value given.
    """
    if value is None and name in ("top_p", "top_k"):
        return
    _CHECKS[name](name, value)


# -- the argparse helper -------------------------------------------------------------------------------
_HELP = {
    "temperature": "0 = greedy, > 0 samples (default 0.6)",
    "top_p": "nucleus mass in (0, 1], 1 = off (default 0.95 for diffusion, off for AR: the published settings)",
    "top_k": "keep the k largest logits (default: off)",
    "stop": "stop string (repeatable): the middle ends before it; AR decoding stops there (default: none)",
    "steps": "diffusion steps; a budget for threshold / factor (default 64)",
    "alg": "diffusion algorithm: " + ", ".join(ALGORITHMS) + " (default p2)",
    "alg_temp": "Gumbel noise on maskgit-family selection, 0 = deterministic (default 0)",
    "eps": "end of the diffusion time schedule (default 0.001)",
    "length": "middle length: oracle = the true middle's (needs it), fixed, adaptive, search = candidate lengths "
    "batched and chosen by the model's own scores (default oracle: published)",
    "middle_tokens": "masks for --length fixed; the maximum for adaptive and search (default 64)",
    "cache": "none = exact, dual = prefix/suffix K/V cached (default none)",
    "refresh": "dual cache: steps between full refreshes, 1 = exact (default 8)",
    "threshold": "confidence bound of --alg threshold (default 0.9)",
    "factor": "parameter of --alg factor (default 1.0)",
    "max_new_tokens": "AR budget per middle (default 512)",
}
_TYPES = {
    "temperature": float, "top_p": float, "top_k": int, "stop": str, "steps": int, "alg": str, "alg_temp": float,
    "eps": float, "length": str, "middle_tokens": int, "cache": str, "refresh": int, "threshold": float,
    "factor": float, "max_new_tokens": int,
}  # fmt: skip
_CHOICES = {"alg": ALGORITHMS, "cache": CACHE_MODES, "length": LENGTH_MODES}


def add_sampler_arguments(
    parser: argparse.ArgumentParser,
    *,
    axes: Iterable[str] = (),
    exclude: Iterable[str] = (),
    help_overrides: Mapping[str, str] | None = None,
) -> None:
    """Add ``--preset`` and one flag per :class:`SamplerSettings` field to a (sub)command.

    Every flag defaults to "unset" (``None``), so that :func:`settings_from_args` can tell what was given:
    unset flags take the preset's value for the model's kind. ``--help`` shows each default.

    Parameters
    ----------
    parser : argparse.ArgumentParser
    axes : iterable of str
        Fields that take several values (``nargs="+"``), for commands that sweep over them (``bench``,
        ``sweep``); :func:`settings_from_args` leaves them to the caller.
    exclude : iterable of str
        Fields the command does not offer (for example ``bench`` times a fixed middle length, so it has no
        ``--max-new-tokens``).
    help_overrides : mapping, optional
        Help texts that replace the standard ones (a command whose default differs says so).
    """
    axes, exclude = set(axes), set(exclude)
    unknown = (axes | exclude) - set(FIELDS)
    if unknown:
        raise ValueError(f"not sampler options: {sorted(unknown)}")
    parser.set_defaults(_sampler_axes=tuple(sorted(axes)), _sampler_fields=tuple(f for f in FIELDS if f not in exclude))
    groups = {
        "both": parser.add_argument_group("sampler, both kinds (unset options take the preset's value)"),
        "diffusion": parser.add_argument_group("sampler, diffusion models"),
        "ar": parser.add_argument_group("sampler, AR models"),
    }
    groups["both"].add_argument(
        "--preset", choices=tuple(PRESETS), default="published",
        help="named setting: published (default; the published runs of the model's kind), fast (diffusion: dual "
             "cache + threshold), greedy (temperature 0)",
    )  # fmt: skip
    for name in FIELDS:
        if name in exclude:
            continue
        kinds = FIELD_KINDS[name]
        group = groups["both" if len(kinds) == 2 else kinds[0]]
        flag = "--" + name.replace("_", "-")
        text = (help_overrides or {}).get(name, _HELP[name])
        kw: dict[str, Any] = {"type": _TYPES[name], "default": None, "help": text}
        if name in _CHOICES:
            kw["choices"], kw["metavar"] = _CHOICES[name], name.upper()
        if name == "stop":
            kw["action"] = "append"
        elif name in axes:
            kw["nargs"] = "+"
            kw["help"] += "; several values sweep over them"
        group.add_argument(flag, dest=name, **kw)


def given_sampler_options(args: argparse.Namespace, *, include_axes: bool = False) -> dict[str, Any]:
    """The sampler options given on the command line (``None`` = unset), by field name."""
    offered = getattr(args, "_sampler_fields", FIELDS)
    axes = () if include_axes else getattr(args, "_sampler_axes", ())
    given = {}
    for name in offered:
        value = getattr(args, name, None)
        if value is None or name in axes:
            continue
        given[name] = tuple(value) if name == "stop" else value
    return given


def settings_from_args(
    args: argparse.Namespace, kind: str | None = None, *, overrides: Mapping[str, Any] | None = None
) -> SamplerSettings:
    """Validated settings from parsed flags: the preset for ``kind``, then the flags given, then ``overrides``.

    Parameters
    ----------
    args : argparse.Namespace
        From a parser that went through :func:`add_sampler_arguments`.
    kind : {"diffusion", "ar"}, optional
        The model's kind. Without it the flags' values are still checked (for validation before the kind is
        known) against the diffusion preset.
    overrides : mapping, optional
        Values that win over the flags (a command's own sweep axis, for example).

    Raises
    ------
    ValueError
        For a value out of range, or a flag that does not apply to ``kind`` (``--steps`` for an AR model).
    """
    given = given_sampler_options(args)
    if kind is not None:
        foreign = [name for name in given_sampler_options(args, include_axes=True) if kind not in FIELD_KINDS[name]]
        if foreign:
            flags = ", ".join("--" + f.replace("_", "-") for f in foreign)
            other = "diffusion" if kind == "ar" else "AR"
            raise ValueError(
                f"{flags} appl{'ies' if len(foreign) == 1 else 'y'} to {other} models only, and this is "
                f"{'an AR' if kind == 'ar' else 'a diffusion'} model; drop {'it' if len(foreign) == 1 else 'them'} "
                "(or pass --kind if the model's kind was detected wrongly)"
            )
    preset = getattr(args, "preset", None) or "published"
    return SamplerSettings.preset(preset, kind or "diffusion").replace(**given, **dict(overrides or {}))


def axis_values(args: argparse.Namespace, settings: SamplerSettings) -> dict[str, list[Any]]:
    """The values of each sweep axis (:func:`add_sampler_arguments` ``axes``), each one validated.

    An axis left unset sweeps over the single value of ``settings``; repeated values are dropped.
    """
    out: dict[str, list[Any]] = {}
    for name in getattr(args, "_sampler_axes", ()):
        given = getattr(args, name, None)
        values = [getattr(settings, name)] if given is None else list(dict.fromkeys(given))
        for value in values:
            check_option(name, value)
        out[name] = values
    return out
