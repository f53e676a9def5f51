"""Recurrent Memory Transformer (Bulatov, Kuratov & Burtsev, "Recurrent Memory Transformer", arXiv 2207.06881,
section 3 and figure 2; "Scaling Transformer to 1M tokens and beyond with RMT", arXiv 2304.11062).

A Llama-style decoder reads the sequence in segments H_tau of S tokens with m memory vectors M_tau:

    input of segment tau:  [M_tau ; H_tau ; M_tau]      (read positions, the segment, write positions)
    M_{tau+1} = the final hidden states at the write positions,   M_0 learned

The decoder's causal mask lets every segment token read the memory and the write positions read the whole
segment. RoPE positions restart in every segment (read 0..m-1, tokens m..m+S-1, write m+S..2m+S-1), so a
segment depends on the ones before only through M_tau. Segments are counted per row over real tokens
(``hf_memory.segments``): a left-padded row is segmented like the same row unpadded, and pads are never keys,
so they never reach the write positions. A row's memory is replaced only when its segment is complete.

ARMT (Rodkin et al., "Associative Recurrent Memory Transformer", arXiv 2407.04841; ``memory_type="armt"``) keeps
the write positions and drops the read ones: segment tau's input is [H_tau ; M] with the same learned M every
segment, and what crosses segments is one associative matrix per layer (``AssociativeMemory``), written from
the memory tokens' outputs of that layer and read by every position before it.

Decoding keeps, per layer, the keys and values of [read memory ; the row's unfinished segment] and the memory
(RMT) or the associative state (ARMT).
When a row's segment fills, the write pass runs (the write positions over the cached segment), the memory is
replaced, and the read pass of the new memory starts the next segment's keys: generation crosses segment
boundaries with the updated memory, exactly as the full forward does.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from hf_memory.cache import SegmentCacheLayer, own_cache_layer, segment_state, store_segment_state
from hf_memory.layers.attention import Attention
from hf_memory.modeling_utils import (
    HFMemoryForCausalLM,
    HFMemoryModel,
    HFMemoryPreTrainedModel,
    MemoryDecoderLayer,
    padding_mask,
)
from hf_memory.segments import from_segments, real_first, to_segments, unfinished_segment, when_any

from .configuration_rmt import RMTConfig


class RecurrentMemoryCacheLayer(SegmentCacheLayer):
    """Cache of one layer (``layer_types`` entry ``"recurrent_memory_attention"``): the keys and values of
    [read memory ; the row's unfinished segment], [B, H_kv, m + S, d] (ARMT: [B, H_kv, S, d]; slots past the
    row's ``count`` tokens are never visible); RMT's memory M [B, m, hidden] that the read keys came from (the
    same in every layer), or ARMT's associative matrix A [B, d_phi, hidden] and normaliser z [B, d_phi] of this
    layer; all memory in fp32. Bounded by one segment."""

    _layer_type = "recurrent_memory_attention"
    state_names = ("memory", "keys", "values", "associations", "normalizer")


class StackPass:
    """The keys and values of one pass through the layer stack: per layer, those its queries see before the
    pass's own (``prefix``: (k, v) per layer, or None) and the pass's own (``new``), and the attention maps."""

    def __init__(self, prefix=None):
        self.prefix, self.new, self.weights = prefix, {}, {}

    def extend(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.new[layer_idx] = (k, v)
        if self.prefix is None:
            return k, v
        prefix_k, prefix_v = self.prefix[layer_idx]
        return torch.cat([prefix_k, k], dim=2), torch.cat([prefix_v, v], dim=2)


def dpfp(x: torch.Tensor, nu: int = 3) -> torch.Tensor:
    """Deterministic parameter-free projection DPFP-nu (Schlag et al. 2021, eq. 20), L2-normalised: r = [relu(x),
    relu(-x)], phi = [r * roll(r, 1), ..., r * roll(r, nu)]; width 2 * nu * d, non-negative."""
    r = torch.cat([torch.relu(x), torch.relu(-x)], dim=-1)
    phi = torch.cat([r * r.roll(shifts=j, dims=-1) for j in range(1, nu + 1)], dim=-1)
    return nn.functional.normalize(phi, dim=-1)


class AssociativeMemory(nn.Module):
    """ARMT's associative block of one layer (arXiv 2407.04841, section 3, as in the authors' code): a matrix
    A [d_phi, hidden] and normaliser z [d_phi] over phi = DPFP-3 features (``dpfp``), both zero at the start.

        read, every position h before the layer:   h + A^T phi(W_q h) / (z^T phi(W_q h) + eps)
        write, the memory tokens' layer outputs M_j, all at once from (A, z) of the previous segment:
            k_j = phi(W_k M_j),  v_j = W_v M_j,  beta_j = sigmoid(W_beta M_j)
            vbar_j = A^T k_j / (z^T k_j + eps),  gamma_j = clip(1 - z^T k_j / |k_j|^2, 0, 1)  (no gradient)
            A += sum_j beta_j k_j (v_j - vbar_j)^T,   z += sum_j gamma_j k_j

    The write corrects what A already returns for k_j (a delta rule normalised by z), so rewriting a key
    replaces its value. It is not the project's gated delta rule: the prediction and the read are divided by
    z^T phi, and the m writes of a segment are parallel, not sequential. State math in fp32."""

    eps = 1e-5

    def __init__(self, config):
        super().__init__()
        hidden, key = config.hidden_size, config.associative_key_dim
        self.q_proj = nn.Linear(hidden, key, bias=False)
        self.k_proj = nn.Linear(hidden, key, bias=False)
        self.v_proj = nn.Linear(hidden, hidden, bias=False)
        self.beta_proj = nn.Linear(hidden, 1)
        self.feature_size = 6 * key  # DPFP-3

    def empty(self, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.zeros(batch, self.feature_size, self.v_proj.out_features, device=device),
                torch.zeros(batch, self.feature_size, device=device))

    def read(self, hidden: torch.Tensor, associations: torch.Tensor, normalizer: torch.Tensor) -> torch.Tensor:
        phi = dpfp(self.q_proj(hidden).float())
        out = (phi @ associations) / ((phi @ normalizer[..., None]) + self.eps)
        return hidden + out.to(hidden.dtype)

    def write(self, memory: torch.Tensor, associations: torch.Tensor, normalizer: torch.Tensor):
        k = dpfp(self.k_proj(memory).float())  # [B, m, d_phi]
        v = self.v_proj(memory).float()
        beta = torch.sigmoid(self.beta_proj(memory).float())
        stored = k @ normalizer[..., None]  # z^T k_j, [B, m, 1]
        v_bar = (k @ associations) / (stored + self.eps)
        gamma = (1 - stored / k.square().sum(-1, keepdim=True)).clamp(0, 1).detach()
        return (associations + (k * beta).transpose(1, 2) @ (v - v_bar),
                normalizer + (gamma * k).sum(1))


class RecurrentMemoryAttention(Attention):
    """Llama's attention over the keys of the current pass (read memory, segment tokens, write positions)
    after the cached ones the pass continues; the mask of the pass is given (``visible`` below)."""

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, cache=None, stack_pass=None,
                **kwargs):
        q, k, v = self.project(hidden_states, position_embeddings)
        k, v = stack_pass.extend(self.layer_idx, k, v)
        out, weights = self.attend(q, k, v, attention_mask, **kwargs)
        stack_pass.weights[self.layer_idx] = weights
        return self.o_proj(out), weights


def visible(query_slots: torch.Tensor, key_valid: torch.Tensor, offset: int, dtype) -> torch.Tensor:
    """Additive mask [B, 1, T, P + T] of a pass: query t (slot ``offset + t`` of the segment input) sees the
    valid keys (``key_valid`` [B, P + T]) at slots up to its own, and always itself (so no row is empty)."""
    slots = torch.arange(key_valid.shape[1], device=key_valid.device)
    queries = offset + query_slots
    allowed = (slots[None, None, :] <= queries[None, :, None]) & key_valid[:, None, :]
    allowed = allowed | (slots[None, None, :] == queries[None, :, None])
    return torch.zeros(allowed.shape, dtype=dtype, device=key_valid.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)[:, None]


class RMTDecoderLayer(MemoryDecoderLayer):
    """Llama block: x += Attn(RMSNorm(x)); x += SwiGLU(RMSNorm(x)), Llama's parameter names."""

    names = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


class RMTPreTrainedModel(HFMemoryPreTrainedModel):
    config: RMTConfig
    config_class = RMTConfig
    mixers = {"recurrent_memory_attention": RecurrentMemoryAttention}
    decoder_layer = RMTDecoderLayer
    rope_layer_types = frozenset({"recurrent_memory_attention"})
    _no_split_modules = ["RMTDecoderLayer"]
    _can_record_outputs = {}  # hidden states and maps are gathered per segment by the model itself
    _supports_flash_attn = False  # the segment + memory mask is explicit: eager and sdpa

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, RMTModel) and module.memory_tokens is not None:
            init.normal_(module.memory_tokens, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, AssociativeMemory):
            init.zeros_(module.beta_proj.bias)


class RMTModel(RMTPreTrainedModel, HFMemoryModel):
    """Embeddings, the Llama stack run once per segment on [read memory ; segment ; write memory], final
    RMSNorm; ARMT's associative block before every layer."""

    def init_extra_parameters(self, config: RMTConfig) -> None:
        m = config.num_memory_tokens if config.use_memory else 0
        self.memory_tokens = nn.Parameter(torch.zeros(m, config.hidden_size)) if m else None  # M_0 (ARMT: M)
        associative = config.memory_type == "armt" and config.use_memory
        self.associative = nn.ModuleList(AssociativeMemory(config) for _ in range(config.num_hidden_layers)) \
            if associative else None
        self.num_write = m
        self.num_read = 0 if associative else m  # ARMT reads through the associative blocks instead

    @deprecate_kwarg("cache_params", "5.40.0", new_name="cache")
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @merge_with_config_defaults
    @capture_outputs
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, **kwargs) -> BaseModelOutputWithPast:
        """``position_ids`` are ignored: positions are those of the segment input (see the module docstring)."""
        self._check_inputs(input_ids, inputs_embeds)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, length = inputs_embeds.shape[:2]
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = self._check_cache(cache, batch)
        if isinstance(attention_mask, dict):  # generate's per-layer-type mapping: this model reads the 2-D mask
            attention_mask = attention_mask["recurrent_memory_attention"]
        self._check_mask(attention_mask, batch, length, past)
        keep = padding_mask(attention_mask, length)
        keep = torch.ones(batch, length, dtype=torch.bool, device=inputs_embeds.device) if keep is None else keep.bool()
        record = dict(hidden_states=kwargs.get("output_hidden_states", self.config.output_hidden_states),
                      attentions=kwargs.get("output_attentions", self.config.output_attentions))
        supervised = kwargs.pop("supervised_tokens", None)
        options = {k: v for k, v in kwargs.items() if k not in ("output_hidden_states", "output_attentions")}
        if segment_state(cache, 0) is not None:
            hidden, hidden_states, attentions = self._continue(inputs_embeds, keep, cache, record, options)
        else:
            hidden, hidden_states, attentions = self._read_segments(inputs_embeds, keep, cache, record, options,
                                                                    supervised)
        return BaseModelOutputWithPast(last_hidden_state=hidden, cache=cache, hidden_states=hidden_states,
                                       attentions=attentions)

    def _stack(self, embeds, bias, positions, prefix=None, associations=None, write=False, record=None,
               options=None):
        """One pass of the layer stack over ``embeds`` [B, T, d] at segment ``positions`` ([T] or [B, T]) under
        ``bias``, after the cached keys of ``prefix``; ARMT reads ``associations`` ((A, z) per layer) before
        each layer and, with ``write``, writes the last m positions' outputs. Returns the final-normed hidden
        states, the per-layer hidden states (when recorded), the pass, and the written associations."""
        stack_pass, written = StackPass(prefix), []
        position_embeddings = self.rotary_emb(embeds, positions if positions.dim() == 2 else positions[None])
        hidden, per_layer = embeds, [embeds] if record and record["hidden_states"] else None
        for i, layer in enumerate(self.layers):
            if associations is not None:
                hidden = self.associative[i].read(hidden, *associations[i])
            hidden = layer(hidden, attention_mask=bias, position_embeddings=position_embeddings, stack_pass=stack_pass,
                           **(options or {}))
            if associations is not None and write:
                written.append(self.associative[i].write(hidden[:, -self.num_write :], *associations[i]))
            if per_layer is not None:
                per_layer.append(hidden)
        hidden = self._modules[self.final_norm_name](hidden)
        if per_layer is not None:
            per_layer[-1] = hidden  # as Llama's: the last entry is the normed output
        return hidden, per_layer, stack_pass, written or None

    def _first_memory(self, batch: int, dtype):
        """RMT's M_0 [B, m, d] (empty without memory) and ARMT's empty associations (None for RMT)."""
        device = self.embed_tokens.weight.device
        if self.memory_tokens is None:
            return torch.zeros(batch, 0, self.config.hidden_size, dtype=dtype, device=device), None
        memory = self.memory_tokens.to(dtype)[None].expand(batch, -1, -1)
        if self.associative is None:
            return memory, None
        return None, [block.empty(batch, device) for block in self.associative]

    def _write_tokens(self, memory, batch: int, dtype) -> torch.Tensor:
        """The write positions' inputs: the memory itself (RMT) or ARMT's learned M."""
        if memory is not None:
            return memory
        return self.memory_tokens.to(dtype)[None].expand(batch, -1, -1)

    def _read_segments(self, embeds, keep, cache, record, options, supervised=None):
        """A whole sequence from the first memory, segment by segment over each row's real tokens; with a cache,
        the memory and the keys of [read memory ; unfinished segment] are kept for decoding.

        ``supervised`` [B, T] (set by the causal LM from its labels) marks the outputs a loss reads: a segment
        that has none and whose memory is detached before any loss sees it (``bptt_depth``) runs without
        autograd, so truncated back-propagation also frees its activations."""
        config, n, r, w = self.config, self.config.segment_size, self.num_read, self.num_write
        batch, device = embeds.shape[0], embeds.device
        real, order = keep.sum(1), real_first(keep)
        tokens = to_segments(embeds[:, None], order, n)[:, 0]  # [B, segments * n, d], real tokens first
        num_segments = tokens.shape[1] // n
        memory, associations = self._first_memory(batch, embeds.dtype)
        positions = torch.arange(r + n + w, device=device)
        outputs, per_layer, maps = [], [], []
        needs_graph = self._segments_needing_graph(supervised, order, num_segments)
        for index in range(num_segments):
            with torch.set_grad_enabled(torch.is_grad_enabled() and needs_graph[index]):
                if config.bptt_depth is not None and 0 < index < num_segments - config.bptt_depth:
                    # gradients pass only the last bptt_depth memory hand-offs
                    memory = None if memory is None else memory.detach()
                    associations = associations and [(a.detach(), z.detach()) for a, z in associations]
                start = index * n
                valid = torch.arange(start, start + n, device=device)[None, :] < real[:, None]  # [B, n]
                key_valid = torch.cat([valid.new_ones(batch, r), valid, valid.new_ones(batch, w)], dim=1)
                bias = visible(positions, key_valid, 0, embeds.dtype)
                read = memory[:, :r] if memory is not None else embeds[:, :0]
                write = self._write_tokens(memory, batch, embeds.dtype)[:, :w]
                inputs = torch.cat([read, tokens[:, start : start + n], write], dim=1)
                hidden, layers, stack_pass, written = self._stack(inputs, bias, positions, None, associations, True,
                                                                  record, options)
                outputs.append(hidden[:, r : r + n])
                if layers is not None:
                    per_layer.append([h[:, r : r + n] for h in layers])
                if record["attentions"] and None not in stack_pass.weights.values():
                    maps.append([a[:, :, r : r + n] for a in stack_pass.weights.values()])
                complete = (real >= start + n)  # a row's memory is replaced once its segment is full
                memory, associations = self._hand_on(memory, associations, hidden[:, r + n :], written, complete)

        def in_order(x):  # [B, segments * n, d] -> the input's order and length
            return from_segments(x[:, None], order)[:, 0]

        hidden_states = None if not per_layer else tuple(in_order(torch.cat(h, dim=1)) for h in zip(*per_layer))
        attentions = None if not maps else tuple(from_segments(torch.cat(a, dim=2), order) for a in zip(*maps))
        if cache is not None:
            self._start_cache(cache, memory, associations, unfinished_segment(tokens[:, None], real, n)[:, 0],
                              real % n, keep.shape[1])
        return in_order(torch.cat(outputs, dim=1)), hidden_states, attentions

    def _segments_needing_graph(self, supervised, order, num_segments: int) -> list[bool]:
        """Per segment: whether autograd must record it — a loss reads one of its outputs, or its memory reaches
        a later segment undetached (all, without ``supervised`` or ``bptt_depth``)."""
        depth = self.config.bptt_depth
        if supervised is None or depth is None:
            return [True] * num_segments
        n = self.config.segment_size
        read = to_segments(supervised[:, None, :, None].float(), order, n).view(len(order), num_segments, n)
        read = read.amax(dim=(0, 2)).bool().tolist()
        return [read[i] or i + 1 >= num_segments - depth for i in range(num_segments)]

    def _hand_on(self, memory, associations, write_outputs, written, complete):
        """The memory of the next segment for the rows whose segment is ``complete`` [B]: RMT's write positions'
        outputs, ARMT's written associations; the others keep theirs."""
        if associations is not None:
            kept = complete[:, None, None], complete[:, None]
            return None, [(torch.where(kept[0], a_new, a), torch.where(kept[1], z_new, z))
                          for (a, z), (a_new, z_new) in zip(associations, written)]
        if self.num_write:
            memory = torch.where(complete[:, None, None], write_outputs, memory)
        return memory, None

    def _store(self, cache, memory, associations, kv, count, processed) -> None:
        for i, (k, v) in enumerate(kv):
            a, z = associations[i] if associations is not None else (None, None)
            store_segment_state(cache, i, memory=None if memory is None else memory.float(), keys=k, values=v,
                                associations=a, normalizer=z, count=count, processed=processed[i])

    def _start_cache(self, cache, memory, associations, unfinished, count, processed: int) -> None:
        """Keys of [read memory ; each row's first ``count`` unfinished tokens] (a read pass), stored with the
        memory."""
        n, r = self.config.segment_size, self.num_read
        batch, device = unfinished.shape[0], unfinished.device
        valid = torch.arange(n, device=device)[None, :] < count[:, None]
        key_valid = torch.cat([valid.new_ones(batch, r), valid], dim=1)
        bias = visible(torch.arange(r + n, device=device), key_valid, 0, unfinished.dtype)
        read = memory[:, :r] if memory is not None else unfinished[:, :0]
        _, _, stack_pass, _ = self._stack(torch.cat([read, unfinished], dim=1), bias,
                                          torch.arange(r + n, device=device), None, associations)
        kv = [stack_pass.new[i] for i in range(len(self.layers))]
        self._store(cache, memory, associations, kv, count, [processed] * len(kv))

    def _continue(self, embeds, keep, cache, record, options):
        """New tokens after a cached prefix, one at a time: each row appends the token to its segment and attends
        over [read memory ; segment so far]; a row whose segment fills runs the write pass, takes the new memory
        and starts the next segment (RMT: with the read pass of the new memory)."""
        n, r, device = self.config.segment_size, self.num_read, embeds.device
        outputs, per_layer, maps = [], [], []
        for t in range(embeds.shape[1]):
            layers = [own_cache_layer(cache, i, RecurrentMemoryCacheLayer) for i in range(len(self.layers))]
            count, live = layers[0].count, keep[:, t]
            memory = None if layers[0].memory is None else layers[0].memory.to(embeds.dtype)
            associations = None if layers[0].associations is None else [(l.associations, l.normalizer) for l in layers]
            slot = r + count  # [B] the token's slot (and position) in the segment input
            slots = torch.arange(r + n, device=device)
            key_valid = torch.cat([slots[None, :] < slot[:, None], live[:, None]], dim=1)
            bias = torch.zeros(key_valid.shape, dtype=embeds.dtype, device=device).masked_fill(
                ~key_valid, torch.finfo(embeds.dtype).min)[:, None, None]
            prefix = [(layer.keys, layer.values) for layer in layers]
            hidden, hidden_layers, stack_pass, _ = self._stack(embeds[:, t : t + 1], bias, slot[:, None], prefix,
                                                               associations, False, record, options)
            outputs.append(hidden)
            if hidden_layers is not None:
                per_layer.append(hidden_layers)
            if record["attentions"] and None not in stack_pass.weights.values():
                maps.append(list(stack_pass.weights.values()))
            at_slot = ((slots[None, :] == slot[:, None]) & live[:, None])[:, None, :, None]  # [B, 1, r + n, 1]
            kv = [(torch.where(at_slot, k, layer.keys), torch.where(at_slot, v, layer.values))
                  for layer, (k, v) in zip(layers, (stack_pass.new[i] for i in range(len(layers))))]
            count = count + live.long()
            filled = count == n
            if self.num_write:  # a full segment hands its memory on
                memory, associations, kv = self._fold(memory, associations, kv, filled)
            count = torch.where(filled, 0, count)
            self._store(cache, memory, associations, kv, count, [layer.tokens + 1 for layer in layers])
        hidden_states = None if not per_layer else tuple(torch.cat(h, dim=1) for h in zip(*per_layer))
        attentions = None if not maps else tuple(torch.cat(a, dim=2) for a in zip(*maps))
        return torch.cat(outputs, dim=1), hidden_states, attentions

    def _fold(self, memory, associations, kv, filled):
        """The rows whose segment is full (``filled`` [B]) hand their memory on (``_next_segment``); the others
        keep theirs."""
        return when_any(filled, self._next_segment, (memory, associations, kv), (filled,))

    def _next_segment(self, memory, associations, kv, filled):
        """Rows whose segment is full (``filled`` [B]): the write pass (write positions r+S.. over the full
        segment) hands on the next memory; RMT's read pass of it gives the next segment's first r keys."""
        n, r, w = self.config.segment_size, self.num_read, self.num_write
        batch, device = filled.shape[0], filled.device
        dtype = kv[0][0].dtype
        key_valid = torch.ones(batch, r + n + w, dtype=torch.bool, device=device)
        bias = visible(torch.arange(w, device=device), key_valid, r + n, dtype)
        written_hidden, _, _, written = self._stack(self._write_tokens(memory, batch, dtype), bias,
                                                    torch.arange(r + n, r + n + w, device=device), kv, associations,
                                                    True)
        memory, associations = self._hand_on(memory, associations, written_hidden, written, filled)
        if r:
            read_bias = visible(torch.arange(r, device=device), key_valid[:, :r], 0, dtype)
            _, _, read, _ = self._stack(memory, read_bias, torch.arange(r, device=device))
            start = filled[:, None, None, None]
            kv = [(torch.cat([torch.where(start, read.new[i][0], k[:, :, :r]), k[:, :, r:]], dim=2),
                   torch.cat([torch.where(start, read.new[i][1], v[:, :, :r]), v[:, :, r:]], dim=2))
                  for i, (k, v) in enumerate(kv)]
        return memory, associations, kv


class RMTForCausalLM(RMTPreTrainedModel, HFMemoryForCausalLM):
    """The Recurrent Memory Transformer with a language-modelling head; the loss covers segment tokens only
    (memory positions never reach the logits)."""

    base_model_class = RMTModel

    @deprecate_kwarg("cache_params", "5.40.0", new_name="cache")
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        """The causal LM's forward; with ``labels``, the model learns which outputs the loss reads (the position
        before each label), so that truncated back-propagation can skip recording unsupervised segments."""
        if labels is not None:
            kwargs["supervised_tokens"] = nn.functional.pad(labels[:, 1:] != -100, (0, 1))
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               cache=cache, inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                               logits_to_keep=logits_to_keep, **kwargs)


AUTO_MAP = {"AutoModel": RMTModel, "AutoModelForCausalLM": RMTForCausalLM}

__all__ = ["AssociativeMemory", "RMTModel", "RMTForCausalLM", "RMTPreTrainedModel", "RecurrentMemoryCacheLayer"]
