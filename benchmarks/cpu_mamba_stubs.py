"""Pure-PyTorch CPU stand-ins for the CUDA-only kernels that NVIDIA's published Hymba code imports.

NVIDIA's remote code (``modeling_hymba.py`` of ``nvidia/Hymba-1.5B-Base``) imports ``mamba_ssm``, ``causal_conv1d``
and ``flash_attn`` at module level and has no PyTorch fallback. ``install()`` registers modules under those names
(in ``sys.modules``) whose functions are written here from the documented math of each kernel, in fp32, so the
published code runs on CPU. Used only by ``benchmarks/hymba_nvidia_parity.py``; nothing in hf-memory imports it.

Semantics reproduced (the reference ``*_ref`` functions of mamba-ssm / causal-conv1d and flash-attn's docs):

- ``selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)``:
  u, delta, z [b, d, l]; A [d, n]; B, C [b, n, l] (or [b, g, n, l]); D [d].
  delta <- softplus(delta + delta_bias); s_t = exp(delta_t A) s_{t-1} + delta_t u_t B_t; y_t = C_t . s_t + D u_t;
  y <- y * silu(z); returns y (in u's dtype) and, if asked, the last state s_L [b, d, n] (fp32).
- ``selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)``: one step of the above, ``state``
  [b, d, n] updated in place; x, dt, z [b, d]; B, C [b, n].
- ``causal_conv1d_fn(x, weight, bias, activation)``: depthwise causal conv, x [b, d, l], weight [d, w], then
  SiLU when activation is "silu" / "swish".
- ``causal_conv1d_update(x, conv_state, weight, bias, activation)``: x [b, d] (or [b, d, 1]); conv_state [b, d, w]
  shifted left in place and the new column appended, output = sum(conv_state * weight) + bias, then SiLU.
- ``flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size)``: q [b, sq, h, d], k / v [b, sk, hk, *]
  (GQA when hk < h). Causal and window masks are aligned to the bottom-right corner, as flash-attn >= 2.1 does:
  query i may see key j iff j <= i + sk - sq (causal) and i + sk - sq - left <= j <= i + sk - sq + right (window).
- ``mamba_inner_fn`` and the varlen / padding helpers are only reached with padded batches or with
  ``mamba_inner_layernorms=False`` in training; they raise.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types

import torch
import torch.nn.functional as F


def _expand_bc(t: torch.Tensor, d: int) -> torch.Tensor:
    """B or C as [b, d, n, l] from [b, n, l] or grouped [b, g, n, l]."""
    if t.dim() == 3:
        return t.unsqueeze(1)
    groups = t.shape[1]
    return t.repeat_interleave(d // groups, dim=1)


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False):
    dtype_in = u.dtype
    u, delta, A = u.float(), delta.float(), A.float()
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].float()
    if delta_softplus:
        delta = F.softplus(delta)
    batch, d, length = u.shape
    B = _expand_bc(B.float(), d)  # [b, 1 or d, n, l]
    C = _expand_bc(C.float(), d)
    state = u.new_zeros(batch, d, A.shape[1])
    ys = []
    for t in range(length):
        dt = delta[:, :, t, None]  # [b, d, 1]
        state = torch.exp(dt * A) * state + dt * B[..., t] * u[:, :, t, None]
        ys.append((state * C[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(dtype_in)
    return (y, state) if return_last_state else y


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    decay = torch.exp(dt[..., None] * A.float())
    new = decay * state.float() + dt[..., None] * B.float()[:, None, :] * x.float()[..., None]
    state.copy_(new)
    out = (new * C.float()[:, None, :]).sum(-1)
    if D is not None:
        out = out + x.float() * D.float()
    if z is not None:
        out = out * F.silu(z.float())
    return out.to(x.dtype)


def _activate(x, activation):
    if activation in ("silu", "swish"):
        return F.silu(x)
    if activation is None:
        return x
    raise ValueError(f"unsupported activation {activation!r}")


def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                     final_states_out=None, activation=None):
    if seq_idx is not None or initial_states is not None or return_final_states:
        raise NotImplementedError("cpu stub: seq_idx / initial_states / final states are not implemented")
    width = weight.shape[-1]
    out = F.conv1d(x, weight.unsqueeze(1), bias, padding=width - 1, groups=x.shape[1])[..., : x.shape[-1]]
    return _activate(out, activation)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None):
    if cache_seqlens is not None:
        raise NotImplementedError("cpu stub: cache_seqlens is not implemented")
    squeeze = x.dim() == 2
    steps = x.unsqueeze(-1) if squeeze else x
    outs = []
    for t in range(steps.shape[-1]):
        conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
        conv_state[:, :, -1] = steps[:, :, t]
        out = (conv_state * weight).sum(-1)
        if bias is not None:
            out = out + bias
        outs.append(_activate(out, activation))
    out = torch.stack(outs, dim=-1)
    return out.squeeze(-1) if squeeze else out


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    alibi_slopes=None, deterministic=False, return_attn_probs=False, **_):
    if alibi_slopes is not None or return_attn_probs:
        raise NotImplementedError("cpu stub: alibi / attention probabilities are not implemented")
    batch, sq, heads, dim = q.shape
    sk, kv_heads = k.shape[1], k.shape[2]
    if kv_heads != heads:
        k = k.repeat_interleave(heads // kv_heads, dim=2)
        v = v.repeat_interleave(heads // kv_heads, dim=2)
    scale = dim ** -0.5 if softmax_scale is None else softmax_scale
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    i = torch.arange(sq)[:, None] + (sk - sq)
    j = torch.arange(sk)[None, :]
    allowed = torch.ones(sq, sk, dtype=torch.bool)
    if causal:
        allowed &= j <= i
    left, right = window_size
    if left >= 0:
        allowed &= j >= i - left
    if right >= 0:
        allowed &= j <= i + right
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    if dropout_p:
        probs = F.dropout(probs, dropout_p)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v.float()).to(q.dtype)


def _unavailable(name):
    def fail(*args, **kwargs):
        raise NotImplementedError(f"cpu stub: {name} is not implemented (padded batches / fused training path)")
    fail.__name__ = name
    return fail


def install() -> None:
    """Register the stand-ins as ``flash_attn``, ``mamba_ssm`` and ``causal_conv1d`` (with their submodules)."""
    contents = {
        "flash_attn": {"flash_attn_func": flash_attn_func,
                       "flash_attn_varlen_func": _unavailable("flash_attn_varlen_func")},
        "flash_attn.bert_padding": {n: _unavailable(n) for n in ("index_first_axis", "pad_input", "unpad_input")},
        "mamba_ssm": {},
        "mamba_ssm.ops": {},
        "mamba_ssm.ops.selective_scan_interface": {"selective_scan_fn": selective_scan_fn,
                                                   "mamba_inner_fn": _unavailable("mamba_inner_fn")},
        "mamba_ssm.ops.triton": {},
        "mamba_ssm.ops.triton.selective_state_update": {"selective_state_update": selective_state_update},
        "causal_conv1d": {"causal_conv1d_fn": causal_conv1d_fn, "causal_conv1d_update": causal_conv1d_update},
    }
    for name, attrs in contents.items():
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        module.__path__ = []
        module.__dict__.update(attrs)
        sys.modules[name] = module
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, module)
