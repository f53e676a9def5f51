"""transformers' ``LlamaForCausalLM`` -> an hf-memory model that keeps every Llama weight under its Llama name:
Infini-attention (``hfm_infini_attention``, the default), the Recurrent Memory Transformer (``hfm_rmt``) or
Mixture-of-Recursions (``hfm_mor``).

Infini-attention's only new parameters are the per-head memory gates beta of eq. 6. In the first segment the
memory is empty, so A = (1 - sigmoid(beta)) A_dot: the gates start at ``gate_init`` = -15 (sigmoid = 3e-7),
which makes the converted model equal to the Llama within the first segment. Gates that far in the tail learn
slowly: give them their own learning rate when fine-tuning (``model.memory_parameter_groups``).

RMT's only new parameter is the first memory M_0 (ARMT's: the memory embeddings M and the associative blocks),
drawn with the spread of the Llama's token embeddings (as the published RMT code does). With
``use_memory=False`` every segment is read alone by the unchanged Llama, which the converted model then equals
within one segment. ARMT's value projections start at zero (as in the authors' code): nothing is written to
the associative memory until fine-tuning, so the converted ARMT equals the Llama on every segment alone.

Mixture-of-Recursions keeps the Llama's number of applied layers L and ties them into ``num_recursions``
applications of a shared block (``sharing``, Middle-Cycle by default: layers 0 and L-1 stay unique), initialised
as the Relaxed Recursive Transformers (Bae et al., arXiv 2410.20672, section 3.2) do: ``"stepwise"`` copies
source layers round(linspace(first, last, K)) of the span the block replaces, ``"average"`` averages the source
layers each shared layer stands for. The routers are new (N(0, initializer_range)). With one recursion, every
capacity 1.0 and ``router_gating="none"`` (or ``routing="none"``) the converted model is the Llama.
"""

from __future__ import annotations

import torch
from transformers import LlamaForCausalLM

from hf_memory.conversion import check_source, load_source, refuse_unmapped
from hf_memory.modeling.infini_attention.configuration_infini_attention import InfiniAttentionConfig
from hf_memory.modeling.infini_attention.modeling_infini_attention import InfiniAttentionForCausalLM
from hf_memory.modeling.mor.configuration_mor import MoRConfig
from hf_memory.modeling.mor.modeling_mor import MoRForCausalLM
from hf_memory.modeling.rmt.configuration_rmt import RMTConfig
from hf_memory.modeling.rmt.modeling_rmt import RMTForCausalLM

GATE_INIT = -15.0
ARCHITECTURES = ("infini_attention", "rmt", "mor")
INITIALIZATIONS = ("stepwise", "average")


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


def mor_config_from_llama(config, num_recursions: int = 3, **mor_fields) -> MoRConfig:
    """MoR with the Llama's sizes and number of applied layers; ``mor_fields``: sharing, routing, capacities,
    router_gating, kv_cache_scheme ..."""
    try:
        return MoRConfig(**llama_fields(config), num_recursions=num_recursions, **mor_fields)
    except ValueError as error:
        if "num_hidden_layers" not in str(error):
            raise
        edges = 2 if mor_fields.get("sharing", "middle_cycle") == "middle_cycle" else 0
        fits = [n for n in range(1, config.num_hidden_layers + 1) if (config.num_hidden_layers - edges) % n == 0]
        raise ValueError(f"--set num_recursions={num_recursions}: the Llama's {config.num_hidden_layers} layers "
                         f"{'less the unique first and last ' if edges else ''}do not split into {num_recursions} "
                         f"equal recursions; num_recursions can be one of {fits}") from None


def tied_source_layers(config: MoRConfig) -> list[list[int]]:
    """Per unique layer of the MoR model, the applied (= source Llama) layers that share it."""
    tied = [[] for _ in range(config.num_unique_layers)]
    for layer in range(config.num_hidden_layers):
        tied[config.unique_layer(layer)].append(layer)
    return tied


def mor_layer_weights(llama_state: dict, config: MoRConfig, initialization: str) -> dict:
    """The unique layers' weights from the Llama's: unique layers copied; each shared layer a stepwise copy or
    the average of the layers it stands for."""
    if initialization not in INITIALIZATIONS:
        raise ValueError(f"--set initialization={initialization!r}: one of {list(INITIALIZATIONS)}")
    tied, edge, k = tied_source_layers(config), config.unique_edges // 2, config.block_size
    steps = torch.linspace(edge, config.num_hidden_layers - 1 - edge, k).round().long().tolist()
    state = {k: v for k, v in llama_state.items() if not k.startswith("model.layers.")}
    names = {k.split(".", 3)[3] for k in llama_state if k.startswith("model.layers.")}
    for j, layers in enumerate(tied):
        shared = edge <= j < edge + k
        sources = [steps[j - edge]] if initialization == "stepwise" and shared else layers
        for name in names:
            tensors = [llama_state[f"model.layers.{s}.{name}"] for s in sources]
            state[f"model.layers.{j}.{name}"] = torch.stack([t.float() for t in tensors]).mean(0).to(tensors[0].dtype)
    return state


def convert_from_llama(source: str, destination: str, dtype: torch.dtype | None = None,
                       architecture: str = "infini_attention", segment_size: int = 2048,
                       memory_update: str = "delta", num_memory_tokens: int = 16, use_memory: bool = True,
                       memory_type: str = "rmt", num_recursions: int = 3, sharing: str = "middle_cycle",
                       initialization: str = "stepwise", routing: str = "expert_choice",
                       capacities: list[float] | None = None, router_gating: str = "weighted",
                       kv_cache_scheme: str = "recursion_wise"):
    """Read a transformers ``LlamaForCausalLM`` folder, write an hf-memory (Hub-ready) folder of ``architecture``
    (``infini_attention``: takes ``memory_update``; ``rmt``: takes ``num_memory_tokens``, ``use_memory``,
    ``memory_type`` rmt or armt; ``mor``: takes ``num_recursions``, ``sharing``, ``initialization`` stepwise or
    average, ``routing``, ``capacities``, ``router_gating``, ``kv_cache_scheme``)."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"--set architecture={architecture!r}: a Llama converts to one of {list(ARCHITECTURES)}")
    check_source(source, "from", "llama")
    llama = load_source(LlamaForCausalLM, source, dtype=dtype)
    if architecture == "mor":
        config = mor_config_from_llama(llama.config, num_recursions, sharing=sharing, routing=routing,
                                       capacities=capacities, router_gating=router_gating,
                                       kv_cache_scheme=kv_cache_scheme)
        model = MoRForCausalLM(config).to(llama.dtype)
        missing, unexpected = model.load_state_dict(mor_layer_weights(llama.state_dict(), config, initialization),
                                                    strict=False)
        refuse_unmapped("Llama -> mor", {m for m in missing if ".routers." not in m and ".depth_router." not in m
                                         and ".causal_routers." not in m}, unexpected)
        model.generation_config = llama.generation_config
        model.save_pretrained(destination)
        return model
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
