"""Configuration of Infini-attention (Munkhdalai, Faruqui & Gopal, "Leave No Context Behind: Efficient
Infinite Context Transformers with Infini-attention", arXiv 2404.07143)."""

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

LAYER_TYPES = ("infini_attention",)
register_layer_type("infini_attention")
MEMORY_UPDATES = ("linear", "delta")


@strict_config
class InfiniAttentionConfig(HFMemoryConfig):
    r"""
    A Llama-style decoder whose attention layers process the sequence in segments of ``segment_size`` tokens:
    causal softmax attention inside the segment (RoPE there only) mixed, by a learned per-head gate
    (initial logit ``memory_gate_init``), with a retrieval from a compressive memory of all earlier segments,
    updated by the ``memory_update`` rule (``"linear"`` or ``"delta"``). Memory is kept per KV head.
    ``memory_detach_every=k`` stops gradients through the memory after every k segments (the paper
    backpropagates through all of them: ``None``). ``use_memory=False`` gives the local-attention-only
    ablation of the same model. ``use_fused_kernels=False`` keeps the memory read on the PyTorch reference
    even on CUDA. ``head_dim`` and ``rope_parameters`` are Llama's (any of transformers' RoPE types).
    """

    model_type = "hfm_infini_attention"
    layer_type_choices = LAYER_TYPES
    keys_to_ignore_at_inference = ["cache"]

    vocab_size: int = 32000
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_hidden_layers: int = 16
    num_attention_heads: int = 16
    rope_parameters: dict | None = None
    max_position_embeddings: int = 32768
    segment_size: int = 2048
    memory_update: str = "delta"
    memory_detach_every: int | None = None
    use_memory: bool = True
    memory_gate_init: float = 0.0
    memory_eps: float = 1e-6
    use_fused_kernels: bool = True

    def validate_architecture(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        require_common(self)
        require_attention(self)
        require_rope(self)
        require_positive(self, "segment_size")
        require_finite(self, "memory_gate_init")
        require_layer_types(self, LAYER_TYPES)
        require(self.memory_update in MEMORY_UPDATES, "memory_update",
                f"must be one of {list(MEMORY_UPDATES)}, got {self.memory_update!r}")
        require(self.memory_detach_every is None or self.memory_detach_every > 0, "memory_detach_every",
                f"must be None or a positive number of segments, got {self.memory_detach_every!r}")
        require_finite(self, "memory_eps", positive=True)


__all__ = ["InfiniAttentionConfig"]
