"""The ``dinfill`` command itself: every contract subcommand is registered, and ``infill`` runs end to end."""

from __future__ import annotations

import pytest

from dinfill.cli import build_parser, main


def test_contract_subcommands_are_registered():
    choices = build_parser()._subparsers._group_actions[0].choices
    assert {"infill", "eval", "score", "bench", "sweep", "report"} <= set(choices)


@pytest.mark.parametrize(
    "model,extra",
    [
        ("tiny-dcoder", ["--length", "fixed", "--middle-tokens", "5", "--steps", "3", "--alg", "maskgit_plus"]),
        ("tiny-qwen2", ["--max-new-tokens", "4"]),
    ],
)
def test_infill_runs_both_kinds(model, extra, shared_dir, capsys):
    tok = str(shared_dir / "tokenizers" / "qwen2.5-coder")
    argv = ["infill", "--model", model, "--random-weights", "--tokenizer", tok, "--device", "cpu"]
    rc = main(argv + ["--prefix", "def add(a, b):\n    return ", "--suffix", "\n"] + extra)
    out = capsys.readouterr()
    assert rc == 0
    kind = "diffusion" if model == "tiny-dcoder" else "ar"
    assert f"{kind} model" in out.err and out.out.endswith("\n")


def test_infill_oracle_without_middle_is_a_clear_error(shared_dir, capsys):
    tok = str(shared_dir / "tokenizers" / "qwen2.5-coder")
    rc = main(["infill", "--model", "tiny-dcoder", "--random-weights", "--tokenizer", tok, "--prefix", "x = "])
    assert rc == 2 and "--length oracle needs --middle" in capsys.readouterr().err
