"""Titans (Behrouz, Zhong & Mirrokni, "Titans: Learning to Memorize at Test Time", arXiv 2501.00663).

Built so far: the neural long-term memory as a token mixer (sections 3.1 and 4.4) and its decoding state. The
MAC / MAG / MAL blocks, the cache layer of the model and the model follow (issue 11).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hf_memory.cache import RowStateCacheLayer
from hf_memory.layers.norms import GatedRMSNorm
from hf_memory.modeling_utils import padding_mask
from hf_memory.ops.neural_memory import neural_memory_chunked
from hf_memory.ops.short_conv import conv_projections
from hf_memory.segments import from_segments, real_first, to_segments

from .configuration_titans import TitansConfig

# starting gates (sigmoid of the bias): step theta / max_lr 0.12, momentum eta 0.9, forgetting alpha 0.01
GATE_BIAS_INIT = {"step": -2.0, "momentum": 2.2, "forget": -4.6}


class NeuralMemoryState(RowStateCacheLayer):
    """A neural memory's decoding state, per row: the committed weights and momentum of every memory layer
    [B, H, d_in, d_out] (fp32), the unfinished chunk's keys, values [B, H, chunk, d] and gates [B, H, chunk, 3]
    with its length ``pending`` [B], and the conv history [B, 3 * H * d, kernel - 1]."""

    tensor_names = ("pending_k", "pending_v", "pending_gates", "pending", "conv")
    crop_refusal = "a neural memory cannot be cropped: its weights cannot be rolled back"

    def __init__(self, **kwargs):
        super().__init__()
        self.weights = self.momentum = None

    def store(self, weights, momentum, pending_k, pending_v, pending_gates, pending, conv, new_tokens: int) -> None:
        self.weights, self.momentum = weights, momentum
        self.pending_k, self.pending_v, self.pending_gates, self.pending, self.conv = (
            pending_k, pending_v, pending_gates, pending, conv)
        self.tokens += new_tokens
        self.is_initialized = True

    def _map_tensors(self, fn) -> None:
        super()._map_tensors(fn)
        if self.weights is not None:
            self.weights, self.momentum = [fn(w) for w in self.weights], [fn(s) for s in self.momentum]


class NeuralMemory(nn.Module):
    """The long-term memory module (LMM) of one layer, eqs. 11-15 and section 4.4.

        q, k, v = SiLU(DepthwiseConv(W_{q,k,v} x)), q and k L2-normalised per head        (eq. 11, section 4.4)
        theta_t = max_lr * sigmoid(w_theta x_t + b), eta_t = sigmoid(...), alpha_t = sigmoid(...)  (per head)
        y_t = M_{c(t)}(q_t), M learned on (k_t, v_t) by ``neural_memory_chunked``            (eqs. 12-15)
        out = W_o (RMSNorm(y) * SiLU(W_g x))                                                   (section 4.4)

    M_0 is learned per head. Chunks are counted per row over its real tokens (a left-padded row reads and
    writes its memory as the same row unpadded; pads write nothing)."""

    def __init__(self, config: TitansConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.head_dim = config.memory_num_heads, config.memory_head_dim
        self.chunk_size, self.conv_size = config.memory_chunk_size, config.memory_conv_kernel
        self.max_lr, self.max_grad_norm = config.memory_max_lr, config.memory_max_grad_norm
        hidden, inner = config.hidden_size, self.num_heads * self.head_dim
        self.q_proj = nn.Linear(hidden, inner, bias=False)
        self.k_proj = nn.Linear(hidden, inner, bias=False)
        self.v_proj = nn.Linear(hidden, inner, bias=False)
        self.q_conv1d, self.k_conv1d, self.v_conv1d = (nn.Conv1d(inner, inner, self.conv_size, groups=inner,
                                                                 bias=False) for _ in range(3))
        self.step_proj = nn.Linear(hidden, self.num_heads)  # theta
        self.momentum_proj = nn.Linear(hidden, self.num_heads)  # eta
        self.forget_proj = nn.Linear(hidden, self.num_heads)  # alpha
        width = config.memory_expansion * self.head_dim
        sizes = [self.head_dim] + [width] * (config.memory_depth - 1) + [self.head_dim]
        self.memory_init = nn.ParameterList(  # M_0: one MLP per head
            nn.Parameter(torch.randn(self.num_heads, a, b) / math.sqrt(a)) for a, b in zip(sizes, sizes[1:]))
        self.g_proj = nn.Linear(hidden, inner, bias=False)
        self.o_norm = GatedRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.o_proj = nn.Linear(inner, hidden, bias=False)
        with torch.no_grad():
            for name, bias in GATE_BIAS_INIT.items():
                getattr(self, f"{name}_proj").bias.fill_(bias)

    def gates(self, x: torch.Tensor, keep: torch.Tensor | None):
        """theta, eta, alpha [B, H, T] in fp32; pads: no step, no forgetting, momentum kept."""
        theta = self.max_lr * torch.sigmoid(self.step_proj(x).float())
        eta = torch.sigmoid(self.momentum_proj(x).float())
        alpha = torch.sigmoid(self.forget_proj(x).float())
        if keep is not None:
            real = keep[..., None]
            theta, alpha, eta = theta * real, alpha * real, torch.where(real, eta, 1.0)
        return (g.transpose(1, 2) for g in (theta, eta, alpha))

    def forward(self, hidden_states, attention_mask=None, state: NeuralMemoryState | None = None, **kwargs):
        """The memory's output for the new tokens; with ``state`` (a cache's), the tokens continue its stream and
        the state is updated: committed weights and momentum, the unfinished chunk, the conv history."""
        batch, length, _ = hidden_states.shape
        mask = padding_mask(attention_mask, length)
        keep = torch.ones(batch, length, dtype=torch.bool, device=hidden_states.device) if mask is None \
            else mask.bool()
        x = hidden_states * keep[..., None].to(hidden_states.dtype)
        history = None if state is None else state.conv
        inputs, (q, k, v) = conv_projections(x, (self.q_proj, self.k_proj, self.v_proj),
                                             (self.q_conv1d, self.k_conv1d, self.v_conv1d), history)
        q, k, v = (t.reshape(batch, length, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        q, k, v = F.normalize(q.float(), dim=-1), F.normalize(k.float(), dim=-1), v.float()
        gates = torch.stack(list(self.gates(x, keep)), dim=-1)  # [B, H, T, 3]: theta, eta, alpha
        valid = keep
        if state is not None and state.pending is not None:  # the unfinished chunk goes first
            held = state.pending_k.shape[2]
            q = torch.cat([torch.zeros_like(state.pending_k), q], dim=2)
            k, v = torch.cat([state.pending_k, k], dim=2), torch.cat([state.pending_v, v], dim=2)
            gates = torch.cat([state.pending_gates, gates], dim=2)
            valid = torch.cat([torch.arange(held, device=keep.device)[None] < state.pending[:, None], keep], dim=1)
        y, weights, momentum, unfinished = self.read_and_write(q, k, v, gates, valid, state)
        y = y[:, :, -length:].transpose(1, 2)  # [B, T, H, d]
        if state is not None:
            window = inputs if history is None else torch.cat([history, inputs], dim=-1)
            conv = F.pad(window, (self.conv_size - 1, 0))[..., 1 - self.conv_size :]  # the last kernel - 1 inputs
            state.store(weights, momentum, *unfinished, conv, length)
        gate = self.g_proj(x).reshape(batch, length, self.num_heads, self.head_dim)
        out = self.o_norm(y.to(x.dtype), gate).reshape(batch, length, -1)
        return self.o_proj(out), None

    def read_and_write(self, q, k, v, gates, valid, state):
        """The memory over each row's real tokens (``valid`` [B, S]) taken in order and in whole chunks: the
        outputs at the input's positions, the weights and momentum after each row's last complete chunk, and that
        row's remaining tokens (keys, values, gates padded to a chunk, their count; only with a ``state``)."""
        batch, c = q.shape[0], self.chunk_size
        order, real = real_first(valid), valid.sum(1)
        q, k, v = (to_segments(t, order, c) for t in (q, k, v))
        theta, eta, alpha = to_segments(gates, order, c).unbind(-1)
        eta = torch.where(torch.arange(eta.shape[-1], device=eta.device) < real[:, None, None], eta, 1.0)
        if state is not None and state.weights is not None:
            weights, momentum = state.weights, state.momentum
        else:
            weights = [w[None].expand(batch, *w.shape).float() for w in self.memory_init]
            momentum = [torch.zeros_like(w) for w in weights]
        outputs = []
        for n in range(q.shape[2] // c):
            chunk = slice(n * c, (n + 1) * c)
            y, new_weights, new_momentum = neural_memory_chunked(
                q[:, :, chunk], k[:, :, chunk], v[:, :, chunk], theta[:, :, chunk], eta[:, :, chunk],
                alpha[:, :, chunk], weights, momentum, chunk_size=c, max_grad_norm=self.max_grad_norm)
            done = (real >= (n + 1) * c)[:, None, None, None]  # the row's chunk is complete: commit it
            weights = [torch.where(done, new, old) for new, old in zip(new_weights, weights)]
            momentum = [torch.where(done, new, old) for new, old in zip(new_momentum, momentum)]
            outputs.append(y)
        y = from_segments(torch.cat(outputs, dim=2), order)
        if state is None:  # nothing to keep
            return y, weights, momentum, None
        start = real // c * c  # each row's unfinished chunk
        slots = (start[:, None] + torch.arange(c, device=q.device)).clamp(max=q.shape[2] - 1)
        pick = slots[:, None, :, None]
        unfinished = (k.gather(2, pick.expand(-1, k.shape[1], -1, k.shape[-1])),
                      v.gather(2, pick.expand(-1, v.shape[1], -1, v.shape[-1])),
                      torch.stack([g.gather(2, slots[:, None].expand(-1, g.shape[1], -1)) for g in (theta, eta, alpha)],
                                  dim=-1), real - start)
        return y, weights, momentum, unfinished


__all__ = ["NeuralMemory", "NeuralMemoryState"]
