"""One settings object and one ``infill`` for both kinds of model.

``SamplerSettings`` (its presets, ranges and messages), the argparse helper every subcommand uses (same flags,
same defaults), and ``dinfill.sampler.infill``: the same inputs accepted and checked the same way for a
diffusion and an AR model, every option checked before any early return.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging

import pytest
import torch

import dinfill
import dinfill.sampler.autoregressive as autoregressive
import dinfill.sampler.diffusion as diffusion
from dinfill.models import Decoder, builtin_config
from dinfill.models.loading import _init_random
from dinfill.sampler import infill
from dinfill.sampler.settings import (
    ALGORITHMS,
    CACHE_MODES,
    LENGTH_MODES,
    PRESETS,
    SamplerSettings,
    add_sampler_arguments,
    axis_values,
    settings_for,
    settings_from_args,
)

pytestmark = pytest.mark.usefixtures("one_thread")
KINDS = ("diffusion", "ar")


# -- the settings object ------------------------------------------------------------------------------
def test_published_preset_is_the_default():
    d = SamplerSettings()
    assert (d.steps, d.alg, d.temperature, d.top_p, d.length, d.max_new_tokens) == (64, "p2", 0.6, 0.95, "oracle", 512)
    assert SamplerSettings.preset("published", "diffusion") == d
    ar = SamplerSettings.preset("published", "ar").for_kind("ar")
    assert ar == {"temperature": 0.6, "top_p": None, "top_k": None, "stop": [], "max_new_tokens": 512}
    fast = settings_for("diffusion", "fast")
    assert (fast.cache, fast.alg, fast.threshold, fast.refresh) == ("dual", "threshold", 0.9, 8)
    assert all(settings_for(k, "greedy").temperature == 0 for k in KINDS)
    assert set(PRESETS) == {"published", "fast", "greedy"}
    assert settings_for("diffusion", top_p=1.0).for_kind("diffusion")["top_p"] is None  # 1 = off


def test_names_match_the_samplers():
    from dinfill.sampler.canvas import LENGTH_STRATEGIES

    assert ALGORITHMS == tuple(diffusion.ALGORITHMS) and CACHE_MODES == diffusion.CACHE_MODES
    assert LENGTH_MODES == LENGTH_STRATEGIES


@pytest.mark.parametrize(
    "option, message",
    [
        ({"top_p": 1.5}, r"top_p \(--top-p\) must lie in \(0, 1\] \(1 turns it off\), got 1.5"),
        ({"temperature": -1}, r"temperature \(--temperature\) must be >= 0"),
        ({"steps": 0}, r"steps \(--steps\) must be an integer >= 1, got 0"),
        ({"cache": "bogus"}, r"cache \(--cache\) must be one of none, dual, got 'bogus'"),
        ({"alg": "x"}, r"alg \(--alg\) must be one of origin, "),
        ({"refresh": 0}, r"refresh \(--refresh\) must be an integer >= 1"),
        ({"threshold": 0}, r"threshold \(--threshold\) must lie in \(0, 1\]"),
        ({"factor": -1.0}, r"factor \(--factor\) must be > 0"),
        ({"max_new_tokens": 0}, r"max_new_tokens \(--max-new-tokens\) must be an integer >= 1"),
        ({"top_k": 0}, r"top_k \(--top-k\) must be an integer >= 1"),
        ({"eps": 1.0}, r"eps \(--eps\) must lie in \(0, 1\)"),
        ({"stop": "\n"}, r"stop \(--stop\) must be a list of strings"),
        ({"stop": [""]}, r"non-empty strings"),
    ],
)
def test_bad_values_name_the_option_and_its_range(option, message):
    with pytest.raises(ValueError, match=message) as err:
        settings_for("diffusion", **option)
    assert "pass None" not in str(err.value)  # the message must read well on the command line too


def test_unknown_option_is_a_type_error():
    with pytest.raises(TypeError, match=r"unknown sampler option\(s\) \['temprature'\]"):
        SamplerSettings().replace(temprature=0.1)


# -- the argparse helper --------------------------------------------------------------------------------
def _parser(**kw) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="x")
    add_sampler_arguments(p, **kw)
    return p


def test_helper_flags_defaults_and_errors(capsys):
    p = _parser()
    args = p.parse_args([])
    for kind in KINDS:  # nothing given: the preset of the kind
        assert settings_from_args(args, kind) == SamplerSettings.preset("published", kind)
    args = p.parse_args(["--temperature", "0", "--stop", "\n", "--stop", "END", "--preset", "fast"])
    s = settings_from_args(args, "diffusion")
    assert (s.temperature, s.stop, s.cache) == (0.0, ("\n", "END"), "dual")
    with pytest.raises(ValueError, match="--steps applies to diffusion models only, and this is an AR model"):
        settings_from_args(p.parse_args(["--steps", "8"]), "ar")
    with pytest.raises(ValueError, match="--max-new-tokens applies to AR models only"):
        settings_from_args(p.parse_args(["--max-new-tokens", "8"]), "diffusion")
    with pytest.raises(ValueError, match=r"top_p \(--top-p\)"):
        settings_from_args(p.parse_args(["--top-p", "1.5"]))  # checked before the kind is known
    p.print_help()
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for default in ("(default 0.6)", "(default 64)", "(default 512)", "(default p2)", "(default oracle", "0.95"):
        assert default in shown, default


def test_sweep_axes_are_validated_value_by_value():
    p = _parser(axes=("steps", "alg"), exclude=("max_new_tokens",))
    args = p.parse_args(["--steps", "4", "8", "4", "--alg", "p2", "threshold"])
    s = settings_from_args(args, "diffusion")
    assert axis_values(args, s) == {"steps": [4, 8], "alg": ["p2", "threshold"]}
    assert axis_values(p.parse_args([]), s) == {"steps": [64], "alg": ["p2"]}
    with pytest.raises(ValueError, match=r"steps \(--steps\) must be an integer >= 1, got 0"):
        axis_values(p.parse_args(["--steps", "8", "0"]), s)
    with pytest.raises(SystemExit):
        p.parse_args(["--max-new-tokens", "3"])  # excluded: not offered at all


@pytest.mark.parametrize(
    "argv",
    [
        ["infill", "--model", "m"],
        ["eval", "--model", "m", "--task", "humaneval-infill", "--out", "o"],
        ["bench", "--model", "m"],
        ["sweep", "--model", "m"],
    ],
)
def test_every_subcommand_has_the_same_flags_and_defaults(argv):
    from dinfill.cli import build_parser

    args = build_parser().parse_args(argv)
    for kind in KINDS:
        assert settings_from_args(args, kind) == SamplerSettings.preset("published", kind)
    # the common spellings parse everywhere
    more = build_parser().parse_args([*argv, "--dtype", "bfloat16", "--threshold", "0.8", "--factor", "2"])
    assert more.dtype == "bfloat16" and settings_from_args(more, "diffusion").factor == 2.0


# -- infill: one API for both kinds ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok(shared_dir):
    return dinfill.load_tokenizer(str(shared_dir / "tokenizers" / "qwen2.5-coder"), add_mask_token=True)


def _small(kind: str, limit: int = 4096) -> Decoder:
    """A tiny-dcoder-shaped random model (Qwen's vocabulary) with ``limit`` positions."""
    config = dataclasses.replace(builtin_config("tiny-dcoder"), max_position_embeddings=limit)
    model = Decoder(config)
    _init_random(model, 0)
    model.eval().requires_grad_(False)
    model.kind, model.kind_source, model.name = kind, "test", f"small-{kind}"
    return model


@pytest.fixture(scope="module")
def models():
    return {kind: _small(kind) for kind in KINDS}


def _opts(kind: str) -> dict:
    if kind == "diffusion":
        return {"length": "fixed", "middle_tokens": 3, "steps": 2}
    return {"max_new_tokens": 3}


@pytest.mark.parametrize("kind", KINDS)
def test_same_inputs_for_both_kinds(kind, models, tok):
    model = models[kind]
    one = infill(model, tok, "def f():\n    return ", "\n", seed=0, **_opts(kind))  # bare strings: one problem
    assert isinstance(one, list) and len(one) == 1 and isinstance(one[0], str)
    assert infill(model, tok, [], [], **_opts(kind)) == []
    assert infill(model, tok, [], [], return_stats=True, **_opts(kind)) == ([], [])
    texts, stats = infill(model, tok, ["a = ", "b = "], ["\n", ""], seed=1, return_stats=True, **_opts(kind))
    assert len(texts) == 2 and len(stats) == 1 and stats[0].forward_passes >= 1
    if kind == "ar":  # honest AR stats: the tokens the loop generated, stop tokens included
        assert 2 <= stats[0].new_tokens <= 2 * 3 and stats[0].batch_size == 2
    same = infill(model, tok, ["a = ", "b = "], ["\n", ""], seed=1, **_opts(kind))
    assert same == texts  # same seed, same middles
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="pass generator= or seed=, not both"):
        infill(model, tok, ["a"], ["b"], generator=gen, seed=0, **_opts(kind))
    with pytest.raises(TypeError, match=r"infill\(\) got an unexpected keyword argument 'temprature'"):
        infill(model, tok, ["a"], ["b"], temprature=0.5, **_opts(kind))
    other = {"steps": 4} if kind == "ar" else {"max_new_tokens": 4}
    with pytest.raises(TypeError, match=r"infill\(\): (steps|max_new_tokens)= applies to .* models only"):
        infill(model, tok, ["a"], ["b"], **other)
    with pytest.raises(ValueError, match="got 2 prefixes and 1 suffixes"):
        infill(model, tok, ["a", "b"], ["c"], **_opts(kind))
    with pytest.raises(TypeError, match="pass settings= or preset=, not both"):
        infill(model, tok, ["a"], ["b"], settings=SamplerSettings(), preset="fast", **_opts(kind))
    with pytest.raises(ValueError, match="unknown sampler preset 'quick'"):
        infill(model, tok, ["a"], ["b"], preset="quick", **_opts(kind))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "bad, message",
    [
        ({"temperature": -5}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"stop": [""]}, "stop"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_options_are_checked_before_the_early_return(kind, bad, message, models, tok):
    for prefixes, middles in (([], None), (["", ""], ["", ""])):  # no rows; rows with empty oracle middles
        extra = {"length": "oracle", "middles": middles} if kind == "diffusion" and middles else _opts(kind)
        with pytest.raises(ValueError, match=message):
            infill(models[kind], tok, prefixes, list(prefixes), **extra, **bad)


@pytest.mark.parametrize("bad, message", [({"steps": 0}, "steps"), ({"cache": "bogus"}, "cache")])
def test_diffusion_options_are_checked_with_nothing_to_generate(bad, message, models, tok):
    with pytest.raises(ValueError, match=message):
        infill(models["diffusion"], tok, ["", ""], ["", ""], middles=["", ""], temperature=0.0, **bad)
    assert infill(models["diffusion"], tok, ["", ""], ["", ""], middles=["", ""]) == ["", ""]


def test_api_defaults_are_the_published_setting(monkeypatch, models, tok):
    seen = {}

    def fake(kind):
        def call(model, tokenizer, prefixes, suffixes, **kw):
            seen[kind] = kw
            return [""] * len(prefixes), []

        return call

    monkeypatch.setattr(diffusion, "infill", fake("diffusion"))
    monkeypatch.setattr(autoregressive, "infill", fake("ar"))
    infill(models["diffusion"], tok, ["a"], ["b"], middles=["c"])
    infill(models["ar"], tok, ["a"], ["b"])
    for kind in KINDS:
        published = SamplerSettings.preset("published", kind).for_kind(kind)
        published.pop("stop")
        assert {k: seen[kind][k] for k in published} == published
    assert seen["ar"]["stop_strings"] == [] and seen["diffusion"]["middles"] == ["c"]
    assert seen["diffusion"]["batch_size"] == seen["ar"]["batch_size"] == 32


@pytest.mark.parametrize("kind", KINDS)
def test_prompts_over_the_limit_lose_the_start_of_the_prefix_for_both(kind, tok, caplog):
    model = _small(kind, limit=96)
    long_prefix = "x = 1\n" * 60  # ~240 tokens, well past 96 positions
    with caplog.at_level(logging.WARNING, logger="dinfill"):
        out = infill(model, tok, [long_prefix, "y = "], ["\n", "\n"], seed=0, **_opts(kind))
    assert len(out) == 2
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "1 of 2" in warning and "prefixes lose their first tokens" in warning


def test_stop_strings_cut_both_kinds(models, tok):
    # random weights, sampled with a seed: the middle is some text (greedy gives '' or blanks here, which checked
    # nothing); a stop string taken from its middle must cut it right before its first occurrence
    opts = {"diffusion": {"length": "fixed", "middle_tokens": 6, "steps": 3}, "ar": {"max_new_tokens": 6}}
    for kind in KINDS:
        (full,) = infill(models[kind], tok, ["a = "], ["\n"], seed=0, **opts[kind])
        assert len(full) >= 3, f"{kind}: the middle {full!r} is too short to cut"
        stop = full[len(full) // 2]
        (cut,) = infill(models[kind], tok, ["a = "], ["\n"], seed=0, stop=[stop], **opts[kind])
        assert cut == full[: full.index(stop)] and len(cut) < len(full), kind
