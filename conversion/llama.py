"""transformers' ``LlamaForCausalLM`` -> an hf-memory model that keeps every Llama weight under its Llama name:
Infini-attention (``hfm_infini_attention``, the default) or the Recurrent Memory Transformer (``hfm_rmt``).

Infini-attention's only new parameters are the per-head memory gates beta of eq. 6. In the first segment the
memory is empty, so A = (1 - sigmoid(beta)) A_dot: the gates start at ``gate_init`` = -15 (sigmoid = 3e-7),
which makes the converted model equal to the Llama within the first segment. Gates that far in the tail learn
slowly: give them their own learning rate when fine-tuning (``model.memory_parameter_groups``).

RMT's only new parameter is the first memory M_0 (ARMT's: the memory embeddings M and the associative blocks),
drawn with the spread of the Llama's token embeddings (as the published RMT code does). With
``use_memory=False`` every segment is read alone by the unchanged Llama, which the converted model then equals
within one segment. ARMT's value projections start at zero (as in the authors' code): nothing is written to
the associative memory until fine-tuning, so the converted ARMT equals the Llama on every segment alone.
"""

from __future__ import annotations

import torch
from transformers import LlamaForCausalLM

from hf_memory.conversion import check_source, load_source, refuse_unmapped
from hf_memory.modeling.infini_attention.configuration_infini_attention import InfiniAttentionConfig
from hf_memory.modeling.infini_attention.modeling_infini_attention import InfiniAttentionForCausalLM
from hf_memory.modeling.rmt.configuration_rmt import RMTConfig
from hf_memory.modeling.rmt.modeling_rmt import RMTForCausalLM

GATE_INIT = -15.0
ARCHITECTURES = ("infini_attention", "rmt")


def llama_fields(config) -> dict:
    """The Llama's sizes and RoPE (any of transformers' RoPE types, e.g. Llama-3's scaled RoPE)."""
    if getattr(config, "mlp_bias", False):
        raise ValueError("Llama checkpoints with mlp_bias=True cannot be converted (the MLP here has no bias)")
    return dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim,
        hidden_act=config.hidden_act, rms_norm_eps=config.rms_norm_eps, rope_parameters=dict(config.rope_parameters),
        attention_bias=config.attention_bias, max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings, pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, initializer_range=config.initializer_range,
    )


def config_from_llama(config, segment_size: int = 2048, memory_update: str = "delta") -> InfiniAttentionConfig:
    """Infini-attention with the Llama's sizes, segments of ``segment_size``, closed memory gates."""
    return InfiniAttentionConfig(**llama_fields(config), segment_size=segment_size, memory_update=memory_update,
                                 memory_gate_init=GATE_INIT)


def rmt_config_from_llama(config, segment_size: int = 2048, num_memory_tokens: int = 16, use_memory: bool = True,
                          memory_type: str = "rmt") -> RMTConfig:
    """RMT with the Llama's sizes; its positions must cover a segment with read and write memory."""
    fields = llama_fields(config)
    fields["max_position_embeddings"] = max(fields["max_position_embeddings"], 2 * num_memory_tokens + segment_size)
    return RMTConfig(**fields, segment_size=segment_size, num_memory_tokens=num_memory_tokens, use_memory=use_memory,
                     memory_type=memory_type)


def convert_from_llama(source: str, destination: str, dtype: torch.dtype | None = None,
                       architecture: str = "infini_attention", segment_size: int = 2048,
                       memory_update: str = "delta", num_memory_tokens: int = 16, use_memory: bool = True,
                       memory_type: str = "rmt"):
    """Read a transformers ``LlamaForCausalLM`` folder, write an hf-memory (Hub-ready) folder of ``architecture``
    (``infini_attention``: takes ``memory_update``; ``rmt``: takes ``num_memory_tokens``, ``use_memory``,
    ``memory_type`` rmt or armt)."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"--set architecture={architecture!r}: a Llama converts to one of {list(ARCHITECTURES)}")
    check_source(source, "from", "llama")
    llama = load_source(LlamaForCausalLM, source, dtype=dtype)
    if architecture == "rmt":
        model = RMTForCausalLM(rmt_config_from_llama(llama.config, segment_size, num_memory_tokens, use_memory,
                                                     memory_type))
        new = {name for name, _ in model.named_parameters() if not name.startswith(("model.layers.", "model.embed",
                                                                                     "model.norm", "lm_head"))}
    else:
        model = InfiniAttentionForCausalLM(config_from_llama(llama.config, segment_size, memory_update))
        new = {name for name, _ in model.named_parameters() if name.endswith("memory_gate")}
    model = model.to(llama.dtype)
    missing, unexpected = model.load_state_dict(llama.state_dict(), strict=False)
    refuse_unmapped(f"Llama -> {architecture}", set(missing) - new, unexpected)
    if architecture == "rmt" and use_memory:
        with torch.no_grad():
            embeddings = llama.get_input_embeddings().weight
            model.model.memory_tokens.normal_(0.0, embeddings.float().std().item())
            for block in model.model.associative or ():
                block.v_proj.weight.zero_()
    model.generation_config = llama.generation_config
    model.save_pretrained(destination)
    return model
