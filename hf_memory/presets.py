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
    vocab_size=128, hidden_size=64, num_hidden_layers=2, num_heads=2, head_dim=16, expand_v=2.0,
    intermediate_size=128, chunk_size=16, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
_GDN_1_3B = dict(
    vocab_size=32000, hidden_size=2048, num_hidden_layers=21, num_heads=6, head_dim=256, expand_v=2.0,
    conv_size=4, intermediate_size=5632, max_position_embeddings=4096,
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
}


def list_presets() -> dict[str, str]:
    """Preset name -> its source."""
    return {name: preset.source for name, preset in PRESETS.items()}


def get_config(name: str, **overrides):
    """The config of preset ``name``, with ``overrides`` applied (validated like any config)."""
    from hf_memory import ARCHITECTURES

    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    preset = PRESETS[name]
    config_class = ARCHITECTURES[preset.architecture].config_class
    return config_class(**{**preset.config, **overrides})
