"""Short causal depthwise convolution (kernel ~4) used before q/k/v in Gated DeltaNet and in Mamba mixers.

y[:, c, t] = act(sum_j w[c, j] * x[:, c, t - K + 1 + j] + b[c]) over the last K inputs, zeros before the start.
Reference in PyTorch (``F.conv1d``); causal-conv1d's kernels on CUDA through ``hf_memory.kernels``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hf_memory.kernels import fused_kernel


def _activate(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation is None:
        return y
    if activation in ("silu", "swish"):
        return F.silu(y)
    raise ValueError(f"unsupported short-conv activation {activation!r} (expected 'silu' or None)")


def causal_conv1d_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str | None = "silu"
) -> torch.Tensor:
    """x [B, D, T], weight [D, K] -> [B, D, T]: the definition, zero history before the first input."""
    kernel_size = weight.shape[-1]
    y = F.conv1d(x.to(weight.dtype), weight[:, None, :], bias, padding=kernel_size - 1, groups=x.shape[1])
    return _activate(y[..., : x.shape[-1]], activation).to(x.dtype)


DIRECT_MAX_TOKENS = 16  # with a history, up to this many new tokens are convolved directly


def short_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str | None,
    *,
    history: torch.Tensor | None = None,
    use_fused_kernels: bool = True,
) -> torch.Tensor:
    """Causal conv of x [B, D, T] continuing after ``history`` [B, D, L] (the cached last inputs, or None).

    Returns the T new outputs. With a cache, the caller keeps ``history`` up to date (see ``hf_memory.cache``).
    """
    if history is None:
        kernel = fused_kernel("causal_conv1d_fn", x, weight, use_fused_kernels=use_fused_kernels)
        if kernel is not None:
            return kernel(x.contiguous(), weight, bias, activation=activation)
        return causal_conv1d_reference(x, weight, bias, activation)
    full = torch.cat([history.to(x.dtype), x], dim=-1)
    if x.shape[-1] > DIRECT_MAX_TOKENS:
        return causal_conv1d_reference(full, weight, bias, activation)[..., -x.shape[-1] :]
    # decode: the few new outputs as windows x weights (one token: 2-3x faster than conv1d on CPU)
    span = x.shape[-1] + weight.shape[-1] - 1  # the inputs the new outputs see, zeros before the start
    if full.shape[-1] < span:
        full = F.pad(full, (span - full.shape[-1], 0))
    y = (full[..., -span:].to(weight.dtype).unfold(-1, weight.shape[-1], 1) * weight[:, None]).sum(-1)
    y = y if bias is None else y + bias[:, None]
    return _activate(y, activation).to(x.dtype)


def conv_projections(x: torch.Tensor, projections, convs, history: torch.Tensor | None = None,
                     use_fused_kernels: bool = True):
    """SiLU(DepthwiseConv(W x)) for each projection W (``nn.Linear``) and its depthwise ``nn.Conv1d``, run as one
    causal conv over the concatenated channels (q, k, v of Gated DeltaNet and Titans' memory). x [B, T, D];
    returns the conv input [B, sum D_i, T] (the history a cache keeps) and the outputs [B, T, D_i]."""
    inputs = torch.cat([projection(x) for projection in projections], dim=-1).transpose(1, 2)
    weight = torch.cat([conv.weight for conv in convs])[:, 0]
    mixed = short_conv(inputs, weight, None, "silu", history=history, use_fused_kernels=use_fused_kernels)
    return inputs, mixed.transpose(1, 2).split([projection.out_features for projection in projections], dim=-1)
