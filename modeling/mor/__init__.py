"""Mixture-of-Recursions: a shared block applied recursively with per-token depth (arXiv 2507.10524)."""

from hf_memory.registry import Architecture, Preset

from .configuration_mor import MoRConfig
from .modeling_mor import AUTO_MAP

ARCHITECTURE = Architecture(
    "mor", MoRConfig, AUTO_MAP,
    presets={
        "mor-tiny": Preset(
            dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_recursions=3,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
                 pad_token_id=0, bos_token_id=1, eos_token_id=2),
            "hf-memory test size: Middle-Cycle, a 2-layer block applied up to 3 times, expert-choice, capacities "
            "1, 2/3, 1/3",
        ),
        "mor-360m": Preset(
            dict(vocab_size=49152, hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_recursions=3,
                 num_attention_heads=15, num_key_value_heads=5, rms_norm_eps=1e-5, max_position_embeddings=2048,
                 tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
            "arXiv 2507.10524 360M setting: the authors' configs (conf/pretrain/250720_pretrain_smollm-360m_*.yaml) "
            "build HuggingFaceTB/SmolLM-360M's dimensions (hidden 960, 32 layers, 15 heads / 5 KV heads, FFN 2560, "
            "vocabulary 49152 tied, 2048-token sequences); Middle-Cycle with N_r = 3 (unique first and last layer, a "
            "10-layer block), expert-choice, capacities 1, 2/3, 1/3: 118.0M non-embedding parameters (the paper's "
            "118M); RoPE theta 10000 assumed (Llama's)",
        ),
    },
    invalid_configs=[
        ({"num_recursions": 0}, "num_recursions"),
        ({"num_hidden_layers": 7}, "num_hidden_layers"),
        ({"sharing": "middle"}, "sharing"),
        ({"routing": "random"}, "routing"),
        ({"capacities": [1.0, 0.5]}, "capacities"),
        ({"capacities": [0.5, 1.0, 0.3]}, "capacities"),
        ({"capacities": [1.0, 0.0, 0.0]}, "capacities"),
        ({"sharing": "sequence", "num_hidden_layers": 6}, "sharing"),
        ({"router_function": "softmax"}, "router_function"),
        ({"router_gating": "soft"}, "router_gating"),
        ({"causal_routing": "threshold"}, "causal_routing"),
        ({"kv_cache_scheme": "shared"}, "kv_cache_scheme"),
        ({"router_alpha": -0.1}, "router_alpha"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ],
)
