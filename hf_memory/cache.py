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
from transformers import cache_utils
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


class SegmentMemoryLayer(cache_utils.CacheLayerMixin):
    """Cache of one Infini-attention layer (``layer_types`` entry ``"infini_attention"``).

    Per row: the compressive memory M [H_kv, d_k, d_v] and normaliser z [H_kv, d_k] (fp32), the current
    segment's rotated keys, un-rotated keys and values (at most ``segment_size`` tokens: decode memory is
    bounded by one segment), how many tokens the segment holds, and how many real tokens the row has seen
    (its next RoPE position). When a row's segment fills it is folded into M, z and emptied.
    """

    _layer_type = "infini_attention"
    supports_early_init = False
    is_compileable = False
    is_croppable = False

    def __init__(self, **kwargs):
        super().__init__()
        self.memory = self.norm = self.raw_keys = None
        self.count = self.seen = None
        self.processed = 0

    def lazy_initialization(self, *args, **kwargs) -> None:
        raise NotImplementedError("an Infini-attention cache layer is filled by `store`, not by key/value updates")

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError("an Infini-attention cache layer is filled by `store`, not by key/value updates")

    def store(self, memory, norm, keys, raw_keys, values, count, seen, processed: int) -> None:
        self.memory, self.norm, self.keys, self.raw_keys, self.values = memory, norm, keys, raw_keys, values
        self.count, self.seen, self.processed = count, seen, processed
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.processed

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.processed + query_length, 0

    def _tensors(self) -> list[str]:
        return ["memory", "norm", "keys", "raw_keys", "values", "count", "seen"]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            for name in self._tensors():
                tensor = getattr(self, name)
                setattr(self, name, tensor.index_select(0, beam_idx.to(tensor.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            for name in self._tensors():
                setattr(self, name, getattr(self, name).repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            for name in self._tensors():
                setattr(self, name, getattr(self, name)[indices])

    def reset(self) -> None:
        self.__init__()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a compressive memory cannot be cropped: the folded segments cannot be taken back")

    def offload(self) -> None:
        raise NotImplementedError("offloading is not supported for Infini-attention cache layers")

    def prefetch(self) -> None:
        raise NotImplementedError("offloading is not supported for Infini-attention cache layers")
