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
        outputs.append((state @ C_[:, :, t, None])[..., 0])  # C_t^T h_t
    y = torch.stack(outputs, dim=-1) if outputs else u_.new_zeros(u_.shape)
    if D is not None:
        y = y + D.float()[None, :, None] * u_
    return y.to(u.dtype), state


BLOCK = 256  # tokens whose states a forward without gradients holds at a time


class _StepwiseScan(torch.autograd.Function):
    """The recurrence stepped over time with a hand-written backward. Everything that does not depend on the
    previous state (the decays exp(Delta_t A), the drives Delta_t B_t x_t, the read-outs C_t^T h_t and every
    gradient but the state's) is computed for all t at once; the loops carry only h_t = a_t h_{t-1} + b_t
    forward and its adjoint g_t = C_t dy_t + a_{t+1} g_{t+1} backward, one [B, D, N] multiply-add per step
    written in place (``out=`` into per-step views), and autograd records one node, so it trains fast on CPU.
    On CPU this loop is faster than a parallel scan: mambapy's ``pscan`` (transformers' ``use_mambapy``) took
    1.0-4.2x its time at 1K-2K tokens, a chunked Hillis-Steele scan 0.8-7x. Without gradients the states are
    held ``BLOCK`` tokens at a time."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, initial_state):
        dtype = torch.promote_types(u.dtype, torch.float32)
        u_, delta_, A_, B_, C_ = (t.to(dtype) for t in (u, delta, A, B, C))
        batch, channels, length = u_.shape
        state = u_.new_zeros(batch, channels, A_.shape[1]) if initial_state is None else initial_state.to(dtype)
        training = any(ctx.needs_input_grad)
        block = max(length, 1) if training else BLOCK
        outputs, kept = [], [u_.new_empty(0, *state.shape)] * 2
        # time-major [T, B, D, N]: each step reads and writes contiguous memory
        delta_t, drive_t, B_t = (t.permute(2, 0, 1).contiguous() for t in (delta_, delta_ * u_, B_))
        for start in range(0, length, block):
            span = slice(start, start + block)
            decay = torch.exp(delta_t[span, ..., None] * A_)  # a_t = exp(Delta_t A)
            drive = drive_t[span, ..., None] * B_t[span, :, None]  # b_t = Delta_t x_t B_t
            states = torch.empty_like(drive)  # h_t
            for a_t, b_t, h_t in zip(decay.unbind(0), drive.unbind(0), states.unbind(0)):
                state = torch.addcmul(b_t, a_t, state, out=h_t)
            outputs.append(torch.einsum("tbdn,bnt->bdt", states, C_[..., span]))  # y_t = C_t^T h_t
            kept = [states, decay]
        y = torch.cat(outputs, dim=-1) if outputs else u_.new_zeros(u_.shape)
        if D is not None:
            y = y + D.to(dtype)[None, :, None] * u_
        if training:
            ctx.save_for_backward(u_, delta_, A_, B_, C_, D, initial_state, *kept)
        return y.to(u.dtype), state.clone()

    @staticmethod
    def backward(ctx, grad_y, grad_final):
        u, delta, A, B, C, D, initial_state, states, decay = ctx.saved_tensors
        grad_y = grad_y.to(u.dtype)
        # g_t = dL/dh_t: the read-out's share C_t dy_t, plus g_{t+1} carried back through a_{t+1}
        grad_states = torch.einsum("bdt,bnt->tbdn", grad_y, C)
        carried = u.new_zeros(states.shape[1:]) if grad_final is None else grad_final.to(u.dtype).clone()
        for g_t, a_t in zip(reversed(grad_states.unbind(0)), reversed(decay.unbind(0))):
            torch.mul(g_t.add_(carried), a_t, out=carried)  # g_t, then a_t g_t for step t - 1
        first_state = u.new_zeros(states.shape[1:]) if initial_state is None else initial_state.to(u.dtype)
        previous = torch.cat([first_state[None], states[:-1]])  # h_{t-1}
        grad_C = torch.einsum("bdt,tbdn->bnt", grad_y, states)
        grad_log_decay = grad_states * previous * decay  # d/d(Delta_t A) of a_t h_{t-1}
        grad_drive = torch.einsum("tbdn,bnt->bdt", grad_states, B)  # d/d(Delta_t x_t) of Delta_t x_t B_t
        grad_B = torch.einsum("tbdn,bdt->bnt", grad_states, delta * u)
        grad_delta = torch.einsum("tbdn,dn->bdt", grad_log_decay, A) + grad_drive * u
        grad_A = torch.einsum("tbdn,bdt->dn", grad_log_decay, delta)
        grad_u = grad_drive * delta
        grad_D = None
        if D is not None:
            grad_u = grad_u + grad_y * D.to(u.dtype)[None, :, None]
            grad_D = (grad_y * u).sum((0, 2))
        grad_initial = None if initial_state is None else grad_states[0] * decay[0]
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
