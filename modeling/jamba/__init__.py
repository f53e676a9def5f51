"""Jamba-style interleaved hybrid: Mamba + attention (+ MoE) (arXiv 2403.19887)."""
