"""The README as a user reads it: every ```python block runs as written, and every link resolves.

The Python blocks run one by one, each in a fresh namespace (a block must not lean on names from another),
offline: they use tiny built-in shapes with random weights and take the tokenizer from ``DINFILL_TOKENIZER``,
which this test points at the shared Qwen2.5-Coder tokenizer (it skips, saying so, when that is absent).

The link check covers README.md, docs/*.md and bench/*.md (markdown links to relative paths) and every
``docs/<file>`` mentioned in the package, the tests, bench/ and the docs themselves: each must resolve to a file
inside the repository. Nothing may point at ``../shared/docs``, which users of the package do not have.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_DOCS_REF = re.compile(r"(?<![\w./-])docs/[\w.-]+\.md")


def _python_blocks() -> list[str]:
    return _BLOCK.findall(README.read_text(encoding="utf-8"))


def test_readme_has_python_blocks():
    assert len(_python_blocks()) >= 3


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_python_block_runs_as_written(index, shared_dir, monkeypatch, one_thread, capsys):
    monkeypatch.setenv("DINFILL_TOKENIZER", str(shared_dir / "tokenizers" / "qwen2.5-coder"))
    code = _python_blocks()[index]
    exec(compile(code, f"README.md python block {index + 1}", "exec"), {"__name__": "__readme__"})  # noqa: S102


def _markdown_files() -> list[Path]:
    return [README, *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "bench").glob("*.md"))]


def test_docs_folder_has_the_three_pages():
    for name in ("sampler-semantics.md", "eval-protocol.md", "gpu-check.md"):
        assert (REPO / "docs" / name).is_file(), name


def test_markdown_links_resolve_inside_the_repository():
    broken = []
    for md in _markdown_files():
        for target in _LINK.findall(md.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+://|#|mailto:", target):
                continue
            path = (md.parent / target.split("#")[0]).resolve()
            if not path.exists() or REPO not in path.parents and path != REPO:
                broken.append(f"{md.relative_to(REPO)}: {target}")
    assert not broken, broken


def _sources() -> list[Path]:
    files = [*_markdown_files(), REPO / "setup.py"]
    for folder in ("dinfill", "tests", "bench"):
        files += sorted((REPO / folder).rglob("*.py")) + sorted((REPO / folder).rglob("*.sh"))
    return [f for f in files if f.is_file()]


def test_docs_references_in_code_and_docs_resolve():
    missing, outside = [], []
    for f in _sources():
        text = f.read_text(encoding="utf-8")
        if "shared/docs" in text and f != Path(__file__):
            outside.append(str(f.relative_to(REPO)))
        for ref in set(_DOCS_REF.findall(text)):
            if not (REPO / ref).is_file():
                missing.append(f"{f.relative_to(REPO)}: {ref}")
    assert not outside, f"references to ../shared/docs, which users do not have: {outside}"
    assert not missing, missing
