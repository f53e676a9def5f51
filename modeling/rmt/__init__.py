"""Recurrent Memory Transformer (arXiv 2207.06881, 2304.11062) and its associative variant ARMT (arXiv 2407.04841)."""

from hf_memory.registry import Architecture, Preset

from .configuration_rmt import RMTConfig
from .modeling_rmt import AUTO_MAP

ARCHITECTURE = Architecture(
    "rmt", RMTConfig, AUTO_MAP,
    presets={
        "rmt-tiny": Preset(
            dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, segment_size=8, num_memory_tokens=4, max_position_embeddings=512,
                 pad_token_id=0, bos_token_id=1, eos_token_id=2),
            "hf-memory test size: segments of 8 tokens, 4 memory tokens",
        ),
        "armt-tiny": Preset(
            dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, segment_size=8, num_memory_tokens=4, memory_type="armt",
                 associative_key_dim=16, max_position_embeddings=512, pad_token_id=0, bos_token_id=1,
                 eos_token_id=2),
            "hf-memory test size of ARMT (arXiv 2407.04841): segments of 8 tokens, 4 memory tokens, associative "
            "keys of 16 (DPFP-3 features of 96)",
        ),
        "rmt-1b": Preset(
            dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, segment_size=1024, num_memory_tokens=16,
                 max_position_embeddings=2048, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
            "1B-class Llama-style RMT: TinyLlama-1.1B's dimensions (the Llama checkpoint to convert), segments of "
            "1024 tokens and 16 memory tokens (arXiv 2304.11062 used 10-16 memory tokens with 512-1024-token "
            "segments on its 1M-token runs)",
        ),
    },
    invalid_configs=[
        ({"segment_size": 0}, "segment_size"),
        ({"num_memory_tokens": 0}, "num_memory_tokens"),
        ({"memory_type": "lstm"}, "memory_type"),
        ({"bptt_depth": 0}, "bptt_depth"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"layer_types": ["recurrent_memory_attention", "full_attention"]}, "layer_types"),
        ({"max_position_embeddings": 8}, "max_position_embeddings"),
        ({"memory_type": "armt", "associative_key_dim": 0}, "associative_key_dim"),
    ],
)
