"""Infini-attention (arXiv 2404.07143)."""

from hf_memory.registry import Architecture, Preset

from .configuration_infini_attention import InfiniAttentionConfig
from .modeling_infini_attention import AUTO_MAP

ARCHITECTURE = Architecture(
    "infini_attention", InfiniAttentionConfig, AUTO_MAP,
    presets={
        "infini-attention-tiny": Preset(
            dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, segment_size=8, memory_update="delta", max_position_embeddings=4096,
                 pad_token_id=0, bos_token_id=1, eos_token_id=2),
            "hf-memory test size: segments of 8 tokens, delta memory update",
        ),
        "infini-attention-1b": Preset(
            dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, segment_size=2048, memory_update="delta",
                 max_position_embeddings=1048576),
            "1B-class Llama-style model with Infini-attention, segment 2048 and delta update, the setting of the "
            "1M-token passkey result of arXiv 2404.07143 (the paper does not list the base model's dimensions; "
            "these are TinyLlama-1.1B's, the natural Llama checkpoint to convert)",
        ),
    },
    invalid_configs=[
        ({"segment_size": 0}, "segment_size"),
        ({"memory_update": "hebbian"}, "memory_update"),
        ({"memory_detach_every": 0}, "memory_detach_every"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"layer_types": ["infini_attention", "full_attention"]}, "layer_types"),
        ({"memory_eps": 0.0}, "memory_eps"),
        ({"memory_gate_init": float("nan")}, "memory_gate_init"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": float("inf")}}, "rope_parameters"),
    ],
)
