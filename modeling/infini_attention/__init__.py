"""Infini-attention (arXiv 2404.07143)."""
