"""transformers' ``FalconH1ForCausalLM`` <-> hf-memory's parallel hybrid (``hfm_hymba``, Falcon-H1 layout).

Falcon-H1 is the parallel hybrid with Mamba-2 heads, sum fusion and muP multipliers, no meta tokens, every
layer global: hf-memory's ``HymbaConfig(fusion="sum", mamba_version="mamba2")`` holds every field and
multiplier, so the weights map by name only (a layer's ``self_attn`` and ``mamba`` live under ``mixer``) and a
round trip is bit-exact.
"""

from __future__ import annotations

import math
import re

import torch
from transformers import FalconH1Config, FalconH1ForCausalLM

from hf_memory.conversion import check_source, load_source, transfer
from hf_memory.modeling.hymba.configuration_hymba import HymbaConfig
from hf_memory.modeling.hymba.modeling_hymba import HymbaForCausalLM

# fields with the same meaning and name in both configs
SHARED_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "initializer_range", "rms_norm_eps", "attention_dropout", "attention_bias",
    "mlp_bias", "max_position_embeddings", "rope_parameters", "tie_word_embeddings", "pad_token_id", "bos_token_id",
    "eos_token_id", "mamba_d_ssm", "mamba_d_state", "mamba_d_conv", "mamba_expand", "mamba_n_groups",
    "mamba_chunk_size", "mamba_conv_bias", "mamba_proj_bias", "mamba_rms_norm", "embedding_multiplier",
    "lm_head_multiplier", "attention_in_multiplier", "key_multiplier", "attention_out_multiplier",
    "ssm_in_multiplier", "ssm_out_multiplier", "ssm_multipliers", "mlp_multipliers",
)


def config_from_falcon_h1(config: FalconH1Config) -> HymbaConfig:
    if config.hidden_act != "silu":
        raise ValueError(f"Falcon-H1 with hidden_act {config.hidden_act!r}: its Mamba-2 conv uses that activation, "
                         "hf-memory's Mamba-2 mixer SiLU")
    if config.mamba_rms_norm and config.mamba_norm_before_gate:
        raise ValueError("Falcon-H1 with mamba_rms_norm and mamba_norm_before_gate: hf-memory's Mamba-2 norm is "
                         "applied after the gate (mamba_norm_before_gate=False)")
    limit = list(config.time_step_limit or (0.0, math.inf))
    if limit != [0.0, math.inf]:
        raise ValueError(f"Falcon-H1 with time_step_limit {limit}: hf-memory's Mamba-2 does not clamp dt")
    d_ssm = config.mamba_d_ssm or config.mamba_expand * config.hidden_size
    if config.mamba_n_heads * config.mamba_d_head != d_ssm:
        raise ValueError(f"Falcon-H1 with mamba_n_heads {config.mamba_n_heads} x mamba_d_head {config.mamba_d_head} "
                         f"!= mamba_d_ssm {d_ssm}")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    fields = {field: getattr(config, field) for field in SHARED_FIELDS}
    return HymbaConfig(
        **{**fields, "mamba_d_ssm": d_ssm}, head_dim=head_dim, attention_value_head_dim=head_dim, fusion="sum",
        mamba_version="mamba2", mamba_head_dim=config.mamba_d_head, mamba_out_proj_bias=config.projectors_bias,
        num_memory_tokens=0, layer_types=["parallel_attention"] * config.num_hidden_layers, kv_reuse_groups=[],
    )


def config_to_falcon_h1(config: HymbaConfig) -> FalconH1Config:
    layout = (config.fusion, config.mamba_version, config.num_memory_tokens, config.kv_reuse_groups,
              set(config.layer_types), config.attention_value_head_dim)
    if layout != ("sum", "mamba2", 0, [], {"parallel_attention"}, config.head_dim):
        raise ValueError("only the Falcon-H1 layout (fusion 'sum', mamba2, no meta tokens, no KV sharing, all layers "
                         "global, attention_value_head_dim == head_dim) exists in transformers' Falcon-H1")
    falcon = FalconH1Config(
        **{field: getattr(config, field) for field in SHARED_FIELDS}, mamba_n_heads=config.mamba_num_heads,
        mamba_d_head=config.mamba_head_dim, mamba_norm_before_gate=False, projectors_bias=config.mamba_out_proj_bias,
        time_step_limit=(0.0, float("inf")),
    )
    falcon.head_dim = config.head_dim
    return falcon


def rename_from_falcon_h1(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {re.sub(r"\.(self_attn|mamba)\.", r".mixer.\1.", name): tensor for name, tensor in state_dict.items()}


def rename_to_falcon_h1(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {re.sub(r"\.mixer\.(self_attn|mamba)\.", r".\1.", name): tensor for name, tensor in state_dict.items()}


def convert_from_falcon_h1(source: str, destination: str, dtype: torch.dtype | None = None) -> HymbaForCausalLM:
    """Read a transformers ``FalconH1ForCausalLM`` folder, write an hf-memory (Hub-ready) folder."""
    check_source(source, "from", "falcon_h1")
    falcon = load_source(FalconH1ForCausalLM, source, dtype=dtype)
    model = transfer(falcon, HymbaForCausalLM(config_from_falcon_h1(falcon.config)),
                     rename_from_falcon_h1(falcon.state_dict()), "transformers' Falcon-H1 -> hf-memory parallel hybrid")
    model.save_pretrained(destination)
    return model


def convert_to_falcon_h1(source: str, destination: str, dtype: torch.dtype | None = None) -> FalconH1ForCausalLM:
    """Read an hf-memory parallel-hybrid folder of the Falcon-H1 layout, write a ``FalconH1ForCausalLM`` folder."""
    check_source(source, "to", "falcon_h1")
    model = load_source(HymbaForCausalLM, source, dtype=dtype)
    falcon = transfer(model, FalconH1ForCausalLM(config_to_falcon_h1(model.config)),
                      rename_to_falcon_h1(model.state_dict()), "hf-memory parallel hybrid -> transformers' Falcon-H1")
    falcon.save_pretrained(destination)
    return falcon
