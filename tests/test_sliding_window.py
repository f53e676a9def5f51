"""Sliding-window attention (hf_memory.ops.sliding_window): the blockwise op equals the dense definition and
transformers' own sliding-window mask + eager attention, in values and gradients; empty rows are zeros; the
largest intermediate is O(T * window), not O(T^2)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import PreTrainedConfig
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_sliding_window_causal_mask
from transformers.models.llama.modeling_llama import eager_attention_forward

from hf_memory.ops.sliding_window import sliding_window_attention, sliding_window_attention_reference

# (batch, heads, kv_heads, T, S, window, block_size, left pads of the last sequence)
CASES = {
    "plain": (1, 2, 2, 40, 40, 8, None, 0),
    "gqa_left_padding": (2, 4, 2, 37, 37, 6, 8, 11),
    "prefix_gqa_padding": (2, 6, 2, 19, 45, 10, 4, 30),
    "block_not_dividing_T": (2, 2, 1, 33, 33, 5, 7, 3),
    "window_larger_than_T": (2, 2, 2, 12, 20, 64, None, 5),
    "window_one": (1, 3, 1, 17, 17, 1, 5, 0),
    "single_query_decode": (2, 4, 2, 1, 30, 9, None, 4),
    "default_blocks_long": (2, 4, 2, 300, 310, 20, None, 40),
}


def _inputs(batch, heads, kv_heads, length, kv_length, pads, head_dim=8, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, head_dim, generator=generator).to(dtype)
    k = torch.randn(batch, kv_heads, kv_length, head_dim, generator=generator).to(dtype)
    v = torch.randn(batch, kv_heads, kv_length, head_dim, generator=generator).to(dtype)
    mask = torch.ones(batch, kv_length, dtype=torch.long)
    mask[-1, :pads] = 0  # left padding of the last sequence
    return q, k, v, mask


def _transformers_attention(q, k, v, mask, window):
    """transformers' create_sliding_window_causal_mask (eager, 4-D additive) + eager_attention_forward."""
    config = PreTrainedConfig()
    config.sliding_window = window
    config._attn_implementation = "eager"
    batch, heads, length, head_dim = q.shape
    prefix = k.shape[2] - length
    cache = None
    if prefix:  # a cached prefix of keys: the queries are the last T positions
        cache = DynamicCache()
        cache.update(k[:, :, :prefix], v[:, :, :prefix], layer_idx=0)
    additive = create_sliding_window_causal_mask(
        config=config,
        inputs_embeds=q.new_zeros(batch, length, 1),
        attention_mask=mask,
        cache=cache,
        position_ids=torch.arange(prefix, prefix + length)[None],
    )
    module = SimpleNamespace(num_key_value_groups=heads // k.shape[1], training=False)
    out, _ = eager_attention_forward(module, q, k, v, additive, scaling=head_dim**-0.5)
    return out


def _rows_with_a_key(mask, length, window):
    """[B, T] bool: query t has at least one real key in its window."""
    kv_length = mask.shape[1]
    positions = torch.arange(kv_length)
    q_pos = positions[kv_length - length :]
    band = (positions[None, :] <= q_pos[:, None]) & (positions[None, :] > q_pos[:, None] - window)
    return (band[None] & mask[:, None, :].bool()).any(-1)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_blockwise_equals_the_dense_reference(case):
    batch, heads, kv_heads, length, kv_length, window, block, pads = case
    q, k, v, mask = _inputs(batch, heads, kv_heads, length, kv_length, pads)
    kwargs = dict(window=window, scaling=8**-0.5, key_padding_mask=mask)
    out = sliding_window_attention(q, k, v, block_size=block, **kwargs)
    assert out.shape == (batch, length, heads, 8)
    torch.testing.assert_close(out, sliding_window_attention_reference(q, k, v, **kwargs), rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_transformers_sliding_window_mask_and_eager_attention(case):
    batch, heads, kv_heads, length, kv_length, window, block, pads = case
    q, k, v, mask = _inputs(batch, heads, kv_heads, length, kv_length, pads, seed=1)
    out = sliding_window_attention(
        q, k, v, window=window, scaling=8**-0.5, key_padding_mask=mask, block_size=block
    )
    expected = _transformers_attention(q, k, v, mask, window)
    # transformers spreads an empty row over every key; this op returns zeros there (tested below)
    rows = _rows_with_a_key(mask, length, window)
    torch.testing.assert_close(out[rows], expected[rows], rtol=0, atol=1e-5)


def test_matches_transformers_behind_its_sliding_window_cache():
    """Decode-style: the cache keeps only window - 1 old keys, the 2-D mask covers every position seen."""
    window, prompt, chunk = 6, 13, 4
    q, k, v, mask = _inputs(2, 4, 2, prompt + chunk, prompt + chunk, pads=3, seed=2)
    config = PreTrainedConfig(sliding_window=window, layer_types=["sliding_attention"], num_hidden_layers=1)
    config._attn_implementation = "eager"
    cache = DynamicCache(config=config)
    cache.update(k[:, :, :prompt], v[:, :, :prompt], layer_idx=0)
    additive = create_sliding_window_causal_mask(
        config=config, inputs_embeds=q.new_zeros(2, chunk, 1), attention_mask=mask, cache=cache,
        position_ids=torch.arange(prompt, prompt + chunk)[None],
    )
    keys, values = cache.update(k[:, :, prompt:], v[:, :, prompt:], layer_idx=0)
    assert keys.shape[2] == window - 1 + chunk  # the cache really dropped old keys
    module = SimpleNamespace(num_key_value_groups=2, training=False)
    expected, _ = eager_attention_forward(module, q[:, :, prompt:], keys, values, additive, scaling=8**-0.5)
    out = sliding_window_attention(
        q[:, :, prompt:], keys, values, window=window, scaling=8**-0.5, key_padding_mask=mask[:, -keys.shape[2] :]
    )
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", ["gqa_left_padding", "prefix_gqa_padding", "block_not_dividing_T"])
def test_gradients_equal_the_dense_reference(case):
    batch, heads, kv_heads, length, kv_length, window, block, pads = CASES[case]
    inputs = _inputs(batch, heads, kv_heads, length, kv_length, pads, seed=3)
    mask = inputs[3]
    cotangent = torch.randn(batch, length, heads, 8, generator=torch.Generator().manual_seed(4))
    grads = []
    for fn, extra in ((sliding_window_attention, {"block_size": block}), (sliding_window_attention_reference, {})):
        q, k, v = (x.clone().requires_grad_() for x in inputs[:3])
        out = fn(q, k, v, window=window, scaling=8**-0.5, key_padding_mask=mask, **extra)
        grads.append(torch.autograd.grad((out * cotangent).sum(), (q, k, v)))
    for blockwise, dense in zip(*grads):
        torch.testing.assert_close(blockwise, dense, rtol=1e-4, atol=1e-6)


def test_rows_without_an_allowed_key_are_zero_with_finite_gradients():
    q, k, v, mask = _inputs(2, 4, 2, 24, 24, pads=10, seed=5)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = sliding_window_attention(q, k, v, window=4, scaling=8**-0.5, key_padding_mask=mask, block_size=5)
    empty = ~_rows_with_a_key(mask, 24, 4)
    assert empty.sum() == 10  # the 10 left pads see only pads
    assert torch.isfinite(out).all() and (out[empty] == 0).all()
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))
    assert (q.grad[1, :, :10] == 0).all()  # an empty row sends no gradient


def test_bf16_stays_bf16_and_close_to_fp32():
    q, k, v, mask = _inputs(2, 4, 2, 50, 50, pads=7, seed=6, dtype=torch.bfloat16)
    kwargs = dict(window=9, scaling=8**-0.5, key_padding_mask=mask)
    out = sliding_window_attention(q, k, v, block_size=16, **kwargs)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    fp32 = sliding_window_attention_reference(q.float(), k.float(), v.float(), **kwargs)
    torch.testing.assert_close(out.float(), fp32, rtol=0, atol=3e-2)


def test_dropout_acts_only_in_training():
    q, k, v, mask = _inputs(1, 2, 2, 30, 30, pads=0, seed=7)
    kwargs = dict(window=8, scaling=8**-0.5, key_padding_mask=mask, dropout=0.5)
    reference = sliding_window_attention_reference(q, k, v, window=8, scaling=8**-0.5, key_padding_mask=mask)
    torch.testing.assert_close(sliding_window_attention(q, k, v, training=False, **kwargs), reference)
    torch.manual_seed(0)
    dropped = sliding_window_attention(q, k, v, training=True, **kwargs)
    assert (dropped - reference).abs().max() > 1e-2
    torch.manual_seed(0)
    torch.testing.assert_close(sliding_window_attention(q, k, v, training=True, **kwargs), dropped)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces (no timing, no allocator statistics)."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


def test_largest_intermediate_is_linear_in_length_not_quadratic():
    length, window, heads, head_dim = 16384, 64, 2, 16
    generator = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, heads, length, head_dim, generator=generator) for _ in range(3))
    with torch.no_grad(), _LargestTensor() as probe:
        out = sliding_window_attention(q, k, v, window=window, scaling=head_dim**-0.5)
    assert torch.isfinite(out).all()
    # the output itself (T * H * d) is the largest tensor; a dense score matrix would be H * T^2 = 4096x more
    assert probe.largest <= length * heads * max(head_dim, window)
    assert probe.largest * 1000 < heads * length * length


def test_rejects_a_padding_mask_that_does_not_cover_the_keys():
    q, k, v, mask = _inputs(1, 2, 2, 10, 12, pads=0)
    with pytest.raises(ValueError, match=r"key_padding_mask.*attention_mask\[:, -S:\]"):
        sliding_window_attention(q, k, v, window=4, scaling=1.0, key_padding_mask=torch.cat([mask, mask], 1))


@pytest.mark.parametrize("case", ["gqa_left_padding", "prefix_gqa_padding", "single_query_decode"])
def test_sinks_are_seen_by_every_query_and_blockwise_equals_dense_with_them(case):
    """Sink keys (Titans' persistent memory) in front of every window: blockwise = reference, values and
    gradients; and the reference = an explicit dense mask whose sink columns are all open."""
    batch, heads, kv_heads, length, kv_length, window, block, pads = CASES[case]
    q, k, v, mask = _inputs(batch, heads, kv_heads, length, kv_length, pads)
    generator = torch.Generator().manual_seed(1)
    sinks = [torch.randn(1, kv_heads, 3, 8, generator=generator).requires_grad_() for _ in range(2)]
    leaves = [q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), *sinks]
    results = []
    for attend in (sliding_window_attention, sliding_window_attention_reference):
        for t in leaves:
            t.grad = None
        kwargs = dict(block_size=block) if attend is sliding_window_attention else {}
        out = attend(q, k, v, window=window, scaling=0.3, key_padding_mask=mask, sinks=tuple(sinks), **kwargs)
        out.square().sum().backward()
        results.append([out] + [t.grad.clone() for t in leaves])
    for blockwise, reference in zip(*results):
        torch.testing.assert_close(blockwise, reference, rtol=1e-5, atol=1e-6)
    # explicit: keys [sinks ; keys], a query at absolute position i sees every sink and its window's real keys
    groups = heads // kv_heads
    keys, values = (torch.cat([s.expand(batch, -1, -1, -1), x], 2).repeat_interleave(groups, 1)
                    for s, x in zip(sinks, (k, v)))
    i = torch.arange(kv_length - length, kv_length)[:, None]
    j = torch.arange(kv_length)[None]
    visible = ((j <= i) & (j > i - window))[None] & mask.bool()[:, None]
    visible = torch.cat([torch.ones(batch, length, 3, dtype=torch.bool), visible], -1)[:, None]
    scores = (q @ keys.transpose(-1, -2)) * 0.3
    dense = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1) @ values
    torch.testing.assert_close(results[1][0], dense.transpose(1, 2), rtol=1e-5, atol=1e-6)
