"""Kernel tests run the Triton kernels on CPU tensors through Triton's interpreter when no GPU is
present; the variable must be set before Triton is imported."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
