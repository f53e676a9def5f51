"""Configuration of the Recurrent Memory Transformer (Bulatov, Kuratov & Burtsev, "Recurrent Memory
Transformer", arXiv 2207.06881; "Scaling Transformer to 1M tokens and beyond with RMT", arXiv 2304.11062)."""

from __future__ import annotations

from hf_memory.configuration_utils import (
    HFMemoryConfig,
    register_layer_type,
    require,
    require_attention,
    require_common,
    require_layer_types,
    require_positive,
    require_rope,
    strict_config,
)

LAYER_TYPES = ("recurrent_memory_attention",)
register_layer_type("recurrent_memory_attention")
MEMORY_TYPES = ("rmt", "armt")


@strict_config
class RMTConfig(HFMemoryConfig):
    r"""
    A Llama-style decoder that reads the sequence in segments of ``segment_size`` tokens with
    ``num_memory_tokens`` memory vectors: segment tau's input is [memory ; segment tokens ; memory] (read
    positions first, write positions last), and the final hidden states at the write positions are the next
    segment's memory; the first memory is learned. RoPE positions restart at 0 in every segment (read memory
    0..m-1, tokens m..m+S-1, write positions m+S..2m+S-1), so a segment sees earlier ones only through memory.

    ``memory_type="armt"`` is the Associative RMT (Rodkin et al., arXiv 2407.04841): the segment input is
    [segment tokens ; memory] with the same learned memory embeddings every segment, and each layer carries an
    associative matrix written from the memory tokens' outputs and read by every position before the layer
    (DPFP-3 features of keys / queries of width ``associative_key_dim``); positions 0..S+m-1.

    ``bptt_depth=k`` lets gradients through at most the last k memory hand-offs of a forward (the memory
    entering older segments is detached); ``None`` back-propagates through all of them. ``use_memory=False``
    drops the memory: every segment is read alone by the plain Llama decoder (the ablation, and the switch
    under which a model converted from Llama equals it within one segment). ``head_dim`` and
    ``rope_parameters`` are Llama's (any of transformers' RoPE types).
    """

    model_type = "hfm_rmt"
    layer_type_choices = LAYER_TYPES
    keys_to_ignore_at_inference = ["cache"]

    vocab_size: int = 32000
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_hidden_layers: int = 16
    num_attention_heads: int = 16
    rope_parameters: dict | None = None
    max_position_embeddings: int = 4096
    segment_size: int = 1024
    num_memory_tokens: int = 10
    memory_type: str = "rmt"
    associative_key_dim: int = 64
    bptt_depth: int | None = None
    use_memory: bool = True

    def validate_architecture(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        require_common(self)
        require_attention(self)
        require_rope(self)
        require_positive(self, "segment_size", "num_memory_tokens", "associative_key_dim")
        require_layer_types(self, LAYER_TYPES)
        require(self.memory_type in MEMORY_TYPES, "memory_type",
                f"must be one of {list(MEMORY_TYPES)}, got {self.memory_type!r}")
        require(self.bptt_depth is None or (isinstance(self.bptt_depth, int) and self.bptt_depth > 0), "bptt_depth",
                f"must be None (all segments) or a positive number of segments, got {self.bptt_depth!r}")
        require(isinstance(self.use_memory, bool), "use_memory", f"must be True or False, got {self.use_memory!r}")
        span = 2 * self.num_memory_tokens + self.segment_size
        require(self.max_position_embeddings >= span, "max_position_embeddings",
                f"must cover a segment with its read and write memory (2 * num_memory_tokens + segment_size = "
                f"{span}), got {self.max_position_embeddings}")


__all__ = ["RMTConfig"]
