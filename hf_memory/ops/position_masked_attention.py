"""Softmax attention whose mask is a function of token positions: key j is visible to query i when it is real
(position >= 0; pads carry -1), not after the query, and within the window (``q - k < window``: ``window`` keys
including the query's own) or one of the first ``num_sinks`` positions. With ``num_sinks`` meta tokens this is
Hymba's sliding-window mask ``causal AND (in window OR meta)`` (arXiv 2411.13676, section 2.2); with
``window=None``, plain causal attention over real keys.

Positions, not slots, decide: a left-padded row equals the same row unpadded, and a cache may keep the sink
keys pinned in front of the last window.

Implementations:
  * ``position_mask`` as an additive [B, 1, T, S] mask for the model's eager / sdpa attention: the definition,
    on every device;
  * ``flex_position_attention``: PyTorch's flex attention (``torch.nn.attention.flex_attention``, compiled) with a
    block mask built from the same predicate, chosen on CUDA through ``hf_memory.kernels`` (operator
    ``"flex_attention"``): key blocks no query of a block can see are skipped, no [T, S] mask is materialised.
"""

from __future__ import annotations

import functools

import torch


def position_mask(query_positions, key_positions, window: int | None, num_sinks: int) -> torch.Tensor:
    """Boolean [B, T, S]: which keys (positions [B, S], -1 at pads) each query (positions [B, T]) sees."""
    q, k = query_positions[:, :, None], key_positions[:, None, :]
    visible = (k >= 0) & (k <= q)
    if window is not None:
        visible = visible & ((q - k < window) | (k < num_sinks))
    return visible


def additive_position_mask(query_positions, key_positions, window: int | None, num_sinks: int, dtype) -> torch.Tensor:
    """``position_mask`` as the additive [B, 1, T, S] mask of eager / sdpa attention (0 or the dtype's min)."""
    visible = position_mask(query_positions, key_positions, window, num_sinks)
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(
        ~visible, torch.finfo(dtype).min)[:, None]


def flex_block_mask(query_positions, key_positions, window: int | None, num_sinks: int):
    """The flex-attention ``BlockMask`` of ``position_mask`` (the same predicate, evaluated per block)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        q, k = query_positions[b, q_idx], key_positions[b, kv_idx]
        visible = (k >= 0) & (k <= q)
        if window is not None:
            visible = visible & ((q - k < window) | (k < num_sinks))
        return visible

    batch, length = query_positions.shape
    return create_block_mask(mask_mod, batch, None, length, key_positions.shape[1], device=query_positions.device)


def flex_position_attention(flex_attention, query, key, value, block_mask, scaling: float) -> torch.Tensor:
    """softmax(q k^T * scaling, masked by ``position_mask``) v through ``flex_attention`` (the function, compiled
    or not) and the ``flex_block_mask`` of the positions; query [B, H, T, d], key [B, H_kv, S, d], value
    [B, H_kv, S, d_v]. Returns [B, T, H, d_v] (the layout of transformers' attention functions). A query that
    sees no key gets 0."""
    out = flex_attention(query, key, value, block_mask=block_mask, scale=scaling,
                         enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous()


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def compiled_flex_attention(*args, **kwargs) -> torch.Tensor:
    """``flex_attention`` compiled on first use (uncompiled, it materialises the scores and is only a check)."""
    return _compiled_flex_attention()(*args, **kwargs)
