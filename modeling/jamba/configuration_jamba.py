"""Configuration of the Jamba-style interleaved hybrid (Lieber et al., "Jamba: A Hybrid Transformer-Mamba
Language Model", arXiv 2403.19887)."""

from __future__ import annotations

import math

from hf_memory.configuration_utils import (
    HFMemoryConfig,
    require,
    require_attention,
    require_common,
    require_finite,
    require_layer_types,
    require_positive,
    strict_config,
)

MIXER_TYPES = ("linear_attention", "full_attention")
FFN_TYPES = ("dense", "sparse")


@strict_config
class JambaHybridConfig(HFMemoryConfig):
    r"""
    A stack of blocks ``x += Mixer(RMSNorm(x)); x += FFN(RMSNorm(x))``.

    Mixers: ``layer_types[i]`` is ``"full_attention"`` (GQA, no positional encoding) or ``"linear_attention"``
    (a Mamba mixer: Mamba-1 with RMSNorm on Delta, B, C when ``mamba_version="mamba1"``, the paper's choice;
    Mamba-2 / SSD when ``"mamba2"``, as in Bamba). Unless given explicitly, layer i is attention when
    ``i % attn_layer_period == attn_layer_offset`` (paper: 8, 4 -> 1 attention : 7 Mamba).

    FFNs: ``mlp_layer_types[i]`` is ``"sparse"`` (MoE: ``num_experts`` SwiGLU experts, softmax router, top
    ``num_experts_per_tok``, weights not renormalised) or ``"dense"`` (SwiGLU); unless given, layer i is sparse
    when ``i % expert_layer_period == expert_layer_offset`` (paper: 2, 1; 16 experts, top-2).
    ``output_router_logits`` adds ``router_aux_loss_coef`` x the load-balancing loss (pads excluded).

    Attention: ``num_attention_heads``, ``num_key_value_heads`` (GQA), ``head_dim``; no positional encoding.
    Mamba layers: the ``mamba_*`` fields (transformers' Jamba names); ``use_fused_kernels=False`` forces the
    PyTorch references even on CUDA.
    """

    model_type = "hfm_jamba"
    layer_type_choices = MIXER_TYPES
    keys_to_ignore_at_inference = ["cache"]

    vocab_size: int = 65536
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    mlp_layer_types: list[str] | None = None
    attn_layer_period: int = 8
    attn_layer_offset: int = 4
    expert_layer_period: int = 2
    expert_layer_offset: int = 1
    # attention
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 8
    max_position_embeddings: int = 262144
    # mixture of experts
    num_experts: int = 16
    num_experts_per_tok: int = 2
    router_aux_loss_coef: float = 0.001
    output_router_logits: bool = False
    # Mamba mixers
    mamba_version: str = "mamba1"
    mamba_d_state: int = 16
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_dt_rank: int | str = "auto"
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    mamba_inner_norms: bool = True
    mamba_head_dim: int = 64
    mamba_n_groups: int = 1
    mamba_chunk_size: int = 64
    use_fused_kernels: bool = True
    # embeddings, init, generation
    pad_token_id: int | None = 0

    def fill_defaults(self) -> None:
        """Layers by period / offset (unless listed), and Mamba's dt_rank = ceil(hidden_size / 16)."""
        require(self.attn_layer_period > 0 and 0 <= self.attn_layer_offset < self.attn_layer_period,
                "attn_layer_offset", f"must be in [0, attn_layer_period={self.attn_layer_period})")
        require(self.expert_layer_period > 0 and 0 <= self.expert_layer_offset < self.expert_layer_period,
                "expert_layer_offset", f"must be in [0, expert_layer_period={self.expert_layer_period})")
        layers = range(self.num_hidden_layers) if isinstance(self.num_hidden_layers, int) else ()
        if self.layer_types is None:
            self.layer_types = ["full_attention" if i % self.attn_layer_period == self.attn_layer_offset
                                else "linear_attention" for i in layers]
        if self.mlp_layer_types is None:
            self.mlp_layer_types = ["sparse" if i % self.expert_layer_period == self.expert_layer_offset
                                    and self.num_experts > 1 else "dense" for i in layers]
        super().fill_defaults()
        if self.mamba_dt_rank == "auto" and isinstance(self.hidden_size, int):
            self.mamba_dt_rank = math.ceil(self.hidden_size / 16)

    def validate_layer_type(self):
        super().validate_layer_type()
        require_layer_types(self, FFN_TYPES, field="mlp_layer_types")

    @property
    def mamba_intermediate_size(self) -> int:
        return self.mamba_expand * self.hidden_size

    @property
    def mamba_num_heads(self) -> int:
        return self.mamba_intermediate_size // self.mamba_head_dim

    def validate_architecture(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        require_common(self)
        require_attention(self, rope=False)
        require_positive(self, "num_experts", "num_experts_per_tok", "mamba_d_state", "mamba_d_conv", "mamba_expand",
                         "mamba_dt_rank", "mamba_head_dim", "mamba_n_groups", "mamba_chunk_size")
        require_finite(self, "router_aux_loss_coef")
        self.validate_layer_type()
        require(self.num_experts_per_tok <= self.num_experts, "num_experts_per_tok",
                f"top-{self.num_experts_per_tok} of {self.num_experts} experts is impossible")
        require("sparse" not in self.mlp_layer_types or self.num_experts > 1, "num_experts",
                "sparse (MoE) layers need at least 2 experts")
        require(self.mamba_version in ("mamba1", "mamba2"), "mamba_version",
                f"must be 'mamba1' or 'mamba2', got {self.mamba_version!r}")
        if self.mamba_version == "mamba2":
            require(self.mamba_intermediate_size % self.mamba_head_dim == 0, "mamba_head_dim",
                    f"must divide mamba_expand * hidden_size = {self.mamba_intermediate_size}")
            require(self.mamba_num_heads % self.mamba_n_groups == 0, "mamba_n_groups",
                    f"must divide the number of Mamba-2 heads ({self.mamba_num_heads})")


__all__ = ["JambaHybridConfig"]
