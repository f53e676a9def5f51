"""Jamba-style interleaved hybrid: Mamba + attention (+ MoE) (arXiv 2403.19887)."""

from hf_memory.registry import Architecture, Preset

from .configuration_jamba import JambaHybridConfig
from .modeling_jamba import AUTO_MAP

_TINY = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, attn_layer_period=4,
    attn_layer_offset=2, expert_layer_period=2, expert_layer_offset=1, num_experts=4, num_experts_per_tok=2,
    num_attention_heads=4, num_key_value_heads=2, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
    max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)

ARCHITECTURE = Architecture(
    "jamba", JambaHybridConfig, AUTO_MAP,
    presets={
        "jamba-tiny": Preset(_TINY, "hf-memory test size: Mamba-1 (inner norms) : attention 3 : 1, MoE on odd layers"),
        "jamba-mamba2-tiny": Preset(
            {**_TINY, "mamba_version": "mamba2", "mamba_d_state": 16, "mamba_head_dim": 16, "mamba_chunk_size": 16},
            "hf-memory test size of the Mamba-2 (SSD) variant of the same layout (as Bamba, IBM 2024)",
        ),
        "jamba-v0.1": Preset(
            dict(vocab_size=65536, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, attn_layer_period=8, attn_layer_offset=4,
                 expert_layer_period=2, expert_layer_offset=1, num_experts=16, num_experts_per_tok=2,
                 mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, max_position_embeddings=262144),
            "Jamba-v0.1, arXiv 2403.19887: 52B total / 12B active parameters, 1 attention : 7 Mamba, MoE every "
            "other layer (16 experts, top-2), 256K context",
        ),
    },
    invalid_configs=[
        ({"attn_layer_offset": 4}, "attn_layer_offset"),
        ({"expert_layer_period": 0}, "expert_layer_offset"),
        ({"num_experts_per_tok": 5}, "num_experts_per_tok"),
        ({"mamba_version": "mamba3"}, "mamba_version"),
        ({"mamba_version": "mamba2", "mamba_head_dim": 24}, "mamba_head_dim"),
        ({"layer_types": ["linear_attention", "sliding_attention"]}, "layer_types"),
        ({"mlp_layer_types": ["dense"]}, "mlp_layer_types"),
        ({"mamba_dt_rank": "big"}, "mamba_dt_rank"),
    ],
)
