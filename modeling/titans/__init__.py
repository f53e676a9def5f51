"""Titans (arXiv 2501.00663): a neural long-term memory learned at test time beside attention with persistent
memory, as context (MAC), a gate (MAG) or a layer (MAL)."""

from hf_memory.registry import Architecture, Preset

from .configuration_titans import TitansConfig
from .modeling_titans import AUTO_MAP

_TINY = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, memory_num_heads=2, memory_head_dim=16, memory_depth=2, memory_expansion=2,
    memory_chunk_size=4, sliding_window=8, segment_size=16, num_persistent_tokens=2, max_position_embeddings=512,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)

ARCHITECTURE = Architecture(
    "titans", TitansConfig, AUTO_MAP,
    presets={
        "titans-mac-tiny": Preset({**_TINY, "variant": "mac", "segment_size": 8},
                                  "hf-memory test size of Titans MAC: segments of 8, memory chunks of 4, "
                                  "2 persistent tokens"),
        "titans-mag-tiny": Preset({**_TINY, "variant": "mag"},
                                  "hf-memory test size of Titans MAG: memory chunks of 4, window 8, 2 persistent tokens"),
        "titans-mal-tiny": Preset({**_TINY, "variant": "mal"},
                                  "hf-memory test size of Titans MAL: memory chunks of 4, window 8, 2 persistent tokens"),
        "titans-mag-760m": Preset(
            dict(vocab_size=32000, hidden_size=1536, intermediate_size=4096, num_hidden_layers=18,
                 num_attention_heads=16, num_key_value_heads=16, memory_depth=2, memory_chunk_size=64,
                 sliding_window=2048, num_persistent_tokens=4, max_position_embeddings=4096, variant="mag",
                 tie_word_embeddings=True),
            "Titans MAG at the paper's 760M scale (arXiv 2501.00663, 30B tokens; Wiki ppl 18.61): 784M parameters. "
            "The paper publishes no dimensions: width 1536, 18 layers, 16 heads, FFN 4096, memory depth 2, chunk "
            "64, window 2048 and 4 persistent tokens are a documented guess"),
    },
    invalid_configs=[
        ({"variant": "mam"}, "variant"),
        ({"variant": "mac", "segment_size": 6}, "segment_size"),
        ({"memory_depth": 0}, "memory_depth"),
        ({"memory_chunk_size": 0}, "memory_chunk_size"),
        ({"sliding_window": 0}, "sliding_window"),
        ({"num_persistent_tokens": -1}, "num_persistent_tokens"),
        ({"memory_max_grad_norm": 0.0}, "memory_max_grad_norm"),
        ({"layer_types": ["titans_mag", "titans_mal"]}, "layer_types"),
    ],
)
