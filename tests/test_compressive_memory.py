"""Infini-attention's compressive memory (the reference of hf_memory.ops.compressive_memory): segment
causality, the closed forms of the linear and delta updates, pads, GQA, fp32 state, truncated gradients."""

from __future__ import annotations

import pytest
import torch

from hf_memory.ops.compressive_memory import segmented_memory, sigma, update


def _qkv(batch=2, heads=4, kv_heads=2, length=23, d_k=8, d_v=6, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, d_k, generator=generator)
    k = torch.randn(batch, kv_heads, length, d_k, generator=generator)
    v = torch.randn(batch, kv_heads, length, d_v, generator=generator)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def test_linear_memory_is_the_sum_of_every_written_key_value_pair():
    q, k, v = _qkv()
    _, (memory, norm) = segmented_memory(q, k, v, segment_size=5)
    torch.testing.assert_close(memory, sigma(k).transpose(-1, -2) @ v)
    torch.testing.assert_close(norm, sigma(k).sum(-2))


def test_each_token_reads_the_memory_of_earlier_segments_only_closed_form():
    q, k, v = (t.double() for t in _qkv(length=17))
    segment, eps = 4, 1e-6
    retrieved, _ = segmented_memory(q, k, v, segment_size=segment, eps=eps)
    groups = q.shape[1] // k.shape[1]
    for t in range(q.shape[2]):
        written = (t // segment) * segment  # tokens of earlier segments
        for h in range(q.shape[1]):
            sk, vv = sigma(k[:, h // groups, :written]).double(), v[:, h // groups, :written]
            sq = sigma(q[:, h, t]).double()
            numerator = torch.einsum("bk,btk,btv->bv", sq, sk, vv)
            denominator = torch.einsum("bk,btk->b", sq, sk)[:, None] + eps
            torch.testing.assert_close(retrieved[:, h, t].double(), numerator / denominator)


def test_changing_a_segment_changes_only_later_retrievals():
    q, k, v = _qkv(length=20)
    before, _ = segmented_memory(q, k, v, segment_size=5)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 10:15] += 1.0
    v2[:, :, 10:15] -= 1.0
    after, _ = segmented_memory(q, k2, v2, segment_size=5)
    torch.testing.assert_close(after[:, :, :15], before[:, :, :15])
    assert (after[:, :, 15:] - before[:, :, 15:]).abs().max() > 1e-3


def test_delta_update_adds_nothing_for_a_value_the_memory_already_returns():
    _, k, v = _qkv(batch=1, kv_heads=1, length=1)
    memory, norm = update(torch.zeros(1, 1, 8, 6), torch.zeros(1, 1, 8), k, v, rule="linear")
    retrieved_v = (sigma(k) @ memory) / (sigma(k) @ norm[..., None] + 1e-6)
    torch.testing.assert_close(retrieved_v, v, rtol=1e-4, atol=1e-5)
    memory_after, norm_after = update(memory, norm, k, v, rule="delta")
    torch.testing.assert_close(memory_after, memory, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(norm_after, norm + sigma(k).sum(-2))


def test_pads_write_nothing():
    q, k, v = _qkv(length=12)
    keep = torch.ones(2, 12)
    keep[0, :5] = 0
    _, (memory, norm) = segmented_memory(q, k, v, segment_size=4, keep=keep, rule="delta")
    # row 0's real tokens 5..11 fall in segments [4, 8) and [8, 12): write just them, segment by segment
    memory_steps, norm_steps = torch.zeros_like(memory[:1]), torch.zeros_like(norm[:1])
    for start, end in [(5, 8), (8, 12)]:
        memory_steps, norm_steps = update(memory_steps, norm_steps, k[:1, :, start:end], v[:1, :, start:end],
                                          rule="delta")
    torch.testing.assert_close(memory[:1], memory_steps)
    torch.testing.assert_close(norm[:1], norm_steps)


def test_query_heads_share_the_memory_of_their_kv_head():
    q, k, v = _qkv(heads=4, kv_heads=2)
    grouped, _ = segmented_memory(q, k, v, segment_size=6)
    repeated, _ = segmented_memory(q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), segment_size=6)
    torch.testing.assert_close(grouped, repeated)


def test_memory_and_normaliser_stay_fp32_for_bf16_inputs():
    q, k, v = _qkv(dtype=torch.bfloat16)
    retrieved, (memory, norm) = segmented_memory(q, k, v, segment_size=5, rule="delta")
    assert retrieved.dtype == torch.bfloat16
    assert memory.dtype == norm.dtype == torch.float32


@pytest.mark.parametrize("detach_every,flows", [(None, True), (1, False)])
def test_detach_every_k_segments_cuts_gradients_through_memory(detach_every, flows):
    q, k, v = _qkv(length=15)
    k.requires_grad_()
    retrieved, _ = segmented_memory(q, k, v, segment_size=5, detach_every=detach_every)
    last = retrieved[:, :, 10:].sum()  # the last segment reads memory written by segments 0 and 1
    (grad,) = torch.autograd.grad(last, k, allow_unused=True) if last.requires_grad else (None,)
    assert (grad is not None and grad[:, :, :5].abs().sum() > 0) == flows


def test_unknown_update_rule_is_refused():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="unknown memory update"):
        segmented_memory(q, k, v, segment_size=5, rule="hebbian")
