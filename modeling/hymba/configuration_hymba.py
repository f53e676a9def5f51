"""Configuration of the parallel hybrid: attention heads and SSM heads side by side in every layer — Hymba
(Dong et al., "Hymba: A Hybrid-head Architecture for Small Language Models", arXiv 2411.13676) and the
Falcon-H1 layout (transformers' ``FalconH1ForCausalLM``)."""

from __future__ import annotations

import math

from hf_memory.configuration_utils import (
    HFMemoryConfig,
    register_layer_type,
    require,
    require_attention,
    require_common,
    require_finite,
    require_positive,
    strict_config,
)

# Every layer runs attention and an SSM in parallel; the attention part is global or sliding-window.
LAYER_TYPES = ("parallel_attention", "parallel_sliding_attention")
for _name in LAYER_TYPES:
    register_layer_type(_name)


@strict_config
class HymbaConfig(HFMemoryConfig):
    r"""
    A stack of blocks ``x += Fuse(Attention(RMSNorm(x)), SSM(RMSNorm(x))); x += FFN(RMSNorm(x))``.

    Layers: ``layer_types[i]`` is ``"parallel_attention"`` (global causal attention) or
    ``"parallel_sliding_attention"`` (a window of ``sliding_window`` keys including the query's own, plus every
    meta token). Unless listed, the first, middle and last layers are global and the others sliding when
    ``sliding_window`` is set (Hymba: 3 global of 32), all global otherwise.

    Fusion (``fusion``): ``"mean"`` (Hymba, eq. 3): ``out_proj((beta_1 * RMSNorm(attn) + beta_2 * RMSNorm(ssm)) / 2)``
    with the attention heads' values ``attention_value_head_dim`` wide so that their output has the SSM's width;
    ``"sum"`` (Falcon-H1): ``attention_out_multiplier * o_proj(attn) + ssm_out_multiplier * out_proj(ssm)``.

    Meta tokens: ``num_memory_tokens`` learned vectors put before every sequence at prefill (Hymba: 128); they
    take positions 0..M-1, never get labels and never appear in logits or hidden states.

    ``use_ssm=False`` switches the SSM heads off (attention heads alone: the ablation of the paper's table 1).

    Cross-layer KV sharing: each group of ``kv_reuse_groups`` lists a producer then its consumers (Hymba:
    ``[[1, 2], [3, 4], ...]``); a consumer has no key / value projections and reads the producer's K, V.

    SSM: ``mamba_version="mamba1"`` (Hymba: Mamba-1 with RMSNorms on Delta, B, C when ``mamba_inner_norms``) or
    ``"mamba2"`` (Falcon-H1: SSD heads of ``mamba_head_dim``, optional gated RMSNorm ``mamba_rms_norm``); width
    ``mamba_d_ssm`` (default ``mamba_expand * hidden_size``).

    muP multipliers (Falcon-H1; 1 elsewhere): ``embedding_multiplier``, ``lm_head_multiplier``,
    ``attention_in_multiplier``, ``key_multiplier``, ``attention_out_multiplier``, ``ssm_in_multiplier``,
    ``ssm_out_multiplier``, ``ssm_multipliers`` (z, x, B, C, dt parts of the SSM input projection) and
    ``mlp_multipliers`` (gate, down).
    """

    model_type = "hfm_hymba"
    layer_type_choices = LAYER_TYPES
    keys_to_ignore_at_inference = ["cache"]

    vocab_size: int = 32001
    hidden_size: int = 1600
    intermediate_size: int = 5504
    num_hidden_layers: int = 32
    fusion: str = "mean"
    num_memory_tokens: int = 0
    kv_reuse_groups: list[list[int]] | None = None
    use_ssm: bool = True
    mlp_bias: bool = False
    # attention
    num_attention_heads: int = 25
    num_key_value_heads: int | None = 5
    attention_value_head_dim: int | None = None
    sliding_window: int | None = None
    max_position_embeddings: int = 8192
    rope_parameters: dict | None = None
    # SSM
    mamba_version: str = "mamba1"
    mamba_d_state: int = 16
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_d_ssm: int | None = None
    mamba_dt_rank: int | str = "auto"
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    mamba_out_proj_bias: bool = False
    mamba_inner_norms: bool = True
    mamba_head_dim: int = 64
    mamba_n_groups: int = 1
    mamba_chunk_size: int = 256
    mamba_rms_norm: bool = True
    use_fused_kernels: bool = True
    # muP multipliers
    embedding_multiplier: float = 1.0
    lm_head_multiplier: float = 1.0
    attention_in_multiplier: float = 1.0
    key_multiplier: float = 1.0
    attention_out_multiplier: float = 1.0
    ssm_in_multiplier: float = 1.0
    ssm_out_multiplier: float = 1.0
    ssm_multipliers: list[float] | None = None
    mlp_multipliers: list[float] | None = None
    # embeddings, init, generation
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 0

    def fill_defaults(self) -> None:
        """Global first / middle / last layers (sliding elsewhere when there is a window), value heads as wide as
        the SSM for the mean fusion, dt_rank = ceil(hidden_size / 16), multipliers 1."""
        if self.layer_types is None and isinstance(self.num_hidden_layers, int) and self.num_hidden_layers > 0:
            n = self.num_hidden_layers
            global_layers = {0, n // 2, n - 1} if self.sliding_window else set(range(n))
            self.layer_types = [LAYER_TYPES[i not in global_layers] for i in range(n)]
        if self.mamba_d_ssm is None and isinstance(self.hidden_size, int) and isinstance(self.mamba_expand, int):
            self.mamba_d_ssm = self.mamba_expand * self.hidden_size
        super().fill_defaults()
        if (self.attention_value_head_dim is None and self.fusion == "mean" and isinstance(self.mamba_d_ssm, int)
                and isinstance(self.num_attention_heads, int) and self.num_attention_heads > 0):
            self.attention_value_head_dim = self.mamba_d_ssm // self.num_attention_heads
        if self.attention_value_head_dim is None:
            self.attention_value_head_dim = self.head_dim
        if self.mamba_dt_rank == "auto" and isinstance(self.hidden_size, int):
            self.mamba_dt_rank = math.ceil(self.hidden_size / 16)
        if self.ssm_multipliers is None:
            self.ssm_multipliers = [1.0] * 5
        if self.mlp_multipliers is None:
            self.mlp_multipliers = [1.0, 1.0]
        if self.kv_reuse_groups is None:
            self.kv_reuse_groups = []

    @property
    def mamba_num_heads(self) -> int:
        return self.mamba_d_ssm // self.mamba_head_dim

    def kv_source(self, layer_idx: int) -> int:
        """The layer whose keys and values layer ``layer_idx`` attends over (itself unless it is a consumer)."""
        for producer, *consumers in self.kv_reuse_groups:
            if layer_idx in consumers:
                return producer
        return layer_idx

    def kv_producers(self) -> set[int]:
        return {group[0] for group in self.kv_reuse_groups}

    def validate_architecture(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        require_common(self)
        require_attention(self, rope=True)
        require_positive(self, "mamba_d_state", "mamba_d_conv", "mamba_expand", "mamba_d_ssm", "mamba_dt_rank",
                         "mamba_head_dim", "mamba_n_groups", "mamba_chunk_size")
        require(isinstance(self.num_memory_tokens, int) and self.num_memory_tokens >= 0, "num_memory_tokens",
                f"must be an integer >= 0, got {self.num_memory_tokens!r}")
        self.validate_layer_type()
        require(self.fusion in ("mean", "sum"), "fusion", f"must be 'mean' (Hymba) or 'sum' (Falcon-H1), got {self.fusion!r}")
        require(self.mamba_version in ("mamba1", "mamba2"), "mamba_version",
                f"must be 'mamba1' or 'mamba2', got {self.mamba_version!r}")
        require_positive(self, "attention_value_head_dim")
        if self.fusion == "mean":
            width = self.num_attention_heads * self.attention_value_head_dim
            require(width == self.mamba_d_ssm, "attention_value_head_dim",
                    f"the mean fusion needs the attention output (num_attention_heads x attention_value_head_dim = "
                    f"{width}) as wide as the SSM (mamba_d_ssm = {self.mamba_d_ssm})")
        if self.mamba_version == "mamba2":
            require(self.mamba_d_ssm % self.mamba_head_dim == 0, "mamba_head_dim",
                    f"must divide mamba_d_ssm = {self.mamba_d_ssm}")
            require(self.mamba_num_heads % self.mamba_n_groups == 0, "mamba_n_groups",
                    f"must divide the number of Mamba-2 heads ({self.mamba_num_heads})")
        if "parallel_sliding_attention" in self.layer_types:
            require(isinstance(self.sliding_window, int) and self.sliding_window > 0, "sliding_window",
                    f"sliding-window layers need a positive sliding_window, got {self.sliding_window!r}")
        require_finite(self, "embedding_multiplier", "lm_head_multiplier", "attention_in_multiplier", "key_multiplier",
                       "attention_out_multiplier", "ssm_in_multiplier", "ssm_out_multiplier")
        for name, count in (("ssm_multipliers", 5), ("mlp_multipliers", 2)):
            value = getattr(self, name)
            require(isinstance(value, (list, tuple)) and len(value) == count
                    and all(isinstance(v, (int, float)) and math.isfinite(v) for v in value), name,
                    f"must be {count} finite numbers, got {value!r}")
        self._validate_kv_reuse_groups()

    def _validate_kv_reuse_groups(self) -> None:
        groups, seen = self.kv_reuse_groups, set()
        require(isinstance(groups, (list, tuple)), "kv_reuse_groups", f"must be a list of layer-index lists, got {groups!r}")
        for group in groups:
            ok = (isinstance(group, (list, tuple)) and len(group) >= 2
                  and all(isinstance(i, int) and 0 <= i < self.num_hidden_layers for i in group))
            require(ok, "kv_reuse_groups", f"each group is [producer, consumer, ...] of layer indices in "
                                           f"[0, {self.num_hidden_layers}), got {group!r}")
            producer, *consumers = group
            require(all(c > producer for c in consumers), "kv_reuse_groups",
                    f"consumers must come after their producer, got {group!r}")
            require(not (seen & set(group)), "kv_reuse_groups", f"layer(s) {sorted(seen & set(group))} are in two groups")
            seen |= set(group)
            for c in consumers:
                require(not (self.layer_types[producer] == "parallel_sliding_attention"
                             and self.layer_types[c] == "parallel_attention"), "kv_reuse_groups",
                        f"global layer {c} cannot read the keys of sliding-window layer {producer}, which keeps only "
                        "its window")


__all__ = ["HymbaConfig"]
