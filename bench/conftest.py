"""Shared set-up of the micro-benchmarks in ``bench/`` (pytest-benchmark; GPU runners, CPU smoke runs).

Run on a GPU: ``pytest bench/ --benchmark-json=bench/micro.json``. Without CUDA every test marked
``cuda`` (or asking for the ``cuda_only`` fixture) is skipped with its reason, and the smoke tests run
the same entry points on tiny shapes (``pytest bench/ --benchmark-disable`` runs each once, untimed).

What lives here is deliberately small, because several files share it: the Triton interpreter switch
(it must precede the first ``import triton``), the ``cuda`` marker and fixture, and a pytest-benchmark hook
that stamps the JSON output with dinfill's environment record (device, versions, git revision, date), so
``--benchmark-json`` files carry the same identification as the results JSONL.
"""

from __future__ import annotations

import importlib.util
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

CUDA_REASON = "times compiled kernels at real shapes: needs a CUDA GPU (the CPU smoke tests cover the code path)"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; skipped with the reason when there is none")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=CUDA_REASON)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def cuda_only() -> torch.device:
    """The CUDA device; skips the test (saying why) on a machine without one."""
    if not torch.cuda.is_available():
        pytest.skip(CUDA_REASON)
    return torch.device("cuda")


if importlib.util.find_spec("pytest_benchmark") is not None:  # hooks of a plugin that may be absent

    def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
        from dinfill.bench.report import environment

        machine_info["dinfill"] = environment()
