"""Triton kernels of fastfoof's hot operations, installed as `fastfoof.kernels`."""
