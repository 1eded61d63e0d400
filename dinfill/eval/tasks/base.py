"""The task interface shared by both benchmarks (see :mod:`dinfill.eval.tasks`)."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from dinfill.eval.datasets import Problem, sha256_of
from dinfill.eval.execution import Sandbox
from dinfill.eval.metrics import exact_match
from dinfill.eval.postprocess import PostProcess

KINDS = ("diffusion", "ar")


class Task(ABC):
    """One benchmark: its problems, how a model sees them, and how a middle is scored.

    Parameters
    ----------
    subset : str, optional
        Variant of the benchmark (see :attr:`subsets`); :attr:`default_subset` if None.
    data, data_dir : path, optional
        Where the dataset comes from (see :mod:`dinfill.eval.datasets`).
    download : bool
        Allow a one-time verified download into the cache.
    """

    name: ClassVar[str]
    subsets: ClassVar[tuple[str, ...]]
    default_subset: ClassVar[str]
    default_postprocess: ClassVar[PostProcess]
    #: Whether scoring runs code unless told otherwise (pass@1 needs it; exact match does not).
    executes_by_default: ClassVar[bool]
    #: Whether the task has an exact-match metric.
    exact_match: ClassVar[bool] = False

    def __init__(
        self,
        subset: str | None = None,
        data: str | os.PathLike | None = None,
        data_dir: str | os.PathLike | None = None,
        download: bool = True,
    ) -> None:
        self.subset = subset or self.default_subset
        if self.subset not in self.subsets:
            raise ValueError(f"{self.name}: unknown subset {self.subset!r}; choose one of {list(self.subsets)}")
        self._sources = {"data": data, "data_dir": data_dir, "download": download}
        self._problems: list[Problem] | None = None
        self.source_path: Path | None = None
        self._sha256: str | None = None

    @abstractmethod
    def _source(self, data, data_dir, download: bool) -> Path:
        """Find (or download) the dataset file."""

    @abstractmethod
    def _read(self, path: Path) -> list[Problem]:
        """Read this subset's problems from the dataset file."""

    def problems(self) -> list[Problem]:
        """The problems in dataset order (loaded once)."""
        if self._problems is None:
            self.source_path = self._source(**self._sources)
            self._problems = self._read(self.source_path)
        return self._problems

    def dataset_sha256(self) -> str:
        """sha256 of the dataset file the problems came from (recorded in run.json)."""
        self.problems()
        if self._sha256 is None:
            self._sha256 = sha256_of(self.source_path)
        return self._sha256

    def can_execute(self) -> bool:
        """Whether this subset has tests a Python sandbox can run."""
        return True

    def prefix(self, problem: Problem, kind: str) -> str:
        """Text before the hole as the model of ``kind`` sees it."""
        _check_kind(kind)
        return problem.prompt

    def suffix(self, problem: Problem, kind: str) -> str:
        """Text after the hole as the model of ``kind`` sees it."""
        _check_kind(kind)
        return problem.suffix

    @abstractmethod
    def program(self, problem: Problem, middle: str) -> str:
        """The Python program that checks ``middle``."""

    def score(
        self,
        problems: Sequence[Problem],
        completions: Sequence[str],
        postprocess: PostProcess,
        sandbox: Sandbox | None,
        progress: bool = False,
    ) -> list[tuple[str, dict]]:
        """Post-process and score middles; returns ``(processed, outcome)`` per completion.

        ``outcome`` holds ``passed``/``status``/``detail``/``cpu_s``/``wall_s`` when ``sandbox`` is
        given, and for exact-match tasks ``exact_match`` (processed middle, stripped, against the
        stripped canonical) plus ``exact_match_first_line`` and ``exact_match_whole`` (both rules on
        the raw middle, whatever the post-processing).
        """
        if len(problems) != len(completions):
            raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
        # The rule applies to what is executed and to the headline exact match alike.
        processed = [postprocess(text) for text in completions]
        outcomes: list[dict] = [{} for _ in completions]
        if self.exact_match:
            for outcome, problem, raw, done in zip(outcomes, problems, completions, processed, strict=True):
                outcome["exact_match"] = done.strip() == problem.canonical.strip()
                # Both published rules from the raw middle, whatever the run's rule, so any two runs compare.
                outcome["exact_match_first_line"] = exact_match(raw, problem.canonical, "first_line")
                outcome["exact_match_whole"] = exact_match(raw, problem.canonical, "whole")
        if sandbox is not None:
            if not self.can_execute():
                raise ValueError(f"{self.name} {self.subset}: only Python problems can be executed; use --no-execute")
            programs = [self.program(p, done) for p, done in zip(problems, processed, strict=True)]
            # One batch for the sandbox: it runs distinct programs once, in parallel.
            results = sandbox.run_many(programs, progress=progress, desc=f"{self.name} exec")
            for outcome, result in zip(outcomes, results, strict=True):
                outcome.update(passed=result.passed, **result.to_dict())
                # Outcome fields stay the same for every status; the return code is in the detail text.
                del outcome["returncode"]
        return list(zip(processed, outcomes, strict=True))


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"model kind {kind!r} is not one of {KINDS}")
