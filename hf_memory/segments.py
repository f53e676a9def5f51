"""Segment bookkeeping shared by the segment-wise architectures (Infini-attention, RMT, Titans).

A sequence is read in segments of ``n`` tokens counted per row over its *real* tokens, so that a left-padded
row is segmented exactly like the same row without pads: tokens are reordered real-first, zero-padded to a
whole number of segments, processed segment by segment, and put back in their original order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_unflatten


def real_first(keep: torch.Tensor) -> torch.Tensor:
    """[B, T] order that lists each row's real tokens first (in their order), then its pads."""
    return torch.argsort((~keep).int(), dim=1, stable=True)


def to_segments(x: torch.Tensor, order: torch.Tensor, segment_size: int) -> torch.Tensor:
    """x [B, H, T, d] reordered by ``order`` along T and zero-padded to a multiple of ``segment_size``."""
    pad = (-x.shape[2]) % segment_size
    return F.pad(x.gather(2, order[:, None, :, None].expand_as(x)), (0, 0, 0, pad))


def from_segments(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Inverse of ``to_segments``: drop the padding, put tokens back in their original order along dim 2."""
    x = x[:, :, : order.shape[1]]
    return torch.empty_like(x).scatter_(2, order[:, None, :, None].expand_as(x), x)


def unfinished_segment(x: torch.Tensor, real: torch.Tensor, segment_size: int) -> torch.Tensor:
    """Each row's last, unfinished segment of x [B, H, T_padded, d] (real [B] tokens, segments of
    ``segment_size``), as [B, H, segment_size, d]; slots past the row's tokens hold whatever x has there."""
    first = (real // segment_size * segment_size)[:, None] + torch.arange(segment_size, device=real.device)
    first = first.clamp(max=x.shape[2] - 1)[:, None, :, None]
    return x.gather(2, first.expand(-1, x.shape[1], -1, x.shape[-1]))


def when_any(flags: torch.Tensor, fold, state: tuple, inputs: tuple = ()) -> tuple:
    """``fold(*state, *inputs)`` (a new state of the same structure) if any of ``flags`` is set, else ``state``: a
    segment folded into the memory only when one fills. Eager code branches in Python (one host sync; nothing is
    copied on the step that does not fold); traced code (``torch.compile``) takes ``torch.cond``, which puts both
    branches in the graph and picks one on the device, so a decode step needs no host sync."""
    if not torch.compiler.is_compiling():
        return fold(*state, *inputs) if bool(flags.any()) else state
    leaves, structure = tree_flatten(state)
    at = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]  # cond takes and returns tensors

    def rebuild(tensors):
        merged = list(leaves)
        for i, tensor in zip(at, tensors):
            merged[i] = tensor
        return tree_unflatten(merged, structure)

    def fold_tensors(*operands):
        folded = tree_flatten(fold(*rebuild(operands[: len(at)]), *operands[len(at) :]))[0]
        return tuple(folded[i].clone(memory_format=torch.contiguous_format) for i in at)

    def keep_tensors(*operands):  # cond's branches return fresh tensors (no aliases) of the same layout
        return tuple(x.clone(memory_format=torch.contiguous_format) for x in operands[: len(at)])

    return rebuild(torch.cond(flags.any(), fold_tensors, keep_tensors, (*(leaves[i] for i in at), *inputs)))
