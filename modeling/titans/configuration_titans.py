"""Configuration of Titans (Behrouz, Zhong & Mirrokni, "Titans: Learning to Memorize at Test Time",
arXiv 2501.00663)."""

from __future__ import annotations

from hf_memory.configuration_utils import (
    HFMemoryConfig,
    register_layer_type,
    require,
    require_attention,
    require_common,
    require_finite,
    require_layer_types,
    require_positive,
    require_rope,
    strict_config,
)

VARIANTS = ("mac", "mag", "mal")
LAYER_TYPES = tuple(f"titans_{variant}" for variant in VARIANTS)
for _layer_type in LAYER_TYPES:
    register_layer_type(_layer_type)


@strict_config
class TitansConfig(HFMemoryConfig):
    r"""
    A Llama-style decoder whose layers pair softmax attention with Titans' neural long-term memory: per head
    an MLP of ``memory_depth`` layers (hidden width ``memory_expansion`` x ``memory_head_dim``) whose weights
    are learned at test time by gradient steps with momentum and forgetting (``hf_memory.ops.neural_memory``),
    in chunks of ``memory_chunk_size`` tokens (1: the exact sequential rule), each token's step clipped to norm
    ``memory_max_grad_norm`` and its step size at most ``memory_max_lr``. q, k, v pass a depthwise causal conv of
    ``memory_conv_kernel``, SiLU and (q, k) L2 norm (section 4.4); ``num_persistent_tokens`` learned tokens are
    the persistent memory (section 3.3).

    ``variant``: ``"mac"`` (memory as context: segments of ``segment_size``, a whole number of memory chunks; the
    memory's read-out as context for the segment's attention, the memory updated with the attention output), ``"mag"`` (memory as gate:
    sliding-window attention of ``sliding_window`` gated by the memory branch), ``"mal"`` (memory as layer:
    the memory, then sliding-window attention). ``use_memory=False`` is the attention-only ablation.
    ``use_fused_kernels=False`` keeps the memory on its PyTorch reference on CUDA too (the fused Triton kernel
    runs without gradients, for memory depth 1-2, head size 16-128 and chunks of 16, 32 or 64:
    ``hf_memory.ops.neural_memory.fused_fits``).
    """

    model_type = "hfm_titans"
    layer_type_choices = LAYER_TYPES
    keys_to_ignore_at_inference = ["cache"]

    vocab_size: int = 32000
    hidden_size: int = 1536
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    rope_parameters: dict | None = None
    max_position_embeddings: int = 4096
    variant: str = "mac"
    memory_num_heads: int | None = None
    memory_head_dim: int | None = None
    memory_depth: int = 2
    memory_expansion: int = 2
    memory_chunk_size: int = 64
    memory_conv_kernel: int = 4
    memory_max_lr: float = 1.0
    memory_max_grad_norm: float | None = 1.0
    num_persistent_tokens: int = 4
    segment_size: int = 512
    sliding_window: int = 512
    use_memory: bool = True
    use_fused_kernels: bool = True

    def fill_defaults(self) -> None:
        """Memory heads as the attention's; ``layer_types`` all of the variant."""
        if self.layer_types is None and self.variant in VARIANTS and isinstance(self.num_hidden_layers, int):
            self.layer_types = [f"titans_{self.variant}"] * self.num_hidden_layers
        super().fill_defaults()
        if self.memory_num_heads is None:
            self.memory_num_heads = self.num_attention_heads
        if self.memory_head_dim is None:
            self.memory_head_dim = self.head_dim

    def validate_architecture(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        require_common(self)
        require_attention(self)
        require_rope(self)
        require(self.variant in VARIANTS, "variant", f"must be one of {list(VARIANTS)}, got {self.variant!r}")
        require_layer_types(self, (f"titans_{self.variant}",))
        require_positive(self, "memory_num_heads", "memory_head_dim", "memory_depth", "memory_expansion",
                         "memory_chunk_size", "memory_conv_kernel", "segment_size", "sliding_window")
        require(isinstance(self.num_persistent_tokens, int) and self.num_persistent_tokens >= 0,
                "num_persistent_tokens", f"must be a count >= 0, got {self.num_persistent_tokens!r}")
        require(self.variant != "mac" or self.segment_size % self.memory_chunk_size == 0, "segment_size",
                f"MAC reads the memory at segment starts: segment_size must be a multiple of memory_chunk_size "
                f"({self.memory_chunk_size}), got {self.segment_size}")
        require_finite(self, "memory_max_lr", positive=True)
        require(self.memory_max_grad_norm is None or (isinstance(self.memory_max_grad_norm, (int, float))
                                                       and self.memory_max_grad_norm > 0),
                "memory_max_grad_norm", f"must be None or > 0, got {self.memory_max_grad_norm!r}")
        require(isinstance(self.use_memory, bool), "use_memory", f"must be True or False, got {self.use_memory!r}")


__all__ = ["TitansConfig"]
