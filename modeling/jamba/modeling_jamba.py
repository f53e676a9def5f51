"""Jamba-style interleaved hybrid (Lieber et al., "Jamba: A Hybrid Transformer-Mamba Language Model",
arXiv 2403.19887).

Each block is ``x += Mixer(RMSNorm(x)); x += FFN(RMSNorm(x))`` (section 2, figure 1). The mixer is either
attention (GQA, no positional encoding: the Mamba layers carry position) or a Mamba layer; the FFN is either a
SwiGLU MLP or a mixture of experts. Memory is split between a bounded recurrent state in every Mamba layer and
an ordinary KV cache in the few attention layers (1 in 8 in the paper, so the KV cache is ~8x smaller).
"""

from __future__ import annotations

from functools import partial

from torch import nn
from transformers import initialization as init
from transformers.utils.output_capturing import OutputRecorder

from hf_memory.layers.attention import Attention
from hf_memory.layers.mamba import Mamba2Mixer, MambaMixer
from hf_memory.layers.moe import Experts, SparseMoE, TopKRouter
from hf_memory.modeling_utils import (
    HFMemoryForCausalLM,
    HFMemoryModel,
    HFMemoryPreTrainedModel,
    MemoryDecoderLayer,
    dense_ffn,
)

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


def build_moe(config: JambaHybridConfig, layer_idx: int) -> nn.Module:
    """Jamba's MoE: ``num_experts`` SwiGLU experts, softmax router, top-``num_experts_per_tok`` not renormalised."""
    return SparseMoE(config.hidden_size, config.intermediate_size, config.num_experts, config.num_experts_per_tok,
                     config.hidden_act)


class JambaHybridDecoderLayer(MemoryDecoderLayer):
    """x += Mixer(RMSNorm(x)); x += FFN(RMSNorm(x)), with transformers' Jamba parameter names."""

    names = ("input_layernorm", "mixer", "pre_ff_layernorm", "feed_forward")


class JambaHybridPreTrainedModel(HFMemoryPreTrainedModel):
    config: JambaHybridConfig
    config_class = JambaHybridConfig
    mixers = {"full_attention": partial(Attention, use_rope=False), "linear_attention": build_mamba_mixer}
    ffns = {"dense": dense_ffn, "sparse": build_moe}
    decoder_layer = JambaHybridDecoderLayer
    final_norm_name = "final_layernorm"
    rope_layer_types = frozenset()
    _no_split_modules = ["JambaHybridDecoderLayer"]
    _can_record_outputs = {
        **HFMemoryPreTrainedModel._can_record_outputs,
        "router_logits": OutputRecorder(TopKRouter, index=0),
    }

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


class JambaHybridModel(JambaHybridPreTrainedModel, HFMemoryModel):
    """Embeddings, the interleaved stack, final RMSNorm."""


class JambaHybridForCausalLM(JambaHybridPreTrainedModel, HFMemoryForCausalLM):
    """The hybrid with a language-modelling head and the MoE load-balancing loss (``output_router_logits``)."""

    base_model_class = JambaHybridModel


AUTO_MAP = {"AutoModel": JambaHybridModel, "AutoModelForCausalLM": JambaHybridForCausalLM}

__all__ = ["JambaHybridModel", "JambaHybridForCausalLM", "JambaHybridPreTrainedModel"]
