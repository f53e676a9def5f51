"""Compressive memory of Infini-attention (Munkhdalai, Faruqui & Gopal, "Leave No Context Behind",
arXiv 2404.07143, section 2.1.1-2.1.2, eqs. 3-6).

Per KV head, a memory M (d_k x d_v) and a normaliser z (d_k), with sigma = ELU + 1:

    retrieve (eq. 3):        A_mem = sigma(Q) M_{s-1} / (sigma(Q) z_{s-1} + eps)
    linear update (eq. 4):   M_s = M_{s-1} + sigma(K)^T V                 z_s = z_{s-1} + sum_t sigma(K_t)
    delta update (eq. 5):    M_s = M_{s-1} + sigma(K)^T (V - sigma(K) M_{s-1} / (sigma(K) z_{s-1} + eps))

Every token of segment s reads the memory left by segments < s; the segment is written after it is read.
Shapes: q [B, H, T, d_k] (H query heads share the memory of their KV head, H % H_kv == 0), k [B, H_kv, T, d_k],
v [B, H_kv, T, d_v], keep [B, T] (1 = real token, 0 = pad: pads are never written), M [B, H_kv, d_k, d_v],
z [B, H_kv, d_k]. M and z are fp32 whatever the input dtype (they are sums that overflow fp16/bf16);
retrievals come back in q's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hf_memory.kernels import fused_kernel

UPDATES = ("linear", "delta")


def sigma(x: torch.Tensor) -> torch.Tensor:
    """ELU + 1: a positive feature map, so that the normaliser sigma(q) z is positive."""
    return F.elu(x.float()) + 1.0


def empty_memory(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """M = 0 [B, H_kv, d_k, d_v] and z = 0 [B, H_kv, d_k], fp32."""
    batch, heads, _, d_k = k.shape
    return k.new_zeros(batch, heads, d_k, v.shape[-1], dtype=torch.float32), k.new_zeros(
        batch, heads, d_k, dtype=torch.float32
    )


def retrieve(q: torch.Tensor, memory: torch.Tensor, norm: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Eq. 3 for q [B, H, T, d_k] against the memory of its KV head; returns [B, H, T, d_v] in q's dtype."""
    batch, heads, length, d_k = q.shape
    groups = heads // memory.shape[1]
    sq = sigma(q).reshape(batch, memory.shape[1], groups * length, d_k)  # query heads of one KV head together
    numerator = sq @ memory
    denominator = sq @ norm[..., None] + eps
    return (numerator / denominator).reshape(batch, heads, length, -1).to(q.dtype)


def _kernel_dims(d_k: int, d_v: int) -> bool:
    """The project's Triton kernels take power-of-two head dims >= 16."""
    return all(d >= 16 and d & (d - 1) == 0 for d in (d_k, d_v))


def read_memory(q: torch.Tensor, memory: torch.Tensor, norm: torch.Tensor, eps: float = 1e-6,
                *, use_fused_kernels: bool = True) -> torch.Tensor:
    """Eq. 3, dispatched: the project's fused Triton read on CUDA, else ``retrieve``."""
    enabled = use_fused_kernels and _kernel_dims(q.shape[-1], memory.shape[-1])
    kernel = fused_kernel("compressive_memory_retrieve", q, memory, use_fused_kernels=enabled)
    return retrieve(q, memory, norm, eps) if kernel is None else kernel(q, memory, norm, eps)


def write_kernel(k: torch.Tensor, v: torch.Tensor, use_fused_kernels: bool = True):
    """The project's fused Triton write for these keys and values (CUDA, kernel dims), or None."""
    enabled = use_fused_kernels and _kernel_dims(k.shape[-1], v.shape[-1])
    return fused_kernel("compressive_memory_write", k, v, use_fused_kernels=enabled)


def write_memory(memory, norm, k, v, keep=None, rule: str = "linear", eps: float = 1e-6,
                 *, use_fused_kernels: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 4 / 5, dispatched: the project's fused Triton write on CUDA, else ``update``."""
    kernel = write_kernel(k, v, use_fused_kernels)
    if kernel is None:
        return update(memory, norm, k, v, keep, rule, eps)
    return kernel(memory, norm, k, v, keep, rule, eps)


def update(
    memory: torch.Tensor,
    norm: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor | None = None,
    rule: str = "linear",
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write one segment's keys and values (eq. 4 or 5); pads (keep == 0) write nothing."""
    if rule not in UPDATES:
        raise ValueError(f"unknown memory update {rule!r}; expected one of {UPDATES}")
    sk, values = sigma(k), v.float()
    if keep is not None:
        sk = sk * keep[:, None, :, None].float()
    if rule == "delta":
        values = values - (sk @ memory) / (sk @ norm[..., None] + eps)
    return memory + sk.transpose(-1, -2) @ values, norm + sk.sum(-2)


def memories_before_segments(k: torch.Tensor, v: torch.Tensor, complete: torch.Tensor, segment_size: int,
                             eps: float = 1e-6, initial: tuple[torch.Tensor, torch.Tensor] | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(M_{s-1}, z_{s-1}) before each segment s under the delta rule (eq. 5), [B, S, H_kv, d_k, d_v] and
    [B, S, H_kv, d_k], from k [B, H_kv, S n, d_k], v [B, H_kv, S n, d_v] and ``complete`` [B, S] (a segment
    not complete writes nothing), starting from ``initial`` (M, z) (default: empty). ``update`` with M and z kept as
    one [d_k, d_v + 1] matrix [M | z]: a segment reads sigma(K) [M | z] in one product and writes
    sigma(K)^T [V - A_mem | 1] in one more."""
    batch, heads, length, d_k = k.shape
    segments, d_v = length // segment_size, v.shape[-1]

    def per_segment(x):  # [B, H_kv, S n, d] -> [S, B H_kv, n, d]
        x = x.unflatten(2, (segments, segment_size)).permute(2, 0, 1, 3, 4)
        return x.reshape(segments, batch * heads, segment_size, x.shape[-1])

    sk = per_segment(sigma(k) * complete.repeat_interleave(segment_size, dim=1)[:, None, :, None])
    v1 = per_segment(torch.cat([v.float(), v.new_ones(*v.shape[:-1], 1, dtype=torch.float32)], dim=-1))
    state = (k.new_zeros(batch * heads, d_k, d_v + 1, dtype=torch.float32) if initial is None  # [M | z]
             else torch.cat([initial[0], initial[1][..., None]], dim=-1).float().flatten(0, 1))
    states = []
    for sk_s, v1_s in zip(sk.unbind(0), v1.unbind(0)):
        states.append(state)
        read = torch.bmm(sk_s, state)
        retrieved = F.pad(read[..., :d_v] / (read[..., d_v:] + eps), (0, 1))
        state = torch.baddbmm(state, sk_s.transpose(1, 2), v1_s - retrieved)
    states = torch.stack(states).unflatten(1, (batch, heads)).transpose(0, 1)  # [B, S, H_kv, d_k, d_v + 1]
    return states[..., :d_v], states[..., d_v]


def segmented_memory(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_size: int,
    keep: torch.Tensor | None = None,
    rule: str = "linear",
    memory: tuple[torch.Tensor, torch.Tensor] | None = None,
    detach_every: int | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The memory path over a whole sequence, segment by segment (the definition).

    Returns (A_mem [B, H, T, d_v], (M, z) after the last segment). A last segment shorter than
    ``segment_size`` is read and written like the others. Gradients flow through M and z across segments
    (the paper); ``detach_every=k`` cuts them after every k segments to bound training memory.
    """
    memory, norm = empty_memory(k, v) if memory is None else memory
    retrieved = []
    for index, start in enumerate(range(0, q.shape[2], segment_size)):
        end = start + segment_size
        retrieved.append(retrieve(q[:, :, start:end], memory, norm, eps))
        segment_keep = None if keep is None else keep[:, start:end]
        memory, norm = update(memory, norm, k[:, :, start:end], v[:, :, start:end], segment_keep, rule, eps)
        if detach_every and (index + 1) % detach_every == 0:
            memory, norm = memory.detach(), norm.detach()
    if not retrieved:
        return q.new_zeros(*q.shape[:3], v.shape[-1]), (memory, norm)
    return torch.cat(retrieved, dim=2), (memory, norm)
