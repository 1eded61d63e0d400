"""Evaluation layer: HumanEval-Infill (pass@1) and SantaCoder-FIM (exact match), reproducing published counts.

Kept thin on purpose (one small task interface, one file per benchmark) and strict where trust
matters: datasets are sha256-pinned (:mod:`.datasets`), model-written code runs only in the
sandbox (:mod:`.execution`), results are append-only and resumable (:mod:`.records`,
:mod:`.runner`), and every reported number comes from the records with its settings next to it
(:mod:`.report`). The command line is in :mod:`.cli` (``dinfill eval | score | report``) and :mod:`.compare`
(``dinfill compare``: the published comparison in one command).
Submodules are imported lazily so that ``import dinfill.eval`` stays cheap.
"""

from __future__ import annotations

import importlib

__all__ = [
    "ExecResult",
    "InfillGenerator",
    "PostProcess",
    "Problem",
    "RunSpec",
    "Sandbox",
    "SandboxConfig",
    "get_task",
    "load_humaneval",
    "load_santacoder",
    "pass_at_k",
    "run_eval",
]

_WHERE = {
    "ExecResult": "execution",
    "Sandbox": "execution",
    "SandboxConfig": "execution",
    "InfillGenerator": "runner",
    "RunSpec": "runner",
    "run_eval": "runner",
    "PostProcess": "postprocess",
    "Problem": "datasets",
    "load_humaneval": "datasets",
    "load_santacoder": "datasets",
    "get_task": "tasks",
    "pass_at_k": "metrics",
}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"dinfill.eval.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'dinfill.eval' has no attribute {name!r}")
