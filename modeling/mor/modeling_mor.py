"""Mixture-of-Recursions (Bae et al., "Mixture-of-Recursions: Learning Dynamic Recursive Depths for Adaptive
Token-Level Computation", arXiv 2507.10524, section 2).

A block of K Llama layers with one set of weights is applied up to N_r times (Middle-Cycle: between a unique
first and last layer), and every token takes its own number of recursions r = 1..N_r:

    expert-choice (eq. 2):  H^{r+1}_t = g^r_t f(H^r_t; Phi') + H^r_t   if token t is routed to recursion r
                                      = H^r_t                            otherwise,
                            g^r_t = alpha * sigmoid(theta_r^T H^r_t); in training the top capacities[r] fraction
                            of each row's tokens among those of recursion r - 1 (beta-percentile of eq. 2);
                            at inference sigmoid >= 0.5 (the BCE auxiliary loss trains it towards the top-k),
    token-choice (eq. 3):   one router at the block input: depth i_t = argmax_j g_tj, g = alpha * softmax(W H^1_t);
                            H^{r+1}_t = f(H^r_t) while r < i_t, and the output g_t f(H^{i_t}_t) + H^1_t.

f is the block's output (its layers' own residuals included, as in the authors' code). The tokens of one
recursion are gathered per row, in their order, into a shorter sequence that the block runs on: they keep
their own RoPE positions (the authors' code handed the first-k position ids on), and attention at applied
layer l reads the keys of the tokens that reached l (recursion-wise KV) or of recursion 1 at the same block
layer (recursive KV sharing). Nothing is computed for a token beyond its depth, in training and while
decoding; the rows of a batch whose new tokens all stopped leave the block's call (depth-wise batching).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache
from transformers import cache_utils
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from hf_memory.cache import RowStateCacheLayer, own_cache_layer
from hf_memory.layers.attention import Attention, apply_rotary
from hf_memory.modeling_utils import (
    HFMemoryForCausalLM,
    HFMemoryModel,
    HFMemoryPreTrainedModel,
    MemoryDecoderLayer,
    padding_mask,
    positions_from_mask,
)
from hf_memory.ops.position_masked_attention import additive_position_mask

from .configuration_mor import LAYER_TYPES, MoRConfig


# ------------------------------------------------------------------------------------------------ cache
class RecursionCacheLayer(RowStateCacheLayer):
    """Cache of one applied layer of the shared block (``layer_types`` entry ``"recursive_attention"``): the keys
    and values [B, H_kv, S, d] of the tokens that reached this layer, their stream indices [B, S] (-1 in the
    slots past a row's tokens) and each row's number of them ``used`` [B]; each row's tokens first and in
    order, so S covers the most tokens any row brought here (grown ``growth`` slots at a time while decoding,
    written in place without autograd). Under recursive KV sharing the layers of deeper recursions stay empty."""

    tensor_names = ("keys", "values", "key_index", "used")
    crop_refusal = "a Mixture-of-Recursions cache cannot be cropped: assisted decoding is not supported"
    growth = 64

    def update_selected(self, keys, values, key_index, rows, batch: int):
        """Append the new keys [B', H_kv, n, d], values and stream indices [B', n] (-1 in unused slots, which come
        after each row's used ones) of batch rows ``rows`` (None: all ``batch`` rows); return the rows' keys,
        values and indices of every row (those kept plus the new ones): reading the rows that stopped costs less
        than copying out the ones still running."""
        n = keys.shape[2]
        if self.keys is None:
            self.keys = keys.new_zeros(batch, keys.shape[1], 0, keys.shape[-1])
            self.values = values.new_zeros(batch, values.shape[1], 0, values.shape[-1])
            self.key_index = key_index.new_full((batch, 0), -1)
            self.used = key_index.new_zeros(batch)
        used = self.used if rows is None else self.used[rows]
        size = int(used.max()) + n
        if size > self.keys.shape[2]:
            grow = size - self.keys.shape[2] + (self.growth if self.keys.shape[2] else 0)
            self.keys = nn.functional.pad(self.keys, (0, 0, 0, grow))
            self.values = nn.functional.pad(self.values, (0, 0, 0, grow))
            self.key_index = nn.functional.pad(self.key_index, (0, grow), value=-1)
        row = (torch.arange(batch, device=keys.device) if rows is None else rows)[:, None]
        slot = used[:, None] + torch.arange(n, device=keys.device)  # each new key after the row's kept ones
        in_place = not (torch.is_grad_enabled() and (keys.requires_grad or values.requires_grad))
        for name, new in (("keys", keys.transpose(1, 2)), ("values", values.transpose(1, 2))):
            held = getattr(self, name)
            if in_place:
                held.transpose(1, 2)[row, slot] = new
            else:
                held = held.transpose(1, 2).index_put((row, slot), new).transpose(1, 2)
            setattr(self, name, held)
        self.key_index[row, slot] = key_index
        self.used = self.used.index_add(0, row[:, 0], (key_index >= 0).sum(1))
        width = int(self.used.max())
        self.is_initialized = True
        return self.keys[:, :, :width], self.values[:, :, :width], self.key_index[:, :width]

    def count(self, new_tokens: int) -> None:
        """Count a forward's tokens (pads included), whether or not any reached this layer."""
        self.tokens += new_tokens
        self.is_initialized = True


# the cache of the tokens that reached a layer is no larger under a static cache
cache_utils.DYNAMIC_LAYER_TYPE_MAPPING["recursive_attention"] = RecursionCacheLayer
cache_utils.STATIC_LAYER_TYPE_MAPPING["recursive_attention"] = RecursionCacheLayer


class RecursionPass:
    """The keys and values of one forward: what each applied layer's queries saw (read again by deeper
    recursions under recursive KV sharing) and the attention maps, kept while the forward runs."""

    def __init__(self, cache, batch: int, record_weights: bool):
        self.cache, self.batch, self.record_weights = cache, batch, record_weights
        self.seen, self.weights = {}, {}

    def keys_of(self, layer: int, k, v, key_index, rows):
        """Recursion-wise KV: the new keys join the layer's cached ones (with a cache: of every batch row) and
        the queries see both; returns keys, values, their indices and their batch rows (None: all)."""
        if self.cache is not None:
            k, v, key_index = own_cache_layer(self.cache, layer, RecursionCacheLayer).update_selected(
                k, v, key_index, rows, self.batch)
            rows = None
        self.seen[layer] = (k, v, key_index, rows)
        return self.seen[layer]

    def shared_keys(self, source: int):
        """Recursive KV sharing: what applied layer ``source`` (first recursion) saw, as ``keys_of`` returns it."""
        return self.seen[source]


@dataclass
class RecursionStep:
    """What a shared-block layer needs to run one applied layer on the tokens of a recursion: the pass, the
    applied layer, the stream index [B', k] of each gathered token (-1 in padded slots), the batch rows taking
    part (None: all), and the first-recursion layer whose keys it reads under KV sharing (None: its own)."""

    recursion_pass: RecursionPass
    layer: int
    query_index: torch.Tensor
    rows: torch.Tensor | None
    shared_source: int | None = None


# ------------------------------------------------------------------------------------------------ layers
class MoRAttention(Attention):
    """Llama attention. In a unique layer (``step`` None): every token, the model's mask and transformers' KV
    cache. In the shared block: the gathered tokens of a recursion attend causally, by stream index, to the keys
    of the tokens that reached this applied layer, or (KV sharing, deeper recursions) to the first recursion's
    keys, projecting only queries."""

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, cache=None, step=None,
                recursion_pass=None, **kwargs):
        if step is None:
            q, k, v = self.project(hidden_states, position_embeddings)
            if cache is not None:
                k, v = cache.update(k, v, self.layer_idx)
            out, weights = self.attend(q, k, v, attention_mask)
            recursion_pass.weights[self.layer_idx] = weights
            return self.o_proj(out), weights
        if step.shared_source is not None:
            batch, length, _ = hidden_states.shape
            q = self.q_proj(hidden_states).view(batch, length, -1, self.head_dim).transpose(1, 2)
            q = apply_rotary(q, *position_embeddings)
            k, v, key_index, key_rows = step.recursion_pass.shared_keys(step.shared_source)
        else:
            q, k, v = self.project(hidden_states, position_embeddings)
            k, v, key_index, key_rows = step.recursion_pass.keys_of(step.layer, k, v, step.query_index, step.rows)
        q, query_index, place = self.among_key_rows(q, step.query_index, step.rows, key_rows, k.shape[0])
        decoding = q.shape[2] == 1 and bool((key_index >= 0).all()) and bool((query_index >= 0).all())
        # one new token per row, every kept key before it: nothing to mask
        mask = None if decoding else additive_position_mask(query_index, key_index, None, 0, q.dtype)
        out, weights = self.attend(q, k, v, mask)
        if place is not None:  # back to the queries' rows
            out, key_index = out[place], key_index[place]
            weights = None if weights is None else weights[place]
        if step.recursion_pass.record_weights:
            step.recursion_pass.weights[step.layer] = (weights, step.query_index, key_index, step.rows)
        return self.o_proj(out), weights

    @staticmethod
    def among_key_rows(q, query_index, rows, key_rows, key_batch: int):
        """Queries of batch ``rows`` placed at their rows among the keys' rows ``key_rows`` (None: all rows), the
        other rows seeing no key; returns q, the query indices and where the queries' rows are (None: as given)."""
        if rows is None or (key_rows is not None and rows.shape == key_rows.shape and torch.equal(rows, key_rows)):
            return q, query_index, None
        place = rows if key_rows is None else torch.searchsorted(key_rows, rows)
        q = q.new_zeros(key_batch, *q.shape[1:]).index_copy(0, place, q)
        query_index = query_index.new_full((key_batch, query_index.shape[1]), -1).index_copy(0, place, query_index)
        return q, query_index, place


class MoRDecoderLayer(MemoryDecoderLayer):
    """Llama block: x += Attn(RMSNorm(x)); x += SwiGLU(RMSNorm(x)), Llama's parameter names."""

    names = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


@dataclass
class MoRModelOutputWithPast(MoeModelOutputWithPast):
    """``router_logits``: expert-choice, per recursion the router's logits [B, T]; token-choice, the depth
    router's logits [B, T, N_r]. ``recursion_depth`` [B, T]: the recursions each token took (0 at pads).
    ``aux_loss``: the weighted router losses (training only)."""

    aux_loss: torch.FloatTensor | None = None
    recursion_depth: torch.LongTensor | None = None


@dataclass
class MoRCausalLMOutputWithPast(MoeCausalLMOutputWithPast):
    recursion_depth: torch.LongTensor | None = None


class MoRPreTrainedModel(HFMemoryPreTrainedModel):
    config: MoRConfig
    config_class = MoRConfig
    mixers = {"recursive_attention": MoRAttention, "full_attention": MoRAttention}
    decoder_layer = MoRDecoderLayer
    rope_layer_types = frozenset(LAYER_TYPES)
    _no_split_modules = ["MoRDecoderLayer"]
    _can_record_outputs = {}  # hidden states and maps are assembled by the model (tokens are gathered per depth)
    _supports_flash_attn = False  # the recursion layers' mask is one of stream indices: eager and sdpa


class MoRModel(MoRPreTrainedModel, HFMemoryModel):
    """Embeddings, the unique layers and the shared block applied per token up to N_r times, final RMSNorm."""

    def build_layers(self, config: MoRConfig) -> nn.ModuleList:
        """The unique layers only; applied layer l runs ``layers[config.unique_layer(l)]``."""
        first_use = {}
        for layer in range(config.num_hidden_layers):
            first_use.setdefault(config.unique_layer(layer), layer)
        return nn.ModuleList(self.decoder_layer(config, first_use[j], self.mixers, self.ffns)
                             for j in range(config.num_unique_layers))

    def init_extra_parameters(self, config: MoRConfig) -> None:
        """Expert-choice: a router theta_r per recursion (and, for ``causal_routing="aux_router"``, the
        auxiliary routers that decide at inference); token-choice: one router over the N_r depths."""
        hidden, n = config.hidden_size, config.num_recursions
        self.routers = self.causal_routers = self.depth_router = None
        if config.routing == "expert_choice":
            self.routers = nn.ModuleList(nn.Linear(hidden, 1, bias=False) for _ in range(n))
            if config.causal_routing == "aux_router":
                self.causal_routers = nn.ModuleList(nn.Linear(hidden, 1, bias=False) for _ in range(n))
        elif config.routing == "token_choice":
            self.depth_router = nn.Linear(hidden, n, bias=False)

    @deprecate_kwarg("cache_params", "5.40.0", new_name="cache")
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @merge_with_config_defaults
    @capture_outputs
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, **kwargs) -> MoRModelOutputWithPast:
        config = self.config
        self._check_inputs(input_ids, inputs_embeds)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, length = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        if use_cache and cache is None:
            cache = DynamicCache(config=config)
        past = self._check_cache(cache, batch) or 0
        self._check_mask(attention_mask, batch, length, past)
        if isinstance(attention_mask, dict):  # generate's per-layer-type mapping: the 2-D mask of the new tokens
            keep = attention_mask["recursive_attention"]
            keep = None if keep is None else keep[:, -length:]
        else:
            keep = padding_mask(attention_mask, length)
        keep = torch.ones(batch, length, dtype=torch.bool, device=device) if keep is None else keep.bool()
        if position_ids is None:
            mask_2d = None if isinstance(attention_mask, dict) else attention_mask
            position_ids = positions_from_mask(mask_2d, length, past, device)
        cos, sin = self.rotary_emb(inputs_embeds, position_ids)
        cos, sin = cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)
        record_states = kwargs.get("output_hidden_states", config.output_hidden_states)
        record_weights = kwargs.get("output_attentions", config.output_attentions)
        recursion_pass = RecursionPass(cache, batch, record_weights)
        masks = self._mask_mapping(inputs_embeds, attention_mask, cache, position_ids, record_weights) \
            if "full_attention" in config.layer_types else {}
        stream_index = torch.where(keep, torch.arange(past, past + length, device=device)[None], -1)

        hidden, states = inputs_embeds, [inputs_embeds] if record_states else None
        unique = dict(attention_mask=masks.get("full_attention"), position_embeddings=(cos, sin), cache=cache,
                      recursion_pass=recursion_pass)
        if config.sharing == "middle_cycle":
            hidden = self.layers[0](hidden, **unique)
            if states is not None:
                states.append(hidden)
        router = self._route_expert if config.routing == "expert_choice" else \
            self._route_token if config.routing == "token_choice" else self._route_none
        hidden, depth, router_logits, aux_loss = router(hidden, keep, stream_index, (cos, sin), recursion_pass,
                                                        states)
        if config.sharing == "middle_cycle":
            hidden = self.layers[-1](hidden, **unique)
            if states is not None:
                states.append(hidden)
        hidden = self._modules[self.final_norm_name](hidden)
        if states is not None:
            states[-1] = hidden  # as Llama's: the last entry is the normed output
        if cache is not None:
            for layer, layer_type in enumerate(config.layer_types):
                if layer_type == "recursive_attention":
                    own_cache_layer(cache, layer, RecursionCacheLayer).count(length)
        attentions = self._attention_maps(recursion_pass, batch, length, past) if record_weights else None
        return MoRModelOutputWithPast(last_hidden_state=hidden, cache=cache, router_logits=router_logits,
                                      hidden_states=None if states is None else tuple(states), attentions=attentions,
                                      aux_loss=aux_loss, recursion_depth=depth)

    # --------------------------------------------------------------------------------------- one recursion
    def _run_recursion(self, recursion: int, hidden, selected, stream_index, rope, recursion_pass, states):
        """Run the shared block's layers of ``recursion`` on the ``selected`` [B, T] tokens of ``hidden``,
        gathered per row in order into [B', k] (B' the rows with a selected token); returns the gather
        (rows, order [B', k], valid [B', k]; all None when every token is selected) with the block's input and
        output there, or None if no token."""
        counts = selected.sum(1)
        if torch.compiler.is_compiling():  # traced: every row, every slot (no host sync); invalid slots are masked
            rows, size = None, selected.shape[1]
        else:
            if not bool((counts > 0).any()):
                if states is not None:  # the block's layers leave every state as it is
                    states.extend([hidden] * (self.config.block_size - 1))
                return None
            if bool(selected.all()):  # every token: nothing to gather
                return self._run_block(recursion, hidden, rope, stream_index, (None, None, None), recursion_pass,
                                       states)
            rows = None if bool((counts > 0).all()) else torch.nonzero(counts > 0).squeeze(1)
            size = int(counts.max())
        pick = (lambda t: t) if rows is None else (lambda t: t[rows])
        order = torch.argsort((~pick(selected)).to(torch.int8), dim=1, stable=True)[:, :size]
        valid = torch.arange(size, device=order.device)[None] < pick(counts)[:, None]
        query_index = torch.where(valid, pick(stream_index).gather(1, order), -1)

        def gather(t):  # [B, T, d] -> the gathered tokens [B', k, d]
            return pick(t).gather(1, order[..., None].expand(-1, -1, t.shape[-1]))

        return self._run_block(recursion, gather(hidden), (gather(rope[0]), gather(rope[1])), query_index,
                               (rows, order, valid), recursion_pass, states, hidden)

    def _run_block(self, recursion, block_input, rope, query_index, gathered, recursion_pass, states, hidden=None):
        """The shared block's layers of ``recursion`` on the gathered tokens ``block_input`` [B', k, d]."""
        config = self.config
        first, x = config.recursion_layers(0), block_input
        for i, layer in enumerate(config.recursion_layers(recursion)):
            shares = config.kv_cache_scheme == "recursive_sharing" and recursion > 0
            step = RecursionStep(recursion_pass, layer, query_index, gathered[0], first[i] if shares else None)
            x = self.layers[config.unique_layer(layer)](x, position_embeddings=rope, step=step)
            if states is not None and i + 1 < config.block_size:  # the last one is recorded once combined
                states.append(self._scatter(block_input if hidden is None else hidden, gathered, x))
        return gathered, block_input, x

    @staticmethod
    def _scatter(hidden, gathered, values):
        """``hidden`` [B, T, d] with the gathered tokens' entries replaced by ``values`` [B', k, d]."""
        rows, order, valid = gathered
        if order is None:
            return values
        pick = (lambda t: t) if rows is None else (lambda t: t[rows])
        index = order[..., None].expand(-1, -1, hidden.shape[-1])
        values = torch.where(valid[..., None], values, pick(hidden).gather(1, index))  # padded slots: unchanged
        updated = pick(hidden).scatter(1, index, values)
        return updated if rows is None else hidden.index_copy(0, rows, updated)

    # --------------------------------------------------------------------------------------- the routings
    def _route_none(self, hidden, keep, stream_index, rope, recursion_pass, states):
        """The plain recursive transformer: every real token takes every recursion, H^{r+1} = f(H^r)."""
        for recursion in range(self.config.num_routed_recursions):
            ran = self._run_recursion(recursion, hidden, keep, stream_index, rope, recursion_pass, states)
            if ran is not None:
                hidden = self._scatter(hidden, ran[0], ran[2])
            if states is not None:
                states.append(hidden)
        return hidden, keep.long() * self.config.num_routed_recursions, None, None

    def _route_expert(self, hidden, keep, stream_index, rope, recursion_pass, states):
        """Expert-choice routing (eq. 2): per recursion the router picks among the tokens of the previous one."""
        config = self.config
        active, depth = keep, torch.zeros_like(keep, dtype=torch.long)
        logits_per_recursion, bce, z_loss = [], [], []
        real = keep.sum(1)
        for r in range(config.num_recursions):
            logits = self.routers[r](hidden).squeeze(-1).float()  # [B, T]
            weight = config.router_alpha * (torch.sigmoid(logits) if config.router_function == "sigmoid"
                                            else torch.tanh(logits))
            decider = logits if self.causal_routers is None else \
                self.causal_routers[r](hidden.detach()).squeeze(-1).float()
            if config.capacities[r] >= 1.0:
                selected = active
            elif self.training:
                selected = self._top_k(weight, active, real, config.capacities[r])
            else:  # causal: the token's own score (sigmoid >= 0.5, tanh >= 0)
                selected = active & (decider >= 0)
            if self.training:
                targets = selected[active].float()
                bce.append(nn.functional.binary_cross_entropy_with_logits(decider[active], targets)
                           if targets.numel() else decider.sum() * 0)
                z_loss.append(logits[active].square().mean() if targets.numel() else logits.sum() * 0)
            logits_per_recursion.append(logits)
            ran = self._run_recursion(r, hidden, selected, stream_index, rope, recursion_pass, states)
            if ran is not None:
                gathered, block_input, block_output = ran
                gate = self._gather_tokens(weight[..., None], gathered).to(hidden.dtype)
                update = block_output if config.router_gating == "none" else block_input + gate * block_output
                hidden = self._scatter(hidden, gathered, update)
            if states is not None:
                states.append(hidden)
            depth = depth + selected.long()
            active = selected
        aux_loss = None
        if self.training:
            aux_loss = config.router_aux_loss_coef * sum(bce) + config.router_z_loss_coef * sum(z_loss)
        return hidden, depth, tuple(logits_per_recursion), aux_loss

    @staticmethod
    def _top_k(weight, active, real, capacity: float):
        """Per row, the floor(capacity * real tokens) highest weights among the ``active`` tokens (at least 1)."""
        k = torch.floor(real.double() * capacity + 1e-9).long().clamp(min=1)
        k = torch.minimum(k, active.sum(1))
        largest = int(k.max())
        if largest == 0:
            return active & False
        top = weight.masked_fill(~active, float("-inf")).topk(largest, dim=1).indices
        take = torch.arange(largest, device=weight.device)[None] < k[:, None]
        return torch.zeros_like(active).scatter(1, top, take)

    @staticmethod
    def _gather_tokens(x, gathered):
        rows, order, _ = gathered
        if order is None:
            return x
        x = x if rows is None else x[rows]
        return x.gather(1, order[..., None].expand(-1, -1, x.shape[-1]))

    def _route_token(self, hidden, keep, stream_index, rope, recursion_pass, states):
        """Token-choice routing (eq. 3): depth i_t = argmax of alpha * softmax(W H^1_t) (top-1); the state is
        carried unweighted through recursions 1..i_t and the output is g_t f(H^{i_t}) + H^1_t."""
        config = self.config
        logits = self.depth_router(hidden).float()  # [B, T, N_r]
        probs = torch.softmax(logits, -1) if config.router_function == "softmax" else torch.sigmoid(logits)
        probs = config.router_alpha * probs
        choice = probs.argmax(-1)  # [B, T]: the last recursion each token takes (0-based)
        gate = probs.gather(-1, choice[..., None])  # [B, T, 1]
        carried, output = hidden, hidden
        for r in range(config.num_recursions):
            selected = keep & (choice >= r)
            ran = self._run_recursion(r, carried, selected, stream_index, rope, recursion_pass, states)
            if ran is not None:
                gathered, _, block_output = ran
                exits = self._gather_tokens((choice == r)[..., None], gathered)
                exit_value = block_output if config.router_gating == "none" else \
                    self._gather_tokens(hidden, gathered) + self._gather_tokens(gate, gathered).to(hidden.dtype) * \
                    block_output
                output = self._scatter(output, gathered, torch.where(exits, exit_value,
                                                                     self._gather_tokens(output, gathered)))
                carried = self._scatter(carried, gathered, block_output)
            if states is not None:
                states.append(carried)
        aux_loss = None
        if self.training:
            real = keep.sum().clamp(min=1)
            importance = (probs * keep[..., None]).sum((0, 1)) / real  # P_j
            chosen = nn.functional.one_hot(choice, config.num_recursions)[keep].sum(0)
            load = config.num_recursions * chosen / real  # f_j
            z_loss = torch.logsumexp(logits, -1)[keep].square().mean()
            aux_loss = config.router_aux_loss_coef * (importance * load).sum() + config.router_z_loss_coef * z_loss
        return output, (choice + 1) * keep, (logits,), aux_loss

    # --------------------------------------------------------------------------------------- outputs
    def _attention_maps(self, recursion_pass, batch: int, length: int, past: int):
        """One map [B, H, T, past + T] per applied layer; a token's row is zero in the layers it skipped."""
        maps = []
        for layer, layer_type in enumerate(self.config.layer_types):
            entry = recursion_pass.weights.get(layer)
            if layer_type == "full_attention" or entry is None:  # a unique layer's map, or a layer no token reached
                maps.append(entry if entry is not None else self.embed_tokens.weight.new_zeros(
                    batch, self.config.num_attention_heads, length, past + length))
                continue
            weights, query_index, key_index, rows = entry
            maps.append(None if weights is None else
                        self._scatter_map(weights, query_index, key_index, rows, batch, length, past))
        return None if any(m is None for m in maps) else tuple(maps)

    @staticmethod
    def _scatter_map(weights, query_index, key_index, rows, batch: int, length: int, past: int):
        """A recursion layer's map over gathered queries and kept keys [B', H, k, S], placed at the queries'
        tokens and the keys' stream indices."""
        heads, size, width = weights.shape[1], weights.shape[2], past + length
        w = weights.float().masked_fill((query_index < 0)[:, None, :, None] | (key_index < 0)[:, None, None, :], 0)
        by_key = w.new_zeros(w.shape[0], heads, size, width).scatter_add(
            3, key_index.clamp(min=0)[:, None, None, :].expand(-1, heads, size, -1), w)
        query_token = (query_index - past).clamp(min=0)[:, None, :, None].expand(-1, heads, -1, width)
        maps = w.new_zeros(w.shape[0], heads, length, width).scatter_add(2, query_token, by_key)
        if rows is not None:
            maps = w.new_zeros(batch, heads, length, width).index_copy(0, rows, maps)
        return maps.to(weights.dtype)


class MoRForCausalLM(MoRPreTrainedModel, HFMemoryForCausalLM):
    """Mixture-of-Recursions with a language-modelling head; in training the router losses (``aux_loss``:
    expert-choice BCE and z-loss, token-choice balancing and z-loss, weighted by their coefficients) are added
    to the loss, as a MoE model adds its balancing loss."""

    base_model_class = MoRModel

    @deprecate_kwarg("cache_params", "5.40.0", new_name="cache")
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, **kwargs) -> MoRCausalLMOutputWithPast:
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            if outputs.aux_loss is not None:
                loss = loss + outputs.aux_loss.to(loss.dtype)
        return MoRCausalLMOutputWithPast(loss=loss, aux_loss=outputs.aux_loss, logits=logits, cache=outputs.cache,
                                         hidden_states=outputs.hidden_states, attentions=outputs.attentions,
                                         router_logits=outputs.router_logits, recursion_depth=outputs.recursion_depth)


AUTO_MAP = {"AutoModel": MoRModel, "AutoModelForCausalLM": MoRForCausalLM}

__all__ = ["MoRModel", "MoRForCausalLM", "MoRPreTrainedModel", "RecursionCacheLayer"]
