"""Triton kernels for the compressive memory of Infini-attention, fused with the feature map
sigma = ELU + 1:

    read  (eq. 3):  A_mem = sigma(Q) M / (sigma(Q) z + eps)       one program per (batch, head, token block)
    write (eq. 4):  M += sigma(K)^T W,  z += sum_t sigma(K_t)      one program per (batch, KV head), pads skipped

(the delta rule, eq. 5, writes W = V - read(K)). This module imports triton and is loaded only through
``hf_memory.kernels`` (CUDA tensors, triton installed); ``hf_memory.ops.compressive_memory`` is the reference
it is tested against, on CPU under ``TRITON_INTERPRET=1``. Backwards are PyTorch's: the ops are small matmuls.
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


@triton.jit
def _write_kernel(
    k_ptr, w_ptr, keep_ptr, m_ptr, z_ptr,
    length,
    stride_kb, stride_kh, stride_kt,
    stride_wb, stride_wh, stride_wt,
    stride_keepb,
    stride_mb, stride_mh, stride_mk,
    stride_zb, stride_zh,
    D_K: tl.constexpr, D_V: tl.constexpr, BLOCK_T: tl.constexpr,
):
    batch, head = tl.program_id(0), tl.program_id(1)
    k = tl.arange(0, D_K)
    v = tl.arange(0, D_V)
    memory = tl.zeros((D_K, D_V), dtype=tl.float32)
    norm = tl.zeros((D_K,), dtype=tl.float32)
    for start in range(0, length, BLOCK_T):
        t = start + tl.arange(0, BLOCK_T)
        rows = t < length
        keep = tl.load(keep_ptr + batch * stride_keepb + t, mask=rows, other=0.0)
        key = tl.load(k_ptr + batch * stride_kb + head * stride_kh + t[:, None] * stride_kt + k[None, :],
                      mask=rows[:, None], other=0.0).to(tl.float32)
        sk = tl.where(key > 0, key + 1.0, tl.exp(key)) * keep[:, None]  # sigma(K), zero at pads
        w = tl.load(w_ptr + batch * stride_wb + head * stride_wh + t[:, None] * stride_wt + v[None, :],
                    mask=rows[:, None], other=0.0).to(tl.float32)
        memory += tl.dot(tl.trans(sk), w, input_precision="ieee")
        norm += tl.sum(sk, axis=0)
    m_offsets = m_ptr + batch * stride_mb + head * stride_mh + k[:, None] * stride_mk + v[None, :]
    tl.store(m_offsets, tl.load(m_offsets) + memory)
    z_offsets = z_ptr + batch * stride_zb + head * stride_zh + k
    tl.store(z_offsets, tl.load(z_offsets) + norm)


def _check_dims(d_k: int, d_v: int) -> None:
    if d_k & (d_k - 1) or d_v & (d_v - 1) or d_k < 16 or d_v < 16:
        raise ValueError(f"the Triton memory kernels need power-of-two head dims >= 16, got d_k={d_k}, d_v={d_v}")


def _launch(q: torch.Tensor, memory: torch.Tensor, norm: torch.Tensor, eps: float) -> torch.Tensor:
    batch, heads, length, d_k = q.shape
    d_v = memory.shape[-1]
    _check_dims(d_k, d_v)
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


def _launch_write(memory, norm, k, w, keep):
    batch, heads, length, d_k = k.shape
    _check_dims(d_k, w.shape[-1])
    memory, norm = memory.float().clone().contiguous(), norm.float().clone().contiguous()
    k, w = k.contiguous(), w.contiguous()
    keep = (torch.ones(batch, length, device=k.device) if keep is None else keep.float()).contiguous()
    _write_kernel[(batch, heads)](
        k, w, keep, memory, norm, length,
        k.stride(0), k.stride(1), k.stride(2),
        w.stride(0), w.stride(1), w.stride(2),
        keep.stride(0),
        memory.stride(0), memory.stride(1), memory.stride(2),
        norm.stride(0), norm.stride(1),
        D_K=d_k, D_V=w.shape[-1], BLOCK_T=16,
    )
    return memory, norm


class _Write(torch.autograd.Function):
    @staticmethod
    def forward(ctx, memory, norm, k, w, keep):
        ctx.save_for_backward(k, w, keep)
        return _launch_write(memory, norm, k, w, keep)

    @staticmethod
    def backward(ctx, grad_memory, grad_norm):
        from hf_memory.ops.compressive_memory import sigma

        k, w, keep = ctx.saved_tensors
        with torch.enable_grad():
            k_ = k.detach().requires_grad_(ctx.needs_input_grad[2])
            w_ = w.detach().requires_grad_(ctx.needs_input_grad[3])
            sk = sigma(k_) if keep is None else sigma(k_) * keep[:, None, :, None].float()
            written = ((sk.transpose(-1, -2) @ w_.float()) * grad_memory).sum() + (sk.sum(-2) * grad_norm).sum()
            wanted = [t for t in (k_, w_) if t.requires_grad]
            grads = iter(torch.autograd.grad(written, wanted)) if wanted else iter(())
        grad_k = next(grads) if k_.requires_grad else None
        grad_w = next(grads) if w_.requires_grad else None
        return grad_memory, grad_norm, grad_k, grad_w, None


def memory_write(memory, norm, k, v, keep=None, rule: str = "linear", eps: float = 1e-6):
    """Fused eq. 4 / 5: same arguments and result as ``hf_memory.ops.compressive_memory.update``."""
    if rule not in ("linear", "delta"):
        raise ValueError(f"unknown memory update {rule!r}; expected one of ('linear', 'delta')")
    w = v.float() - memory_retrieve(k, memory, norm, eps).float() if rule == "delta" else v.float()
    return _Write.apply(memory, norm, k, w, keep)
