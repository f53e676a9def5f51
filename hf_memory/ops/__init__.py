"""Operators: PyTorch references (the definitions) and their dispatch to fused kernels."""
