"""The selective scan of Mamba-1 (Gu & Dao, arXiv 2312.00752, Algorithm 2, eq. 2a-2b with ZOH/Euler
discretisation as in the released kernels).

Per channel d and state index n, with a diagonal A:

    h_t = exp(Delta_t A) * h_{t-1} + Delta_t B_t x_t        y_t = C_t^T h_t + D x_t

Shapes (the layout of mamba-ssm's kernels): u = x [B, D, T], delta [B, D, T] (already positive: the caller
applies softplus and the bias, and sets Delta = 0 at pads, which makes a step neutral), A [D, N] (negative),
B, C [B, N, T], D [D] or None, state [B, D, N]. State math in fp32; y comes back in u's dtype.

Implementations:
  * ``selective_scan_sequential``: token by token, the definition;
  * ``selective_scan_stepwise``: the same loop with a hand-written backward (one autograd node, one
    [B, D, N] state per step), exact and fast enough to train on CPU;
  * mamba-ssm's ``selective_scan_fn`` (prefill from an empty state) and ``selective_state_update``
    (one decode step) on CUDA, through ``hf_memory.kernels``.
"""

from __future__ import annotations

import torch

from hf_memory.kernels import fused_kernel, needs_grad


def selective_scan_sequential(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference recurrence (the definition). Returns (y [B, D, T], final state [B, D, N] fp32)."""
    u_, delta_, A_, B_, C_ = (t.float() for t in (u, delta, A, B, C))
    state = u_.new_zeros(*u_.shape[:2], A_.shape[1]) if initial_state is None else initial_state.float()
    outputs = []
    for t in range(u.shape[-1]):
        decay = torch.exp(delta_[:, :, t, None] * A_)  # exp(Delta_t A)
        state = decay * state + (delta_[:, :, t] * u_[:, :, t])[..., None] * B_[:, None, :, t]
        outputs.append(torch.einsum("bdn,bn->bd", state, C_[:, :, t]))  # C_t^T h_t
    y = torch.stack(outputs, dim=-1) if outputs else u_.new_zeros(u_.shape)
    if D is not None:
        y = y + D.float()[None, :, None] * u_
    return y.to(u.dtype), state


class _StepwiseScan(torch.autograd.Function):
    """The recurrence stepped over time with a hand-written backward: each step touches one [B, D, N] state,
    and autograd records one node instead of a graph per step, so it trains fast on CPU."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, initial_state):
        dtype = torch.promote_types(u.dtype, torch.float32)
        u_, delta_, A_, B_, C_ = (t.to(dtype) for t in (u, delta, A, B, C))
        batch, channels, length = u_.shape
        state = u_.new_zeros(batch, channels, A_.shape[1]) if initial_state is None else initial_state.to(dtype)
        states = u_.new_empty(batch, channels, A_.shape[1], length)
        y = u_.new_empty(batch, channels, length)
        for t in range(length):
            state = torch.exp(delta_[:, :, t, None] * A_) * state + (delta_[:, :, t] * u_[:, :, t])[..., None] * B_[:, None, :, t]
            states[..., t] = state
            y[:, :, t] = torch.einsum("bdn,bn->bd", state, C_[:, :, t])
        if D is not None:
            y = y + D.to(dtype)[None, :, None] * u_
        ctx.save_for_backward(u_, delta_, A_, B_, C_, D, initial_state, states)
        return y.to(u.dtype), state

    @staticmethod
    def backward(ctx, grad_y, grad_final):
        u, delta, A, B, C, D, initial_state, states = ctx.saved_tensors
        grad_y = grad_y.to(u.dtype)
        grad_state = u.new_zeros(states.shape[:3]) if grad_final is None else grad_final.to(u.dtype).clone()
        first_state = u.new_zeros(states.shape[:3]) if initial_state is None else initial_state.to(u.dtype)
        grad_u, grad_delta, grad_B, grad_C = (torch.empty_like(t) for t in (u, delta, B, C))
        grad_A = torch.zeros_like(A)
        for t in range(u.shape[-1] - 1, -1, -1):
            previous = states[..., t - 1] if t > 0 else first_state
            grad_state = grad_state + grad_y[:, :, t, None] * C[:, None, :, t]  # from y_t = C_t . h_t
            grad_C[:, :, t] = torch.einsum("bd,bdn->bn", grad_y[:, :, t], states[..., t])
            decay = torch.exp(delta[:, :, t, None] * A)
            grad_log_decay = grad_state * previous * decay  # d/d(Delta A) of exp(Delta A) h_{t-1}
            grad_drive = torch.einsum("bdn,bn->bd", grad_state, B[:, :, t])  # d/d(Delta u) of Delta u B
            grad_B[:, :, t] = torch.einsum("bdn,bd->bn", grad_state, delta[:, :, t] * u[:, :, t])
            grad_delta[:, :, t] = (grad_log_decay * A).sum(-1) + grad_drive * u[:, :, t]
            grad_A += torch.einsum("bdn,bd->dn", grad_log_decay, delta[:, :, t])
            grad_u[:, :, t] = grad_drive * delta[:, :, t]
            grad_state = grad_state * decay  # on to h_{t-1}
        grad_D = None
        if D is not None:
            grad_u = grad_u + grad_y * D.to(u.dtype)[None, :, None]
            grad_D = (grad_y * u).sum((0, 2))
        grad_initial = None if initial_state is None else grad_state
        return grad_u, grad_delta, grad_A, grad_B, grad_C, grad_D, grad_initial


def selective_scan_stepwise(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same result as the sequential definition, with the hand-written backward of ``_StepwiseScan``.
    The state is fp32 (fp64 for fp64 inputs)."""
    return _StepwiseScan.apply(u, delta, A, B, C, D, initial_state)


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    *,
    use_fused_kernels: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatching entry point. Decode steps (T = 1) are a single update, never a re-scan; the fused one-step
    kernel has no backward, so it is used only when no gradient is needed."""
    if u.shape[-1] == 1 and initial_state is not None:
        tensors = (u, delta, A, B, C, D, initial_state)
        kernel = None if needs_grad(*tensors) else fused_kernel("selective_state_update", u, use_fused_kernels=use_fused_kernels)
        if kernel is not None:
            state = initial_state.float().clone()
            y = kernel(state, u[..., 0], delta[..., 0], A.float(), B[..., 0], C[..., 0], D)
            return y[..., None].to(u.dtype), state
        return selective_scan_sequential(u, delta, A, B, C, D, initial_state)
    if initial_state is None:
        kernel = fused_kernel("selective_scan_fn", u, use_fused_kernels=use_fused_kernels)
        if kernel is not None:
            y, final = kernel(u.contiguous(), delta.contiguous(), A.float().contiguous(), B.contiguous(),
                              C.contiguous(), D, return_last_state=True)
            return y, final.float()
    return selective_scan_stepwise(u, delta, A, B, C, D, initial_state)
