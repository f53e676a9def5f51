"""Normalisation layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019): x / sqrt(mean(x^2) + eps) * w, computed in fp32."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one call: torch's rms_norm normalises in fp32 and rounds once to x's dtype, as
        # (x.float() * rsqrt(mean(x^2) + eps)).to(x.dtype) does in six
        return self.weight * F.rms_norm(x, x.shape[-1:], eps=self.eps)


class GatedRMSNorm(RMSNorm):
    """Output norm of Gated DeltaNet / Mamba-2: RMSNorm(o) * silu(gate), per head (normalised over the last dim)."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        return (super().forward(x).float() * F.silu(gate.float())).to(dtype)
