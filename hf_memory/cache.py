"""Recurrent state in transformers' ``cache_utils``.

Recurrent layers are ``"linear_attention"`` in ``config.layer_types`` (transformers' name for Mamba / GDN
layers), so ``DynamicCache(config=model.config)`` and ``generate`` build a ``LinearAttentionLayer`` for each:
a short-conv history and a recurrent state, reordered by beam search. Attention layers
(``"full_attention"``, ``"sliding_attention"``) get transformers' KV layers.

These helpers are how a recurrent layer reads and writes its state. A recurrent state cannot be rolled
back, so recording the past for a later ``crop`` (assisted / speculative decoding) is refused up front.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache


def recurrent_state(cache: Cache | None, layer_idx: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(conv history [B, D, K], recurrent state) of a layer, or (None, None) before its first forward."""
    if cache is None:
        return None, None
    if cache.is_recording_past(layer_idx):
        raise NotImplementedError(
            f"layer {layer_idx} keeps a recurrent state, which cannot be cropped or rolled back: assisted / "
            "speculative decoding and cache.activate_past_recording() are not supported by this model"
        )
    return cache.get_conv_state(layer_idx), cache.get_recurrent_state(layer_idx)


def store_recurrent_state(
    cache: Cache | None, layer_idx: int, conv_input: torch.Tensor, state: torch.Tensor, conv_kernel: int
) -> None:
    """Append this call's conv inputs [B, D, T] to the history and keep the new state (fp32)."""
    if cache is None:
        return
    cache.update_conv_state(conv_input, layer_idx, conv_kernel_size=conv_kernel)
    cache.update_recurrent_state(state.float(), layer_idx)
