"""Softmax attention shared by the hybrids: GQA, optional RoPE, full or sliding window.

Sliding-window layers run blockwise (``hf_memory.ops.sliding_window``, O(T * window) memory) whenever they get
the 2-D padding mask instead of a 4-D one: the model passes it for eager / sdpa when the input is longer than
the window, where a dense [T, T] mask would be quadratic.

Every softmax attention in the project (this mixer, Infini-attention's segment attention, those to come) runs
through transformers' ``ALL_ATTENTION_FUNCTIONS`` under ``config._attn_implementation`` (``eager``, ``sdpa``,
``flash_attention_2`` ...), with ``eager_attention`` below as the one eager implementation; masks come from
``transformers.masking_utils`` and KV from the model's ``Cache``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from hf_memory.ops.sliding_window import sliding_window_attention


class RotaryEmbedding(nn.Module):
    """RoPE (Su et al. 2021) of ``config.rope_parameters``: the default theta^(-2i/d) frequencies, or any of
    transformers' scaled types (linear, dynamic, yarn, llama3, ...), for heads of ``config.head_dim``."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        self.max_seq_len_cached = self.original_max_seq_len = config.max_position_embeddings
        init_fn = self.compute_default_rope_parameters if self.rope_type == "default" else ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = init_fn(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # re-made by transformers' _init_weights
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config, device=None, seq_len=None) -> tuple[torch.Tensor, float]:
        """theta^(-2i/d) for d = head_dim, and attention scaling 1."""
        dim, theta = config.head_dim, config.rope_parameters["rope_theta"]
        return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)), 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)  # [B, T, d/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, d]; cos, sin [B, T, d]."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, H_kv, S, d] -> [B, H_kv * groups, S, d], each KV head serving ``groups`` query heads (an expand;
    the reshape copies only where the layout requires it)."""
    if groups == 1:
        return x
    batch, heads, length, dim = x.shape
    return x[:, :, None].expand(batch, heads, groups, length, dim).reshape(batch, heads * groups, length, dim)


def eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """softmax(q k^T * scaling + mask) v with an fp32 softmax; query [B, H, T, d], key/value [B, H_kv, S, d],
    mask additive [B, 1, T, S]. Returns ([B, T, H, d], weights [B, H, T, S])."""
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scores = (query @ key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]]
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return (weights @ value).transpose(1, 2).contiguous(), weights


def runs_blockwise(config, length: int) -> bool:
    """Whether sliding-window layers take the blockwise O(T * window) path for ``length`` new tokens."""
    return config._attn_implementation in ("eager", "sdpa") and length > config.sliding_window


def blockwise_sliding_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """The attention-function interface over ``sliding_window_attention``; ``attention_mask`` is the 2-D padding
    mask of the cached + new tokens (or None). Returns no attention weights."""
    padding = None if attention_mask is None else attention_mask[:, -key.shape[2] :].bool()
    out = sliding_window_attention(query, key, value, window=module.sliding_window, scaling=scaling,
                                   key_padding_mask=padding, dropout=dropout, training=module.training)
    return out, None


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads (Ainslie et al. 2023), RoPE unless ``use_rope=False``, and a
    sliding window of ``config.sliding_window`` on ``"sliding_attention"`` layers. Values may be wider than
    queries and keys (``config.attention_value_head_dim``, Hymba's heads)."""

    def __init__(self, config, layer_idx: int, use_rope: bool = True, output_projection: bool = True,
                 key_value_projections: bool = True):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads  # read by transformers' kernels
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.sliding_window = config.sliding_window if config.layer_types[layer_idx] == "sliding_attention" else None
        self.use_rope = use_rope
        self.is_causal = True
        self.attention_dropout = config.attention_dropout
        hidden, bias = config.hidden_size, config.attention_bias
        self.value_head_dim = getattr(config, "attention_value_head_dim", None) or self.head_dim
        self.key_multiplier = getattr(config, "key_multiplier", 1.0)  # Falcon-H1's muP factor on k
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        if key_value_projections:  # without: the layer reads another layer's K and V (cross-layer KV sharing)
            self.k_proj = nn.Linear(hidden, self.num_key_value_heads * self.head_dim, bias=bias)
            self.v_proj = nn.Linear(hidden, self.num_key_value_heads * self.value_head_dim, bias=bias)
        # a parallel hybrid may fuse the heads' output with its SSM's before one shared projection
        self.o_proj = nn.Linear(self.num_heads * self.value_head_dim, hidden, bias=bias) if output_projection else None

    def project(self, hidden_states, position_embeddings=None):
        """q [B, H, T, d], k [B, H_kv, T, d] (RoPE applied), v [B, H_kv, T, d_v]; k and v are None in a layer
        without key / value projections."""
        batch, length, _ = hidden_states.shape
        cos, sin = position_embeddings if self.use_rope else (None, None)
        q = self.q_proj(hidden_states).view(batch, length, -1, self.head_dim).transpose(1, 2)
        q = apply_rotary(q, cos, sin) if self.use_rope else q
        if not hasattr(self, "k_proj"):
            return q, None, None
        k = self.k_proj(hidden_states).view(batch, length, -1, self.head_dim).transpose(1, 2) * self.key_multiplier
        k = apply_rotary(k, cos, sin) if self.use_rope else k
        v = self.v_proj(hidden_states).view(batch, length, -1, self.value_head_dim).transpose(1, 2)
        return q, k, v

    def attend(self, q, k, v, attention_mask, **kwargs):
        """The ``config._attn_implementation`` attention of q over k, v: ([B, T, H * d_v], weights or None)."""
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention)
        if self.sliding_window and (runs_blockwise(self.config, q.shape[2]) if attention_mask is None
                                    else isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2):
            attend = blockwise_sliding_attention
        out, weights = attend(
            self, q, k, v, attention_mask, dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling, sliding_window=self.sliding_window, **kwargs,
        )
        return out.reshape(q.shape[0], q.shape[2], -1), weights

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, cache=None, **kwargs):
        q, k, v = self.project(hidden_states, position_embeddings)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        out, weights = self.attend(q, k, v, attention_mask, **kwargs)
        return self.o_proj(out), weights
