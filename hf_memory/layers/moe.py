"""Sparse mixture of SwiGLU experts with a softmax top-k router (Shazeer et al. 2017; Switch Transformer,
Fedus et al. 2021, for the load-balancing loss), as used by Jamba (arXiv 2403.19887: 16 experts, top-2,
top-k weights not renormalised)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN


class TopKRouter(nn.Module):
    """p = softmax(W_r x); keep the k largest p_e (renormalised to sum to 1 only if ``normalize``)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, normalize: bool = False):
        super().__init__()
        self.top_k, self.normalize = top_k, normalize
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, H] -> (logits [N, E], top-k weights [N, k] in x's dtype, top-k expert index [N, k])."""
        logits = F.linear(x, self.weight)
        probabilities = logits.float().softmax(dim=-1)
        weights, index = probabilities.topk(self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(-1, keepdim=True)
        return logits, weights.to(x.dtype), index


class Experts(nn.Module):
    """E SwiGLU experts stored as 3-D tensors: gate_up_proj [E, 2I, H], down_proj [E, H, I]."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, hidden_act: str = "silu"):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.act_fn = ACT2FN[hidden_act]

    def forward(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, H]; each token's output is sum_j weights[:, j] * expert_{index[:, j]}(x). Eager: each chosen
        expert on its tokens. Under torch.compile every expert runs on every token, scaled by its (mostly zero)
        router weight: the same sum without data-dependent shapes or a host sync, at E / k times the FFN work."""
        if torch.compiler.is_compiling():
            scale = torch.zeros(x.shape[0], self.num_experts, dtype=weights.dtype, device=x.device)
            scale = scale.scatter_add(1, index, weights)  # [N, E]
            out = torch.zeros_like(x)
            for expert in range(self.num_experts):
                gate, up = F.linear(x, self.gate_up_proj[expert]).chunk(2, dim=-1)
                y = F.linear(self.act_fn(gate) * up, self.down_proj[expert]) * scale[:, expert, None]
                out = out + y.to(out.dtype)
            return out
        out = torch.zeros_like(x)
        for expert in index.unique().tolist():
            token, slot = torch.where(index == expert)
            gate, up = F.linear(x[token], self.gate_up_proj[expert]).chunk(2, dim=-1)
            y = F.linear(self.act_fn(gate) * up, self.down_proj[expert]) * weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


class SparseMoE(nn.Module):
    """Router + experts; no token is dropped (full capacity)."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 hidden_act: str = "silu", normalize_top_k: bool = False):
        super().__init__()
        self.router = TopKRouter(hidden_size, num_experts, top_k, normalize_top_k)
        self.experts = Experts(num_experts, hidden_size, intermediate_size, hidden_act)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[B, T, H] -> [B, T, H]; the router's logits are recorded by the model (``output_router_logits``)."""
        batch, length, hidden = hidden_states.shape
        x = hidden_states.reshape(-1, hidden)
        _, weights, index = self.router(x)
        return self.experts(x, index, weights).reshape(batch, length, hidden)


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch Transformer auxiliary loss (eqs. 4-6) over all MoE layers, extended to top-k:
    E * sum_e f_e P_e, with f_e the fraction of (token, slot) assignments to expert e and P_e the mean router
    probability of e. Pad tokens (attention_mask == 0) count in neither."""
    logits = torch.cat([layer.float() for layer in router_logits], dim=0)  # [L * N, E]
    probabilities = logits.softmax(dim=-1)
    chosen = F.one_hot(probabilities.topk(top_k, dim=-1).indices, num_experts).sum(1).float()  # [L * N, E]
    if attention_mask is None:
        keep = torch.ones(logits.shape[0], 1, device=logits.device)
    else:
        tokens = router_logits[0].shape[0]
        keep = attention_mask[:, -(tokens // attention_mask.shape[0]) :].reshape(-1, 1).float()
        keep = keep.to(logits.device).repeat(len(router_logits), 1)
    total = keep.sum()
    fraction = (chosen * keep).sum(0) / total
    mean_probability = (probabilities * keep).sum(0) / total
    return num_experts * (fraction * mean_probability).sum()
