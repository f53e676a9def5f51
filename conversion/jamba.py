"""transformers' ``JambaForCausalLM`` <-> hf-memory's Jamba-style hybrid (``hfm_jamba``, Mamba-1 mixers).

Both are the same model (arXiv 2403.19887); only names differ: transformers keeps a layer's mixer under
``self_attn`` (attention) or ``mamba``, hf-memory under ``mixer``. The weights are read and written through
each library's own ``from_pretrained`` / ``save_pretrained``, so on-disk formats (sharding, per-expert MoE
tensors) are handled by the library that owns them.
"""

from __future__ import annotations

import re

import torch
from transformers import JambaConfig, JambaForCausalLM

from hf_memory.conversion import check_source, load_source, transfer
from hf_memory.modeling.jamba.configuration_jamba import JambaHybridConfig
from hf_memory.modeling.jamba.modeling_jamba import JambaHybridForCausalLM

# fields with the same meaning and name in both configs
SHARED_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "initializer_range", "rms_norm_eps", "attention_dropout",
    "num_experts", "num_experts_per_tok", "expert_layer_period", "expert_layer_offset", "attn_layer_period",
    "attn_layer_offset", "mamba_d_state", "mamba_d_conv", "mamba_expand", "mamba_dt_rank", "mamba_conv_bias",
    "mamba_proj_bias", "router_aux_loss_coef", "output_router_logits", "tie_word_embeddings", "pad_token_id",
    "bos_token_id", "eos_token_id", "max_position_embeddings",
)


def config_from_jamba(config: JambaConfig) -> JambaHybridConfig:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return JambaHybridConfig(
        **{field: getattr(config, field) for field in SHARED_FIELDS},
        head_dim=head_dim, mamba_version="mamba1", mamba_inner_norms=True,
    )


def config_to_jamba(config: JambaHybridConfig) -> JambaConfig:
    if config.mamba_version != "mamba1" or not config.mamba_inner_norms:
        raise ValueError("only Mamba-1 mixers with inner norms (mamba_version='mamba1', mamba_inner_norms=True) "
                         "exist in transformers' Jamba")
    by_period = JambaHybridConfig(**{field: getattr(config, field) for field in SHARED_FIELDS})
    if (config.layer_types, config.mlp_layer_types) != (by_period.layer_types, by_period.mlp_layer_types):
        raise ValueError("transformers' Jamba places layers by period/offset only; this config's explicit "
                         "layer_types / mlp_layer_types do not follow them")
    if config.head_dim != config.hidden_size // config.num_attention_heads:
        raise ValueError("transformers' Jamba needs head_dim == hidden_size // num_attention_heads")
    return JambaConfig(**{field: getattr(config, field) for field in SHARED_FIELDS})


def rename_from_jamba(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {re.sub(r"\.(self_attn|mamba)\.", ".mixer.", name): tensor for name, tensor in state_dict.items()}


def rename_to_jamba(state_dict: dict[str, torch.Tensor], config: JambaHybridConfig) -> dict[str, torch.Tensor]:
    renamed = {}
    for name, tensor in state_dict.items():
        match = re.match(r"model\.layers\.(\d+)\.mixer\.", name)
        if match:
            mixer = "self_attn" if config.layer_types[int(match.group(1))] == "full_attention" else "mamba"
            name = name.replace(".mixer.", f".{mixer}.", 1)
        renamed[name] = tensor
    return renamed


def convert_from_jamba(source: str, destination: str, dtype: torch.dtype | None = None) -> JambaHybridForCausalLM:
    """Read a transformers ``JambaForCausalLM`` folder, write an hf-memory (Hub-ready) folder."""
    check_source(source, "from", "jamba")
    jamba = load_source(JambaForCausalLM, source, dtype=dtype)
    model = transfer(jamba, JambaHybridForCausalLM(config_from_jamba(jamba.config)),
                     rename_from_jamba(jamba.state_dict()), "transformers' Jamba -> hf-memory Jamba")
    model.save_pretrained(destination)
    return model


def convert_to_jamba(source: str, destination: str, dtype: torch.dtype | None = None) -> JambaForCausalLM:
    """Read an hf-memory Jamba folder (Mamba-1 mixers), write a transformers ``JambaForCausalLM`` folder."""
    check_source(source, "to", "jamba")
    model = load_source(JambaHybridForCausalLM, source, dtype=dtype)
    jamba = transfer(model, JambaForCausalLM(config_to_jamba(model.config)),
                     rename_to_jamba(model.state_dict(), model.config), "hf-memory Jamba -> transformers' Jamba")
    jamba.save_pretrained(destination)
    return jamba
