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
from transformers.cache_utils import Cache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from hf_memory.cache import recurrent_state, store_recurrent_state
from hf_memory.layers.attention import Attention, RotaryEmbedding
from hf_memory.layers.mlp import GatedMLP
from hf_memory.layers.norms import GatedRMSNorm, RMSNorm
from hf_memory.modeling_utils import HFMemoryPreTrainedModel, inverse_softplus_dt, padding_mask, positions_from_mask
from hf_memory.ops.gated_delta import gated_delta_rule
from hf_memory.ops.short_conv import short_conv

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
        self.num_heads, self.num_v_heads = config.num_heads, config.num_v_heads
        self.head_k_dim, self.head_v_dim = config.head_dim, config.value_head_dim
        self.key_dim = self.num_heads * self.head_k_dim
        self.value_dim = self.num_v_heads * self.head_v_dim
        self.conv_size = config.conv_size
        self.chunk_size = config.chunk_size
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

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, cache: Cache | None = None
    ) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        mask = padding_mask(attention_mask, length)
        x = hidden_states if mask is None else hidden_states * mask[..., None].to(hidden_states.dtype)
        conv_history, state = recurrent_state(cache, self.layer_idx)

        qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1).transpose(1, 2)  # [B, D, T]
        conv_weight = torch.cat([self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight])[:, 0]
        mixed = short_conv(qkv, conv_weight, None, "silu", conv_history, self.use_fused_kernels).transpose(1, 2)
        q, k, v = mixed.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = l2_normalize(q.reshape(batch, length, self.num_heads, self.head_k_dim))
        k = l2_normalize(k.reshape(batch, length, self.num_heads, self.head_k_dim))
        v = v.reshape(batch, length, self.num_v_heads, self.head_v_dim)

        log_alpha, beta = self.gates(x)
        if mask is not None:  # alpha = 1, beta = 0 at pads
            log_alpha = log_alpha * mask[..., None]
            beta = beta * mask[..., None]

        o, state = gated_delta_rule(q, k, v, log_alpha, beta, state, self.chunk_size, self.use_fused_kernels)
        store_recurrent_state(cache, self.layer_idx, qkv, state, self.conv_size)

        gate = self.g_proj(x).reshape(batch, length, self.num_v_heads, self.head_v_dim)
        o = self.o_norm(o.to(x.dtype), gate).reshape(batch, length, self.value_dim)
        return self.o_proj(o)


class GatedDeltaNetDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: x += Mixer(RMSNorm(x)); x += SwiGLU(RMSNorm(x)). The mixer follows ``layer_types``."""

    def __init__(self, config: GatedDeltaNetConfig, layer_idx: int):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        self.mixer_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if self.layer_type == "linear_attention":
            self.mixer = GatedDeltaNetMixer(config, layer_idx)
        else:
            window = config.sliding_window if self.layer_type == "sliding_attention" else None
            self.mixer = Attention(config, layer_idx, sliding_window=window)
        self.mlp_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        mixed = self.mixer_norm(hidden_states)
        if self.layer_type == "linear_attention":
            mixed = self.mixer(mixed, attention_mask=attention_mask, cache=cache)
        else:
            mixed = self.mixer(mixed, attention_mask, position_embeddings, cache=cache, **kwargs)
        hidden_states = hidden_states + mixed
        return hidden_states + self.mlp(self.mlp_norm(hidden_states))


class GatedDeltaNetPreTrainedModel(HFMemoryPreTrainedModel):
    config: GatedDeltaNetConfig
    config_class = GatedDeltaNetConfig
    model_card = "gated_deltanet"
    _no_split_modules = ["GatedDeltaNetDecoderLayer"]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, GatedDeltaNetMixer):
            # Mamba-2 initialisation: A ~ U[1, 16]; dt ~ logU[1e-3, 1e-1], dt_bias = softplus^-1(dt)
            init.copy_(module.A_log, torch.empty_like(module.A_log).uniform_(1, 16).log())
            init.copy_(module.dt_bias, inverse_softplus_dt(module.num_v_heads, dt_min=1e-3, dt_max=0.1))


class GatedDeltaNetModel(GatedDeltaNetPreTrainedModel):
    """Embeddings, the stack of ``layer_types`` blocks, final RMSNorm."""

    def __init__(self, config: GatedDeltaNetConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(GatedDeltaNetDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.has_attention = any(t != "linear_attention" for t in config.layer_types)
        self.rotary_emb = RotaryEmbedding(config.attention_head_dim, config.rope_theta) if self.has_attention else None
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def _masks(self, inputs_embeds, attention_mask, cache, position_ids) -> dict:
        masks = {"linear_attention": attention_mask}
        if self.has_attention:
            kwargs = dict(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                          cache=cache, position_ids=position_ids)
            if "full_attention" in self.config.layer_types:
                masks["full_attention"] = create_causal_mask(**kwargs)
            if "sliding_attention" in self.config.layer_types:
                masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
        return masks

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        inputs_embeds, cache = self._embed_and_cache(input_ids, inputs_embeds, attention_mask, cache, use_cache)

        position_embeddings = None
        if self.has_attention:
            if position_ids is None:
                past = cache.get_seq_length() if cache is not None else 0
                position_ids = positions_from_mask(attention_mask, inputs_embeds.shape[1], past, inputs_embeds.device)
            position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        masks = self._masks(inputs_embeds, attention_mask, cache, position_ids)

        hidden_states = inputs_embeds
        all_hidden_states = [] if output_hidden_states else None
        for layer in self.layers:
            if all_hidden_states is not None:
                all_hidden_states.append(hidden_states)
            hidden_states = layer(
                hidden_states,
                attention_mask=masks[layer.layer_type],
                position_embeddings=position_embeddings,
                cache=cache,
            )
        hidden_states = self.norm(hidden_states)
        if all_hidden_states is not None:
            all_hidden_states.append(hidden_states)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            cache=cache,
            hidden_states=tuple(all_hidden_states) if all_hidden_states is not None else None,
        )


class GatedDeltaNetForCausalLM(GatedDeltaNetPreTrainedModel, GenerationMixin):
    """Gated DeltaNet with a language-modelling head."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: GatedDeltaNetConfig):
        super().__init__(config)
        self.model = GatedDeltaNetModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        logits, loss = self._logits_and_loss(outputs.last_hidden_state, labels, logits_to_keep, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states
        )


AUTO_MAP = {"AutoModel": GatedDeltaNetModel, "AutoModelForCausalLM": GatedDeltaNetForCausalLM}

__all__ = ["GatedDeltaNetMixer", "GatedDeltaNetModel", "GatedDeltaNetForCausalLM", "GatedDeltaNetPreTrainedModel"]
