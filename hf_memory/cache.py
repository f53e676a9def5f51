"""Recurrent and segment state in transformers' ``cache_utils``; models use the named functions below, never
``cache.layers[i]``.

Recurrent layers are ``"linear_attention"`` in ``config.layer_types`` (transformers' name for Mamba / GDN
layers), so ``DynamicCache(config=model.config)`` and ``generate`` build a ``LinearAttentionLayer`` for each:
a short-conv history and a recurrent state, reordered by beam search. Attention layers
(``"full_attention"``, ``"sliding_attention"``) get transformers' KV layers. Segment-wise architectures
(Infini-attention now, RMT and Titans next) subclass ``SegmentCacheLayer`` in their modeling file with their
own ``_layer_type``.

A recurrent state cannot be rolled back, so recording the past for a later ``crop`` (assisted / speculative
decoding) is refused up front.
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


def own_cache_layer(cache: Cache | None, layer_idx: int, kind: type):
    """The cache layer of ``layer_idx`` when it is the architecture's own ``kind`` of layer, else a clear error;
    None without a cache."""
    if cache is None:
        return None
    layer = cache.layers[layer_idx]
    if not isinstance(layer, kind):
        raise ValueError(f"cache layer {layer_idx} is a {type(layer).__name__}, not a {kind.__name__}: build the "
                         "cache with DynamicCache(config=model.config) for this model")
    return layer


def segment_state(cache: Cache | None, layer_idx: int) -> SegmentCacheLayer | None:
    """The segment cache layer of ``layer_idx`` once it holds a state, else None (no cache, or first call)."""
    layer = own_cache_layer(cache, layer_idx, SegmentCacheLayer)
    return layer if layer is not None and layer.is_initialized else None


def store_segment_state(cache: Cache | None, layer_idx: int, **state) -> None:
    """Keep a segment layer's state (the names its ``state_names`` declare, plus count and the tokens fed)."""
    if cache is not None:
        cache.layers[layer_idx].store(**state)


class RowStateCacheLayer(cache_utils.CacheLayerMixin):
    """A cache layer of per-row tensors (batch first) named in ``tensor_names``, fed ``tokens`` tokens so far (pads
    included; what ``get_seq_length`` reports): beam search reorders the rows; cropping (assisted decoding) and
    offloading are refused. Subclasses fill the tensors with their own update methods."""

    tensor_names: tuple[str, ...] = ()
    supports_early_init = False
    is_compileable = False
    is_croppable = False
    crop_refusal = "this cache cannot be cropped"

    def __init__(self, **kwargs):
        super().__init__()
        for name in self.tensor_names:
            setattr(self, name, None)
        self.tokens = 0

    def lazy_initialization(self, *args, **kwargs) -> None:
        raise NotImplementedError(f"a {type(self).__name__} is filled by its own update method, not key/value updates")

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError(f"a {type(self).__name__} is filled by its own update method, not key/value updates")

    def get_seq_length(self) -> int:
        return self.tokens

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.tokens + query_length, 0

    def _map_tensors(self, fn) -> None:
        for name in self.tensor_names:
            if getattr(self, name) is not None:  # a state the configuration does not use
                setattr(self, name, fn(getattr(self, name)))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_tensors(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_tensors(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_tensors(lambda t: t[indices])

    def reset(self) -> None:
        self.__init__()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(f"{self.crop_refusal} (crop)")

    def offload(self) -> None:
        raise NotImplementedError(f"offloading is not supported for {type(self).__name__}")

    def prefetch(self) -> None:
        raise NotImplementedError(f"offloading is not supported for {type(self).__name__}")


class SegmentCacheLayer(RowStateCacheLayer):
    """Cache of a segment-wise layer: per row, the state the architecture names in ``state_names`` (tensors
    with the batch first: a memory, the current segment's keys / values ...), ``count`` [B] real tokens in
    each row's unfinished segment, and ``tokens`` fed (pads included). Bounded: at most one segment of tokens
    is kept.

    A subclass sets ``_layer_type`` (registered for ``DynamicCache`` and ``StaticCache`` alike: the state is
    already bounded) and ``state_names``.
    """

    state_names: tuple[str, ...] = ()
    crop_refusal = "a segment memory cannot be cropped: folded segments cannot be taken back"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.tensor_names = (*cls.state_names, "count")
        if cls._layer_type is not None:
            cache_utils.STATIC_LAYER_TYPE_MAPPING[cls._layer_type] = cls

    def store(self, count: torch.Tensor, processed: int, **state: torch.Tensor) -> None:
        if set(state) != set(self.state_names):
            raise ValueError(f"{type(self).__name__} stores {sorted(self.state_names)}, got {sorted(state)}")
        for name, tensor in state.items():
            setattr(self, name, tensor)
        self.count, self.tokens = count, processed
        self.is_initialized = True
