"""Named configurations: a ``<arch>-tiny`` preset per architecture (seconds on CPU; used by tests, docs and
the demo) and the sizes published in each paper, with their source."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Preset:
    architecture: str  # key of hf_memory.ARCHITECTURES
    config: dict = field(default_factory=dict)
    source: str = ""


_GDN_TINY = dict(
    vocab_size=128, hidden_size=64, num_hidden_layers=2, linear_num_key_heads=2, linear_key_head_dim=16,
    linear_value_head_dim=32, intermediate_size=128, linear_chunk_size=16, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
_GDN_1_3B = dict(
    vocab_size=32000, hidden_size=2048, num_hidden_layers=21, linear_num_key_heads=6, linear_key_head_dim=256,
    linear_value_head_dim=512, linear_conv_kernel_dim=4, intermediate_size=5632, max_position_embeddings=4096,
)

_JAMBA_TINY = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, attn_layer_period=4,
    attn_layer_offset=2, expert_layer_period=2, expert_layer_offset=1, num_experts=4, num_experts_per_tok=2,
    num_attention_heads=4, num_key_value_heads=2, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
    max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)

PRESETS: dict[str, Preset] = {
    "gated-deltanet-tiny": Preset("gated_deltanet", _GDN_TINY, "hf-memory test size"),
    "gated-deltanet-h1-tiny": Preset(
        "gated_deltanet",
        {**_GDN_TINY, "num_hidden_layers": 4, "sliding_window": 8,
         "layer_types": ["linear_attention", "sliding_attention"] * 2},
        "hf-memory test size of the H1 hybrid (GDN alternating with sliding-window attention)",
    ),
    "gated-deltanet-1.3b": Preset(
        "gated_deltanet", _GDN_1_3B,
        "Gated DeltaNet 1.3B, arXiv 2412.06464 (100B tokens; Wiki ppl 16.42, 8-task avg 55.32); "
        "6 heads x 256, expand_v 2, conv 4 as in the authors' released configuration",
    ),
    "gated-deltanet-h1-1.3b": Preset(
        "gated_deltanet",
        {**_GDN_1_3B, "num_hidden_layers": 20, "sliding_window": 2048, "num_attention_heads": 16,
         "layer_types": ["linear_attention", "sliding_attention"] * 10},
        "Gated DeltaNet-H1 1.3B, arXiv 2412.06464: GDN alternating with sliding-window attention, window 2048 "
        "(8-task avg 56.40); depth chosen to keep ~1.3B parameters",
    ),
    "jamba-tiny": Preset("jamba", _JAMBA_TINY, "hf-memory test size: Mamba-1 (inner norms) : attention 3 : 1, MoE on odd layers"),
    "jamba-mamba2-tiny": Preset(
        "jamba", {**_JAMBA_TINY, "mamba_version": "mamba2", "mamba_d_state": 16, "mamba_head_dim": 16,
                  "mamba_chunk_size": 16},
        "hf-memory test size of the Mamba-2 (SSD) variant of the same layout (as Bamba, IBM 2024)",
    ),
    "jamba-v0.1": Preset(
        "jamba", dict(vocab_size=65536, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, attn_layer_period=8, attn_layer_offset=4,
                      expert_layer_period=2, expert_layer_offset=1, num_experts=16, num_experts_per_tok=2,
                      mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, max_position_embeddings=262144),
        "Jamba-v0.1, arXiv 2403.19887: 52B total / 12B active parameters, 1 attention : 7 Mamba, MoE every "
        "other layer (16 experts, top-2), 256K context",
    ),
    "infini-attention-tiny": Preset(
        "infini_attention",
        dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, segment_size=8, memory_update="delta", max_position_embeddings=4096,
             pad_token_id=0, bos_token_id=1, eos_token_id=2),
        "hf-memory test size: segments of 8 tokens, delta memory update",
    ),
    "infini-attention-1b": Preset(
        "infini_attention",
        dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, segment_size=2048, memory_update="delta", max_position_embeddings=1048576),
        "1B-class Llama-style model with Infini-attention, segment 2048 and delta update, the setting of the "
        "1M-token passkey result of arXiv 2404.07143 (the paper does not list the base model's dimensions; "
        "these are TinyLlama-1.1B's, the natural Llama checkpoint to convert)",
    ),
}


def list_presets() -> dict[str, str]:
    """Preset name -> its source."""
    return {name: preset.source for name, preset in PRESETS.items()}


def get_config(name: str, **overrides):
    """The config of preset ``name``, with ``overrides`` applied (validated like any config; a key that is no
    field of the architecture's config is refused, naming the closest one)."""
    from hf_memory import ARCHITECTURES
    from hf_memory.configuration_utils import reject_unknown_keys

    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    preset = PRESETS[name]
    config_class = ARCHITECTURES[preset.architecture].config_class
    reject_unknown_keys(config_class, overrides)
    return config_class(**{**preset.config, **overrides})
