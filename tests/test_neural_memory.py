"""Titans' neural memory operator: the analytic per-token gradient is autograd's, the token-by-token reference is
the sequential rule of eqs. 12-15, and the chunked form equals the reference forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_memory.ops.neural_memory import mlp_forward, neural_memory_chunked, neural_memory_reference, token_gradients


def _inputs(batch=2, heads=3, length=24, dim=8, depth=2, expansion=2, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, length, dim, generator=g) for _ in range(3))
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    theta = torch.rand(batch, heads, length, generator=g) * 0.5
    eta = 0.5 + 0.5 * torch.rand(batch, heads, length, generator=g)
    alpha = torch.rand(batch, heads, length, generator=g) * 0.1
    sizes = [dim] + [expansion * dim] * (depth - 1) + [dim]
    weights = [torch.randn(heads, a, b, generator=g) / a**0.5 for a, b in zip(sizes, sizes[1:])]
    tensors = [q, k, v, theta, eta, alpha] + weights
    for t in tensors:
        t.requires_grad_(requires_grad)
    return tensors[:6], weights


def _batched(weights, batch):
    return [w[None].expand(batch, *w.shape) for w in weights]


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_factored_token_gradients_are_autograds_gradients_of_the_associative_loss(depth):
    (q, k, v, *_), weights = _inputs(depth=depth)
    weights = [w[None].expand(2, *w.shape).clone().requires_grad_(True) for w in weights]
    loss = 0.5 * (mlp_forward(weights, k[:, :, :1])[0] - v[:, :, :1]).square().sum()
    expected = torch.autograd.grad(loss, weights)
    for (a, d), grad in zip(token_gradients(weights, k[:, :, :1], v[:, :, :1]), expected):
        torch.testing.assert_close(a.transpose(-1, -2) @ d, grad, rtol=1e-5, atol=1e-6)


def test_chunk_size_one_is_the_exact_sequential_rule_reading_m_t():
    """S_t = eta S - theta grad l(M_{t-1}), M_t = (1 - alpha) M_{t-1} + S_t, y_t = M_t(q_t), grads by autograd."""
    (q, k, v, theta, eta, alpha), weights = _inputs(depth=2, length=10)
    memory = [w[None].expand(2, *w.shape).clone() for w in weights]
    momentum = [torch.zeros_like(w) for w in memory]
    expected = []
    for t in range(10):
        params = [w.clone().requires_grad_(True) for w in memory]
        loss = 0.5 * (mlp_forward(params, k[:, :, t : t + 1])[0] - v[:, :, t : t + 1]).square().sum()
        grads = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum(g.square().sum((-1, -2)) for g in grads))
        clip = (1.0 / norm).clamp(max=1.0)[..., None, None]
        step = theta[:, :, t, None, None] * clip
        momentum = [eta[:, :, t, None, None] * s - step * g for s, g in zip(momentum, grads)]
        memory = [(1 - alpha[:, :, t, None, None]) * w + s for w, s in zip(memory, momentum)]
        expected.append(mlp_forward(memory, q[:, :, t : t + 1])[0])
    y, final, _ = neural_memory_reference(q, k, v, theta, eta, alpha, _batched(weights, 2), chunk_size=1)
    torch.testing.assert_close(y, torch.cat(expected, 2), rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(final, memory):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 4, 8])
@pytest.mark.parametrize("depth", [1, 2])
def test_chunked_form_equals_the_reference_forward_and_backward(chunk_size, depth):
    results = []
    for implementation in (neural_memory_reference, neural_memory_chunked):
        inputs, weights = _inputs(depth=depth, requires_grad=True)
        y, final, momentum = implementation(*inputs, _batched(weights, 2), chunk_size=chunk_size, max_grad_norm=0.5)
        (y.square().sum() + sum(w.sum() for w in final) + sum(s.sum() for s in momentum)).backward()
        results.append((y, final, [t.grad for t in inputs + weights]))
    (y_ref, final_ref, grads_ref), (y, final, grads) = results
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    for ours, theirs in zip(final, final_ref):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    for ours, theirs in zip(grads, grads_ref):
        torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-4)


def test_larger_chunks_take_gradients_at_the_chunk_start_and_so_change_the_function():
    inputs, weights = _inputs(depth=2)
    exact = neural_memory_chunked(*inputs, _batched(weights, 2), chunk_size=1)[0]
    chunked = neural_memory_chunked(*inputs, _batched(weights, 2), chunk_size=8)[0]
    assert (exact - chunked).abs().max() > 1e-3


def test_a_clipped_step_bounds_every_tokens_gradient_norm():
    (q, k, v, theta, eta, alpha), weights = _inputs(depth=2)
    v = v * 1e4  # huge surprises
    start = _batched(weights, 2)
    _, after, _ = neural_memory_reference(q[:, :, :1], k[:, :, :1], v[:, :, :1], torch.ones_like(theta[:, :, :1]),
                                          torch.zeros_like(eta[:, :, :1]), torch.zeros_like(alpha[:, :, :1]), start,
                                          max_grad_norm=0.5)
    step = torch.sqrt(sum((a - b).square().sum((-1, -2)) for a, b in zip(after, start)))
    assert torch.all(step <= 0.5 + 1e-4) and torch.all(step > 0.49)


def test_memory_state_and_output_are_fp32_for_bf16_inputs():
    inputs, weights = _inputs(depth=2)
    y, final, momentum = neural_memory_chunked(*[t.bfloat16() for t in inputs], _batched(weights, 2), chunk_size=4)
    assert y.dtype == torch.float32 and all(w.dtype == torch.float32 for w in final + momentum)


def test_rows_commit_only_the_chunks_their_lengths_complete_in_both_forms():
    """``lengths`` [B]: row 0 completes one chunk of 8 out of three, row 1 all; the chunked form equals the token-by-
    token reference, row 1 equals the same row alone, and row 0 ends with the weights of its first chunk."""
    inputs, weights = _inputs(requires_grad=True)
    lengths = torch.tensor([13, 24])
    results = []
    for implementation in (neural_memory_reference, neural_memory_chunked):
        y, final, momentum = implementation(*inputs, _batched(weights, 2), chunk_size=8, lengths=lengths)
        real = (torch.arange(24)[None] < lengths[:, None])[:, None, :, None]
        (y * real).square().sum().backward()
        results.append([y * real, *final, *momentum] + [t.grad.clone() for t in inputs + weights])
        for t in inputs + weights:
            t.grad = None
    for chunked, reference in zip(results[1], results[0]):
        torch.testing.assert_close(chunked, reference, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        alone = neural_memory_chunked(*[t[1:] for t in inputs], _batched(weights, 1), chunk_size=8)
        first = neural_memory_chunked(*[t[:1, :, :8] for t in inputs], _batched(weights, 1), chunk_size=8)
        y, final, _ = neural_memory_chunked(*inputs, _batched(weights, 2), chunk_size=8, lengths=lengths)
    torch.testing.assert_close(y[1:], alone[0])
    for w, w_alone, w_first in zip(final, alone[1], first[1]):
        torch.testing.assert_close(w[1:], w_alone)
        torch.testing.assert_close(w[:1], w_first)
    torch.testing.assert_close(y[:1, :, 8:13], mlp_forward(first[1], inputs[0][:1, :, 8:13].detach())[0])
