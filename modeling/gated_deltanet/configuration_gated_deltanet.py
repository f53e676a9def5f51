"""Configuration of Gated DeltaNet (Yang, Kautz & Hatamizadeh, arXiv 2412.06464, ICLR 2025)."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from hf_memory.configuration_utils import require, require_layer_types, require_positive

LAYER_TYPES = ("linear_attention", "sliding_attention", "full_attention")


@strict
class GatedDeltaNetConfig(PreTrainedConfig):
    r"""
    Gated DeltaNet language model, pure or hybrid.

    ``layer_types`` lists the token mixer of each layer: ``"linear_attention"`` (a Gated DeltaNet layer),
    ``"sliding_attention"`` (softmax attention over the last ``sliding_window`` tokens, with RoPE) or
    ``"full_attention"``. The paper's H1 hybrid alternates Gated DeltaNet and sliding-window attention.

    Gated DeltaNet layers: ``num_heads`` query/key heads of size ``head_dim``; ``num_v_heads`` value heads
    (defaults to ``num_heads``; a multiple of it, each key head then serves several value heads) of size
    ``head_dim * expand_v``; short causal convs of width ``conv_size``; ``allow_neg_eigval`` doubles beta so
    the transition's eigenvalues may be negative; ``chunk_size`` is the chunk of the chunkwise training form.
    ``use_fused_kernels=False`` forces the PyTorch references even on CUDA.

    Attention layers: ``num_attention_heads``, ``num_key_value_heads`` (GQA), ``attention_head_dim``,
    ``rope_theta``.
    """

    model_type = "hfm_gated_deltanet"
    keys_to_ignore_at_inference = ["cache"]

    vocab_size: int = 32000
    hidden_size: int = 2048
    num_hidden_layers: int = 21
    intermediate_size: int | None = None
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    layer_types: list[str] | None = None
    # Gated DeltaNet layers
    num_heads: int = 6
    num_v_heads: int | None = None
    head_dim: int = 256
    expand_v: float = 2.0
    conv_size: int = 4
    allow_neg_eigval: bool = False
    chunk_size: int = 64
    use_fused_kernels: bool = True
    # attention layers (hybrids)
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    attention_head_dim: int | None = None
    sliding_window: int | None = None
    rope_theta: float = 10000.0
    attention_bias: bool = False
    attention_dropout: float = 0.0
    max_position_embeddings: int = 2048
    # embeddings, init, generation
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    def __post_init__(self, **kwargs):
        if self.layer_types is None:
            self.layer_types = ["linear_attention"] * self.num_hidden_layers
        if self.num_v_heads is None:
            self.num_v_heads = self.num_heads
        if self.intermediate_size is None:  # SwiGLU with 4x hidden, 2/3 of it, rounded up to 256
            self.intermediate_size = 256 * ((int(self.hidden_size * 4 * 2 / 3) + 255) // 256)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.attention_head_dim is None:
            self.attention_head_dim = self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)
        self.check()

    @property
    def value_head_dim(self) -> int:
        return int(self.head_dim * self.expand_v)

    def check(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        require_positive(
            self, "vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "num_heads", "num_v_heads",
            "head_dim", "conv_size", "chunk_size", "num_attention_heads", "num_key_value_heads", "attention_head_dim",
        )
        require_layer_types(self, LAYER_TYPES)
        require(self.num_v_heads % self.num_heads == 0, "num_v_heads",
                f"must be a multiple of num_heads ({self.num_heads}), got {self.num_v_heads}")
        require(self.expand_v > 0 and float(self.head_dim * self.expand_v).is_integer(), "expand_v",
                f"head_dim * expand_v must be a positive integer, got {self.head_dim} * {self.expand_v}")
        require(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
                f"must divide num_attention_heads ({self.num_attention_heads}), got {self.num_key_value_heads}")
        require(self.attention_head_dim % 2 == 0, "attention_head_dim", "must be even for RoPE")
        if "sliding_attention" in self.layer_types:
            require(isinstance(self.sliding_window, int) and self.sliding_window > 0, "sliding_window",
                    "sliding_attention layers need a positive sliding_window")
        require(0.0 <= self.attention_dropout < 1.0, "attention_dropout", "must be in [0, 1)")


__all__ = ["GatedDeltaNetConfig"]
