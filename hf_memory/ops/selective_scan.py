"""The selective scan of Mamba-1 (Gu & Dao, arXiv 2312.00752, Algorithm 2, eq. 2a-2b with ZOH/Euler
discretisation as in the released kernels).

Per channel d and state index n, with a diagonal A:

    h_t = exp(Delta_t A) * h_{t-1} + Delta_t B_t x_t        y_t = C_t^T h_t + D x_t

Shapes (the layout of mamba-ssm's kernels): u = x [B, D, T], delta [B, D, T] (already positive: the caller
applies softplus and the bias, and sets Delta = 0 at pads, which makes a step neutral), A [D, N] (negative),
B, C [B, N, T], D [D] or None, state [B, D, N]. State math in fp32; y comes back in u's dtype.

Implementations:
  * ``selective_scan_sequential``: token by token, the definition;
  * ``selective_scan_parallel``: a log-depth (Hillis-Steele) scan over the time axis, exact, fast on CPU;
  * mamba-ssm's ``selective_scan_fn`` (prefill from an empty state) and ``selective_state_update``
    (one decode step) on CUDA, through ``hf_memory.kernels``.
"""

from __future__ import annotations

import torch

from hf_memory.kernels import fused_kernel, needs_grad


def _discretise(u, delta, A, B):
    """(decay exp(Delta A) [B, D, N, T], input Delta B u [B, D, N, T]) in fp32."""
    delta = delta.float()
    decay = torch.exp(delta[:, :, None, :] * A.float()[None, :, :, None])
    drive = (delta * u.float())[:, :, None, :] * B.float()[:, None, :, :]
    return decay, drive


def _readout(states, u, C, D):
    """y_t = C_t^T h_t + D x_t from all states [B, D, N, T]."""
    y = (states * C.float()[:, None, :, :]).sum(2)
    if D is not None:
        y = y + D.float()[None, :, None] * u.float()
    return y


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
    decay, drive = _discretise(u, delta, A, B)
    state = decay.new_zeros(decay.shape[:3]) if initial_state is None else initial_state.float()
    states = []
    for t in range(u.shape[-1]):
        state = decay[..., t] * state + drive[..., t]
        states.append(state)
    all_states = torch.stack(states, dim=-1) if states else decay
    return _readout(all_states, u, C, D).to(u.dtype), state


def selective_scan_parallel(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same result as the sequential scan in ceil(log2 T) whole-tensor steps.

    The pairs (a_t, b_t) of h_t = a_t h_{t-1} + b_t compose associatively:
    (a_1, b_1) then (a_2, b_2) = (a_1 a_2, a_2 b_1 + b_2). After the doubling passes, b_t is h_t from a zero
    state and a_t the product of decays up to t, so h_t = b_t + a_t h_0. All decays are <= 1: no overflow.
    """
    a, b = _discretise(u, delta, A, B)
    length, offset = u.shape[-1], 1
    while offset < length:
        b = torch.cat([b[..., :offset], b[..., offset:] + a[..., offset:] * b[..., :-offset]], dim=-1)
        a = torch.cat([a[..., :offset], a[..., offset:] * a[..., :-offset]], dim=-1)
        offset *= 2
    if initial_state is not None:
        b = b + a * initial_state.float()[..., None]
    final = b[..., -1] if length else (a.new_zeros(a.shape[:3]) if initial_state is None else initial_state.float())
    return _readout(b, u, C, D).to(u.dtype), final


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    use_kernels: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatching entry point. Decode steps (T = 1) are a single update, never a re-scan; the fused one-step
    kernel has no backward, so it is used only when no gradient is needed."""
    if u.shape[-1] == 1 and initial_state is not None:
        tensors = (u, delta, A, B, C, D, initial_state)
        kernel = None if needs_grad(*tensors) else fused_kernel("selective_state_update", u, enabled=use_kernels)
        if kernel is not None:
            state = initial_state.float().clone()
            y = kernel(state, u[..., 0], delta[..., 0], A.float(), B[..., 0], C[..., 0], D)
            return y[..., None].to(u.dtype), state
        return selective_scan_sequential(u, delta, A, B, C, D, initial_state)
    if initial_state is None:
        kernel = fused_kernel("selective_scan_fn", u, enabled=use_kernels)
        if kernel is not None:
            y, final = kernel(u.contiguous(), delta.contiguous(), A.float().contiguous(), B.contiguous(),
                              C.contiguous(), D, return_last_state=True)
            return y, final.float()
    return selective_scan_parallel(u, delta, A, B, C, D, initial_state)
