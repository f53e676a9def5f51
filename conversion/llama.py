"""transformers' ``LlamaForCausalLM`` -> hf-memory's Infini-attention (``hfm_infini_attention``).

Every Llama weight is copied under the same name (the Infini-attention model keeps Llama's names). The only
new parameters are the per-head memory gates beta of eq. 6. In the first segment the memory is empty, so
A = (1 - sigmoid(beta)) A_dot: the gates start at ``gate_init`` = -15 (sigmoid = 3e-7), which makes the
converted model equal to the Llama within the first segment. Gates that far in the tail learn slowly: give
them their own learning rate when fine-tuning (``model.memory_parameter_groups``).
"""

from __future__ import annotations

import torch
from transformers import LlamaForCausalLM

from hf_memory.conversion import check_source, load_source, refuse_unmapped
from hf_memory.modeling.infini_attention.configuration_infini_attention import InfiniAttentionConfig
from hf_memory.modeling.infini_attention.modeling_infini_attention import InfiniAttentionForCausalLM

GATE_INIT = -15.0


def config_from_llama(config, segment_size: int = 2048, memory_update: str = "delta") -> InfiniAttentionConfig:
    """The Llama's sizes and RoPE (any of transformers' RoPE types, e.g. Llama-3's scaled RoPE), plus segments."""
    if getattr(config, "mlp_bias", False):
        raise ValueError("Llama checkpoints with mlp_bias=True cannot be converted (the MLP here has no bias)")
    return InfiniAttentionConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim,
        hidden_act=config.hidden_act, rms_norm_eps=config.rms_norm_eps, rope_parameters=dict(config.rope_parameters),
        attention_bias=config.attention_bias, max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings, pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, initializer_range=config.initializer_range,
        segment_size=segment_size, memory_update=memory_update, memory_gate_init=GATE_INIT,
    )


def convert_from_llama(source: str, destination: str, dtype: torch.dtype | None = None,
                       segment_size: int = 2048, memory_update: str = "delta") -> InfiniAttentionForCausalLM:
    """Read a transformers ``LlamaForCausalLM`` folder, write an hf-memory Infini-attention (Hub-ready) folder."""
    check_source(source, "from", "llama")
    llama = load_source(LlamaForCausalLM, source, dtype=dtype)
    model = InfiniAttentionForCausalLM(config_from_llama(llama.config, segment_size, memory_update)).to(llama.dtype)
    missing, unexpected = model.load_state_dict(llama.state_dict(), strict=False)
    gates = {name for name in missing if name.endswith("memory_gate")}
    refuse_unmapped("Llama -> Infini-attention", set(missing) - gates, unexpected)
    model.generation_config = llama.generation_config
    model.save_pretrained(destination)
    return model
