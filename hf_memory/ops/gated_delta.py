"""The gated delta rule (Gated DeltaNet, arXiv 2412.06464, eq. 10).

Per head, with S_t the d_v x d_k state of the paper:

    S_t = alpha_t * S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T        o_t = S_t q_t

This module stores the state key-first, ``state = S^T`` of shape [B, H, d_k, d_v] (the layout of
flash-linear-attention and transformers' Qwen3-Next, so states move between them without a transpose):

    state_t = alpha_t (I - beta_t k_t k_t^T) state_{t-1} + beta_t k_t v_t^T     o_t = state_t^T q_t

Shapes: q, k [B, T, H, d_k] (already L2-normalised), v [B, T, H, d_v], g = log alpha [B, T, H] (<= 0),
beta [B, T, H]. Queries are scaled by d_k^-1/2 here. All state math is fp32; outputs come back in v's dtype.

Three implementations:
  * ``gated_delta_rule_recurrent``: token by token, the definition (and the decode step);
  * ``gated_delta_rule_chunked``: the chunkwise WY/UT form, exact up to fp32 rounding, fast enough to train
    on CPU (and the CUDA path when flash-linear-attention is absent or forced off);
  * flash-linear-attention's chunk / fused-recurrent kernels on CUDA, through ``hf_memory.kernels``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hf_memory.kernels import fused_kernel, needs_grad


def gated_delta_rule_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference recurrence (the definition). Returns (o [B, T, H, d_v], final state [B, H, d_k, d_v] fp32).

    Tokens are taken as [B, H, 1, d] row vectors, so that each product is one batched matmul: a decode step (T = 1)
    is a handful of calls."""
    batch, length, heads, d_k = k.shape
    scale = d_k**-0.5 if scale is None else scale
    q, k, v = (x.float().transpose(1, 2) for x in (q, k, v))  # [B, H, T, d]
    g, beta = (x.float().transpose(1, 2)[..., None] for x in (g, beta))  # [B, H, T, 1]
    state = q.new_zeros(batch, heads, d_k, v.shape[-1]) if initial_state is None else initial_state.float()
    outputs = []
    for t in range(length):
        k_t = k[:, :, t : t + 1]
        state = state * g[:, :, t : t + 1].exp()  # decay: alpha_t * state_{t-1}
        delta = beta[:, :, t : t + 1] * (v[:, :, t : t + 1] - k_t @ state)  # beta_t (v_t - S k_t)
        state = state + k_t.transpose(-1, -2) @ delta  # write beta_t (v_t - S k_t) k_t^T
        outputs.append((q[:, :, t : t + 1] * scale) @ state)  # o_t = S_t q_t
    o = torch.cat(outputs, dim=2) if outputs else v.new_zeros(batch, heads, 0, v.shape[-1])
    return o.transpose(1, 2), state


def unit_lower_triangular_inverse(a: torch.Tensor) -> torch.Tensor:
    """(I + a)^-1 for strictly lower-triangular a [..., C, C], by doubling the block size: when the diagonal blocks
    L11, L22 of size s are inverted, the block [[L11, 0], [L21, L22]] of size 2s has the inverse
    [[L11^-1, 0], [-L22^-1 L21 L11^-1, L22^-1]]. Batched products only: a batch of triangular solves of this size
    runs at a fraction of the matmul rate on CPU, and copies its operands into column-major layout."""
    size = a.shape[-1]
    padded = 1 << (size - 1).bit_length()  # sizes other than powers of two: I + a extended by an identity block
    if padded != size:
        a = F.pad(a, (0, padded - size, 0, padded - size))
    inverse = a.new_ones(*a.shape[:-2], padded, 1, 1)  # the diagonal blocks of size s = 1
    s = 1
    while s < padded:
        grid = a.unflatten(-1, (padded // s, s)).unflatten(-3, (padded // s, s))  # [..., C/s, s, C/s, s]
        lower_left = grid[..., 1::2, :, 0::2, :].diagonal(dim1=-4, dim2=-2).movedim(-1, -3)  # L21 of each pair
        upper, lower = inverse[..., 0::2, :, :], inverse[..., 1::2, :, :]
        below = -(lower @ lower_left @ upper)
        inverse = torch.cat([torch.cat([upper, torch.zeros_like(upper)], -1), torch.cat([below, lower], -1)], -2)
        s *= 2
    return inverse.squeeze(-3)[..., :size, :size]


def gated_delta_rule_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    scale: float | None = None,
    chunk_size: int = 64,
    chunks_per_block: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise WY / UT form of the same recurrence.

    Inside a chunk with cumulative log-decay gamma_t and Gamma_t = exp(gamma_t), write
    state_t = alpha_t state_{t-1} + k_t u_t^T with u_t = beta_t (v_t - alpha_t state_{t-1}^T k_t). Unrolling gives
    the lower-triangular system (I + A) U = beta V - (beta Gamma K) state_0 with
    A_ti = beta_t (Gamma_t / Gamma_i) k_t^T k_i (i < t), so U = W_v - W_k state_0 with
    [W_v | W_k] = (I + A)^-1 [beta V | beta Gamma K]; then, with D_ti = Gamma_t / Gamma_i (i <= t),
    O = (Gamma Q) state_0 + [(Q K^T) * D] U and state_C = Gamma_C state_0 + (K * Gamma_C / Gamma)^T U.
    Both are affine in state_0:
        O = [(Q K^T) * D] W_v + P state_0,          P = Gamma Q - [(Q K^T) * D] W_k
        state_C = M state_0 + (K * Gamma_C / Gamma)^T W_v,   M = Gamma_C I - (K * Gamma_C / Gamma)^T W_k
    so everything but state_C = M state_0 + b is computed for many chunks at once; that one product runs chunk
    after chunk. Chunks go ``chunks_per_block`` at a time, so that the [C, C] intermediates stay in cache.
    """
    batch, length, heads, d_k = k.shape
    d_v = v.shape[-1]
    scale = d_k**-0.5 if scale is None else scale
    out_dtype = v.dtype
    pad = (-length) % chunk_size
    n_chunks = (length + pad) // chunk_size
    # [N, B H, C, d]: chunk-major, so a block of chunks is contiguous. Padding at the end has beta = 0 and g = 0
    # (alpha = 1), so it neither writes nor decays the state.
    q, k, v = (F.pad(x.float(), (0, 0, 0, 0, 0, pad)).unflatten(1, (n_chunks, chunk_size)).permute(1, 0, 3, 2, 4)
               .reshape(n_chunks, batch * heads, chunk_size, -1).contiguous() for x in (q, k, v))
    g, beta = (F.pad(x.float(), (0, 0, 0, pad)).unflatten(1, (n_chunks, chunk_size)).permute(1, 0, 3, 2)
               .reshape(n_chunks, batch * heads, chunk_size).contiguous() for x in (g, beta))
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    identity = torch.eye(d_k, device=q.device)

    state = (q.new_zeros(batch * heads, d_k, d_v) if initial_state is None
             else initial_state.float().reshape(batch * heads, d_k, d_v))
    outputs = []
    for q, k, v, g, beta in zip(*(x.split(chunks_per_block) for x in (q, k, v, g, beta))):
        n = q.shape[0]
        q, k, v, g, beta = (x.flatten(0, 1) for x in (q, k, v, g, beta))  # [n B H, C, ...]: 3-d products
        gamma = g.cumsum(-1)
        gamma_exp = gamma.exp()[..., None]
        # D = exp(log(Gamma_t / Gamma_i)), the upper triangle set to -inf before exp so it can neither overflow
        # nor leak
        decay_ratio = (gamma[..., :, None] - gamma[..., None, :]).masked_fill_(~causal, float("-inf")).exp_()
        k_beta = k * beta[..., None]
        a = (k_beta @ k.transpose(-1, -2)) * decay_ratio.tril(-1)  # A
        w = unit_lower_triangular_inverse(a) @ torch.cat([v * beta[..., None], k_beta * gamma_exp], -1)
        intra_w = (q @ k.transpose(-1, -2)).mul_(decay_ratio) @ w  # [(Q K^T) * D] [W_v | W_k]
        k_to_end = k * (gamma[..., -1:] - gamma).exp()[..., None]  # K * Gamma_C / Gamma
        state_w = (k_to_end.transpose(-1, -2) @ w).unflatten(0, (n, -1))  # [n, B H, d_k, d_v + d_k]
        transition = gamma[..., -1, None, None].exp().unflatten(0, (n, -1)) * identity - state_w[..., d_v:]  # M
        chunk_starts = []
        for transition_n, write_n in zip(transition, state_w[..., :d_v]):
            chunk_starts.append(state)
            state = torch.baddbmm(write_n, transition_n, state)  # state_C = M state_0 + b
        p = q * gamma_exp - intra_w[..., d_v:]
        outputs.append((intra_w[..., :d_v] + p @ torch.stack(chunk_starts).flatten(0, 1)) * scale)
    o = torch.cat(outputs).unflatten(0, (n_chunks, batch, heads)).permute(1, 0, 3, 2, 4).reshape(batch, -1, heads, d_v)
    return o[:, :length].to(out_dtype), state.unflatten(0, (batch, heads))


def _repeat_key_heads(q: torch.Tensor, k: torch.Tensor, value_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """More value heads than key heads: each key head serves value_heads / key_heads consecutive value heads."""
    groups = value_heads // k.shape[2]
    if groups == 1:
        return q, k
    return q.repeat_interleave(groups, dim=2), k.repeat_interleave(groups, dim=2)


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    *,
    chunk_size: int = 64,
    use_fused_kernels: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatching entry point: fused kernel on CUDA when available, else the PyTorch references.

    Single-token calls (decode) take the recurrent form; longer ones, and single tokens that need a gradient
    (flash-linear-attention's recurrent kernel has no backward), the chunked form. flash-linear-attention's kernels
    multiply with ``tl.dot``, which needs head sizes of at least 16: smaller ones take the references. The
    returned state is fp32.
    """
    q, k = _repeat_key_heads(q, k, v.shape[2])
    single_step = q.shape[1] == 1
    op = ("fused_recurrent_gated_delta_rule" if single_step and not needs_grad(q, k, v, g, beta, initial_state)
          else "chunk_gated_delta_rule")
    dot_sized = min(k.shape[-1], v.shape[-1]) >= 16
    kernel = fused_kernel(op, q, k, v, use_fused_kernels=use_fused_kernels and dot_sized)
    if kernel is not None:
        state = None if initial_state is None else initial_state.float().contiguous()
        # g and beta by name: flash-linear-attention >= 0.4 puts key- and value-wise gates between them
        o, final_state = kernel(
            q.contiguous(), k.contiguous(), v.contiguous(), g=g.float().contiguous(),
            beta=beta.contiguous().to(q.dtype), scale=k.shape[-1] ** -0.5, initial_state=state,
            output_final_state=True,
        )
        return o, final_state.float()
    if single_step:
        return gated_delta_rule_recurrent(q, k, v, g, beta, initial_state)
    return gated_delta_rule_chunked(q, k, v, g, beta, initial_state, chunk_size=chunk_size)
