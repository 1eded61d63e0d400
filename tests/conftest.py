"""Test-suite set-up.

Without CUDA, Triton kernels can only run in its interpreter, which must be switched on before
triton is imported anywhere: this conftest is the first thing pytest imports, so it does it here.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DATA_DIR = os.environ.get("DINFILL_DATA_DIR")
