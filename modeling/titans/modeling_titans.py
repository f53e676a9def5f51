"""Titans (Behrouz, Zhong & Mirrokni, "Titans: Learning to Memorize at Test Time", arXiv 2501.00663).

Built so far: the neural long-term memory as a token mixer (section 3.1 and 4.4). The MAC / MAG / MAL blocks,
the cache and the model follow (issue 11).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hf_memory.layers.norms import GatedRMSNorm
from hf_memory.modeling_utils import padding_mask
from hf_memory.ops.neural_memory import neural_memory_chunked
from hf_memory.ops.short_conv import conv_projections
from hf_memory.segments import from_segments, real_first, to_segments

from .configuration_titans import TitansConfig

# starting gates (sigmoid of the bias): step theta / max_lr 0.12, momentum eta 0.9, forgetting alpha 0.01
GATE_BIAS_INIT = {"step": -2.0, "momentum": 2.2, "forget": -4.6}


class NeuralMemory(nn.Module):
    """The long-term memory module (LMM) of one layer, eqs. 11-15 and section 4.4.

        q, k, v = SiLU(DepthwiseConv(W_{q,k,v} x)), q and k L2-normalised per head        (eq. 11, section 4.4)
        theta_t = max_lr * sigmoid(w_theta x_t + b), eta_t = sigmoid(...), alpha_t = sigmoid(...)  (per head)
        y_t = M_{c(t)}(q_t), M learned on (k_t, v_t) by ``neural_memory_chunked``            (eqs. 12-15)
        out = W_o (RMSNorm(y) * SiLU(W_g x))                                                   (section 4.4)

    M_0 is learned per head. Chunks are counted per row over its real tokens (a left-padded row reads and
    writes its memory as the same row unpadded; pads write nothing)."""

    def __init__(self, config: TitansConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.head_dim = config.memory_num_heads, config.memory_head_dim
        self.chunk_size, self.conv_size = config.memory_chunk_size, config.memory_conv_kernel
        self.max_lr, self.max_grad_norm = config.memory_max_lr, config.memory_max_grad_norm
        hidden, inner = config.hidden_size, self.num_heads * self.head_dim
        self.q_proj = nn.Linear(hidden, inner, bias=False)
        self.k_proj = nn.Linear(hidden, inner, bias=False)
        self.v_proj = nn.Linear(hidden, inner, bias=False)
        self.q_conv1d, self.k_conv1d, self.v_conv1d = (nn.Conv1d(inner, inner, self.conv_size, groups=inner,
                                                                 bias=False) for _ in range(3))
        self.step_proj = nn.Linear(hidden, self.num_heads)  # theta
        self.momentum_proj = nn.Linear(hidden, self.num_heads)  # eta
        self.forget_proj = nn.Linear(hidden, self.num_heads)  # alpha
        width = config.memory_expansion * self.head_dim
        sizes = [self.head_dim] + [width] * (config.memory_depth - 1) + [self.head_dim]
        self.memory_init = nn.ParameterList(  # M_0: one MLP per head
            nn.Parameter(torch.randn(self.num_heads, a, b) / math.sqrt(a)) for a, b in zip(sizes, sizes[1:]))
        self.g_proj = nn.Linear(hidden, inner, bias=False)
        self.o_norm = GatedRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.o_proj = nn.Linear(inner, hidden, bias=False)
        with torch.no_grad():
            for name, bias in GATE_BIAS_INIT.items():
                getattr(self, f"{name}_proj").bias.fill_(bias)

    def gates(self, x: torch.Tensor, keep: torch.Tensor | None):
        """theta, eta, alpha [B, H, T] in fp32; pads: no step, no forgetting, momentum kept."""
        theta = self.max_lr * torch.sigmoid(self.step_proj(x).float())
        eta = torch.sigmoid(self.momentum_proj(x).float())
        alpha = torch.sigmoid(self.forget_proj(x).float())
        if keep is not None:
            real = keep[..., None]
            theta, alpha, eta = theta * real, alpha * real, torch.where(real, eta, 1.0)
        return (g.transpose(1, 2) for g in (theta, eta, alpha))

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        batch, length, _ = hidden_states.shape
        mask = padding_mask(attention_mask, length)
        keep = None if mask is None else mask.bool()
        x = hidden_states if keep is None else hidden_states * keep[..., None].to(hidden_states.dtype)
        _, (q, k, v) = conv_projections(x, (self.q_proj, self.k_proj, self.v_proj),
                                        (self.q_conv1d, self.k_conv1d, self.v_conv1d))
        q, k, v = (t.reshape(batch, length, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        q, k = F.normalize(q.float(), dim=-1), F.normalize(k.float(), dim=-1)
        theta, eta, alpha = self.gates(x, keep)

        order = real_first(torch.ones(batch, length, dtype=torch.bool, device=x.device) if keep is None else keep)

        def in_chunks(t):  # [B, H, T, d] or [B, H, T] -> each row's real tokens first, zero-filled to whole chunks
            if t.dim() == 3:
                return to_segments(t[..., None], order, self.chunk_size)[..., 0]
            return to_segments(t, order, self.chunk_size)

        # after a row's tokens: no step, no forgetting, momentum kept (eta = 1 - the zero fill)
        theta, eta, alpha = in_chunks(theta), 1 - in_chunks(1 - eta), in_chunks(alpha)
        weights = [w[None].expand(batch, *w.shape) for w in self.memory_init]
        y, _, _ = neural_memory_chunked(in_chunks(q), in_chunks(k), in_chunks(v.float()), theta, eta, alpha, weights,
                                        chunk_size=self.chunk_size, max_grad_norm=self.max_grad_norm)
        y = from_segments(y, order).transpose(1, 2)  # [B, T, H, d]
        gate = self.g_proj(x).reshape(batch, length, self.num_heads, self.head_dim)
        out = self.o_norm(y.to(x.dtype), gate).reshape(batch, length, -1)
        return self.o_proj(out), None


__all__ = ["NeuralMemory"]
