"""Benchmarks as small task objects: build the prompt, post-process, score. One file per benchmark.

Why a task interface: the runner, the ``score`` command and the tests treat both benchmarks the
same way; what differs (prompt format per model kind, the program that is executed, exact match)
lives in :mod:`.humaneval` and :mod:`.santacoder`.
"""

from __future__ import annotations

from dinfill.eval.tasks.base import Task
from dinfill.eval.tasks.humaneval import HumanEvalInfill
from dinfill.eval.tasks.santacoder import SantaCoderFIM

TASKS: dict[str, type[Task]] = {HumanEvalInfill.name: HumanEvalInfill, SantaCoderFIM.name: SantaCoderFIM}

__all__ = ["TASKS", "Task", "HumanEvalInfill", "SantaCoderFIM", "get_task"]


def get_task(name: str, subset: str | None = None, **sources) -> Task:
    """Instantiate a task by name (``humaneval-infill`` or ``santacoder-fim``, both **contract**).

    Parameters
    ----------
    name : str
        Task name.
    subset : str, optional
        HumanEval variant (``single-line`` ...) or SantaCoder language (``py`` ...); the task's default if None.
    **sources
        ``data``, ``data_dir``, ``download``: where the dataset comes from (see :mod:`dinfill.eval.datasets`).
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name](subset, **sources)
