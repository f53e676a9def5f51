"""Infini-attention (Munkhdalai, Faruqui & Gopal, "Leave No Context Behind: Efficient Infinite Context
Transformers with Infini-attention", arXiv 2404.07143).

Each attention layer reads the sequence in segments of N tokens. Inside a segment it is ordinary causal
softmax attention with RoPE (A_dot); every token also retrieves from a compressive memory of all earlier
segments with its un-rotated query (A_mem, eq. 3), and a learned per-head gate mixes the two (eq. 6):

    A = sigmoid(beta) * A_mem + (1 - sigmoid(beta)) * A_dot

After a segment is read, its un-rotated keys and values are written into the memory (eq. 4 linear, eq. 5
delta). The memory math is ``hf_memory.ops.compressive_memory``; this file is the layer and the model.

Segments are counted per row over real tokens (``hf_memory.segments``), so a left-padded row is segmented
exactly like the same row without pads.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import initialization as init
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from hf_memory.cache import SegmentCacheLayer, segment_state, store_segment_state
from hf_memory.layers.attention import apply_rotary, eager_attention
from hf_memory.modeling_utils import HFMemoryForCausalLM, HFMemoryModel, HFMemoryPreTrainedModel, MemoryDecoderLayer
from hf_memory.ops.compressive_memory import (
    empty_memory,
    memories_before_segments,
    read_memory,
    sigma,
    write_kernel,
    write_memory,
)
from hf_memory.segments import from_segments, real_first, to_segments, unfinished_segment, when_any

from .configuration_infini_attention import InfiniAttentionConfig


class InfiniAttentionCacheLayer(SegmentCacheLayer):
    """Cache of one Infini-attention layer (``layer_types`` entry ``"infini_attention"``): per row the
    compressive memory M [H_kv, d_k, d_v] and normaliser z [H_kv, d_k] (fp32), and the unfinished segment's
    rotated keys, un-rotated keys and values (at most ``segment_size`` tokens). When a row's segment fills it
    is folded into M, z and emptied."""

    _layer_type = "infini_attention"
    state_names = ("memory", "norm", "keys", "raw_keys", "values")


class InfiniAttention(nn.Module):
    """One Infini-attention layer (section 2.1, figure 1): local causal attention within the segment, memory
    retrieval, gated mix, memory update — with the memory held per KV head under GQA."""

    def __init__(self, config: InfiniAttentionConfig, layer_idx: int):
        super().__init__()
        self.config = config  # its _attn_implementation picks the local attention kernel
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_kv_heads  # read by transformers' kernels
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        self.attention_dropout = config.attention_dropout
        self.segment_size = config.segment_size
        self.update_rule, self.eps = config.memory_update, config.memory_eps
        self.use_memory, self.detach_every = config.use_memory, config.memory_detach_every
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=bias)
        self.memory_gate = nn.Parameter(torch.zeros(self.num_heads))  # beta of eq. 6, one scalar per head

    def _heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], heads, self.head_dim).transpose(1, 2)

    def _local(self, q, k, v, allowed: torch.Tensor):
        """A_dot: softmax attention over the ``allowed`` [B, 1, Tq, Tk] pairs of the segment, through
        transformers' attention interface; returns ([B, H, Tq, d], weights or None)."""
        mask = torch.where(allowed, 0.0, torch.finfo(q.dtype).min).to(q.dtype)
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention)
        out, weights = attend(self, q, k, v, mask, scaling=self.scaling,
                              dropout=self.attention_dropout if self.training else 0.0)
        return out.transpose(1, 2), weights

    def _mix(self, local: torch.Tensor, q: torch.Tensor, memory, norm) -> torch.Tensor:
        """Eq. 6: sigmoid(beta) A_mem + (1 - sigmoid(beta)) A_dot (A_dot alone with the memory off)."""
        if not self.use_memory:
            return local
        gate = torch.sigmoid(self.memory_gate.float())[None, :, None, None]
        retrieved = read_memory(q, memory, norm, self.eps, use_fused_kernels=self.config.use_fused_kernels)
        return (gate * retrieved.float() + (1 - gate) * local.float()).to(local.dtype)

    def _write(self, memory, norm, k, v, complete):
        return write_memory(memory, norm, k, v, complete, self.update_rule, self.eps,
                            use_fused_kernels=self.config.use_fused_kernels)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, cache=None, **kwargs):
        batch, length, _ = hidden_states.shape
        keep = torch.ones(batch, length, dtype=torch.bool, device=hidden_states.device)
        if attention_mask is not None:
            keep = attention_mask[:, -length:].bool()
        q = self._heads(self.q_proj(hidden_states), self.num_heads)
        k = self._heads(self.k_proj(hidden_states), self.num_kv_heads)
        v = self._heads(self.v_proj(hidden_states), self.num_kv_heads)
        layer = segment_state(cache, self.layer_idx)
        if layer is not None and length == 1:
            out, weights = self._continue(q, k, v, keep, position_embeddings, cache)
        else:  # a sequence, or several new tokens after a cached prefix (which joins as that row's first tokens)
            out, weights = self._prefill(q, k, v, keep, position_embeddings, cache, layer)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1)), weights

    def _prefill(self, q, k, v, keep, position_embeddings, cache, prefix=None):
        """A whole sequence over each row's real tokens: the segments' local attention in one call (segments folded
        into the batch), the memory written segment by segment (eq. 5 needs M_{s-1}; eq. 4 is an exclusive
        cumulative sum), then every segment's read of the memory before it in one call. After a cached ``prefix``
        (several new tokens at once) the row's unfinished segment goes first, its keys as cached, and the memory
        starts from the cached one; only the new tokens' outputs are returned."""
        n = self.segment_size
        q_rot, k_rot = (apply_rotary(x, *position_embeddings) for x in (q, k))
        initial, held = None, 0
        if prefix is not None:  # the cached slots as the first n positions; their queries are not needed
            held = n
            slots = torch.arange(n, device=q.device)[None] < prefix.count[:, None]
            keep = torch.cat([slots, keep], dim=1)
            q, q_rot = (torch.cat([x.new_zeros(*x.shape[:2], n, x.shape[-1]), x], dim=2) for x in (q, q_rot))
            k, k_rot, v = (torch.cat([cached.to(x.dtype), x], dim=2)
                           for cached, x in ((prefix.raw_keys, k), (prefix.keys, k_rot), (prefix.values, v)))
            initial = (prefix.memory, prefix.norm)
        real, order = keep.sum(1), real_first(keep)
        q_raw, k_raw, v, q_rot, k_rot = (to_segments(x, order, n) for x in (q, k, v, q_rot, k_rot))
        batch, segments = q.shape[0], q_raw.shape[2] // n

        def fold(x):  # [B, H, S n, d] -> [B S, H, n, d]
            return x.unflatten(2, (segments, n)).transpose(1, 2).flatten(0, 1)

        def unfold(x):  # the inverse
            return x.unflatten(0, (batch, segments)).transpose(1, 2).flatten(2, 3)

        starts = torch.arange(0, segments * n, n, device=q.device)
        valid = (starts[:, None] + torch.arange(n, device=q.device))[None] < real[:, None, None]  # [B, S, n]
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        allowed = (causal & valid[..., None, :]) | torch.eye(n, dtype=torch.bool, device=q.device)  # [B, S, n, n]
        local, weights = self._local(fold(q_rot), fold(k_rot), fold(v), allowed.flatten(0, 1)[:, None])

        complete = real[:, None] >= starts + n  # [B, S]: a row's segment is written once it is full
        memories, norms = self._memories(k_raw, v, complete, segments, initial)
        out = self._mix(local, fold(q_raw), memories.flatten(0, 1), norms.flatten(0, 1))
        memory, norm = memories[:, -1], norms[:, -1]  # before the last segment: write it too
        memory, norm = self._write(memory, norm, k_raw[:, :, -n:], v[:, :, -n:], complete[:, -1:].expand(-1, n))
        store_segment_state(cache, self.layer_idx, memory=memory, norm=norm, keys=unfinished_segment(k_rot, real, n),
                            raw_keys=unfinished_segment(k_raw, real, n), values=unfinished_segment(v, real, n),
                            count=real % n, processed=(0 if prefix is None else prefix.tokens) + keep.shape[1] - held)
        weights = None if weights is None else from_segments(unfold(weights), order)[:, :, held:]
        return from_segments(unfold(out), order)[:, :, held:], weights

    def _memories(self, k, v, complete, segments, initial=None):
        """(M_{s-1}, z_{s-1}) before each segment s, [B, S, H_kv, d_k, d_v] and [B, S, H_kv, d_k], starting from
        ``initial`` (M, z) (default: empty)."""
        n = self.segment_size
        if self.update_rule == "linear" and not self.detach_every:  # eq. 4: sums of every earlier segment
            sk = sigma(k).unflatten(2, (segments, n)) * complete[:, None, :, None, None]
            writes = sk.transpose(-1, -2) @ v.float().unflatten(2, (segments, n))  # [B, H_kv, S, d_k, d_v]
            memories = torch.cumsum(writes, dim=2) - writes
            norms = torch.cumsum(sk.sum(-2), dim=2) - sk.sum(-2)
            if initial is not None:
                memories, norms = memories + initial[0][:, :, None], norms + initial[1][:, :, None]
            return memories.transpose(1, 2), norms.transpose(1, 2)
        if not self.detach_every and write_kernel(k, v, self.config.use_fused_kernels) is None:
            return memories_before_segments(k, v, complete, n, self.eps, initial)  # eq. 5 in one tensor: fewer calls
        (memory, norm), memories, norms = initial or empty_memory(k, v), [], []
        for index in range(segments - 1):
            memories.append(memory)
            norms.append(norm)
            segment = slice(index * n, (index + 1) * n)
            memory, norm = self._write(memory, norm, k[:, :, segment], v[:, :, segment],
                                       complete[:, index, None].expand(-1, n))
            if self.detach_every and (index + 1) % self.detach_every == 0:
                memory, norm = memory.detach(), norm.detach()
        return torch.stack(memories + [memory], dim=1), torch.stack(norms + [norm], dim=1)

    def _continue(self, q, k, v, keep, position_embeddings, cache):
        """A decode step (one new token after a cached prefix; several take ``_prefill`` with the prefix): append to
        the row's segment, attend over it, read the memory; a row whose segment fills folds it into the memory and
        starts an empty one."""
        layer, n = segment_state(cache, self.layer_idx), self.segment_size
        rows, slots = torch.arange(q.shape[0], device=q.device), torch.arange(n, device=q.device)
        q_rot, k_rot = (apply_rotary(x, *position_embeddings) for x in (q, k))
        live = keep[:, 0]  # [B]; a pad token changes nothing
        keys, raw_keys, values = layer.keys, layer.raw_keys, layer.values
        if torch.is_grad_enabled():  # written in place when decoding (one slot, whatever the segment size);
            keys, raw_keys, values = keys.clone(), raw_keys.clone(), values.clone()  # copied for autograd
        slot = layer.count.clamp(max=n - 1)
        for buffer, new in ((keys, k_rot[:, :, 0]), (raw_keys, k[:, :, 0]), (values, v[:, :, 0])):
            buffer[rows, :, slot] = torch.where(live[:, None, None], new, buffer[rows, :, slot])
        allowed = (slots[None, :] <= slot[:, None])[:, None, None, :]
        local, weights = self._local(q_rot, keys, values, allowed)
        out = self._mix(local, q, layer.memory, layer.norm)

        count = layer.count + live.long()
        filled = count == n
        # a segment is written once, when it fills
        memory, norm = when_any(filled, lambda memory, norm, raw_keys, values, filled: self._write(
            memory, norm, raw_keys, values, filled[:, None].expand(-1, n)), (layer.memory, layer.norm),
            (raw_keys, values, filled))
        store_segment_state(cache, self.layer_idx, memory=memory, norm=norm, keys=keys, raw_keys=raw_keys,
                            values=values, count=torch.where(filled, 0, count), processed=layer.tokens + 1)
        return out, weights


class InfiniAttentionDecoderLayer(MemoryDecoderLayer):
    """Llama block with Infini-attention: x += Attn(RMSNorm(x)); x += SwiGLU(RMSNorm(x)), Llama's names."""

    names = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


class InfiniAttentionPreTrainedModel(HFMemoryPreTrainedModel):
    config: InfiniAttentionConfig
    config_class = InfiniAttentionConfig
    mixers = {"infini_attention": InfiniAttention}
    decoder_layer = InfiniAttentionDecoderLayer
    rope_layer_types = frozenset({"infini_attention"})
    _no_split_modules = ["InfiniAttentionDecoderLayer"]
    _can_record_outputs = {"hidden_states": MemoryDecoderLayer, "attentions": InfiniAttention}
    _supports_flash_attn = False  # segment masks are built here: eager and sdpa

    def memory_parameter_groups(self, lr: float, gate_lr: float | None = None, weight_decay: float = 0.0) -> list:
        """Optimizer parameter groups: the memory gates (beta of eq. 6) with their own learning rate and no
        weight decay, everything else with ``lr`` and ``weight_decay``. Pass them to any torch optimizer, e.g.
        ``Trainer(..., optimizers=(torch.optim.AdamW(model.memory_parameter_groups(1e-4, gate_lr=1e-2)), None))``."""
        gates = [p for name, p in self.named_parameters() if name.endswith("memory_gate")]
        others = [p for name, p in self.named_parameters() if not name.endswith("memory_gate")]
        return [{"params": others, "lr": lr, "weight_decay": weight_decay},
                {"params": gates, "lr": lr if gate_lr is None else gate_lr, "weight_decay": 0.0}]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, InfiniAttention):
            init.constant_(module.memory_gate, self.config.memory_gate_init)


class InfiniAttentionModel(InfiniAttentionPreTrainedModel, HFMemoryModel):
    """Embeddings, Infini-attention blocks, final RMSNorm."""


class InfiniAttentionForCausalLM(InfiniAttentionPreTrainedModel, HFMemoryForCausalLM):
    """Infini-attention with a language-modelling head."""

    base_model_class = InfiniAttentionModel


AUTO_MAP = {"AutoModel": InfiniAttentionModel, "AutoModelForCausalLM": InfiniAttentionForCausalLM}

__all__ = ["InfiniAttentionModel", "InfiniAttentionForCausalLM", "InfiniAttentionPreTrainedModel"]
