"""Configuration of Infini-attention (Munkhdalai, Faruqui & Gopal, "Leave No Context Behind: Efficient
Infinite Context Transformers with Infini-attention", arXiv 2404.07143)."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from hf_memory.configuration_utils import require, require_layer_types, require_positive

LAYER_TYPES = ("infini_attention",)
MEMORY_UPDATES = ("linear", "delta")


@strict
class InfiniAttentionConfig(PreTrainedConfig):
    r"""
    A Llama-style decoder whose attention layers process the sequence in segments of ``segment_size`` tokens:
    causal softmax attention inside the segment (RoPE there only) mixed, by a learned per-head gate
    (initial logit ``memory_gate_init``), with a retrieval from a compressive memory of all earlier segments,
    updated by the ``memory_update`` rule (``"linear"`` or ``"delta"``). Memory is kept per KV head.
    ``memory_detach_every=k`` stops gradients through the memory after every k segments (the paper
    backpropagates through all of them: ``None``). ``use_memory=False`` gives the local-attention-only
    ablation of the same model. ``use_fused_kernels=False`` keeps the memory read on the PyTorch reference
    even on CUDA.
    """

    model_type = "hfm_infini_attention"
    keys_to_ignore_at_inference = ["cache"]

    vocab_size: int = 32000
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_hidden_layers: int = 16
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    attention_head_dim: int | None = None
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    attention_bias: bool = False
    attention_dropout: float = 0.0
    max_position_embeddings: int = 32768
    layer_types: list[str] | None = None
    segment_size: int = 2048
    memory_update: str = "delta"
    memory_detach_every: int | None = None
    use_memory: bool = True
    memory_gate_init: float = 0.0
    memory_eps: float = 1e-6
    use_fused_kernels: bool = True
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    def __post_init__(self, **kwargs):
        if self.layer_types is None:
            self.layer_types = ["infini_attention"] * self.num_hidden_layers
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.attention_head_dim is None:
            self.attention_head_dim = self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)
        self.check()

    def validate_layer_type(self):
        """transformers' strict validation knows only its own layer types; ours are checked here."""
        require_layer_types(self, LAYER_TYPES)

    def check(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        require_positive(self, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                         "num_attention_heads", "num_key_value_heads", "attention_head_dim", "segment_size")
        require_layer_types(self, LAYER_TYPES)
        require(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
                f"must divide num_attention_heads ({self.num_attention_heads}), got {self.num_key_value_heads}")
        require(self.attention_head_dim % 2 == 0, "attention_head_dim", "must be even for RoPE")
        require(self.memory_update in MEMORY_UPDATES, "memory_update",
                f"must be one of {list(MEMORY_UPDATES)}, got {self.memory_update!r}")
        require(self.memory_detach_every is None or self.memory_detach_every > 0, "memory_detach_every",
                f"must be None or a positive number of segments, got {self.memory_detach_every!r}")
        require(self.memory_eps > 0, "memory_eps", "must be positive")
        require(0.0 <= self.attention_dropout < 1.0, "attention_dropout", "must be in [0, 1)")


__all__ = ["InfiniAttentionConfig"]
