"""SantaCoder-FIM (bigcode/santacoder-fim-task): exact match under both rules, execution optional (Python).

Prompts follow the published runs: the diffusion model gets ``prompt + "\\n"`` as prefix (most
prompts end mid-line before the hole's line), AR models the raw prompt. Exact match is reported
under ``first_line`` and ``whole`` from the raw middle, plus under the run's own post-processing.
With execution on, the Python program is ``prompt + "\\n" + middle + "\\n" + suffix + "\\n" + tests``
(leading blank lines of the middle dropped), which runs clean for every canonical middle.
"""

from __future__ import annotations

import re
from pathlib import Path

from dinfill.eval.datasets import SANTACODER_LANGUAGES, Problem, load_santacoder, santacoder_file
from dinfill.eval.postprocess import PostProcess
from dinfill.eval.tasks.base import Task, _check_kind

_LEADING_BLANK_LINES = re.compile(r"\A(?:[ \t]*\n)+")


class SantaCoderFIM(Task):
    """SantaCoder-FIM; ``subset`` is the language: ``py`` (default), ``js`` or ``java`` (exact match only)."""

    name = "santacoder-fim"
    subsets = SANTACODER_LANGUAGES
    default_subset = "py"
    # One rule for every model; the published AR numbers used ``none`` ("whole"), both are always reported.
    default_postprocess = PostProcess("first_line")
    executes_by_default = False
    exact_match = True

    def _source(self, data, data_dir, download: bool) -> Path:
        return santacoder_file(data, data_dir, download)

    def _read(self, path: Path) -> list[Problem]:
        return load_santacoder(self.subset, data=path)

    def can_execute(self) -> bool:
        return self.subset == "py"

    def prefix(self, problem: Problem, kind: str) -> str:
        _check_kind(kind)
        return problem.prompt + "\n" if kind == "diffusion" else problem.prompt

    def program(self, problem: Problem, middle: str) -> str:
        middle = _LEADING_BLANK_LINES.sub("", middle)
        return problem.prompt + "\n" + middle + "\n" + problem.suffix + "\n" + problem.test
