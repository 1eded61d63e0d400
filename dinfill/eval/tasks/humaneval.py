"""HumanEval-Infill (OpenAI human-eval-infilling): pass@1 by running each completed program.

The program is ``prompt + middle + suffix + "\\n" + test + "\\n" + f"check({entry_point})"``, the
harness's own construction; with the sandbox's semantics (fresh namespace, stdin closed, 3 s CPU)
this reproduces the published counts exactly. Both model kinds see the raw prompt and suffix.
"""

from __future__ import annotations

from pathlib import Path

from dinfill.eval.datasets import HUMANEVAL_SUBSETS, Problem, humaneval_file, load_humaneval
from dinfill.eval.postprocess import PostProcess
from dinfill.eval.tasks.base import Task


class HumanEvalInfill(Task):
    """HumanEval-Infill; ``subset``: single-line (default), multi-line, random-span or random-span-light."""

    name = "humaneval-infill"
    subsets = tuple(HUMANEVAL_SUBSETS)
    default_subset = "single-line"
    # The published numbers executed the middle as generated (AR ones untruncated).
    default_postprocess = PostProcess("none")
    executes_by_default = True

    def _source(self, data, data_dir, download: bool) -> Path:
        return humaneval_file(self.subset, data, data_dir, download)

    def _read(self, path: Path) -> list[Problem]:
        return load_humaneval(self.subset, data=path)

    def program(self, problem: Problem, middle: str) -> str:
        return problem.prompt + middle + problem.suffix + "\n" + problem.test + "\n" + f"check({problem.entry_point})"
