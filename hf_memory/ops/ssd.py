"""Mamba-2's state space duality (SSD) operator (Dao & Gu, arXiv 2405.21060, the SSD recurrence of section 3).

Per head h, with head dim P and state size N, the state h_t is a P x N matrix:

    h_t = exp(dt_t A_h) h_{t-1} + dt_t x_t B_t^T        y_t = h_t C_t + D_h x_t

A_h < 0 is a per-head scalar, so exp(dt_t A_h) in (0, 1] is a scalar decay; dt_t >= 0 (the caller has applied
the bias and softplus). dt_t = 0 neither decays nor writes: such a step leaves the state as it was (pad positions).

Shapes, channel-last: x [B, T, H, P]; dt [B, T, H]; A [H]; B, C [B, T, G, N] with G groups shared by consecutive
heads (head h reads group h // (H / G)); D [H] or None; state [B, H, P, N]. All state math is fp32; y comes back
in x's dtype and the final state in fp32.

Three implementations:
  * ``ssd_recurrent``: token by token, the definition (and the decode step);
  * ``ssd_chunked``: the chunkwise SSD algorithm (section 6 of the paper): inside a chunk the quadratic,
    attention-like form Y = (L * C B^T) (dt X) with the 1-semiseparable mask L_ts = exp(a_{s+1} + ... + a_t),
    a_t = dt_t A; between chunks the state is passed on by a loop over chunks. Exact up to fp32 rounding;
  * mamba_ssm's ``mamba_chunk_scan_combined`` / ``selective_state_update`` Triton kernels on CUDA, through
    ``hf_memory.kernels``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hf_memory.kernels import fused_kernel, needs_grad


def _check_shapes(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> int:
    """Validate the channel-last shapes; return the number of heads per group."""
    batch, length, heads, _ = x.shape
    groups = B.shape[2]
    if dt.shape != (batch, length, heads) or A.shape != (heads,):
        raise ValueError(f"ssd: expected dt [B, T, H] and A [H] for x {tuple(x.shape)}, got {tuple(dt.shape)}, "
                         f"{tuple(A.shape)}")
    if B.shape[:2] != (batch, length) or C.shape != B.shape or heads % groups:
        raise ValueError(f"ssd: expected B, C [B, T, G, N] with H % G == 0, got {tuple(B.shape)}, {tuple(C.shape)}")
    return heads // groups


def ssd_recurrent(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference recurrence (the definition). Returns (y [B, T, H, P] in x's dtype, final state [B, H, P, N] fp32)."""
    heads_per_group = _check_shapes(x, dt, A, B, C)
    batch, length, heads, head_dim = x.shape
    state_size = B.shape[-1]
    out_dtype = x.dtype
    x, dt, A = x.float(), dt.float(), A.float()
    B, C = (t.float().repeat_interleave(heads_per_group, dim=2) for t in (B, C))  # [B, T, H, N]
    state = x.new_zeros(batch, heads, head_dim, state_size) if initial_state is None else initial_state.float()
    outputs = []
    for t in range(length):
        decay = (dt[:, t] * A).exp()  # exp(dt_t A_h), [B, H]
        write = (dt[:, t, :, None] * x[:, t])[..., :, None] * B[:, t, :, None, :]  # dt_t x_t B_t^T, [B, H, P, N]
        state = decay[..., None, None] * state + write
        y_t = torch.einsum("bhpn,bhn->bhp", state, C[:, t])  # h_t C_t
        if D is not None:
            y_t = y_t + D.float()[:, None] * x[:, t]
        outputs.append(y_t)
    y = torch.stack(outputs, dim=1) if outputs else x.new_zeros(batch, 0, heads, head_dim)
    return y.to(out_dtype), state


def _segment_sum(a: torch.Tensor) -> torch.Tensor:
    """a [..., L] -> S [..., L, L] with S_ts = a_{s+1} + ... + a_t for s <= t (0 on the diagonal), -inf above it.

    Summed directly (a masked cumsum) rather than as a difference of prefix sums, so small segments stay exact when
    the prefix sums are large; the -inf is set before any exp, so nothing above the diagonal can overflow.
    """
    length = a.shape[-1]
    ones = torch.ones(length, length, dtype=torch.bool, device=a.device)
    terms = a[..., :, None].expand(*a.shape, length).masked_fill(~ones.tril(-1), 0)  # terms[r, s] = a_r for r > s
    sums = terms.cumsum(dim=-2)  # sums[t, s] = sum_{s < r <= t} a_r
    return sums.masked_fill(~ones.tril(), -torch.inf)


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise SSD: the same recurrence, a chunk at a time.

    With a_t = dt_t A (<= 0) and, inside a chunk, the segment sums S_ts = a_{s+1} + ... + a_t (s <= t):
      * intra-chunk (diagonal blocks): Y_t += sum_{s <= t} exp(S_ts) (C_t . B_s) dt_s x_s;
      * the chunk's own contribution to its end state: H_c = sum_s exp(S_{Ls}) dt_s x_s B_s^T (L = last position);
      * inter-chunk: h_end(c) = exp(S_{L0} + a_0) h_end(c - 1) + H_c, and Y_t += exp(a_0 + ... + a_t) h_end(c - 1) C_t.
    Every exponent is a sum of a_r <= 0, so nothing overflows. The sequence is padded at the end with dt = 0, which
    neither decays nor writes.
    """
    heads_per_group = _check_shapes(x, dt, A, B, C)
    batch, length, heads, head_dim = x.shape
    if length == 0:
        return ssd_recurrent(x, dt, A, B, C, D, initial_state)
    groups, state_size = B.shape[2], B.shape[3]
    out_dtype = x.dtype
    pad = (-length) % chunk_size
    n_chunks = (length + pad) // chunk_size

    # Group-major layouts [B, G, (H/G,) N_chunks, L, ...]: B and C are shared by the heads of a group.
    x = F.pad(x.float(), (0, 0, 0, 0, 0, pad)).transpose(1, 2)  # [B, H, T', P]
    x = x.reshape(batch, groups, heads_per_group, n_chunks, chunk_size, head_dim)
    dt = F.pad(dt.float(), (0, 0, 0, pad)).transpose(1, 2).reshape(batch, groups, heads_per_group, n_chunks, chunk_size)
    B, C = (F.pad(t.float(), (0, 0, 0, 0, 0, pad)).transpose(1, 2) for t in (B, C))
    B, C = (t.reshape(batch, groups, n_chunks, chunk_size, state_size) for t in (B, C))
    a = dt * A.float().reshape(groups, heads_per_group)[:, :, None, None]  # log-decays a_t = dt_t A <= 0
    x_dt = x * dt[..., None]  # dt_s x_s

    segsum = _segment_sum(a)  # [B, G, H/G, N_chunks, L, L]
    decay = segsum.exp()  # the mask L of the paper: lower triangular, ones on the diagonal, zeros above
    scores = C @ B.transpose(-1, -2)  # C_t . B_s, [B, G, N_chunks, L, L]
    y = (decay * scores[:, :, None]) @ x_dt  # intra-chunk, [B, G, H/G, N_chunks, L, P]

    decay_to_end = decay[..., -1, :]  # exp(a_{s+1} + ... + a_L), [B, G, H/G, N_chunks, L]
    chunk_states = (x_dt * decay_to_end[..., None]).transpose(-1, -2) @ B[:, :, None]  # H_c, [.., N_chunks, P, N]
    log_decay_from_start = segsum[..., :, 0] + a[..., :1]  # a_0 + ... + a_t (a cumsum, written without subtraction)
    chunk_decay = log_decay_from_start[..., -1].exp()  # exp(a_0 + ... + a_L), [B, G, H/G, N_chunks]

    if initial_state is None:
        state = x.new_zeros(batch, groups, heads_per_group, head_dim, state_size)
    else:
        state = initial_state.float().reshape(batch, groups, heads_per_group, head_dim, state_size)
    start_states = []
    for n in range(n_chunks):
        start_states.append(state)
        state = chunk_decay[..., n, None, None] * state + chunk_states[..., n, :, :]
    start_states = torch.stack(start_states, dim=3)  # the state entering each chunk, [B, G, H/G, N_chunks, P, N]

    # inter-chunk: exp(a_0 + ... + a_t) h_start C_t
    y = y + (C[:, :, None] @ start_states.transpose(-1, -2)) * log_decay_from_start.exp()[..., None]
    y = y.reshape(batch, heads, n_chunks * chunk_size, head_dim)[:, :, :length].transpose(1, 2)  # [B, T, H, P]
    if D is not None:
        y = y + D.float()[:, None] * x.reshape(batch, heads, -1, head_dim)[:, :, :length].transpose(1, 2)
    return y.to(out_dtype), state.reshape(batch, heads, head_dim, state_size)


def ssd(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    *,
    chunk_size: int = 64,
    use_fused_kernels: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatching entry point: fused kernel on CUDA when available, else the PyTorch references.

    Single-token calls (decode) take the recurrent form, or on CUDA mamba_ssm's ``selective_state_update`` (which
    has no backward, so only when no gradient is needed; it updates a copy of the state, never the caller's);
    longer calls take the chunked form, or ``mamba_chunk_scan_combined`` on CUDA. Returns (y in x's dtype,
    final state [B, H, P, N] fp32).
    """
    _check_shapes(x, dt, A, B, C)
    batch, length, heads, head_dim = x.shape
    tensors = (x, dt, A, B, C, D, initial_state)
    if length == 1:
        kernel = None
        if not needs_grad(*tensors):
            kernel = fused_kernel("selective_state_update", *tensors, use_fused_kernels=use_fused_kernels)
        if kernel is not None:
            state_size = B.shape[-1]
            if initial_state is None:
                state = x.new_zeros(batch, heads, head_dim, state_size, dtype=torch.float32)
            else:
                state = initial_state.float().clone()  # updated in place by the kernel
            y = kernel(
                state,
                x[:, 0].contiguous(),
                dt[:, 0, :, None].expand(batch, heads, head_dim),  # per-head scalars broadcast (stride 0)
                A.float()[:, None, None].expand(heads, head_dim, state_size),
                B[:, 0].contiguous(),
                C[:, 0].contiguous(),
                D=None if D is None else D.float()[:, None].expand(heads, head_dim),
            )
            return y[:, None].to(x.dtype), state
        return ssd_recurrent(x, dt, A, B, C, D, initial_state)
    kernel = fused_kernel("mamba_chunk_scan_combined", *tensors, use_fused_kernels=use_fused_kernels)
    if kernel is not None:
        state = None if initial_state is None else initial_state.float().contiguous()
        y, final_state = kernel(
            x.contiguous(), dt.contiguous(), A.float().contiguous(), B.contiguous(), C.contiguous(), chunk_size,
            D=None if D is None else D.float().contiguous(), initial_states=state, return_final_states=True,
        )
        return y.to(x.dtype), final_state.float()
    return ssd_chunked(x, dt, A, B, C, D, initial_state, chunk_size=chunk_size)
