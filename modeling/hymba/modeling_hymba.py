"""The parallel hybrid: attention heads and SSM heads side by side in every layer — Hymba (Dong et al.,
"Hymba: A Hybrid-head Architecture for Small Language Models", arXiv 2411.13676) and the Falcon-H1 layout.

Every block is ``x += Fuse(Attention(u), SSM(u)); x += FFN(RMSNorm(x))`` with ``u = RMSNorm(x)``: the attention
heads recall exactly (a global or sliding-window KV cache), the SSM heads summarise the whole context in a
fixed-size state, both on the same input (section 2.1, figure 2). Hymba fuses by the mean of the normalised
outputs (eq. 3), prepends learned meta tokens that every query sees (section 2.2) and shares KV between
adjacent layers (section 2.3); Falcon-H1 sums the two outputs with muP multipliers.

The attention mask is built from token positions, not slots (``hf_memory.ops.position_masked_attention``): a key
is visible when it is real, not after the query, and within the window or a meta token. So a left-padded row
equals the same row unpadded, and the cache can keep the meta-token KV pinned in front of the last window. On
CUDA it runs as flex attention with a block mask.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import cache_utils
from transformers import initialization as init
from transformers.cache_utils import DynamicLayer, LinearAttentionLayer

from hf_memory.cache import own_cache_layer
from hf_memory.kernels import fused_kernel
from hf_memory.layers.attention import Attention
from hf_memory.layers.mamba import Mamba2Mixer, MambaMixer
from hf_memory.layers.mlp import GatedMLP
from hf_memory.layers.norms import RMSNorm
from hf_memory.ops.position_masked_attention import additive_position_mask, flex_block_mask, flex_position_attention
from hf_memory.modeling_utils import (
    HFMemoryForCausalLM,
    HFMemoryModel,
    HFMemoryPreTrainedModel,
    MemoryDecoderLayer,
    padding_mask,
)

from .configuration_hymba import LAYER_TYPES, HymbaConfig

# Fewer queries than this (decoding, prefill in small pieces) take SDPA with the dense mask: the keys are the
# bounded cache, and flex attention would switch to its decoding kernel, which (torch 2.11, H200) found no valid
# configuration for these head sizes.
FLEX_MIN_QUERIES = 128


class ParallelHybridCacheLayer(LinearAttentionLayer, DynamicLayer):
    """Cache of one parallel layer: the SSM's conv history and fp32 state (as any ``"linear_attention"`` layer)
    and the attention part's keys, values and key positions (-1 at pads). A sliding-window layer keeps the meta
    tokens' KV pinned in front of the last ``window - 1`` keys; a global layer keeps all; a KV consumer keeps
    none. ``get_seq_length`` counts the user's tokens (meta tokens excluded), as ``generate`` expects."""

    is_compileable = False

    def __init__(self, **kwargs):
        DynamicLayer.__init__(self)
        LinearAttentionLayer.__init__(self, number_of_states=1)
        self.key_positions, self.num_meta, self.tokens, self.started = None, 0, 0, False

    def lazy_initialization(self, *args, **kwargs) -> None:
        if args:  # keys / values: set by ``update_attention``
            return
        LinearAttentionLayer.lazy_initialization(self, **kwargs)

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError("a parallel hybrid layer's KV is updated with update_attention(), which also "
                                  "keeps key positions and the meta tokens")

    def update_attention(self, keys, values, positions, window: int | None, num_meta: int):
        """Append this call's keys [B, H_kv, T, d], values and positions [B, T]; return everything the call's
        queries may see (kept + new); keep the meta tokens plus the last ``window - 1`` keys (all if global)."""
        self.num_meta = num_meta
        if self.keys is None:
            all_keys, all_values, all_positions = keys, values, positions
        else:
            all_keys = torch.cat([self.keys, keys], dim=-2)
            all_values = torch.cat([self.values, values], dim=-2)
            all_positions = torch.cat([self.key_positions, positions], dim=-1)
        self.keys, self.values, self.key_positions = all_keys, all_values, all_positions
        kept = self.num_meta + window - 1 if window is not None else None
        if kept is not None and all_keys.shape[-2] > kept:
            # per row: its meta tokens (wherever left pads put them) and the most recent keys
            slots = torch.arange(all_keys.shape[-2], device=keys.device)
            is_meta = (all_positions >= 0) & (all_positions < self.num_meta)
            keep = (slots + is_meta * all_keys.shape[-2]).topk(kept, dim=-1).indices.sort(dim=-1).values
            gather = keep[:, None, :, None]
            self.keys = all_keys.gather(2, gather.expand(-1, all_keys.shape[1], -1, all_keys.shape[-1]))
            self.values = all_values.gather(2, gather.expand(-1, all_values.shape[1], -1, all_values.shape[-1]))
            self.key_positions = all_positions.gather(1, keep)
        self.is_initialized = True
        return all_keys, all_values, all_positions

    def count_tokens(self, new_tokens: int, num_meta: int) -> None:
        """Count a call's tokens; the first call of a fresh cache is a prefill that began with the meta tokens."""
        self.tokens += new_tokens - (0 if self.started else num_meta)
        self.started = True

    def get_seq_length(self) -> int:
        return self.tokens

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.tokens + query_length, 0

    def _map_kv(self, fn) -> None:
        if self.keys is not None:
            self.keys, self.values, self.key_positions = fn(self.keys), fn(self.values), fn(self.key_positions)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        LinearAttentionLayer.reorder_cache(self, beam_idx)
        self._map_kv(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        for states in (self.conv_states, self.recurrent_states):
            for i, t in states.items():
                if isinstance(t, torch.Tensor):
                    states[i] = t.repeat_interleave(repeats, dim=0)
        self._map_kv(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for states in (self.conv_states, self.recurrent_states):
            for i, t in states.items():
                if isinstance(t, torch.Tensor):
                    states[i] = t[indices]
        self._map_kv(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a parallel hybrid cache cannot be cropped: its SSM state cannot be rolled back")

    def reset(self) -> None:
        self.__init__()

    def offload(self) -> None:
        raise NotImplementedError(f"offloading is not supported for {type(self).__name__}")

    def prefetch(self) -> None:
        raise NotImplementedError(f"offloading is not supported for {type(self).__name__}")


for _layer_type in LAYER_TYPES:  # bounded or not, the same layer serves dynamic and static caches
    cache_utils.DYNAMIC_LAYER_TYPE_MAPPING[_layer_type] = ParallelHybridCacheLayer
    cache_utils.STATIC_LAYER_TYPE_MAPPING[_layer_type] = ParallelHybridCacheLayer


def build_ssm(config: HymbaConfig, layer_idx: int) -> nn.Module:
    """The SSM heads: Mamba-1 with inner norms (Hymba) or Mamba-2 (Falcon-H1), with their own output projection
    only when the fusion is a sum."""
    own_projection = config.fusion == "sum"
    if config.mamba_version == "mamba2":
        return Mamba2Mixer(
            hidden_size=config.hidden_size, intermediate_size=config.mamba_d_ssm, state_size=config.mamba_d_state,
            conv_kernel=config.mamba_d_conv, head_dim=config.mamba_head_dim, n_groups=config.mamba_n_groups,
            chunk_size=config.mamba_chunk_size, layer_idx=layer_idx, conv_bias=config.mamba_conv_bias,
            proj_bias=config.mamba_proj_bias, out_proj_bias=config.mamba_out_proj_bias,
            rms_norm_eps=config.rms_norm_eps, use_fused_kernels=config.use_fused_kernels,
            output_projection=own_projection, gated_norm=config.mamba_rms_norm,
            projection_multipliers=tuple(config.ssm_multipliers),
        )
    return MambaMixer(
        hidden_size=config.hidden_size, intermediate_size=config.mamba_d_ssm, state_size=config.mamba_d_state,
        conv_kernel=config.mamba_d_conv, time_step_rank=config.mamba_dt_rank, layer_idx=layer_idx,
        conv_bias=config.mamba_conv_bias, proj_bias=config.mamba_proj_bias, inner_norms=config.mamba_inner_norms,
        rms_norm_eps=config.rms_norm_eps, use_fused_kernels=config.use_fused_kernels,
        output_projection=own_projection,
    )


class HymbaMixer(nn.Module):
    """One hybrid-head layer (section 2.1, eq. 3): attention heads and SSM heads on the same input u (the SSM
    term absent with ``use_ssm=False``).

    mean (Hymba):   out_proj((beta_1 * RMSNorm(attn(u)) + beta_2 * RMSNorm(ssm(u))) / 2)
    sum (Falcon-H1): m_attn_out * o_proj(attn(m_attn_in * u)) + m_ssm_out * out_proj(ssm(m_ssm_in * u))

    A KV consumer (section 2.3) has no key / value projections: its queries attend over the keys and values its
    producer left in ``shared_kv`` during this forward (with its own mask)."""

    def __init__(self, config: HymbaConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.kv_source = config.kv_source(layer_idx)
        self.shares_kv = layer_idx in config.kv_producers()
        self.window = config.sliding_window if config.layer_types[layer_idx] == "parallel_sliding_attention" else None
        self.num_meta = config.num_memory_tokens
        self.self_attn = Attention(config, layer_idx, output_projection=config.fusion == "sum",
                                   key_value_projections=self.kv_source == layer_idx)
        self.mamba = build_ssm(config, layer_idx) if config.use_ssm else None
        if config.fusion == "mean":
            self.attn_norm = RMSNorm(config.mamba_d_ssm, eps=config.rms_norm_eps)  # beta_1
            self.ssm_norm = RMSNorm(config.mamba_d_ssm, eps=config.rms_norm_eps) if config.use_ssm else None  # beta_2
            self.out_proj = nn.Linear(config.mamba_d_ssm, config.hidden_size, bias=False)

    def attention_keys(self, k, v, positions, cache, shared_kv):
        """The keys, values and key positions this layer's queries see: its own (through the cache) or its
        producer's."""
        if self.kv_source != self.layer_idx:
            return shared_kv[self.kv_source]
        if cache is not None:
            k, v, positions = own_cache_layer(cache, self.layer_idx, ParallelHybridCacheLayer).update_attention(
                k, v, positions, self.window, self.num_meta)
        if self.shares_kv:
            shared_kv[self.layer_idx] = (k, v, positions)
        return k, v, positions

    def attend(self, q, k, v, positions, key_positions, shared, **kwargs):
        """Attention under the meta-token + window mask of positions (``position_masked_attention``): flex
        attention with a block mask on CUDA where the fused kernels are on and at least ``FLEX_MIN_QUERIES``
        queries come, the configured eager / sdpa attention with the additive mask (the definition) otherwise or
        when attention maps are asked for."""
        need_weights = kwargs.get("output_attentions", self.config.output_attentions)
        short = q.shape[2] < FLEX_MIN_QUERIES
        flex = None if need_weights or short or self.config._attn_implementation == "eager" else fused_kernel(
            "flex_attention", q, k, v, use_fused_kernels=self.config.use_fused_kernels)
        if flex is not None:
            block_mask = self.shared_mask("flex", flex_block_mask, positions, key_positions, shared)
            out = flex_position_attention(flex, q, k, v, block_mask, self.self_attn.scaling)
            return out.reshape(q.shape[0], q.shape[2], -1), None
        bias = self.shared_mask(q.dtype, lambda *args: additive_position_mask(*args, q.dtype), positions,
                                key_positions, shared)
        return self.self_attn.attend(q, k, v, bias, **kwargs)

    def shared_mask(self, kind, build, positions, key_positions, shared):
        """``build(positions, key_positions, window, num_meta)``, made once per forward for all layers with this
        window: they hold the same key positions (checked here, not assumed), so later layers reuse it. Under
        torch.compile each layer builds its own (the check is a host sync; the compiler shares equal work)."""
        if shared is None or torch.compiler.is_compiling():  # the mixer on its own, or traced
            return build(positions, key_positions, self.window, self.num_meta)
        key = ("mask", kind, self.window)
        if key in shared:
            seen_positions, seen_keys, mask = shared[key]
            if torch.equal(seen_positions, positions) and torch.equal(seen_keys, key_positions):
                return mask
        mask = build(positions, key_positions, self.window, self.num_meta)
        shared[key] = (positions, key_positions, mask)
        return mask

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, cache=None, position_ids=None,
                shared_kv=None, **kwargs):
        config, length = self.config, hidden_states.shape[1]
        mask = padding_mask(attention_mask, length)
        if cache is not None:
            own_cache_layer(cache, self.layer_idx, ParallelHybridCacheLayer).count_tokens(length, self.num_meta)
        positions = position_ids.expand(hidden_states.shape[0], -1)
        key_positions = positions if mask is None else positions.masked_fill(mask == 0, -1)

        q, k, v = self.self_attn.project(hidden_states * config.attention_in_multiplier, position_embeddings)
        k, v, key_positions = self.attention_keys(k, v, key_positions, cache, shared_kv)
        attended, weights = self.attend(q, k, v, positions, key_positions, shared_kv, **kwargs)
        scanned = None
        if self.mamba is not None:
            scanned, _ = self.mamba(hidden_states * config.ssm_in_multiplier, attention_mask=mask, cache=cache)

        if config.fusion == "mean":
            fused = self.attn_norm(attended) + (0.0 if scanned is None else self.ssm_norm(scanned))
            return self.out_proj(fused / 2), weights
        attended = self.self_attn.o_proj(attended) * config.attention_out_multiplier
        return (attended if scanned is None else attended + scanned * config.ssm_out_multiplier), weights


def build_ffn(config: HymbaConfig, layer_idx: int) -> nn.Module:
    return GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act, bias=config.mlp_bias,
                    multipliers=tuple(config.mlp_multipliers))


class HymbaDecoderLayer(MemoryDecoderLayer):
    """x += HymbaMixer(RMSNorm(x)); x += SwiGLU(RMSNorm(x)), with transformers' Falcon-H1 parameter names."""

    names = ("input_layernorm", "mixer", "pre_ff_layernorm", "feed_forward")


class HymbaPreTrainedModel(HFMemoryPreTrainedModel):
    config: HymbaConfig
    config_class = HymbaConfig
    mixers = dict.fromkeys(LAYER_TYPES, HymbaMixer)
    ffns = {"dense": build_ffn}
    decoder_layer = HymbaDecoderLayer
    final_norm_name = "final_layernorm"
    rope_layer_types = frozenset(LAYER_TYPES)
    _no_split_modules = ["HymbaDecoderLayer"]
    _supports_flash_attn = False  # the meta-token + window mask: eager / sdpa with a 4-D mask, flex on CUDA
    _can_record_outputs = {"hidden_states": HymbaDecoderLayer, "attentions": HymbaMixer}

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, (MambaMixer, Mamba2Mixer)):
            for name, value in module.ssm_init_values().items():
                init.copy_(module.get_parameter(name), value)
            if getattr(module, "projection_multipliers", None) is not None:
                init.copy_(module.projection_multipliers, module.multiplier_vector())
        elif isinstance(module, HymbaModel) and module.memory_tokens is not None:
            init.normal_(module.memory_tokens, mean=0.0, std=self.config.initializer_range)


class HymbaModel(HymbaPreTrainedModel, HFMemoryModel):
    """Embeddings, meta tokens, the stack of parallel layers, final RMSNorm."""

    def init_extra_parameters(self, config: HymbaConfig) -> None:
        M = config.num_memory_tokens
        self.memory_tokens = nn.Parameter(torch.zeros(M, config.hidden_size)) if M else None

    def prepend_prefix(self, inputs_embeds, attention_mask, position_ids, past):
        """At prefill, the M meta tokens go before the text (positions 0..M-1; every token moves M positions on)
        and after a row's left pads, so that meta and text stay adjacent for the SSM's short conv and a padded row
        equals the same row unpadded. At every step the 2-D mask gains M ones for them."""
        M = self.config.num_memory_tokens
        if not M:
            return inputs_embeds, attention_mask, position_ids, None
        batch, length = inputs_embeds.shape[:2]
        position_ids = position_ids + M
        mask = attention_mask if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 else None
        if mask is not None:
            mask = torch.cat([mask.new_ones(batch, M), mask], dim=-1)
        if past:
            return inputs_embeds, mask if mask is not None else attention_mask, position_ids, None
        order, output_index = meta_layout(mask, batch, length, M, inputs_embeds.device)
        embeds = torch.cat([self.memory_tokens.to(inputs_embeds.dtype)[None].expand(batch, -1, -1), inputs_embeds], 1)
        meta_positions = torch.arange(M, device=position_ids.device)[None].expand(position_ids.shape[0], -1)
        positions = torch.cat([meta_positions, position_ids], dim=1).expand(batch, -1)
        embeds = embeds.gather(1, order[..., None].expand(-1, -1, embeds.shape[-1]))
        positions = positions.gather(1, order)
        mask = None if mask is None else mask.gather(1, order)
        return embeds, mask, positions, output_index

    def forward(self, input_ids=None, attention_mask=None, *args, **kwargs):
        """``HFMemoryModel.forward`` with ``shared_kv`` (per forward: the producers' KV for cross-layer sharing,
        the attention masks built once per window), and the meta tokens cut from
        recorded hidden states and attention rows as they are from the output."""
        return_dict = kwargs.pop("return_dict", None)
        outputs = super().forward(input_ids, attention_mask, *args, shared_kv={}, return_dict=True, **kwargs)
        batch, length = outputs.last_hidden_state.shape[:2]
        M = self.config.num_memory_tokens
        if not M or (outputs.hidden_states is None and outputs.attentions is None):
            return outputs if return_dict is not False else outputs.to_tuple()
        mask = attention_mask if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 else None
        if mask is not None:
            mask = torch.cat([mask.new_ones(batch, M), mask], dim=-1)
        index = meta_layout(mask, batch, length, M, outputs.last_hidden_state.device)[1]

        def text_only(x, dim):  # drop the meta-token positions a prefill added along ``dim``
            if x.shape[dim] != length + M:
                return x
            shape = [1] * x.dim()
            shape[0], shape[dim] = batch, length
            return x.gather(dim, index.to(x.device).view(shape).expand(*x.shape[:dim], length, *x.shape[dim + 1:]))

        if outputs.hidden_states is not None:
            outputs.hidden_states = tuple(text_only(h, 1) for h in outputs.hidden_states)
        if outputs.attentions is not None:
            outputs.attentions = tuple(text_only(a, 2) for a in outputs.attentions)
        return outputs if return_dict is not False else outputs.to_tuple()


def meta_layout(mask, batch: int, length: int, M: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Where a prefill puts the meta tokens: ``order`` [B, M + T] lays out ``[meta ; tokens]`` as
    ``[pads, meta, real tokens]`` (a stable sort of the extended 2-D ``mask``, pads first), ``output_index``
    [B, T] finds each input token in that layout."""
    if mask is None:
        order = torch.arange(M + length, device=device)[None].expand(batch, -1)
    else:
        order = torch.sort(mask.long(), dim=1, stable=True).indices
    output_index = torch.argsort(order, dim=1)[:, M:]
    return order, output_index


class HymbaForCausalLM(HymbaPreTrainedModel, HFMemoryForCausalLM):
    """The parallel hybrid with a language-modelling head."""

    base_model_class = HymbaModel


AUTO_MAP = {"AutoModel": HymbaModel, "AutoModelForCausalLM": HymbaForCausalLM}

__all__ = ["HymbaMixer", "HymbaModel", "HymbaForCausalLM", "HymbaPreTrainedModel", "ParallelHybridCacheLayer"]
