"""Triton kernels for Titans' neural memory: the chunked update and retrieval of ``neural_memory_chunked`` for a
memory of depth 1 (M(x) = x W_1) or 2 (M(x) = SiLU(x W_1) W_2), every chunk of a sequence in one launch.

One program per (batch row, head) walks the chunks in order; per chunk of C tokens (``chunk_step``'s equations):

    z = k W_1, h = SiLU(z), delta_2 = h W_2 - v, delta_1 = (delta_2 W_2^T) * SiLU'(z)     (factored gradients)
    step_j = theta_j min(1, max_grad_norm / ||G_j||)                                         (per-token clip)
    W_l <- exp(l_beta[C]) W_l + f S_l - (c * a_l)^T delta_l,  S_l <- exp(l_eta[C]) S_l - (m * a_l)^T delta_l
    y = M_old(q) for the chunk's first C - 1 tokens, M_new(q) for its last                 (eq. 15)

with a_1 = k, a_2 = h (depth 1: delta_1 = k W_1 - v). The weights and momentum live in the output buffers (fp32)
between chunks; at depth 2 the hidden units go in blocks of 32, so any width fits a program. Head and hidden sizes
are padded to powers of two with zeros, which the update keeps at zero. A row commits only the chunks its real
tokens complete (``lengths``); a chunk it does not complete costs one read. Matmuls run on tensor cores at the
precision ``fused_precision`` reads from ``torch.get_float32_matmul_precision()``: "tf32x3" by default (fp32-level
accuracy), "tf32" when the user allowed TF32. (IEEE fp32 dots, on CUDA cores, spilled ~50 KB of registers per
thread at head size 96 and ran 2-5x slower than the PyTorch reference on an H200.)

The backward is PyTorch's: the forward keeps the weights and momentum at every chunk start, and the backward
recomputes each chunk with ``chunk_step`` (last chunk first) and differentiates it, so activations are held one
chunk at a time. This module imports triton and is loaded only through ``hf_memory.kernels`` (CUDA tensors,
triton installed); on CPU it runs under ``TRITON_INTERPRET=1`` in the tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hf_memory.ops.neural_memory import FUSED_CHUNK_SIZES as CHUNK_SIZES
from hf_memory.ops.neural_memory import FUSED_MAX_HEAD_SIZE as MAX_HEAD_SIZE
from hf_memory.ops.neural_memory import _in_fp32, chunk_step, fused_fits, fused_precision, mlp_forward


@triton.jit
def _chunk_coefficients(theta_ptr, eta_ptr, alpha_ptr, gates, squared, max_grad_norm, causal, last,
                        CLIP: tl.constexpr):
    """Per token of the chunk: c_j, m_j = theta_j exp(l_eta[C] - l_eta[j]) (clipped steps), and f, exp(l_beta[C]),
    exp(l_eta[C]) (``chunk_step``'s coefficients; the cumulative sums as masked row sums)."""
    step = tl.load(theta_ptr + gates)
    if CLIP:
        step = step * tl.minimum(max_grad_norm / tl.sqrt(tl.maximum(squared, 1e-24)), 1.0)
    log_eta_step = tl.log(tl.maximum(tl.load(eta_ptr + gates), 1e-30))
    log_beta_step = tl.log(1 - tl.load(alpha_ptr + gates))
    log_eta = tl.sum(tl.where(causal, log_eta_step[None, :], 0.0), 1)
    log_beta = tl.sum(tl.where(causal, log_beta_step[None, :], 0.0), 1)
    log_eta_end = tl.sum(tl.where(last, log_eta, 0.0), 0)
    log_beta_end = tl.sum(tl.where(last, log_beta, 0.0), 0)
    to_end = log_beta_end - log_beta + log_eta  # [i]
    carry = tl.where(causal, tl.exp(to_end[:, None] - log_eta[None, :]), 0.0)  # [i, j]
    coefficient = step * tl.sum(carry, 0)
    momentum_weight = tl.exp(log_eta_end - log_eta) * step
    return coefficient, momentum_weight, tl.sum(tl.exp(to_end), 0), tl.exp(log_beta_end), tl.exp(log_eta_end)


@triton.jit
def _linear_memory_kernel(
    q_ptr, k_ptr, v_ptr, theta_ptr, eta_ptr, alpha_ptr, lengths_ptr, w_ptr, s_ptr, saved_ptr, y_ptr,
    length, heads, max_grad_norm,
    D: tl.constexpr, D_PAD: tl.constexpr, C: tl.constexpr, CLIP: tl.constexpr, SAVE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Depth 1: M(x) = x W, delta = k W - v; W [D, D] whole in the program."""
    row = tl.program_id(0)  # batch * heads + head
    real = tl.load(lengths_ptr + row // heads)
    i = tl.arange(0, C)
    d = tl.arange(0, D_PAD)
    causal = i[:, None] >= i[None, :]  # [i, j]: i >= j
    last = i == C - 1
    columns = d[None, :] < D
    inside = (d[:, None] < D) & columns
    matrix = d[:, None] * D + d[None, :]
    w_ptr, s_ptr = w_ptr + row * D * D, s_ptr + row * D * D
    for start in range(0, length, C):  # chunk by chunk
        tokens = (row * length + start + i)[:, None] * D + d[None, :]
        q = tl.load(q_ptr + tokens, mask=columns, other=0.0)
        w = tl.load(w_ptr + matrix, mask=inside, other=0.0)
        if SAVE:  # the chunk start, for the backward's recomputation
            base = saved_ptr + (row * length + start) // C * 2 * D * D
            tl.store(base + matrix, w, mask=inside)
            tl.store(base + D * D + matrix, tl.load(s_ptr + matrix, mask=inside), mask=inside)
        y = tl.dot(q, w, input_precision=PRECISION)
        if real >= start + C:  # the row completes this chunk: commit it
            k = tl.load(k_ptr + tokens, mask=columns, other=0.0)
            delta = tl.dot(k, w, input_precision=PRECISION) - tl.load(v_ptr + tokens, mask=columns, other=0.0)
            squared = tl.sum(k * k, 1) * tl.sum(delta * delta, 1)
            coefficient, momentum_weight, from_momentum, decay, kept = _chunk_coefficients(
                theta_ptr, eta_ptr, alpha_ptr, row * length + start + i, squared, max_grad_norm, causal, last, CLIP)
            s = tl.load(s_ptr + matrix, mask=inside, other=0.0)
            w = (decay * w + from_momentum * s
                 - tl.dot(tl.trans(coefficient[:, None] * k), delta, input_precision=PRECISION))
            s = kept * s - tl.dot(tl.trans(momentum_weight[:, None] * k), delta, input_precision=PRECISION)
            tl.store(w_ptr + matrix, w, mask=inside)
            tl.store(s_ptr + matrix, s, mask=inside)
            y = tl.where(last[:, None], tl.dot(q, w, input_precision=PRECISION), y)
        tl.debug_barrier()  # the next chunk loads what this one stored
        tl.store(y_ptr + tokens, y, mask=columns)


@triton.jit
def _block(d, b, BH: tl.constexpr, D: tl.constexpr, DH: tl.constexpr):
    """Offsets and masks of hidden units b .. b + BH in W_1 [D, DH] and W_2 [DH, D]."""
    h = b + tl.arange(0, BH)
    first, second = d[:, None] * DH + h[None, :], h[:, None] * D + d[None, :]
    return first, second, (d[:, None] < D) & (h[None, :] < DH), (h[:, None] < DH) & (d[None, :] < D)


@triton.jit
def _hidden_and_delta1(k, delta2, w1, w2, PRECISION: tl.constexpr):
    """For one block of hidden units: h = SiLU(k W_1) and delta_1 = (delta_2 W_2^T) * SiLU'(k W_1)."""
    z = tl.dot(k, w1, input_precision=PRECISION)
    sig = tl.sigmoid(z)
    return z * sig, tl.dot(delta2, tl.trans(w2), input_precision=PRECISION) * (sig * (1 + z * (1 - sig)))


@triton.jit
def _mlp_read(x, w1_ptr, w2_ptr, d, D: tl.constexpr, DH: tl.constexpr, BH: tl.constexpr, C: tl.constexpr,
              D_PAD: tl.constexpr, PRECISION: tl.constexpr):
    """SiLU(x W_1) W_2 for x [C, D_PAD], the hidden units in blocks of BH."""
    out = tl.zeros([C, D_PAD], dtype=tl.float32)
    for b in range(0, DH, BH):
        first, second, in1, in2 = _block(d, b, BH, D, DH)
        z = tl.dot(x, tl.load(w1_ptr + first, mask=in1, other=0.0), input_precision=PRECISION)
        out += tl.dot(z * tl.sigmoid(z), tl.load(w2_ptr + second, mask=in2, other=0.0), input_precision=PRECISION)
    return out


@triton.jit
def _mlp_memory_kernel(
    q_ptr, k_ptr, v_ptr, theta_ptr, eta_ptr, alpha_ptr, lengths_ptr, w1_ptr, w2_ptr, s1_ptr, s2_ptr, saved_ptr,
    y_ptr, length, heads, max_grad_norm,
    D: tl.constexpr, DH: tl.constexpr, D_PAD: tl.constexpr, BH: tl.constexpr, C: tl.constexpr, CLIP: tl.constexpr,
    SAVE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Depth 2: M(x) = SiLU(x W_1) W_2, W_1 [D, DH], W_2 [DH, D], the hidden units taken in blocks of BH (so any
    width fits the program): a pass for M(k) and ||h||^2, one for ||delta_1||^2 (clipping), one that updates each
    block from its own old values."""
    row = tl.program_id(0)
    real = tl.load(lengths_ptr + row // heads)
    i = tl.arange(0, C)
    d = tl.arange(0, D_PAD)
    causal = i[:, None] >= i[None, :]
    last = i == C - 1
    columns = d[None, :] < D
    w1_ptr, s1_ptr = w1_ptr + row * D * DH, s1_ptr + row * D * DH
    w2_ptr, s2_ptr = w2_ptr + row * DH * D, s2_ptr + row * DH * D
    for start in range(0, length, C):  # chunk by chunk
        tokens = (row * length + start + i)[:, None] * D + d[None, :]
        q = tl.load(q_ptr + tokens, mask=columns, other=0.0)
        if SAVE:  # the chunk start, for the backward's recomputation
            base = saved_ptr + (row * length + start) // C * 4 * D * DH
            for b in range(0, DH, BH):
                first, second, in1, in2 = _block(d, b, BH, D, DH)
                tl.store(base + first, tl.load(w1_ptr + first, mask=in1), mask=in1)
                tl.store(base + D * DH + first, tl.load(s1_ptr + first, mask=in1), mask=in1)
                tl.store(base + 2 * D * DH + second, tl.load(w2_ptr + second, mask=in2), mask=in2)
                tl.store(base + 3 * D * DH + second, tl.load(s2_ptr + second, mask=in2), mask=in2)
        y = _mlp_read(q, w1_ptr, w2_ptr, d, D, DH, BH, C, D_PAD, PRECISION)
        if real >= start + C:  # the row completes this chunk: commit it
            k = tl.load(k_ptr + tokens, mask=columns, other=0.0)
            delta2 = (_mlp_read(k, w1_ptr, w2_ptr, d, D, DH, BH, C, D_PAD, PRECISION)
                      - tl.load(v_ptr + tokens, mask=columns, other=0.0))
            h_squared = tl.zeros([C], dtype=tl.float32)
            d1_squared = tl.zeros([C], dtype=tl.float32)
            if CLIP:  # ||G_j||^2 = ||h_j||^2 ||delta2_j||^2 + ||k_j||^2 ||delta1_j||^2
                for b in range(0, DH, BH):
                    first, second, in1, in2 = _block(d, b, BH, D, DH)
                    hidden, delta1 = _hidden_and_delta1(k, delta2, tl.load(w1_ptr + first, mask=in1, other=0.0),
                                                        tl.load(w2_ptr + second, mask=in2, other=0.0), PRECISION)
                    h_squared += tl.sum(hidden * hidden, 1)
                    d1_squared += tl.sum(delta1 * delta1, 1)
            squared = h_squared * tl.sum(delta2 * delta2, 1) + tl.sum(k * k, 1) * d1_squared
            coefficient, momentum_weight, from_momentum, decay, kept = _chunk_coefficients(
                theta_ptr, eta_ptr, alpha_ptr, row * length + start + i, squared, max_grad_norm, causal, last, CLIP)
            tl.debug_barrier()  # every block is read at its old values before any is written
            for b in range(0, DH, BH):
                first, second, in1, in2 = _block(d, b, BH, D, DH)
                w1 = tl.load(w1_ptr + first, mask=in1, other=0.0)
                w2 = tl.load(w2_ptr + second, mask=in2, other=0.0)
                s1 = tl.load(s1_ptr + first, mask=in1, other=0.0)
                s2 = tl.load(s2_ptr + second, mask=in2, other=0.0)
                hidden, delta1 = _hidden_and_delta1(k, delta2, w1, w2, PRECISION)
                w1 = (decay * w1 + from_momentum * s1
                      - tl.dot(tl.trans(coefficient[:, None] * k), delta1, input_precision=PRECISION))
                s1 = kept * s1 - tl.dot(tl.trans(momentum_weight[:, None] * k), delta1, input_precision=PRECISION)
                w2 = (decay * w2 + from_momentum * s2
                      - tl.dot(tl.trans(coefficient[:, None] * hidden), delta2, input_precision=PRECISION))
                s2 = kept * s2 - tl.dot(tl.trans(momentum_weight[:, None] * hidden), delta2, input_precision=PRECISION)
                tl.store(w1_ptr + first, w1, mask=in1)
                tl.store(s1_ptr + first, s1, mask=in1)
                tl.store(w2_ptr + second, w2, mask=in2)
                tl.store(s2_ptr + second, s2, mask=in2)
            tl.debug_barrier()  # the read-out below and the next chunk load what was stored
            y = tl.where(last[:, None], _mlp_read(q, w1_ptr, w2_ptr, d, D, DH, BH, C, D_PAD, PRECISION), y)
        tl.store(y_ptr + tokens, y, mask=columns)


# one stage: the loops' loads are not multi-buffered, which keeps shared memory under a Hopper SM's 227 KiB; eight
# warps share the register load of the [head size, head size] tiles (at head size 96, 42% of four warps' spills)
LAUNCH = dict(num_warps=8, num_stages=1)


def hidden_block(hidden: int) -> int:
    """Hidden units per block at depth 2: 32 (16 for narrower memories)."""
    return min(32, triton.next_power_of_2(hidden))


def _launch(q, k, v, theta, eta, alpha, lengths, weights, momentum, chunk_size, max_grad_norm, save):
    """Runs the kernel; returns y, the final weights and momentum, and the chunk-start states (if ``save``)."""
    batch, heads, length, d = q.shape
    hidden = weights[0].shape[-1]
    weights = [w.clone().contiguous() for w in weights]
    momentum = [s.clone().contiguous() for s in momentum]
    q, k, v, theta, eta, alpha = (t.contiguous() for t in (q, k, v, theta, eta, alpha))
    lengths = lengths.to(torch.int32).contiguous()
    chunks = length // chunk_size
    saved = torch.empty(batch, heads, chunks, 2 * len(weights) * d * hidden, device=q.device) if save \
        else torch.empty(1, device=q.device)
    y = torch.empty_like(q)
    d_pad = triton.next_power_of_2(d)
    common = dict(D=d, D_PAD=d_pad, C=chunk_size, CLIP=max_grad_norm is not None, SAVE=save,
                  PRECISION=fused_precision(), **LAUNCH)
    scalars = (length, heads, 0.0 if max_grad_norm is None else float(max_grad_norm))
    if len(weights) == 1:
        _linear_memory_kernel[(batch * heads,)](q, k, v, theta, eta, alpha, lengths, weights[0], momentum[0], saved,
                                                y, *scalars, **common)
    else:
        _mlp_memory_kernel[(batch * heads,)](q, k, v, theta, eta, alpha, lengths, *weights, *momentum, saved, y,
                                             *scalars, DH=hidden, BH=hidden_block(hidden), **common)
    return y, weights, momentum, saved


def _unpack(saved, n, d, hidden, depth):
    """The weights and momentum at the start of chunk ``n`` from ``saved`` [B, H, chunks, state]."""
    flat = saved[:, :, n]
    size = d * hidden
    w1, s1 = flat[..., :size].unflatten(-1, (d, hidden)), flat[..., size : 2 * size].unflatten(-1, (d, hidden))
    if depth == 1:
        return [w1], [s1]
    w2 = flat[..., 2 * size : 3 * size].unflatten(-1, (hidden, d))
    s2 = flat[..., 3 * size :].unflatten(-1, (hidden, d))
    return [w1, w2], [s1, s2]


class _NeuralMemory(torch.autograd.Function):
    """Forward: the kernel, keeping the weights and momentum at every chunk start when a gradient is needed.
    Backward: last chunk first, ``chunk_step`` recomputed from those and differentiated (per-chunk activations only)."""

    @staticmethod
    def forward(ctx, q, k, v, theta, eta, alpha, lengths, chunk_size, max_grad_norm, depth, *state):
        weights, momentum = list(state[:depth]), list(state[depth:])
        save = any(ctx.needs_input_grad)
        y, weights, momentum, saved = _launch(q, k, v, theta, eta, alpha, lengths, weights, momentum, chunk_size,
                                              max_grad_norm, save)
        if save:
            ctx.save_for_backward(q, k, v, theta, eta, alpha, lengths, saved)
        ctx.chunk_size, ctx.max_grad_norm, ctx.depth = chunk_size, max_grad_norm, depth
        ctx.hidden = state[0].shape[-1]
        return (y, *weights, *momentum)

    @staticmethod
    def backward(ctx, grad_y, *grad_state):
        q, k, v, theta, eta, alpha, lengths, saved = ctx.saved_tensors
        c, depth = ctx.chunk_size, ctx.depth
        inputs = (q, k, v, theta, eta, alpha)
        grads = [torch.zeros_like(t) if need else None for t, need in zip(inputs, ctx.needs_input_grad)]
        for n in range(q.shape[2] // c - 1, -1, -1):
            chunk = slice(n * c, (n + 1) * c)
            done = lengths >= (n + 1) * c
            weights, momentum = _unpack(saved, n, q.shape[-1], ctx.hidden, depth)
            with torch.enable_grad():
                pieces = [t[:, :, chunk].detach().requires_grad_(need) for t, need in zip(inputs, ctx.needs_input_grad)]
                start = [t.detach().requires_grad_() for t in weights + momentum]
                if done.any():
                    y, new_weights, new_momentum = chunk_step(*pieces, start[:depth], start[depth:], ctx.max_grad_norm,
                                                              done)
                else:  # the kernel only read this chunk
                    y, new_weights, new_momentum = mlp_forward(start[:depth], pieces[0])[0], start[:depth], start[depth:]
                outputs = [y] + list(new_weights) + list(new_momentum)
                upstream = [grad_y[:, :, chunk]] + list(grad_state)
                wanted = [t for t in pieces + start if t.requires_grad]
                found = iter(torch.autograd.grad(outputs, wanted, upstream, allow_unused=True))
            for index, piece in enumerate(pieces):
                if piece.requires_grad:
                    grad = next(found)
                    if grad is not None:
                        grads[index][:, :, chunk] = grad
            grad_state = [torch.zeros_like(t) if g is None else g for g, t in zip(found, start)]
        return (*grads, None, None, None, None, *grad_state)


def neural_memory_fused(q, k, v, theta, eta, alpha, weights, momentum=None, chunk_size: int = 64,
                        max_grad_norm: float | None = 1.0, lengths: torch.Tensor | None = None):
    """``hf_memory.ops.neural_memory.neural_memory_chunked`` (same arguments and results) as one Triton launch."""
    q, k, v, theta, eta, alpha, weights, momentum = _in_fp32(q, k, v, theta, eta, alpha, weights, momentum,
                                                             chunk_size)
    sizes = [q.shape[-1], weights[0].shape[-1]]
    if not fused_fits(*sizes, len(weights), chunk_size):
        raise ValueError(f"the Triton neural-memory kernel needs memory depth 1 or 2, a head size in [16, "
                         f"{MAX_HEAD_SIZE}], a hidden size >= 16, chunks of {CHUNK_SIZES} and, at depth 2 in "
                         f"{fused_precision()!r} precision, chunk x padded head size <= 4096; got depth "
                         f"{len(weights)}, sizes {sizes}, chunk size {chunk_size}")
    if lengths is None:
        lengths = torch.full((q.shape[0],), q.shape[2], device=q.device)
    y, *state = _NeuralMemory.apply(q, k, v, theta, eta, alpha, lengths, chunk_size, max_grad_norm, len(weights),
                                    *weights, *momentum)
    depth = len(weights)
    return y, state[:depth], state[depth:]
