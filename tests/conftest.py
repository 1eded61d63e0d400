"""Test-suite set-up.

Without CUDA, Triton kernels can only run in its interpreter, which must be switched on before
triton is imported anywhere: this conftest is the first thing pytest imports, so it does it here.

On a CUDA machine the interpreter stays off (the kernel tests then compile for the GPU), so a test that
runs the Triton backend on *CPU tensors* cannot work there. Such a test carries the ``interpreter_only``
marker: it runs wherever the interpreter is on (every machine without CUDA, or ``TRITON_INTERPRET=1`` set by
hand) and is skipped, with that reason, elsewhere.

A shell without job control starts background commands (``cmd &``, ``nohup ... &``) with SIGINT ignored, and
an ignored signal stays ignored across fork and exec: the Ctrl-C tests (which interrupt a ``dinfill score``
they started, or a worker thread here) would then test nothing. The suite takes Python's default handler back,
so its children start with SIGINT's default disposition.
"""

import os
import signal

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

DATA_DIR = os.environ.get("DINFILL_DATA_DIR")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
INTERPRETER_REASON = (
    "runs Triton kernels on CPU tensors, which needs the interpreter: CUDA is present and TRITON_INTERPRET is "
    "unset (the compiled kernels are tested on CUDA tensors instead; set TRITON_INTERPRET=1 to run it anyway)"
)


def interpreter_off() -> bool:
    """True on a CUDA machine where Triton compiles for the GPU instead of interpreting (the backend's own test of
    the switch, so the marker skips exactly where ``DINFILL_BACKEND=triton`` would refuse CPU tensors)."""
    from dinfill.backend import triton_interpreted  # not at the top: TRITON_INTERPRET is set above first

    return torch.cuda.is_available() and not triton_interpreted()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "interpreter_only: runs Triton on CPU tensors; skipped (saying why) where the interpreter is off"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not interpreter_off():
        return
    skip = pytest.mark.skip(reason=INTERPRETER_REASON)
    for item in items:
        if "interpreter_only" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    """``../shared`` beside the checkout (tokenizers, data); skip with the reason when it is absent."""
    path = REPO.parent / "shared"
    if not (path / "tokenizers").is_dir():
        pytest.skip(f"{path}/tokenizers not found: these tests need the shared tokenizer files beside the repo")
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Run a module on one torch thread (tiny models gain nothing from intra-op threads, and on a shared
    2-core machine two OpenMP threads spin-wait against other processes), then restore the count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
