"""Infini-attention (Munkhdalai, Faruqui & Gopal, "Leave No Context Behind: Efficient Infinite Context
Transformers with Infini-attention", arXiv 2404.07143).

Each attention layer reads the sequence in segments of N tokens. Inside a segment it is ordinary causal
softmax attention with RoPE (A_dot); every token also retrieves from a compressive memory of all earlier
segments with its un-rotated query (A_mem, eq. 3), and a learned per-head gate mixes the two (eq. 6):

    A = sigmoid(beta) * A_mem + (1 - sigmoid(beta)) * A_dot

After a segment is read, its un-rotated keys and values are written into the memory (eq. 4 linear, eq. 5
delta). The memory math is ``hf_memory.ops.compressive_memory``; this file is the layer and the model.

Segments are counted per row over real tokens, so a left-padded row is segmented exactly like the same
row without pads: rows are reordered real-tokens-first, processed, and put back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from hf_memory.cache import SegmentMemoryLayer  # importing it registers the "infini_attention" cache layer type
from hf_memory.layers.attention import RotaryEmbedding, apply_rotary
from hf_memory.layers.mlp import GatedMLP
from hf_memory.layers.norms import RMSNorm
from hf_memory.modeling_utils import HFMemoryPreTrainedModel
from hf_memory.ops.compressive_memory import empty_memory, read_memory, write_memory

from .configuration_infini_attention import InfiniAttentionConfig


def local_attention(q, k, v, allowed: torch.Tensor, scaling: float, implementation: str = "eager") -> torch.Tensor:
    """softmax(q k^T * scaling) v over the ``allowed`` [B, 1, Tq, Tk] pairs; q [B, H, Tq, d], k/v [B, H_kv, Tk, d].
    ``implementation`` follows ``config._attn_implementation``: "sdpa" uses torch's fused kernel."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if implementation == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scaling)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scaling
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return (weights @ v.float()).to(q.dtype)


class InfiniAttention(nn.Module):
    """One Infini-attention layer (section 2.1, figure 1): local causal attention within the segment, memory
    retrieval, gated mix, memory update — with the memory held per KV head under GQA."""

    def __init__(self, config: InfiniAttentionConfig, layer_idx: int):
        super().__init__()
        self.config = config  # its _attn_implementation picks the local attention kernel
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.attention_head_dim
        self.scaling = self.head_dim**-0.5
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

    def _mix(self, local: torch.Tensor, q: torch.Tensor, memory, norm) -> torch.Tensor:
        """Eq. 6: sigmoid(beta) A_mem + (1 - sigmoid(beta)) A_dot (A_dot alone with the memory off)."""
        if not self.use_memory:
            return local
        gate = torch.sigmoid(self.memory_gate.float())[None, :, None, None]
        retrieved = read_memory(q, memory, norm, self.eps, self.config.use_fused_kernels)
        mixed = gate * retrieved.float() + (1 - gate) * local.float()
        return mixed.to(local.dtype)

    def forward(self, hidden_states, rotary: RotaryEmbedding, attention_mask=None, cache: Cache | None = None):
        batch, length, _ = hidden_states.shape
        keep = torch.ones(batch, length, dtype=torch.bool, device=hidden_states.device)
        if attention_mask is not None:
            keep = attention_mask[:, -length:].bool()
        q = self._heads(self.q_proj(hidden_states), self.num_heads)
        k = self._heads(self.k_proj(hidden_states), self.num_kv_heads)
        v = self._heads(self.v_proj(hidden_states), self.num_kv_heads)
        layer = cache.layers[self.layer_idx] if cache is not None else None
        if layer is not None and layer.is_initialized:
            out = self._continue(q, k, v, keep, layer, rotary)
        else:
            out = self._prefill(q, k, v, keep, layer, rotary)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))

    def _prefill(self, q, k, v, keep, layer, rotary):
        """A whole sequence from an empty memory, segment by segment over each row's real tokens."""
        batch, _, length, _ = q.shape
        order = torch.argsort((~keep).int(), dim=1, stable=True)  # real tokens first, in their order
        real = keep.sum(1)  # [B]
        pad = (-length) % self.segment_size
        take = lambda x: F.pad(x.gather(2, order[:, None, :, None].expand_as(x)), (0, 0, 0, pad))  # noqa: E731
        q_raw, k_raw, v = take(q), take(k), take(v)
        positions = torch.arange(length + pad, device=q.device).expand(batch, -1)
        cos, sin = rotary(q_raw, positions)
        q_rot, k_rot = apply_rotary(q_raw, cos, sin), apply_rotary(k_raw, cos, sin)

        memory, norm = empty_memory(k_raw, v)
        outputs, n = [], self.segment_size
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        for index, start in enumerate(range(0, length + pad, n)):
            segment = slice(start, start + n)
            valid = torch.arange(start, start + n, device=q.device)[None, :] < real[:, None]  # [B, n]
            allowed = (causal & valid[:, None, :]) | torch.eye(n, dtype=torch.bool, device=q.device)
            local = local_attention(q_rot[:, :, segment], k_rot[:, :, segment], v[:, :, segment],
                                    allowed[:, None], self.scaling, self.config._attn_implementation)
            outputs.append(self._mix(local, q_raw[:, :, segment], memory, norm))
            complete = (real >= start + n)[:, None].expand(-1, n)  # a row's segment is written once it is full
            memory, norm = write_memory(memory, norm, k_raw[:, :, segment], v[:, :, segment], complete,
                                        self.update_rule, self.eps, self.config.use_fused_kernels)
            if self.detach_every and (index + 1) % self.detach_every == 0:
                memory, norm = memory.detach(), norm.detach()
        out = torch.cat(outputs, dim=2)[:, :, :length]
        if layer is not None:
            self._store_partial_segment(layer, memory, norm, k_rot, k_raw, v, real, length)
        return torch.empty_like(out).scatter_(2, order[:, None, :, None].expand_as(out), out)

    def _store_partial_segment(self, layer: SegmentMemoryLayer, memory, norm, k_rot, k_raw, v, real, length):
        """Keep each row's unfinished last segment (its KV) for decoding; finished ones are already in memory."""
        n = self.segment_size
        first = (real // n * n)[:, None] + torch.arange(n, device=real.device)[None, :]  # [B, n] token indices
        first = first.clamp(max=k_rot.shape[2] - 1)[:, None, :, None]
        gather = lambda x: x.gather(2, first.expand(-1, x.shape[1], -1, x.shape[-1]))  # noqa: E731
        layer.store(memory, norm, gather(k_rot), gather(k_raw), gather(v), real % n, real.clone(), length)

    def _continue(self, q, k, v, keep, layer: SegmentMemoryLayer, rotary):
        """New tokens after a cached prefix, one at a time: append to the row's segment, attend over it, read
        the memory; a row whose segment fills folds it into the memory and starts an empty one."""
        n, outputs = self.segment_size, []
        rows = torch.arange(q.shape[0], device=q.device)
        for t in range(q.shape[2]):
            live = keep[:, t]  # [B]; a pad token changes nothing
            cos, sin = rotary(q, layer.seen[:, None])
            q_t, k_t = q[:, :, t : t + 1], k[:, :, t : t + 1]
            keys, raw_keys, values = layer.keys, layer.raw_keys, layer.values
            if torch.is_grad_enabled():  # written in place when decoding; copied when autograd may need them
                keys, raw_keys, values = keys.clone(), raw_keys.clone(), values.clone()
            slot = layer.count.clamp(max=n - 1)
            keys[rows, :, slot] = torch.where(live[:, None, None], apply_rotary(k_t, cos, sin)[:, :, 0],
                                              keys[rows, :, slot])
            raw_keys[rows, :, slot] = torch.where(live[:, None, None], k_t[:, :, 0], raw_keys[rows, :, slot])
            values[rows, :, slot] = torch.where(live[:, None, None], v[:, :, t], values[rows, :, slot])
            allowed = (torch.arange(n, device=q.device)[None, :] <= slot[:, None])[:, None, None, :]
            local = local_attention(apply_rotary(q_t, cos, sin), keys, values, allowed, self.scaling,
                                    self.config._attn_implementation)
            outputs.append(self._mix(local, q_t, layer.memory, layer.norm))

            count = layer.count + live.long()
            filled = count == n
            memory, norm = layer.memory, layer.norm
            if bool(filled.any()):  # a segment is written once, when it fills
                memory, norm = write_memory(memory, norm, raw_keys, values, filled[:, None].expand(-1, n),
                                            self.update_rule, self.eps, self.config.use_fused_kernels)
            layer.store(memory, norm, keys, raw_keys, values, torch.where(filled, 0, count),
                        layer.seen + live.long(), layer.processed + 1)
        return torch.cat(outputs, dim=2)


class InfiniAttentionDecoderLayer(GradientCheckpointingLayer):
    """Llama block with Infini-attention: x += Attn(RMSNorm(x)); x += SwiGLU(RMSNorm(x))."""

    def __init__(self, config: InfiniAttentionConfig, layer_idx: int):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = InfiniAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)

    def forward(self, hidden_states, rotary, attention_mask=None, cache: Cache | None = None) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states), rotary,
                                                       attention_mask, cache)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class InfiniAttentionPreTrainedModel(HFMemoryPreTrainedModel):
    config: InfiniAttentionConfig
    config_class = InfiniAttentionConfig
    model_card = "infini_attention"
    _no_split_modules = ["InfiniAttentionDecoderLayer"]
    _supports_flash_attn = False  # segment masks are built here; eager and sdpa only

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


class InfiniAttentionModel(InfiniAttentionPreTrainedModel):
    """Embeddings, Infini-attention blocks, final RMSNorm."""

    def __init__(self, config: InfiniAttentionConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(InfiniAttentionDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.attention_head_dim, config.rope_theta)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        inputs_embeds, cache = self._embed_and_cache(input_ids, inputs_embeds, attention_mask, cache, use_cache)
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("Infini-attention takes a 2-D [batch, sequence] attention_mask (it builds its own masks)")
        hidden_states = inputs_embeds
        all_hidden_states = [] if output_hidden_states else None
        for layer in self.layers:
            if all_hidden_states is not None:
                all_hidden_states.append(hidden_states)
            hidden_states = layer(hidden_states, self.rotary_emb, attention_mask=attention_mask, cache=cache)
        hidden_states = self.norm(hidden_states)
        if all_hidden_states is not None:
            all_hidden_states.append(hidden_states)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states, cache=cache,
            hidden_states=tuple(all_hidden_states) if all_hidden_states is not None else None,
        )


class InfiniAttentionForCausalLM(InfiniAttentionPreTrainedModel, GenerationMixin):
    """Infini-attention with a language-modelling head."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: InfiniAttentionConfig):
        super().__init__(config)
        self.model = InfiniAttentionModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            inputs_embeds=inputs_embeds, use_cache=use_cache, output_hidden_states=output_hidden_states,
        )
        logits, loss = self._logits_and_loss(outputs.last_hidden_state, labels, logits_to_keep, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache,
                                      hidden_states=outputs.hidden_states)


AUTO_MAP = {"AutoModel": InfiniAttentionModel, "AutoModelForCausalLM": InfiniAttentionForCausalLM}

__all__ = ["InfiniAttentionModel", "InfiniAttentionForCausalLM", "InfiniAttentionPreTrainedModel"]
