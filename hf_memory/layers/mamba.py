"""Mamba mixers shared by the hybrids (Jamba, Bamba-style Jamba, Hymba).

Both keep their short-conv history and fp32 SSM state in a ``"linear_attention"`` cache layer, and
neutralise pads (input zeroed and Delta = 0, so exp(Delta A) = 1 and nothing is written): a left-padded row
ends with the state of its unpadded sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hf_memory.cache import recurrent_state, store_recurrent_state
from hf_memory.layers.norms import RMSNorm
from hf_memory.modeling_utils import inverse_softplus_dt, padding_mask
from hf_memory.ops.selective_scan import selective_scan
from hf_memory.ops.ssd import ssd
from hf_memory.ops.short_conv import short_conv


class MambaMixer(nn.Module):
    """Mamba-1 block (Gu & Dao, arXiv 2312.00752, figure 3 / Algorithm 2), with Jamba's RMSNorms on
    Delta, B and C (arXiv 2403.19887, section 3) when ``inner_norms``:

        (x, z) = in_proj(h);  x = SiLU(causal depthwise conv(x));  (Delta, B, C) = x_proj(x)
        Delta = softplus(dt_proj(Delta));  A = -exp(A_log)
        h_t = exp(Delta_t A) h_{t-1} + Delta_t B_t x_t;  y_t = C_t h_t + D x_t;  out = out_proj(y * SiLU(z))
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        state_size: int,
        conv_kernel: int,
        time_step_rank: int,
        layer_idx: int,
        conv_bias: bool = True,
        proj_bias: bool = False,
        inner_norms: bool = True,
        rms_norm_eps: float = 1e-6,
        use_fused_kernels: bool = True,
        output_projection: bool = True,
    ):
        super().__init__()
        self.layer_idx = layer_idx
        self.intermediate_size, self.state_size = intermediate_size, state_size
        self.conv_kernel, self.time_step_rank = conv_kernel, time_step_rank
        self.use_fused_kernels = use_fused_kernels
        self.in_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=proj_bias)
        self.conv1d = nn.Conv1d(intermediate_size, intermediate_size, conv_kernel, groups=intermediate_size,
                                bias=conv_bias)
        self.x_proj = nn.Linear(intermediate_size, time_step_rank + 2 * state_size, bias=False)
        self.dt_proj = nn.Linear(time_step_rank, intermediate_size, bias=True)
        self.A_log = nn.Parameter(torch.zeros(intermediate_size, state_size))
        self.D = nn.Parameter(torch.ones(intermediate_size))
        # a parallel hybrid (Hymba) may fuse y * SiLU(z) with its attention heads' output before one projection
        self.out_proj = nn.Linear(intermediate_size, hidden_size, bias=proj_bias) if output_projection else None
        if inner_norms:
            self.dt_layernorm = RMSNorm(time_step_rank, eps=rms_norm_eps)
            self.b_layernorm = RMSNorm(state_size, eps=rms_norm_eps)
            self.c_layernorm = RMSNorm(state_size, eps=rms_norm_eps)
        self.inner_norms = inner_norms

    def ssm_init_values(self, dt_min: float = 1e-3, dt_max: float = 0.1) -> dict[str, torch.Tensor]:
        """Initial SSM parameters by name: S4D-real A = -(1..N) per channel, D = 1, and
        dt_proj.bias = softplus^-1(dt) with dt ~ logU[dt_min, dt_max]."""
        a = torch.arange(1, self.state_size + 1, dtype=torch.float32).log().expand(self.intermediate_size, -1)
        return {"A_log": a.clone(), "D": torch.ones(self.intermediate_size), "dt_proj.bias": inverse_softplus_dt(
            self.intermediate_size, dt_min, dt_max)}

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, cache=None, **kwargs):
        length = hidden_states.shape[1]
        mask = padding_mask(attention_mask, length)
        if mask is not None:
            hidden_states = hidden_states * mask[..., None].to(hidden_states.dtype)
        conv_history, state = recurrent_state(cache, self.layer_idx)

        x, z = self.in_proj(hidden_states).transpose(1, 2).chunk(2, dim=1)  # [B, D_in, T] each
        conv_input = x
        x = short_conv(x, self.conv1d.weight[:, 0], self.conv1d.bias, "silu", history=conv_history,
                       use_fused_kernels=self.use_fused_kernels)
        if mask is not None:
            x = x * mask[:, None, :].to(x.dtype)

        time_step, B, C = self.x_proj(x.transpose(1, 2)).split(
            [self.time_step_rank, self.state_size, self.state_size], dim=-1
        )
        if self.inner_norms:
            time_step, B, C = self.dt_layernorm(time_step), self.b_layernorm(B), self.c_layernorm(C)
        delta = F.softplus((time_step @ self.dt_proj.weight.T).float() + self.dt_proj.bias.float()).transpose(1, 2)
        if mask is not None:
            delta = delta * mask[:, None, :]  # Delta = 0 at pads: exp(0 * A) = 1 and no write
        A = -torch.exp(self.A_log.float())

        y, state = selective_scan(x, delta, A, B.transpose(1, 2), C.transpose(1, 2), self.D, state,
                                  use_fused_kernels=self.use_fused_kernels)
        store_recurrent_state(cache, self.layer_idx, conv_input, state, self.conv_kernel)
        y = (y * F.silu(z)).transpose(1, 2).to(hidden_states.dtype)
        return (y if self.out_proj is None else self.out_proj(y)), None


class GroupGatedRMSNorm(nn.Module):
    """Mamba-2's output norm (norm after gate): RMSNorm(y * SiLU(z)) over groups of ``group_size`` channels."""

    def __init__(self, hidden_size: int, group_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.group_size, self.eps = group_size, eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = y.dtype
        gated = y.float() * F.silu(z.float())
        groups = gated.unflatten(-1, (-1, self.group_size))
        normed = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * normed.flatten(-2)).to(dtype)


class Mamba2Mixer(nn.Module):
    """Mamba-2 block (Dao & Gu, arXiv 2405.21060, section 7 / figure 6), as in Bamba:

        (z, xBC, dt) = in_proj(h);  (x, B, C) = SiLU(causal depthwise conv(xBC))
        dt = softplus(dt + dt_bias);  A = -exp(A_log) (one scalar per head)
        h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T;  y_t = h_t C_t + D x_t;  out = out_proj(RMSNorm(y * SiLU(z)))

    Falcon-H1's variant: ``projection_multipliers`` (its muP ``ssm_multipliers``) scale the z, x, B, C and dt
    parts of in_proj(h); ``gated_norm=False`` drops the RMSNorm (out = out_proj(y * SiLU(z))).
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        state_size: int,
        conv_kernel: int,
        head_dim: int,
        n_groups: int,
        chunk_size: int,
        layer_idx: int,
        conv_bias: bool = True,
        proj_bias: bool = False,
        rms_norm_eps: float = 1e-6,
        use_fused_kernels: bool = True,
        output_projection: bool = True,
        out_proj_bias: bool | None = None,
        gated_norm: bool = True,
        projection_multipliers: tuple[float, float, float, float, float] | None = None,
    ):
        super().__init__()
        self.layer_idx = layer_idx
        self.intermediate_size, self.state_size = intermediate_size, state_size
        self.head_dim, self.num_heads, self.n_groups = head_dim, intermediate_size // head_dim, n_groups
        self.conv_kernel, self.chunk_size = conv_kernel, chunk_size
        self.use_fused_kernels = use_fused_kernels
        self.conv_dim = intermediate_size + 2 * n_groups * state_size
        self.in_proj = nn.Linear(hidden_size, intermediate_size + self.conv_dim + self.num_heads, bias=proj_bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, conv_kernel, groups=self.conv_dim, bias=conv_bias)
        self.dt_bias = nn.Parameter(torch.zeros(self.num_heads))
        self.A_log = nn.Parameter(torch.zeros(self.num_heads))
        self.D = nn.Parameter(torch.ones(self.num_heads))
        self.norm = GroupGatedRMSNorm(intermediate_size, intermediate_size // n_groups, eps=rms_norm_eps) if gated_norm else None
        out_bias = proj_bias if out_proj_bias is None else out_proj_bias
        self.out_proj = nn.Linear(intermediate_size, hidden_size, bias=out_bias) if output_projection else None
        self.multipliers = tuple(float(m) for m in projection_multipliers or (1.0,) * 5)
        scaled = any(m != 1.0 for m in self.multipliers)
        self.register_buffer("projection_multipliers", self.multiplier_vector() if scaled else None, persistent=False)

    def multiplier_vector(self) -> torch.Tensor:
        """The per-channel factors of in_proj's output: one multiplier each for z, x, B, C and dt."""
        group_width = self.n_groups * self.state_size
        widths = (self.intermediate_size, self.intermediate_size, group_width, group_width, self.num_heads)
        return torch.cat([torch.full((w,), m) for w, m in zip(widths, self.multipliers)])

    def ssm_init_values(self, dt_min: float = 1e-3, dt_max: float = 0.1) -> dict[str, torch.Tensor]:
        """Initial SSM parameters by name (Mamba-2): A ~ U[1, 16], D = 1, dt_bias = softplus^-1(dt)."""
        return {"A_log": torch.empty(self.num_heads).uniform_(1, 16).log(), "D": torch.ones(self.num_heads),
                "dt_bias": inverse_softplus_dt(self.num_heads, dt_min, dt_max)}

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, cache=None, **kwargs):
        batch, length, _ = hidden_states.shape
        mask = padding_mask(attention_mask, length)
        if mask is not None:
            hidden_states = hidden_states * mask[..., None].to(hidden_states.dtype)
        conv_history, state = recurrent_state(cache, self.layer_idx)

        projected = self.in_proj(hidden_states)
        if self.projection_multipliers is not None:
            projected = projected * self.projection_multipliers.to(projected.dtype)
        z, xBC, dt = projected.split([self.intermediate_size, self.conv_dim, self.num_heads], -1)
        conv_input = xBC.transpose(1, 2)  # [B, conv_dim, T]
        xBC = short_conv(conv_input, self.conv1d.weight[:, 0], self.conv1d.bias, "silu", history=conv_history,
                         use_fused_kernels=self.use_fused_kernels).transpose(1, 2)
        group_width = self.n_groups * self.state_size
        x, B, C = xBC.split([self.intermediate_size, group_width, group_width], dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias.float())
        if mask is not None:
            dt = dt * mask[..., None]  # dt = 0 at pads: no decay, no write
        A = -torch.exp(self.A_log.float())

        y, state = ssd(
            x.reshape(batch, length, self.num_heads, self.head_dim), dt, A,
            B.reshape(batch, length, self.n_groups, self.state_size),
            C.reshape(batch, length, self.n_groups, self.state_size),
            self.D, state, chunk_size=self.chunk_size, use_fused_kernels=self.use_fused_kernels,
        )
        store_recurrent_state(cache, self.layer_idx, conv_input, state, self.conv_kernel)
        y = y.reshape(batch, length, self.intermediate_size)
        y = self.norm(y, z) if self.norm is not None else (y.float() * F.silu(z.float()))
        y = y.to(hidden_states.dtype)
        return (y if self.out_proj is None else self.out_proj(y)), None
