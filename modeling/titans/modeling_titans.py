"""Titans (Behrouz, Zhong & Mirrokni, "Titans: Learning to Memorize at Test Time", arXiv 2501.00663).

A neural long-term memory (an MLP per head whose weights are learned at test time by gradient steps with momentum
and forgetting, sections 3.1 and 4.4) beside sliding-window attention with persistent memory (section 3.3):

    MAC (memory as context, eqs. 21-25): per segment, h = M_{s-1}(q); y = Attn([P ; h ; segment]);
                                          the memory learns y; o = RMSNorm(y) * sigmoid(RMSNorm(M_s(y)))
    MAG (memory as a gate, eqs. 26-28):   o = RMSNorm(SW-Attn*(x)) * sigmoid(RMSNorm(M(x)))
    MAL (memory as a layer, eqs. 29-31):  y = M(x), o = SW-Attn*(y), each with its own residual

SW-Attn* attends over the layer's ``num_persistent_tokens`` learned keys and values (the persistent memory P,
visible to every query) and the last ``sliding_window`` tokens; MAC's attention over P, the segment's read-out and
the segment's tokens.
The memory's math lives in ``hf_memory.ops.neural_memory``; this file is the layers, their cache and the model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from transformers import cache_utils
from transformers import initialization as init

from hf_memory.cache import RowStateCacheLayer, own_cache_layer
from hf_memory.layers.attention import Attention, apply_rotary, runs_blockwise
from hf_memory.layers.norms import GatedRMSNorm, RMSNorm
from hf_memory.modeling_utils import (
    HFMemoryForCausalLM,
    HFMemoryModel,
    HFMemoryPreTrainedModel,
    MemoryDecoderLayer,
    padding_mask,
)
from hf_memory.ops.neural_memory import mlp_forward, neural_memory
from hf_memory.ops.position_masked_attention import additive_position_mask
from hf_memory.ops.short_conv import conv_projections
from hf_memory.ops.sliding_window import sliding_window_attention
from hf_memory.segments import from_segments, real_first, to_segments

from .configuration_titans import LAYER_TYPES, TitansConfig

# starting gates (sigmoid of the bias): step theta / max_lr 0.12, momentum eta 0.9, forgetting alpha 0.01
GATE_BIAS_INIT = {"theta": -2.0, "eta": 2.2, "alpha": -4.6}


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
        y_t = M_{c(t)}(q_t), M learned on (k_t, v_t) by ``neural_memory``                    (eqs. 12-15)
        out = W_o (RMSNorm(y) * SiLU(W_g x))                                                   (section 4.4)

    M_0 is learned per head. Chunks are counted per row over its real tokens (a left-padded row reads and
    writes its memory as the same row unpadded; pads write nothing)."""

    def __init__(self, config: TitansConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.head_dim = config.memory_num_heads, config.memory_head_dim
        self.chunk_size, self.conv_size = config.memory_chunk_size, config.memory_conv_kernel
        self.max_lr, self.max_grad_norm = config.memory_max_lr, config.memory_max_grad_norm
        self.use_fused_kernels = config.use_fused_kernels
        hidden, inner = config.hidden_size, self.num_heads * self.head_dim
        self.q_proj = nn.Linear(hidden, inner, bias=False)
        self.k_proj = nn.Linear(hidden, inner, bias=False)
        self.v_proj = nn.Linear(hidden, inner, bias=False)
        self.q_conv1d, self.k_conv1d, self.v_conv1d = (nn.Conv1d(inner, inner, self.conv_size, groups=inner,
                                                                 bias=False) for _ in range(3))
        self.step_proj = nn.Linear(hidden, self.num_heads, bias=False)  # theta
        self.momentum_proj = nn.Linear(hidden, self.num_heads, bias=False)  # eta
        self.forget_proj = nn.Linear(hidden, self.num_heads, bias=False)  # alpha
        self.gate_bias = nn.Parameter(self.initial_gate_bias())  # [3, H]: theta, eta, alpha
        width = config.memory_expansion * self.head_dim
        sizes = [self.head_dim] + [width] * (config.memory_depth - 1) + [self.head_dim]
        self.memory_init = nn.ParameterList(  # M_0: one MLP per head
            nn.Parameter(torch.randn(self.num_heads, a, b) / math.sqrt(a)) for a, b in zip(sizes, sizes[1:]))
        self.g_proj = nn.Linear(hidden, inner, bias=False)
        self.o_norm = GatedRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.o_proj = nn.Linear(inner, hidden, bias=False)

    def initial_weights(self, batch: int) -> list[torch.Tensor]:
        """M_0 for every row, fp32: [B, H, d_in, d_out] per memory layer."""
        return [w[None].expand(batch, *w.shape).float() for w in self.memory_init]

    def initial_gate_bias(self) -> torch.Tensor:
        return torch.tensor(list(GATE_BIAS_INIT.values()))[:, None].repeat(1, self.num_heads)

    def gates(self, x: torch.Tensor, keep: torch.Tensor | None):
        """theta, eta, alpha [B, H, T] in fp32; pads: no step, no forgetting, momentum kept."""
        b_theta, b_eta, b_alpha = self.gate_bias.float()
        theta = self.max_lr * torch.sigmoid(self.step_proj(x).float() + b_theta)
        eta = torch.sigmoid(self.momentum_proj(x).float() + b_eta)
        alpha = torch.sigmoid(self.forget_proj(x).float() + b_alpha)
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
            conv = last_inputs(inputs, keep, history, self.conv_size - 1)
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
            weights = self.initial_weights(batch)
            momentum = [torch.zeros_like(w) for w in weights]
        y, weights, momentum = neural_memory(q, k, v, theta, eta, alpha, weights, momentum, chunk_size=c,
                                             max_grad_norm=self.max_grad_norm, lengths=real,
                                             use_fused_kernels=self.use_fused_kernels)
        y = from_segments(y, order)
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


class TitansCacheLayer(NeuralMemoryState):
    """Cache of one Titans layer: the neural memory's state (``NeuralMemoryState``) and the attention's last
    ``sliding_window - 1`` keys, values [B, H_kv, S, d] and key positions [B, S] (-1 at pads). Bounded: a memory
    chunk and a window per layer, whatever the context length."""

    tensor_names = (*NeuralMemoryState.tensor_names, "keys", "values", "key_positions", "context_keys",
                    "context_values", "segment_count", "read_conv")

    def __init__(self, **kwargs):
        super().__init__()
        self.snapshot = None  # MAC: the memory's weights at the start of each row's unfinished segment

    def store(self, *state) -> None:
        super().store(*state[:-1], 0)  # the attention counts the tokens

    def store_segment(self, keys, values, context_keys, context_values, count, snapshot, read_conv, new_tokens):
        """MAC: the unfinished segment's keys and values of its tokens and of their retrieved context, padded to a
        segment, ``count`` [B] of them real, the weights its context was read from, the read path's conv history."""
        self.keys, self.values, self.context_keys, self.context_values = keys, values, context_keys, context_values
        self.segment_count, self.snapshot, self.read_conv = count, snapshot, read_conv
        self.tokens += new_tokens
        self.is_initialized = True

    def _map_tensors(self, fn) -> None:
        super()._map_tensors(fn)
        if self.snapshot is not None:
            self.snapshot = [fn(w) for w in self.snapshot]

    def update_attention(self, keys, values, positions, kept: int):
        """Append this call's keys, values and positions; return all the call's queries may see (kept + new)
        and keep the last ``kept``."""
        self.tokens += positions.shape[1]
        if self.keys is not None:
            keys, values = torch.cat([self.keys, keys], dim=2), torch.cat([self.values, values], dim=2)
            positions = torch.cat([self.key_positions, positions], dim=1)
        start = max(keys.shape[2] - kept, 0)  # the last `kept` keys (none for a window of 1)
        self.keys, self.values, self.key_positions = keys[:, :, start:], values[:, :, start:], positions[:, start:]
        self.is_initialized = True
        return keys, values, positions


for _layer_type in LAYER_TYPES:
    cache_utils.DYNAMIC_LAYER_TYPE_MAPPING[_layer_type] = TitansCacheLayer
    cache_utils.STATIC_LAYER_TYPE_MAPPING[_layer_type] = TitansCacheLayer  # bounded: a static cache is this one


class PersistentWindowAttention(Attention):
    """SW-Attn* (eqs. 19, 27, 31): causal attention over the ``num_persistent_tokens`` learned keys and values of
    the layer (the persistent memory P, task knowledge independent of the input, always visible) and the last
    ``sliding_window`` tokens (a left-padded row equals itself unpadded). Inputs longer than the window run
    blockwise (``hf_memory.ops.sliding_window``, O(T * window) memory); shorter ones, and attention maps, through
    the configured attention with the dense mask of positions."""

    def __init__(self, config: TitansConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.window, self.num_persistent = config.sliding_window, config.num_persistent_tokens
        self.persistent_keys = nn.Parameter(torch.zeros(self.num_key_value_heads, self.num_persistent, self.head_dim))
        self.persistent_values = nn.Parameter(torch.zeros(self.num_key_value_heads, self.num_persistent,
                                                          self.value_head_dim))

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, cache=None, position_ids=None,
                **kwargs):
        batch, length, _ = hidden_states.shape
        q, k, v = self.project(hidden_states, position_embeddings)
        keep = padding_mask(attention_mask, length)
        positions = position_ids.expand(batch, length)
        positions = positions if keep is None else positions.masked_fill(keep == 0, -1)
        key_positions = positions
        state = own_cache_layer(cache, self.layer_idx, TitansCacheLayer)
        if state is not None:
            k, v, key_positions = state.update_attention(k, v, positions, self.window - 1)
        sinks = (self.persistent_keys[None], self.persistent_values[None]) if self.num_persistent else None
        if runs_blockwise(self.config, length) and not kwargs.get("output_attentions", self.config.output_attentions):
            # O(T * window) memory: the kept and new keys are consecutive tokens (pads only in front of a row)
            out = sliding_window_attention(q, k, v, window=self.window, scaling=self.scaling, sinks=sinks,
                                           key_padding_mask=key_positions >= 0, training=self.training,
                                           dropout=self.attention_dropout if self.training else 0.0)
            return self.o_proj(out.reshape(batch, length, -1)), None
        bias = additive_position_mask(positions, key_positions, self.window, 0, q.dtype)  # [B, 1, T, S]
        if self.num_persistent:
            k = torch.cat([self.persistent_keys.to(k.dtype).expand(batch, -1, -1, -1), k], dim=2)
            v = torch.cat([self.persistent_values.to(v.dtype).expand(batch, -1, -1, -1), v], dim=2)
            bias = torch.cat([bias.new_zeros(batch, 1, length, self.num_persistent), bias], dim=-1)
        out, weights = self.attend(q, k, v, bias, **kwargs)
        return self.o_proj(out), weights


def long_term_memory(config: TitansConfig, layer_idx: int) -> NeuralMemory | None:
    """The layer's long-term memory, or None for the attention-only ablation (``use_memory=False``)."""
    return NeuralMemory(config, layer_idx) if config.use_memory else None


def memory_state(cache, layer_idx: int) -> TitansCacheLayer | None:
    return own_cache_layer(cache, layer_idx, TitansCacheLayer)


class MemoryAsGate(nn.Module):
    """MAG (eqs. 26-28): the two branches read the same input; the attention's output is gated by the memory's,
    each normalised by a learned vector (RMSNorm) and the memory's through a sigmoid."""

    def __init__(self, config: TitansConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = PersistentWindowAttention(config, layer_idx)
        self.memory = long_term_memory(config, layer_idx)
        if self.memory is not None:
            self.attention_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.memory_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, cache=None, **kwargs):
        y, weights = self.self_attn(hidden_states, attention_mask, position_embeddings, cache, **kwargs)
        if self.memory is None:
            return y, weights
        m, _ = self.memory(hidden_states, attention_mask, state=memory_state(cache, self.layer_idx))
        return self.attention_norm(y) * torch.sigmoid(self.memory_norm(m)), weights


class MemoryRead(nn.Module):
    """The retrieval of MAC (eq. 21), h = M*_{s-1}(q): the memory read without an update, with the weights of the
    segment's start, by queries of its own (W_Q, depthwise conv, SiLU, L2 norm per head as the memory's); the
    read-out leaves through a per-head RMSNorm and a projection to the model width."""

    def __init__(self, config: TitansConfig):
        super().__init__()
        self.num_heads, self.head_dim = config.memory_num_heads, config.memory_head_dim
        inner = self.num_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.q_conv1d = nn.Conv1d(inner, inner, config.memory_conv_kernel, groups=inner, bias=False)
        self.o_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.o_proj = nn.Linear(inner, config.hidden_size, bias=False)

    def queries(self, x, history):
        """q [B, H, T, d] in fp32 and the conv inputs [B, H * d, T] (the history a cache keeps)."""
        inputs, (q,) = conv_projections(x, (self.q_proj,), (self.q_conv1d,), history)
        q = q.reshape(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)
        return F.normalize(q.float(), dim=-1), inputs

    def forward(self, weights, q, dtype):
        """h [B, n, hidden] of queries q [B, H, n, d] read from ``weights`` (per row and head)."""
        y = mlp_forward(weights, q)[0].transpose(1, 2).to(dtype)  # [B, n, H, d]
        return self.o_proj(self.o_norm(y).flatten(2))


def pad_to(t: torch.Tensor, length: int) -> torch.Tensor:
    """[B, H, n, d] zero-padded along n to ``length``."""
    return F.pad(t, (0, 0, 0, length - t.shape[2]))


def last_inputs(inputs, keep, history, kept: int):
    """The ``kept`` conv inputs up to each row's last real token (``keep`` [B, T]; pads may trail a row in MAC's
    segments): [B, D, kept] of history [B, D, <= kept] then inputs [B, D, T]; none for a kernel of 1."""
    window = inputs if history is None else torch.cat([history, inputs], dim=-1)
    length = keep.shape[1]
    ends = window.shape[-1] - length + (keep * torch.arange(1, length + 1, device=keep.device)).amax(1)
    slots = (ends[:, None] + torch.arange(kept, device=ends.device))[:, None].expand(-1, window.shape[1], -1)
    return F.pad(window, (kept, 0)).gather(-1, slots)


class MemoryAsContext(nn.Module):
    """MAC (eqs. 21-25), per row in segments of ``segment_size`` real tokens:

        h = M*_{s-1}(q)                      the memory's read-out for the segment's tokens (``MemoryRead``)
        y = Attn([P ; h ; S])                attention over the persistent memory, the read-out and the segment
        M_s = M_{s-1} learned on y           the memory writes the attention's output (chunk-wise)
        o = RMSNorm(y) * sigmoid(RMSNorm(M*_s(y)))

    Causal: a token sees the read-out and the tokens of its segment up to itself (the read-out of a later token
    holds that token), every persistent slot, and nothing of earlier segments but through the memory. A segment
    is a whole number of memory chunks, so the weights at a segment's start are the committed ones."""

    def __init__(self, config: TitansConfig, layer_idx: int):
        super().__init__()
        self.layer_idx, self.segment_size = layer_idx, config.segment_size
        self.self_attn = PersistentWindowAttention(config, layer_idx)  # its projections and persistent memory
        self.memory = long_term_memory(config, layer_idx)
        if self.memory is not None:
            self.read = MemoryRead(config)
            self.attention_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.memory_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, cache=None, **kwargs):
        batch, length, _ = hidden_states.shape
        c, attn, dtype = self.segment_size, self.self_attn, hidden_states.dtype
        mask = padding_mask(attention_mask, length)
        keep = torch.ones(batch, length, dtype=torch.bool, device=hidden_states.device) if mask is None \
            else mask.bool()
        x = hidden_states * keep[..., None].to(dtype)
        state = memory_state(cache, self.layer_idx)
        q, k, v = attn.project(x, position_embeddings)
        cos, sin = position_embeddings
        # each row's unfinished segment (from the cache) goes first; then its new real tokens; then pads
        held = 0 if state is None or state.segment_count is None else state.keys.shape[2]
        count = keep.new_zeros(batch, dtype=torch.long) if held == 0 else state.segment_count
        valid = torch.cat([torch.arange(held, device=keep.device)[None] < count[:, None], keep], dim=1)
        order, total = real_first(valid), valid.sum(1)

        def stream(new, cached=None):  # [B, H, T, d] of the new tokens -> the segments' layout [B, H, S, d]
            cached = new.new_zeros(*new.shape[:2], held, new.shape[-1]) if cached is None else cached
            return to_segments(torch.cat([cached.to(new.dtype), new], dim=2), order, c)

        k, v = stream(k, None if held == 0 else state.keys), stream(v, None if held == 0 else state.values)
        cos, sin = cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)
        ranked = real_first(keep)  # the new tokens by rank: the r-th real one sits at stream slot count + r
        span = k.shape[2]
        valid = torch.arange(span, device=keep.device)[None] < total[:, None]
        sinks = (attn.persistent_keys[None].expand(batch, -1, -1, -1).to(k.dtype),
                 attn.persistent_values[None].expand(batch, -1, -1, -1).to(v.dtype))
        if self.memory is not None:
            mem = state if state is not None else NeuralMemoryState()
            q_read, read_inputs = self.read.queries(x, None if state is None else state.read_conv)
            cached_context = None if held == 0 else (state.context_keys, state.context_values)
        out = hidden_states.new_zeros(batch, length + 1, hidden_states.shape[-1])  # slot `length`: dropped
        context_keys, context_values, snapshot, maps_out = [], [], None, None
        last_segment = total // c
        slots_c = torch.arange(c, device=keep.device)
        for n in range(span // c):
            part = slice(n * c, (n + 1) * c)
            # queries only for the segment's new tokens: slots [lo, lo + fresh) of each row (decoding: one)
            lo = (count - n * c).clamp(min=0)
            fresh = (torch.minimum(total, torch.full_like(total, (n + 1) * c)) - n * c - lo).clamp(min=0)
            # queries: as many as the row with the most new tokens (traced: the whole segment, no host sync)
            width = c if torch.compiler.is_compiling() else max(int(fresh.max()), 1)
            picks = (lo[:, None] + torch.arange(width, device=keep.device)).clamp(max=c - 1)  # [B, w]
            live = torch.arange(width, device=keep.device)[None] < fresh[:, None]
            into = torch.where(live, picks, c)  # where each query's keys go in the segment; c: dropped
            rank = (n * c + picks - count[:, None]).clamp(0, length - 1)
            source = torch.where(live, ranked.gather(1, rank), length)  # each query's token; length: none

            def pick(t):  # the new tokens' [B, H, T, d] -> the queries' [B, H, w, d]
                index = source.clamp(max=length - 1)[:, None, :, None]
                return t.gather(2, index.expand(-1, t.shape[1], -1, t.shape[-1]))

            def place(t, base):  # [B, H, w, d] -> base [B, H, c, d] with the queries' slots replaced
                base = F.pad(base, (0, 0, 0, 1))
                return base.scatter(2, into[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[-1]), t)[:, :, :c]

            keys, values = k[:, :, part], v[:, :, part]
            if self.memory is not None:
                committed = mem.weights if mem.weights is not None else self.memory.initial_weights(batch)
                start = committed
                if n == 0 and state is not None and state.snapshot is not None:  # a segment begun earlier
                    begun = (count > 0)[:, None, None, None]
                    start = [torch.where(begun, old, now) for old, now in zip(state.snapshot, committed)]
                here = (last_segment == n)[:, None, None, None]
                snapshot = start if snapshot is None else [torch.where(here, a, b) for a, b in zip(start, snapshot)]
                h = self.read(start, pick(q_read), dtype)  # [B, w, hidden]
                h_keys = attn.k_proj(h).view(batch, width, -1, attn.head_dim).transpose(1, 2)
                h_keys = apply_rotary(h_keys, *(pick(t[:, None])[:, 0] for t in (cos, sin)))
                h_values = attn.v_proj(h).view(batch, width, -1, attn.value_head_dim).transpose(1, 2)
                cached = (None, None) if n or cached_context is None else cached_context  # the tokens read before
                h_keys, h_values = (place(new, torch.zeros_like(pad_to(new, c)) if old is None else
                                          pad_to(old.to(new.dtype), c))
                                    for new, old in zip((h_keys, h_values), cached))
                context_keys.append(h_keys)
                context_values.append(h_values)
                keys, values = torch.cat([h_keys, keys], dim=2), torch.cat([h_values, values], dim=2)
            seen = (slots_c[None, None] <= picks[..., None]) & valid[:, None, part]  # [B, w, c]
            bias = torch.zeros(seen.shape, dtype=q.dtype, device=q.device).masked_fill(~seen, torch.finfo(q.dtype).min)
            bias = torch.cat([bias.new_zeros(batch, width, attn.num_persistent)] + [bias] * (keys.shape[2] // c), -1)
            keys, values = torch.cat([sinks[0], keys], dim=2), torch.cat([sinks[1], values], dim=2)
            attended, maps = attn.attend(pick(q), keys, values, bias[:, None], **kwargs)
            y = attn.o_proj(attended)  # [B, w, hidden]: each row's new tokens in order, as the memory learns them
            if self.memory is not None:
                m, _ = self.memory(y, live.long(), state=mem)
                y = self.attention_norm(y) * torch.sigmoid(self.memory_norm(m))
            out = out.scatter(1, source[..., None].expand_as(y), y)
            if maps is not None:  # per query: persistent, the segment's context, the segment's tokens
                maps_out = maps.new_zeros(*maps.shape[:2], length + 1, maps.shape[-1]) if maps_out is None else maps_out
                maps_out = maps_out.scatter(2, source[:, None, :, None].expand_as(maps), maps)
        if state is not None:
            rest = total - last_segment * c  # each row's tokens in its unfinished segment
            slots = (last_segment[:, None] * c + torch.arange(c, device=keep.device)).clamp(max=span - 1)

            def unfinished(t):
                return t.gather(2, slots[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[-1]))

            context = (None, None) if self.memory is None else \
                (unfinished(torch.cat(context_keys, 2)), unfinished(torch.cat(context_values, 2)))
            read_conv = None if self.memory is None else \
                last_inputs(read_inputs, keep, state.read_conv, self.read.q_conv1d.kernel_size[0] - 1)
            state.store_segment(unfinished(k), unfinished(v), *context, rest, snapshot, read_conv, length)
        return out[:, :length], None if maps_out is None else maps_out[:, :, :length]


class TitansDecoderLayer(MemoryDecoderLayer):
    """Pre-norm block: x += Mixer(RMSNorm(x)); x += SwiGLU(RMSNorm(x)). In MAL the memory is a layer of its
    own in front: x += M(RMSNorm(x)) first (eq. 29), and the mixer is SW-Attn*."""

    def __init__(self, config: TitansConfig, layer_idx: int, mixers, ffns):
        super().__init__(config, layer_idx, mixers, ffns)
        self.memory = long_term_memory(config, layer_idx) if self.layer_type == "titans_mal" else None
        if self.memory is not None:
            self.memory_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, cache=None, **kwargs):
        if self.memory is not None:
            m, _ = self.memory(self.memory_layernorm(hidden_states), attention_mask,
                               state=memory_state(cache, self.memory.layer_idx))
            hidden_states = hidden_states + m
        return super().forward(hidden_states, attention_mask, position_embeddings, cache, **kwargs)


class TitansPreTrainedModel(HFMemoryPreTrainedModel):
    config: TitansConfig
    config_class = TitansConfig
    mixers = {"titans_mac": MemoryAsContext, "titans_mag": MemoryAsGate, "titans_mal": PersistentWindowAttention}
    decoder_layer = TitansDecoderLayer
    rope_layer_types = frozenset(LAYER_TYPES)
    _no_split_modules = ["TitansDecoderLayer"]
    _supports_flash_attn = False  # the persistent-memory + window mask: eager / sdpa with a 4-D mask
    _can_record_outputs = {"hidden_states": TitansDecoderLayer, "attentions": [PersistentWindowAttention,
                                                                              MemoryAsContext]}

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, NeuralMemory):
            init.copy_(module.gate_bias, module.initial_gate_bias())
            for w in module.memory_init:  # M_0: fan-in scaled, so that a deep memory's first layer has gradients
                init.normal_(w, mean=0.0, std=w.shape[1] ** -0.5)
        elif isinstance(module, PersistentWindowAttention):
            init.normal_(module.persistent_keys, mean=0.0, std=self.config.initializer_range)
            init.normal_(module.persistent_values, mean=0.0, std=self.config.initializer_range)


class TitansModel(TitansPreTrainedModel, HFMemoryModel):
    """Embeddings, the stack of Titans blocks of ``variant``, final RMSNorm."""


class TitansForCausalLM(TitansPreTrainedModel, HFMemoryForCausalLM):
    """Titans with a language-modelling head."""

    base_model_class = TitansModel


AUTO_MAP = {"AutoModel": TitansModel, "AutoModelForCausalLM": TitansForCausalLM}

__all__ = ["NeuralMemory", "NeuralMemoryState", "TitansModel", "TitansForCausalLM", "TitansPreTrainedModel"]
