"""Jamba-style interleaved hybrid (Lieber et al., "Jamba: A Hybrid Transformer-Mamba Language Model",
arXiv 2403.19887).

Each block is ``x += Mixer(RMSNorm(x)); x += FFN(RMSNorm(x))`` (section 2, figure 1). The mixer is either
attention (GQA, no positional encoding: the Mamba layers carry position) or a Mamba layer; the FFN is either a
SwiGLU MLP or a mixture of experts. Memory is split between a bounded recurrent state in every Mamba layer and
an ordinary KV cache in the few attention layers (1 in 8 in the paper, so the KV cache is ~8x smaller).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast

from hf_memory.layers.attention import Attention
from hf_memory.layers.mamba import Mamba2Mixer, MambaMixer
from hf_memory.layers.mlp import GatedMLP
from hf_memory.layers.moe import Experts, SparseMoE, TopKRouter, load_balancing_loss
from hf_memory.layers.norms import RMSNorm
from hf_memory.modeling_utils import HFMemoryPreTrainedModel

from .configuration_jamba import JambaHybridConfig


def build_mamba_mixer(config: JambaHybridConfig, layer_idx: int) -> nn.Module:
    """The Mamba layer of the config: Mamba-1 with inner norms (Jamba) or Mamba-2 / SSD (Bamba)."""
    if config.mamba_version == "mamba2":
        return Mamba2Mixer(
            hidden_size=config.hidden_size, intermediate_size=config.mamba_intermediate_size,
            state_size=config.mamba_d_state, conv_kernel=config.mamba_d_conv, head_dim=config.mamba_head_dim,
            n_groups=config.mamba_n_groups, chunk_size=config.mamba_chunk_size, layer_idx=layer_idx,
            conv_bias=config.mamba_conv_bias, proj_bias=config.mamba_proj_bias, rms_norm_eps=config.rms_norm_eps,
            use_fused_kernels=config.use_fused_kernels,
        )
    return MambaMixer(
        hidden_size=config.hidden_size, intermediate_size=config.mamba_intermediate_size,
        state_size=config.mamba_d_state, conv_kernel=config.mamba_d_conv, time_step_rank=config.mamba_dt_rank,
        layer_idx=layer_idx, conv_bias=config.mamba_conv_bias, proj_bias=config.mamba_proj_bias,
        inner_norms=config.mamba_inner_norms, rms_norm_eps=config.rms_norm_eps,
        use_fused_kernels=config.use_fused_kernels,
    )


class JambaHybridDecoderLayer(GradientCheckpointingLayer):
    """x += Mixer(RMSNorm(x)); x += FFN(RMSNorm(x)), mixer and FFN chosen by the config's layer lists."""

    def __init__(self, config: JambaHybridConfig, layer_idx: int):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if self.layer_type == "full_attention":
            self.mixer = Attention(config, layer_idx, use_rope=False)
        else:
            self.mixer = build_mamba_mixer(config, layer_idx)
        self.pre_ff_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.is_sparse = config.mlp_layer_types[layer_idx] == "sparse"
        if self.is_sparse:
            self.feed_forward = SparseMoE(config.hidden_size, config.intermediate_size, config.num_experts,
                                          config.num_experts_per_tok, config.hidden_act)
        else:
            self.feed_forward = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask=None, cache: Cache | None = None, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        mixed = self.input_layernorm(hidden_states)
        if self.layer_type == "full_attention":
            mixed = self.mixer(mixed, attention_mask, cache=cache, **kwargs)
        else:
            mixed = self.mixer(mixed, attention_mask=attention_mask, cache=cache)
        hidden_states = hidden_states + mixed
        if self.is_sparse:
            ffn_out, router_logits = self.feed_forward(self.pre_ff_layernorm(hidden_states))
        else:
            ffn_out, router_logits = self.feed_forward(self.pre_ff_layernorm(hidden_states)), None
        return hidden_states + ffn_out, router_logits


class JambaHybridPreTrainedModel(HFMemoryPreTrainedModel):
    config: JambaHybridConfig
    config_class = JambaHybridConfig
    model_card = "jamba"
    _no_split_modules = ["JambaHybridDecoderLayer"]

    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, (MambaMixer, Mamba2Mixer)):
            for name, value in module.ssm_init_values().items():
                init.copy_(module.get_parameter(name), value)
        elif isinstance(module, Experts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, TopKRouter):
            init.normal_(module.weight, mean=0.0, std=std)


class JambaHybridModel(JambaHybridPreTrainedModel):
    """Embeddings, the interleaved stack, final RMSNorm."""

    def __init__(self, config: JambaHybridConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(JambaHybridDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> MoeModelOutputWithPast:
        inputs_embeds, cache = self._embed_and_cache(input_ids, inputs_embeds, attention_mask, cache, use_cache)

        masks = {"linear_attention": attention_mask}
        if "full_attention" in self.config.layer_types:
            masks["full_attention"] = create_causal_mask(
                config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache,
                position_ids=position_ids,
            )

        hidden_states = inputs_embeds
        all_hidden_states = [] if output_hidden_states else None
        all_router_logits = []
        for layer in self.layers:
            if all_hidden_states is not None:
                all_hidden_states.append(hidden_states)
            hidden_states, router_logits = layer(hidden_states, attention_mask=masks[layer.layer_type], cache=cache)
            if router_logits is not None:
                all_router_logits.append(router_logits)
        hidden_states = self.final_layernorm(hidden_states)
        if all_hidden_states is not None:
            all_hidden_states.append(hidden_states)
        return MoeModelOutputWithPast(
            last_hidden_state=hidden_states,
            cache=cache,
            hidden_states=tuple(all_hidden_states) if all_hidden_states is not None else None,
            router_logits=tuple(all_router_logits) if output_router_logits else None,
        )


class JambaHybridForCausalLM(JambaHybridPreTrainedModel, GenerationMixin):
    """The hybrid with a language-modelling head and the MoE load-balancing loss."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: JambaHybridConfig):
        super().__init__(config)
        self.model = JambaHybridModel(config)
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
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> MoeCausalLMOutputWithPast:
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            inputs_embeds=inputs_embeds, use_cache=use_cache, output_hidden_states=output_hidden_states,
            output_router_logits=output_router_logits,
        )
        logits, loss = self._logits_and_loss(outputs.last_hidden_state, labels, logits_to_keep, **kwargs)
        aux_loss = None
        if output_router_logits and outputs.router_logits:
            aux_loss = load_balancing_loss(outputs.router_logits, self.config.num_experts,
                                           self.config.num_experts_per_tok, attention_mask)
            if loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss
        return MoeCausalLMOutputWithPast(
            loss=loss, aux_loss=aux_loss, logits=logits, cache=outputs.cache,
            hidden_states=outputs.hidden_states, router_logits=outputs.router_logits,
        )


AUTO_MAP = {"AutoModel": JambaHybridModel, "AutoModelForCausalLM": JambaHybridForCausalLM}

__all__ = ["JambaHybridModel", "JambaHybridForCausalLM", "JambaHybridPreTrainedModel"]
