"""Shared set-up of the micro-benchmarks in ``bench/`` (pytest-benchmark; GPU runners, CPU smoke runs).

Run on a GPU: ``pytest bench/ --benchmark-json=bench/micro.json``. Without CUDA every test marked
``cuda`` (or asking for the ``cuda_only`` fixture) is skipped with its reason, and the smoke tests run
the same entry points on tiny shapes (``pytest bench/ --benchmark-disable`` runs each once, untimed).

What lives here is deliberately small, because several files share it: the Triton interpreter switch
(it must precede the first ``import triton``), the ``cuda`` marker and fixture, the ``interpreter_only``
marker and fixture (a CPU smoke test that runs the Triton backend on CPU tensors needs the interpreter, which
is off on a CUDA machine: there it is skipped with that reason), and a pytest-benchmark hook
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
INTERPRETER_REASON = (
    "a CPU smoke run of Triton kernels needs the interpreter: CUDA is present and TRITON_INTERPRET is unset "
    "(the CUDA cases of this file time the compiled kernels instead)"
)


def interpreter_off() -> bool:
    """True on a CUDA machine where Triton compiles for the GPU instead of interpreting."""
    return torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; skipped with the reason when there is none")
    config.addinivalue_line(
        "markers", "interpreter_only: runs Triton on CPU tensors; skipped (saying why) where the interpreter is off"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    cuda_skip = pytest.mark.skip(reason=CUDA_REASON)
    interp_skip = pytest.mark.skip(reason=INTERPRETER_REASON)
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(cuda_skip)
        if "interpreter_only" in item.keywords and interpreter_off():
            item.add_marker(interp_skip)


@pytest.fixture
def interpreter_only() -> torch.device:
    """The CPU device for a smoke test that runs Triton kernels on CPU tensors; skips (saying why) where it cannot."""
    if interpreter_off():
        pytest.skip(INTERPRETER_REASON)
    return torch.device("cpu")


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
