"""Kernel tests run the Triton kernels on CPU tensors through Triton's interpreter when no GPU is
present; the variable must be set before Triton is imported."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def float64():
    """float64 as the default dtype for the test, restored after it."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
