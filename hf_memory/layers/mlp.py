"""Feed-forward blocks."""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN


class GatedMLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): m_down * down(act(m_gate * gate(x)) * up(x)), the multipliers
    ``(m_gate, m_down)`` 1 except in muP-parametrised models (Falcon-H1's ``mlp_multipliers``)."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str = "silu", bias: bool = False,
                 multipliers: tuple[float, float] = (1.0, 1.0)):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act_fn = ACT2FN[hidden_act]
        self.gate_multiplier, self.down_multiplier = multipliers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x)
        if self.gate_multiplier != 1.0:
            gate = gate * self.gate_multiplier
        out = self.down_proj(self.act_fn(gate) * self.up_proj(x))
        return out * self.down_multiplier if self.down_multiplier != 1.0 else out
