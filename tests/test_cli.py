"""The ``dinfill`` command as a user runs it: real processes (``python -m dinfill ...``), real files.

Every contract subcommand is registered; ``infill`` runs end to end for both kinds; every sampler option is
checked before any model is loaded (a typo with the 3B shape fails in a fraction of a second, without even
importing torch); ``-v`` works before and after the subcommand; the messages read well on a command line.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dinfill.cli import build_parser, main

REPO = Path(__file__).resolve().parent.parent


def _dinfill(*argv: str, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m dinfill ARGV`` in a fresh process, from the repository root, one torch thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "dinfill", *argv], cwd=REPO, env=env, input=stdin, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


@pytest.fixture(scope="module")
def tok(shared_dir) -> str:
    return str(shared_dir / "tokenizers" / "qwen2.5-coder")


def test_contract_subcommands_are_registered():
    choices = build_parser()._subparsers._group_actions[0].choices
    assert {"infill", "eval", "score", "compare", "bench", "sweep", "report"} <= set(choices)


def test_infill_both_kinds_in_real_processes(tok):
    prefix = "def add(a, b):\n    return "
    diff = _dinfill("infill", "--model", "tiny-dcoder", "--random-weights", "--tokenizer", tok, "--device", "cpu",
                    "--length", "adaptive", "--middle-tokens", "5", "--steps", "3", "--prefix", prefix,
                    "--suffix", "\n")  # fmt: skip
    assert diff.returncode == 0, diff.stderr
    assert "# tiny-dcoder: a diffusion model (built-in shape)" in diff.stderr and diff.stdout.endswith("\n")
    ar = _dinfill("infill", "--model", "tiny-qwen2", "--random-weights", "--tokenizer", tok, "--dtype", "bfloat16",
                  "--max-new-tokens", "4", "--suffix", "\n", stdin=prefix)  # fmt: skip
    assert ar.returncode == 0, ar.stderr
    assert "# tiny-qwen2: an AR model (built-in shape)" in ar.stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["infill", "--model", "starcoder2-3b", "--temperature", "-1", "--prefix", "x"],
         "temperature (--temperature) must be >= 0"),
        (["infill", "--model", "open-dcoder-0.5b", "--top-p", "1.5", "--prefix", "x"],
         "top_p (--top-p) must lie in (0, 1] (1 turns it off), got 1.5"),
        (["infill", "--model", "qwen2.5-coder-1.5b", "--steps", "8", "--prefix", "x"],
         "--steps applies to diffusion models only, and this is an AR model"),
        (["eval", "--model", "open-dcoder-0.5b", "--task", "humaneval-infill", "--out", "{out}", "--steps", "0"],
         "steps (--steps) must be an integer >= 1, got 0"),
        (["eval", "--model", "starcoder2-3b", "--task", "santacoder-fim", "--out", "{out}", "--cache", "dual"],
         "--cache applies to diffusion models only"),
        (["bench", "--model", "starcoder2-3b", "--temperature", "-1"], "temperature (--temperature) must be >= 0"),
        (["sweep", "--model", "open-dcoder-0.5b", "--threshold", "2"], "threshold (--threshold) must lie in (0, 1]"),
        (["compare", "--out", "{out}", "--models", "qwen2.5-coder-0.5b", "starcoder2-3b", "--steps", "8"],
         "--steps applies to diffusion models only, and no model in --models is one"),
        (["compare", "--out", "{out}", "--length", "oracle:12"], "length oracle takes the true middle's length"),
        (["compare", "--out", "{out}", "--models", "starcoder2-3b", "--length", "search"],
         "--length sets the middle length of diffusion models, and no model in --models is one"),
        (["compare", "--out", "{out}", "--temperature", "-1"], "temperature (--temperature) must be >= 0"),
    ],
)  # fmt: skip
def test_options_are_checked_before_the_model_is_loaded(argv, message, tmp_path):
    """In-process timing, and proof that nothing heavy ran: torch was never imported."""
    out = tmp_path / "run"
    argv = [a.replace("{out}", str(out)) for a in argv] + ["--random-weights"]
    code = (
        "import sys, time\nfrom dinfill.cli import main\nt = time.perf_counter()\nrc = main(sys.argv[1:])\n"
        "print(rc, 'torch' in sys.modules, time.perf_counter() - t)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code, *argv], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    rc, torch_imported, seconds = done.stdout.split()
    assert rc == "2" and message in done.stderr and "pass None" not in done.stderr
    assert torch_imported == "False", "options must be checked before torch (let alone the model) is loaded"
    assert float(seconds) < 1.0
    assert not out.exists()  # nothing written for a run that never started


def test_a_typo_with_a_3b_model_fails_fast_end_to_end():
    t0 = time.perf_counter()
    done = _dinfill("infill", "--model", "starcoder2-3b", "--random-weights", "--temperature", "-1", "--prefix", "x")
    wall = time.perf_counter() - t0
    assert done.returncode == 2 and "dinfill infill: error: temperature (--temperature)" in done.stderr
    assert wall < 10, f"{wall:.1f} s: the whole process, interpreter start included (loading the model takes ~70 s)"


def test_verbose_before_and_after_the_subcommand(tmp_path):
    argv = ["bench", "--model", "tiny-llama", "--random-weights", "--lengths", "synthetic", "--no-ceilings",
            "--results", str(tmp_path / "r.jsonl")]  # fmt: skip
    quiet, before, after = _dinfill(*argv), _dinfill("-v", *argv), _dinfill(*argv, "-v")
    line = "INFO loaded tiny-llama as an AR model (built-in shape)"
    assert quiet.returncode == before.returncode == after.returncode == 0, quiet.stderr
    assert line not in quiet.stderr and line in before.stderr and line in after.stderr


def test_oracle_length_without_the_middle_is_a_clear_error(tok, capsys):
    rc = main(["infill", "--model", "tiny-dcoder", "--random-weights", "--tokenizer", tok, "--prefix", "x = "])
    err = capsys.readouterr().err
    assert rc == 2 and "--length oracle (the published setting, the default) needs --middle" in err
    assert "--length adaptive" in err


def test_a_missing_dependency_is_one_line_naming_it_and_the_python():
    """`dinfill bench --static` from a Python without torch (say, the system one with the checkout on PYTHONPATH): one
    line naming the package, the interpreter and the fix; exit 2, no traceback."""
    code = "import sys; sys.modules['torch'] = None; from dinfill.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run([sys.executable, "-c", code, "bench", "--static", "--check"], env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert f"needs the package 'torch', which {sys.executable} cannot import" in done.stderr
    assert "pip install torch==2.13.0" in done.stderr
