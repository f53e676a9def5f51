"""Triton kernel for the compressive-memory read of Infini-attention (eq. 3), fused with its feature map:

    A_mem = sigma(Q) M / (sigma(Q) z + eps),   sigma = ELU + 1

one program per (batch, query head, block of tokens), M and z of the head's KV group held in registers.
This module imports triton and is loaded only through ``hf_memory.kernels`` (CUDA tensors, triton
installed); ``hf_memory.ops.compressive_memory.retrieve`` is the reference it is tested against (on CPU
under ``TRITON_INTERPRET=1``). The backward is PyTorch's: the op is two small matmuls.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _retrieve_kernel(
    q_ptr, m_ptr, z_ptr, out_ptr,
    length, groups, eps,
    stride_qb, stride_qh, stride_qt,
    stride_mb, stride_mh, stride_mk,
    stride_zb, stride_zh,
    stride_ob, stride_oh, stride_ot,
    D_K: tl.constexpr, D_V: tl.constexpr, BLOCK_T: tl.constexpr,
):
    batch, head, block = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    kv_head = head // groups
    t = block * BLOCK_T + tl.arange(0, BLOCK_T)
    k = tl.arange(0, D_K)
    v = tl.arange(0, D_V)
    rows = t < length
    q = tl.load(q_ptr + batch * stride_qb + head * stride_qh + t[:, None] * stride_qt + k[None, :],
                mask=rows[:, None], other=0.0).to(tl.float32)
    sq = tl.where(q > 0, q + 1.0, tl.exp(q))  # ELU(q) + 1
    memory = tl.load(m_ptr + batch * stride_mb + kv_head * stride_mh + k[:, None] * stride_mk + v[None, :])
    norm = tl.load(z_ptr + batch * stride_zb + kv_head * stride_zh + k)
    numerator = tl.dot(sq, memory, input_precision="ieee")  # [BLOCK_T, D_V]
    denominator = tl.sum(sq * norm[None, :], axis=1) + eps  # [BLOCK_T]
    out = numerator / denominator[:, None]
    tl.store(out_ptr + batch * stride_ob + head * stride_oh + t[:, None] * stride_ot + v[None, :], out,
             mask=rows[:, None])


def _launch(q: torch.Tensor, memory: torch.Tensor, norm: torch.Tensor, eps: float) -> torch.Tensor:
    batch, heads, length, d_k = q.shape
    d_v = memory.shape[-1]
    if d_k & (d_k - 1) or d_v & (d_v - 1) or d_k < 16 or d_v < 16:
        raise ValueError(f"the Triton memory read needs power-of-two head dims >= 16, got d_k={d_k}, d_v={d_v}")
    q, memory, norm = q.contiguous(), memory.float().contiguous(), norm.float().contiguous()
    out = torch.empty(batch, heads, length, d_v, device=q.device, dtype=torch.float32)
    block = 16
    grid = (batch, heads, triton.cdiv(length, block))
    _retrieve_kernel[grid](
        q, memory, norm, out, length, heads // memory.shape[1], eps,
        q.stride(0), q.stride(1), q.stride(2),
        memory.stride(0), memory.stride(1), memory.stride(2),
        norm.stride(0), norm.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        D_K=d_k, D_V=d_v, BLOCK_T=block,
    )
    return out


class _Retrieve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, memory, norm, eps):
        ctx.save_for_backward(q, memory, norm)
        ctx.eps = eps
        return _launch(q, memory, norm, eps).to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        from hf_memory.ops.compressive_memory import retrieve

        q, memory, norm = ctx.saved_tensors
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_(t.requires_grad) for t in (q, memory, norm)]
            out = retrieve(*inputs, eps=ctx.eps)
            wanted = [t for t in inputs if t.requires_grad]
            grads = iter(torch.autograd.grad(out, wanted, grad_out)) if wanted else iter(())
        return tuple(next(grads) if t.requires_grad else None for t in inputs) + (None,)


def memory_retrieve(q: torch.Tensor, memory: torch.Tensor, norm: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Fused eq. 3: same shapes and result as ``hf_memory.ops.compressive_memory.retrieve``."""
    return _Retrieve.apply(q, memory, norm, eps)
