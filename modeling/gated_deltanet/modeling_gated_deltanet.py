"""Gated DeltaNet (Yang, Kautz & Hatamizadeh, "Gated Delta Networks: Improving Mamba2 with Delta Rule",
arXiv 2412.06464, ICLR 2025), pure and hybrid (H1: alternating with sliding-window attention).

A Gated DeltaNet layer keeps, per value head, a matrix memory S (d_v x d_k) updated by the gated delta rule

    S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T,        o_t = S_t q_t          (eq. 10)

one step of online gradient descent on 1/2 ||S k_t - v_t||^2 with learning rate beta_t and weight decay
alpha_t. The math lives in ``hf_memory.ops.gated_delta``; this file is the layer and the language model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from hf_memory.cache import recurrent_state, store_recurrent_state
from hf_memory.layers.attention import Attention
from hf_memory.layers.norms import GatedRMSNorm
from hf_memory.modeling_utils import (
    HFMemoryForCausalLM,
    HFMemoryModel,
    HFMemoryPreTrainedModel,
    MemoryDecoderLayer,
    inverse_softplus_dt,
    padding_mask,
)
from hf_memory.ops.gated_delta import gated_delta_rule
from hf_memory.ops.short_conv import conv_projections

from .configuration_gated_deltanet import GatedDeltaNetConfig


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """q / ||q||, k / ||k|| per head (section 3.3), in fp32."""
    return (x.float() * torch.rsqrt(x.float().pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


class GatedDeltaNetMixer(nn.Module):
    """The Gated DeltaNet token mixer (section 3.3, figure 1).

    q, k, v = SiLU(ShortConv(W x)); q, k L2-normalised; beta_t = sigma(W_beta x_t) (x2 with negative
    eigenvalues); log alpha_t = -exp(A_log) * softplus(W_alpha x_t + dt_bias) (Mamba-2 parametrisation);
    o_t from eq. 10; output = W_o (RMSNorm(o_t) * SiLU(W_g x_t)) per head.
    Pads are neutralised: alpha = 1 and beta = 0 there, and their inputs are zero, so a left-padded row has
    the state of its unpadded sequence.
    """

    def __init__(self, config: GatedDeltaNetConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_v_heads = config.linear_num_key_heads, config.linear_num_value_heads
        self.head_k_dim, self.head_v_dim = config.linear_key_head_dim, config.linear_value_head_dim
        self.key_dim = self.num_heads * self.head_k_dim
        self.value_dim = self.num_v_heads * self.head_v_dim
        self.conv_size = config.linear_conv_kernel_dim
        self.chunk_size = config.linear_chunk_size
        self.allow_neg_eigval = config.allow_neg_eigval
        self.use_fused_kernels = config.use_fused_kernels
        hidden = config.hidden_size

        self.q_proj = nn.Linear(hidden, self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.key_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.value_dim, bias=False)
        self.q_conv1d = self._short_conv(self.key_dim)
        self.k_conv1d = self._short_conv(self.key_dim)
        self.v_conv1d = self._short_conv(self.value_dim)
        self.b_proj = nn.Linear(hidden, self.num_v_heads, bias=False)  # W_beta
        self.a_proj = nn.Linear(hidden, self.num_v_heads, bias=False)  # W_alpha
        self.A_log = nn.Parameter(torch.zeros(self.num_v_heads))
        self.dt_bias = nn.Parameter(torch.zeros(self.num_v_heads))
        self.g_proj = nn.Linear(hidden, self.value_dim, bias=False)  # output gate W_g
        self.o_norm = GatedRMSNorm(self.head_v_dim, eps=config.rms_norm_eps)
        self.o_proj = nn.Linear(self.value_dim, hidden, bias=False)

    def _short_conv(self, channels: int) -> nn.Conv1d:
        return nn.Conv1d(channels, channels, self.conv_size, groups=channels, bias=False)

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log alpha, beta), each [B, T, H_v], in fp32."""
        beta = torch.sigmoid(self.b_proj(x).float())
        if self.allow_neg_eigval:
            beta = 2.0 * beta
        log_alpha = -self.A_log.float().exp() * F.softplus(self.a_proj(x).float() + self.dt_bias.float())
        return log_alpha, beta

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, cache=None, **kwargs):
        batch, length, _ = hidden_states.shape
        mask = padding_mask(attention_mask, length)
        x = hidden_states if mask is None else hidden_states * mask[..., None].to(hidden_states.dtype)
        conv_history, state = recurrent_state(cache, self.layer_idx)

        qkv, (q, k, v) = conv_projections(x, (self.q_proj, self.k_proj, self.v_proj),
                                          (self.q_conv1d, self.k_conv1d, self.v_conv1d), conv_history,
                                          self.use_fused_kernels)
        q, k = l2_normalize(torch.stack([q, k], dim=2).reshape(batch, length, 2 * self.num_heads, self.head_k_dim)
                            ).chunk(2, dim=2)  # q and k in one call
        v = v.reshape(batch, length, self.num_v_heads, self.head_v_dim)

        log_alpha, beta = self.gates(x)
        if mask is not None:  # alpha = 1, beta = 0 at pads
            log_alpha = log_alpha * mask[..., None]
            beta = beta * mask[..., None]

        o, state = gated_delta_rule(q, k, v, log_alpha, beta, state, chunk_size=self.chunk_size,
                                    use_fused_kernels=self.use_fused_kernels)
        store_recurrent_state(cache, self.layer_idx, qkv, state, self.conv_size)

        gate = self.g_proj(x).reshape(batch, length, self.num_v_heads, self.head_v_dim)
        o = self.o_norm(o.to(x.dtype), gate).reshape(batch, length, self.value_dim)
        return self.o_proj(o), None


class GatedDeltaNetDecoderLayer(MemoryDecoderLayer):
    """Pre-norm block: x += Mixer(RMSNorm(x)); x += SwiGLU(RMSNorm(x)), the mixer following ``layer_types``."""

    names = ("mixer_norm", "mixer", "mlp_norm", "mlp")


class GatedDeltaNetPreTrainedModel(HFMemoryPreTrainedModel):
    config: GatedDeltaNetConfig
    config_class = GatedDeltaNetConfig
    mixers = {"linear_attention": GatedDeltaNetMixer, "sliding_attention": Attention, "full_attention": Attention}
    decoder_layer = GatedDeltaNetDecoderLayer
    _no_split_modules = ["GatedDeltaNetDecoderLayer"]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, GatedDeltaNetMixer):
            # Mamba-2 initialisation: A ~ U[1, 16]; dt ~ logU[1e-3, 1e-1], dt_bias = softplus^-1(dt)
            init.copy_(module.A_log, torch.empty_like(module.A_log).uniform_(1, 16).log())
            init.copy_(module.dt_bias, inverse_softplus_dt(module.num_v_heads, dt_min=1e-3, dt_max=0.1))


class GatedDeltaNetModel(GatedDeltaNetPreTrainedModel, HFMemoryModel):
    """Embeddings, the stack of ``layer_types`` blocks, final RMSNorm."""


class GatedDeltaNetForCausalLM(GatedDeltaNetPreTrainedModel, HFMemoryForCausalLM):
    """Gated DeltaNet with a language-modelling head."""

    base_model_class = GatedDeltaNetModel


AUTO_MAP = {"AutoModel": GatedDeltaNetModel, "AutoModelForCausalLM": GatedDeltaNetForCausalLM}

__all__ = ["GatedDeltaNetMixer", "GatedDeltaNetModel", "GatedDeltaNetForCausalLM", "GatedDeltaNetPreTrainedModel"]
