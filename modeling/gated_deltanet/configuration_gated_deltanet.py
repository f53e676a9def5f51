"""Configuration of Gated DeltaNet (Yang, Kautz & Hatamizadeh, arXiv 2412.06464, ICLR 2025)."""

from __future__ import annotations

from hf_memory.configuration_utils import (
    HFMemoryConfig,
    require,
    require_attention,
    require_common,
    require_layer_types,
    require_positive,
    require_rope,
    strict_config,
)

LAYER_TYPES = ("linear_attention", "sliding_attention", "full_attention")


@strict_config
class GatedDeltaNetConfig(HFMemoryConfig):
    r"""
    Gated DeltaNet language model, pure or hybrid (the paper's H1: Gated DeltaNet alternating with sliding-window
    attention). Names follow transformers' Qwen3-Next: ``linear_*`` fields size the Gated DeltaNet layers,
    ``head_dim`` and the other attention fields size the softmax-attention layers.

    Args:
        layer_types (`list[str]`, defaults to all `"linear_attention"`): the token mixer of each layer:
            `"linear_attention"` (Gated DeltaNet), `"sliding_attention"` (the last `sliding_window` tokens, RoPE)
            or `"full_attention"`.
        linear_num_key_heads (`int`, defaults to 6): query/key heads of a Gated DeltaNet layer.
        linear_num_value_heads (`int`, defaults to `linear_num_key_heads`): value heads, a multiple of the key
            heads (each key head then serves several value heads).
        linear_key_head_dim (`int`, defaults to 256): d_k, the key (and query) head size.
        linear_value_head_dim (`int`, defaults to 512): d_v, the value head size (the paper's expand_v = 2).
        linear_conv_kernel_dim (`int`, defaults to 4): width of the short causal convs on q, k, v.
        linear_chunk_size (`int`, defaults to 64): chunk of the chunkwise (WY) training form.
        allow_neg_eigval (`bool`, defaults to False): beta x 2, so the transition's eigenvalues may be negative.
        num_attention_heads, num_key_value_heads, head_dim, sliding_window, rope_parameters: the attention layers.
        use_fused_kernels (`bool`, defaults to True): False forces the PyTorch references even on CUDA.
    """

    model_type = "hfm_gated_deltanet"
    layer_type_choices = LAYER_TYPES
    keys_to_ignore_at_inference = ["cache"]

    vocab_size: int = 32000
    hidden_size: int = 2048
    num_hidden_layers: int = 21
    intermediate_size: int | None = None
    # Gated DeltaNet layers
    linear_num_key_heads: int = 6
    linear_num_value_heads: int | None = None
    linear_key_head_dim: int = 256
    linear_value_head_dim: int = 512
    linear_conv_kernel_dim: int = 4
    linear_chunk_size: int = 64
    allow_neg_eigval: bool = False
    use_fused_kernels: bool = True
    # attention layers (hybrids)
    num_attention_heads: int = 16
    sliding_window: int | None = None
    rope_parameters: dict | None = None
    max_position_embeddings: int = 2048
    # embeddings, init, generation

    def fill_defaults(self) -> None:
        super().fill_defaults()
        if self.linear_num_value_heads is None:
            self.linear_num_value_heads = self.linear_num_key_heads
        if self.intermediate_size is None and isinstance(self.hidden_size, int):  # SwiGLU 8/3 x, rounded up to 256
            self.intermediate_size = 256 * ((int(self.hidden_size * 4 * 2 / 3) + 255) // 256)

    def validate_architecture(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        require_common(self)
        require_attention(self)
        require_rope(self)
        require_positive(self, "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                         "linear_value_head_dim", "linear_conv_kernel_dim", "linear_chunk_size")
        require_layer_types(self, LAYER_TYPES)
        require(self.linear_num_value_heads % self.linear_num_key_heads == 0, "linear_num_value_heads",
                f"must be a multiple of linear_num_key_heads ({self.linear_num_key_heads}), "
                f"got {self.linear_num_value_heads}")
        if "sliding_attention" in self.layer_types:
            require(isinstance(self.sliding_window, int) and self.sliding_window > 0, "sliding_window",
                    "sliding_attention layers need a positive sliding_window")


__all__ = ["GatedDeltaNetConfig"]
