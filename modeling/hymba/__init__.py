"""Parallel hybrid: attention and SSM heads in every layer — Hymba (arXiv 2411.13676) and the Falcon-H1 layout."""

from hf_memory.registry import Architecture, Preset

from .configuration_hymba import HymbaConfig
from .modeling_hymba import AUTO_MAP

_TINY = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, sliding_window=8,
    num_memory_tokens=4, layer_types=["parallel_attention", "parallel_sliding_attention",
                                      "parallel_sliding_attention", "parallel_attention"],
    kv_reuse_groups=[[1, 2]], max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)

ARCHITECTURE = Architecture(
    "hymba", HymbaConfig, AUTO_MAP,
    presets={
        "hymba-tiny": Preset(
            _TINY, "hf-memory test size of Hymba: Mamba-1 heads, mean fusion, 4 meta tokens, global first and "
                   "last layers, window 8 between, layers 1 and 2 share KV"),
        "falcon-h1-tiny": Preset(
            dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, fusion="sum", mamba_version="mamba2", mamba_d_state=16,
                 mamba_d_conv=4, mamba_expand=2, mamba_head_dim=16, mamba_n_groups=1, mamba_chunk_size=16,
                 mamba_rms_norm=False, mamba_out_proj_bias=True, attention_in_multiplier=0.9, key_multiplier=1.3,
                 attention_out_multiplier=0.8, ssm_in_multiplier=1.1, ssm_out_multiplier=0.7,
                 ssm_multipliers=[0.5, 1.5, 0.8, 1.2, 0.9], mlp_multipliers=[1.2, 0.6], embedding_multiplier=2.0,
                 lm_head_multiplier=0.5, tie_word_embeddings=False, max_position_embeddings=512,
                 pad_token_id=0, bos_token_id=1, eos_token_id=2),
            "hf-memory test size of the Falcon-H1 layout: Mamba-2 heads, sum fusion with (non-trivial) muP "
            "multipliers, no meta tokens, all layers global"),
        "hymba-1.5b": Preset(
            dict(vocab_size=32001, hidden_size=1600, intermediate_size=5504, num_hidden_layers=32,
                 num_attention_heads=25, num_key_value_heads=5, head_dim=64, attention_value_head_dim=128,
                 mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=100, num_memory_tokens=128,
                 sliding_window=1025, max_position_embeddings=8192,
                 layer_types=["parallel_attention" if i in (0, 15, 31) else "parallel_sliding_attention"
                              for i in range(32)],
                 kv_reuse_groups=[[1, 2], [3, 4], [5, 6], [7, 8], [9, 10], [11, 12], [13, 14], [16, 17, 18],
                                  [19, 20], [21, 22], [23, 24], [25, 26], [27, 28], [29, 30]],
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0 * 7.0 ** (64 / 62)}),
            "Hymba-1.5B-Base, arXiv 2411.13676 and its published config.json: 32 layers (global 0, 15, 31), 25 "
            "heads / 5 KV heads (q, k 64 wide, v 128), 128 meta tokens, window 1024 (+ the query itself), NTK RoPE "
            "base 10000 * 7^(64/62), KV shared in 14 groups; ~1.52B parameters with the tied head"),
    },
    invalid_configs=[
        ({"fusion": "concat"}, "fusion"),
        ({"num_memory_tokens": -1}, "num_memory_tokens"),
        ({"kv_reuse_groups": [[2, 1]]}, "kv_reuse_groups"),
        ({"kv_reuse_groups": [[0, 9]]}, "kv_reuse_groups"),
        ({"layer_types": ["parallel_sliding_attention", "parallel_attention"], "sliding_window": 4,
          "kv_reuse_groups": [[0, 1]]}, "kv_reuse_groups"),
        ({"fusion": "mean", "attention_value_head_dim": 16}, "attention_value_head_dim"),
        ({"layer_types": ["parallel_attention", "parallel_sliding_attention"], "sliding_window": None},
         "sliding_window"),
        ({"mamba_version": "mamba3"}, "mamba_version"),
        ({"ssm_multipliers": [1.0, 2.0]}, "ssm_multipliers"),
        ({"layer_types": ["linear_attention"] * 4}, "layer_types"),
    ],
)
