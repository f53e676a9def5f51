"""The model scaffold every hf_memory architecture shares, written once (as flash-linear-attention's
``FLAModel`` / transformers' modular inheritance do).

An architecture brings three things and nothing generic:

* its config class (``layer_types`` names each layer's token mixer),
* ``mixers``: a table ``layer type -> factory(config, layer_idx)`` of token mixers, each with the one mixer
  signature ``forward(hidden_states, attention_mask=None, position_embeddings=None, cache=None, **kwargs)``
  returning ``(output, attention_weights or None)`` (``kwargs`` carry ``position_ids`` and the attention options),
* optionally ``ffns`` (``mlp_layer_types`` entry -> factory), the parameter names of its checkpoints, parameters
  beyond the layer stack (``init_extra_parameters``: Hymba's meta tokens, RMT's memory, MoR's routers), a learned
  prefix (``prepend_prefix``) and its own set of unique layers (``build_layers``: MoR's shared block).

Everything else — input checks, embeddings, cache creation and checks, positions, RoPE, the per-layer-type
mask mapping (also the one ``generate`` passes), the layer loop, hidden-state / attention / router-logit
capture, LM head, loss and the MoE auxiliary loss — lives here.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import (
    DYNAMIC_LAYER_TYPE_MAPPING,
    STATIC_LAYER_TYPE_MAPPING,
    Cache,
    DynamicCache,
)
from transformers.generation import GenerationMixin
from transformers.masking_utils import (
    LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING,
    create_recurrent_attention_mask,
    create_sliding_window_causal_mask,
)
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    MoeCausalLMOutputWithPast,
    MoeModelOutputWithPast,
)
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from hf_memory.layers.attention import Attention, RotaryEmbedding, runs_blockwise
from hf_memory.layers.mlp import GatedMLP
from hf_memory.layers.moe import load_balancing_loss
from hf_memory.layers.norms import RMSNorm


def inverse_softplus_dt(size: int, dt_min: float, dt_max: float) -> torch.Tensor:
    """Mamba's time-step bias: softplus^-1(dt) with dt log-uniform in [dt_min, dt_max] (floored at 1e-4)."""
    dt = torch.exp(torch.rand(size) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=1e-4)
    return dt + torch.log(-torch.expm1(-dt))


def padding_mask(attention_mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """The 2-D [B, T] keep-mask of the current tokens (1 = real, 0 = pad), or None when there is no padding."""
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    mask = attention_mask[:, -length:]
    if torch.compiler.is_compiling():  # no host sync in a traced forward: the mask, even when all ones
        return mask
    return None if bool(mask.all()) else mask


def positions_from_mask(attention_mask: torch.Tensor | None, length: int, past: int, device) -> torch.Tensor:
    """Position ids [B, T]: counted over real tokens when a 2-D mask is given (left padding), else past + t."""
    if attention_mask is not None and attention_mask.dim() == 2:
        positions = attention_mask.long().cumsum(-1) - 1
        return positions.clamp(min=0)[:, -length:].to(device)
    return (torch.arange(length, device=device) + past)[None]


def past_length(cache: Cache | None) -> int | None:
    """Tokens the cache has seen, or None where no layer counts them (a cache of recurrent layers only)."""
    if cache is None:
        return 0
    try:
        return cache.get_seq_length()
    except ValueError:
        return None


def broken_safetensors(folder) -> list[str]:
    """The ``*.safetensors`` files of a local folder whose header is unreadable or whose size disagrees with it."""
    broken = []
    for path in sorted(Path(folder).glob("*.safetensors")) if Path(folder).is_dir() else ():
        data = path.read_bytes()
        try:
            length = int.from_bytes(data[:8], "little")
            header = json.loads(data[8 : 8 + length])
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            intact = len(data) == 8 + length + end
        except (ValueError, KeyError, TypeError):
            intact = False
        if not intact:
            broken.append(str(path))
    return broken


# ------------------------------------------------------------------------------------------------- layers
def dense_ffn(config, layer_idx: int) -> nn.Module:
    return GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)


class MemoryDecoderLayer(GradientCheckpointingLayer):
    """The pre-norm block of every architecture here: x += Mixer(RMSNorm(x)); x += FFN(RMSNorm(x)).

    The mixer is ``mixers[config.layer_types[i]](config, i)``, the FFN ``ffns[config.mlp_layer_types[i]]`` (a
    SwiGLU MLP where the config has no ``mlp_layer_types``). ``names`` are the submodules' parameter names:
    an architecture with a source checkpoint keeps that checkpoint's names, the others keep Llama's.
    """

    names = ("input_layernorm", "mixer", "post_attention_layernorm", "mlp")

    def __init__(self, config, layer_idx: int, mixers: dict[str, Callable], ffns: dict[str, Callable]):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        mlp_types = getattr(config, "mlp_layer_types", None)
        mixer_norm, mixer, ffn_norm, ffn = self.names
        self.add_module(mixer_norm, RMSNorm(config.hidden_size, eps=config.rms_norm_eps))
        self.add_module(mixer, mixers[self.layer_type](config, layer_idx))
        self.add_module(ffn_norm, RMSNorm(config.hidden_size, eps=config.rms_norm_eps))
        self.add_module(ffn, ffns[mlp_types[layer_idx] if mlp_types else "dense"](config, layer_idx))

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, cache=None, **kwargs):
        mixer_norm, mixer, ffn_norm, ffn = (self._modules[name] for name in self.names)
        mixed, _ = mixer(mixer_norm(hidden_states), attention_mask=attention_mask,
                         position_embeddings=position_embeddings, cache=cache, **kwargs)
        hidden_states = hidden_states + mixed
        return hidden_states + ffn(ffn_norm(hidden_states))


# ------------------------------------------------------------------------------------------------- models
class HFMemoryPreTrainedModel(PreTrainedModel):
    """Base of every hf_memory model.

    ``save_pretrained`` / ``push_to_hub`` of a model built from the installed ``hf_memory`` package also write
    the self-contained modeling code (``auto_map``) and the model card, so the folder loads with
    ``trust_remote_code=True`` where hf_memory is not installed. A model loaded as remote code saves the way
    transformers saves any remote-code model.
    """

    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = False  # not verified against eager (CPU flex attention disagrees); eager, sdpa, flash
    _supports_attention_backend = True
    _is_stateful = True  # recurrent / memory state: no assisted decoding, no cache cropping
    _can_record_outputs = {"hidden_states": MemoryDecoderLayer, "attentions": Attention}

    # what an architecture declares
    mixers: dict[str, Callable] = {}  # layer type -> factory(config, layer_idx)
    ffns: dict[str, Callable] = {"dense": dense_ffn}  # mlp layer type -> factory(config, layer_idx)
    decoder_layer: type[MemoryDecoderLayer] = MemoryDecoderLayer
    final_norm_name = "norm"
    rope_layer_types: frozenset[str] = frozenset({"full_attention", "sliding_attention"})

    def _from_hf_memory_package(self) -> bool:
        return type(self).__module__.startswith("hf_memory.")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' ``from_pretrained``; a truncated or corrupt local weight file is reported by name."""
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except Exception as error:
            broken = broken_safetensors(pretrained_model_name_or_path)
            if broken:
                raise OSError(f"truncated or corrupt weight file(s) {', '.join(broken)} ({error}): save or download "
                              "them again") from error
            raise

    def save_pretrained(self, save_directory, *args, push_to_hub: bool = False, **kwargs):
        """transformers' ``save_pretrained`` plus the bundled code and the model card.

        Model-card options: ``repo_id`` (the load snippet's id), ``license`` (a Hub licence id; none declared
        without it), ``training`` / ``intended_use`` / ``limitations`` (text; without ``training`` the card says
        the training is not recorded and the weights may be random).
        """
        if not self._from_hf_memory_package():
            return super().save_pretrained(save_directory, *args, push_to_hub=push_to_hub, **kwargs)
        export = importlib.import_module("hf_memory.export")
        hub_kwargs = {k: kwargs.pop(k) for k in ("repo_id", "commit_message", "create_pr", "private", "token") if k in kwargs}
        card = {k: kwargs.pop(k) for k in export.CARD_OPTIONS if k in kwargs}
        export.render_model_card(self, repo_id=hub_kwargs.get("repo_id"), **card)  # refuse bad options before writing
        super().save_pretrained(save_directory, *args, **kwargs)
        if self.should_save_on_this_rank(kwargs.get("is_main_process", True)):
            export.write_hub_files(self, save_directory, repo_id=hub_kwargs.get("repo_id"), **card)
            if push_to_hub:
                export.upload_folder(save_directory, **hub_kwargs)

    def push_to_hub(self, repo_id: str, **kwargs):
        """Upload the files of ``save_pretrained(folder, repo_id=repo_id, **card_options)`` as one commit."""
        if not self._from_hf_memory_package():
            return super().push_to_hub(repo_id, **kwargs)
        return importlib.import_module("hf_memory.export").push_to_hub(self, repo_id, **kwargs)


class HFMemoryModel(HFMemoryPreTrainedModel):
    """Embeddings, the stack of ``layer_types`` blocks, final RMSNorm — for every architecture."""

    def __init__(self, config):
        super().__init__(config)
        config.validate_architecture()  # fields set after construction (from_pretrained(..., key=value)) too
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = self.build_layers(config)
        self.add_module(self.final_norm_name, RMSNorm(config.hidden_size, eps=config.rms_norm_eps))
        uses_rope = bool(self.rope_layer_types & set(config.layer_types))
        self.rotary_emb = RotaryEmbedding(config) if uses_rope else None
        self.init_extra_parameters(config)
        self.gradient_checkpointing = False
        self.post_init()

    def build_layers(self, config) -> nn.ModuleList:
        """One decoder layer per ``layer_types`` entry (an architecture that reuses layers builds fewer)."""
        return nn.ModuleList(self.decoder_layer(config, i, self.mixers, self.ffns) for i in range(config.num_hidden_layers))

    def init_extra_parameters(self, config) -> None:
        """Parameters beyond embeddings, layers and norm (Hymba's meta tokens, RMT's memory); none here."""

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    @deprecate_kwarg("cache_params", "5.40.0", new_name="cache")
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | dict | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        self._check_inputs(input_ids, inputs_embeds)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids) * self.config.embedding_multiplier
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = self._check_cache(cache, inputs_embeds.shape[0])
        self._check_mask(attention_mask, inputs_embeds.shape[0], inputs_embeds.shape[1], past)

        mask_2d = None if isinstance(attention_mask, dict) else attention_mask
        if position_ids is None:
            position_ids = positions_from_mask(mask_2d, inputs_embeds.shape[1], past or 0, inputs_embeds.device)
        inputs_embeds, attention_mask, position_ids, output_index = self.prepend_prefix(
            inputs_embeds, attention_mask, position_ids, past)
        position_embeddings = None if self.rotary_emb is None else self.rotary_emb(inputs_embeds, position_ids)
        need_weights = kwargs.get("output_attentions", self.config.output_attentions)
        masks = self._mask_mapping(inputs_embeds, attention_mask, cache, position_ids, need_weights)

        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask=masks[layer.layer_type], position_ids=position_ids,
                                  position_embeddings=position_embeddings, cache=cache, **kwargs)
        hidden_states = self._modules[self.final_norm_name](hidden_states)
        if output_index is not None:  # the input tokens' positions, without the prefix
            hidden_states = hidden_states.gather(1, output_index[..., None].expand(-1, -1, hidden_states.shape[-1]))
        output_class = MoeModelOutputWithPast if "router_logits" in self._can_record_outputs else BaseModelOutputWithPast
        return output_class(last_hidden_state=hidden_states, cache=cache)

    def prepend_prefix(self, inputs_embeds, attention_mask, position_ids, past):
        """Learned vectors put before the tokens (Hymba's meta tokens): the architecture returns the extended
        embeddings, 2-D mask and positions, and the index [B, T] of the input tokens among them (None when
        nothing was added). None here."""
        return inputs_embeds, attention_mask, position_ids, None

    def _mask_mapping(self, inputs_embeds, attention_mask, cache, position_ids, need_weights=False) -> dict:
        """The mask each layer type reads: transformers' 4-D masks for softmax attention, the 2-D padding mask
        (None without padding) for recurrent and segment layers and for sliding-window layers that run blockwise
        (long inputs, no attention maps asked for). ``generate`` may pass this mapping ready-made."""
        layer_types = set(self.config.layer_types)
        if isinstance(attention_mask, dict):
            missing = layer_types - set(attention_mask)
            if missing:
                raise ValueError(f"the attention_mask mapping has no mask for layer types {sorted(missing)}")
            return attention_mask
        kwargs = dict(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache,
                      position_ids=position_ids)
        masks = {}
        for layer_type in layer_types - {"sliding_attention"}:
            function = LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING.get(layer_type, create_recurrent_attention_mask)
            # a layer of two mixers ("hybrid": attention + recurrent) gets each part's mask by its layer type
            masks[layer_type] = ({part: f(**kwargs) for part, f in function.items()} if isinstance(function, dict)
                                 else function(**kwargs))
        if "sliding_attention" in layer_types:  # blockwise O(T * window) when a dense mask would be quadratic
            blockwise = runs_blockwise(self.config, inputs_embeds.shape[1]) and not need_weights
            masks["sliding_attention"] = attention_mask if blockwise else create_sliding_window_causal_mask(**kwargs)
        return masks

    def _check_inputs(self, input_ids, inputs_embeds) -> None:
        """Bad ids or embeddings are refused here, before any kernel sees them."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be [batch, sequence], got shape {tuple(input_ids.shape)}")
            if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
                raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
            if input_ids.shape[1] == 0:
                raise ValueError("input_ids has no tokens (sequence length 0)")
            if torch.compiler.is_compiling():  # the range check reads values (a device sync, a graph break)
                return
            low, high = (int(v) for v in torch.stack(torch.aminmax(input_ids)).tolist())  # one device sync
            if low < 0 or high >= self.config.vocab_size:
                raise ValueError(f"input_ids must lie in [0, vocab_size={self.config.vocab_size}), got values in "
                                 f"[{low}, {high}]")
        else:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
                raise ValueError(f"inputs_embeds must be [batch, sequence, hidden_size={self.config.hidden_size}], "
                                 f"got shape {tuple(inputs_embeds.shape)}")
            if inputs_embeds.shape[1] == 0:
                raise ValueError("inputs_embeds has no tokens (sequence length 0)")

    def _check_cache(self, cache: Cache | None, batch: int) -> int | None:
        """The cache must have been built for this model (one layer of the right kind per ``layer_types`` entry)
        and hold this batch; returns the number of tokens it has seen (None if no layer counts them)."""
        if cache is None:
            return 0
        if not isinstance(cache, Cache):
            raise ValueError(f"cache must be a transformers Cache (e.g. DynamicCache(config=model.config)), got "
                             f"{type(cache).__name__}")
        layer_types = self.config.layer_types
        if len(cache.layers) != len(layer_types):
            raise ValueError(f"the cache has {len(cache.layers)} layers, this model {len(layer_types)}: build it with "
                             "DynamicCache(config=model.config) for this model")
        for i, (layer_type, layer) in enumerate(zip(layer_types, cache.layers)):
            kinds = tuple(m[layer_type] for m in (DYNAMIC_LAYER_TYPE_MAPPING, STATIC_LAYER_TYPE_MAPPING) if layer_type in m)
            if not isinstance(layer, kinds):
                raise ValueError(f"cache layer {i} is a {type(layer).__name__}, but layer {i} of this model is "
                                 f"{layer_type!r}: the cache belongs to another model")
            held = _cache_layer_batch(layer)
            if held is not None and held != batch:
                raise ValueError(f"the cache holds a batch of {held} sequences, the inputs have {batch}")
        return past_length(cache)

    def _check_mask(self, attention_mask, batch: int, length: int, past: int | None) -> None:
        if attention_mask is None or isinstance(attention_mask, dict) or attention_mask.dim() != 2:
            return
        if attention_mask.shape[0] != batch:
            raise ValueError(f"attention_mask has batch {attention_mask.shape[0]}, inputs have batch {batch}")
        expected = length if past is None else past + length
        if attention_mask.shape[1] != expected and not (past is None and attention_mask.shape[1] > length):
            raise ValueError(f"attention_mask covers {attention_mask.shape[1]} tokens; it must cover the cached "
                             f"{past or 0} plus the {length} new ones ({expected})")


def _cache_layer_batch(layer) -> int | None:
    """Batch size held by one cache layer, or None while it is empty."""
    for tensor in (getattr(layer, "keys", None), *getattr(layer, "recurrent_states", {}).values()):
        if isinstance(tensor, torch.Tensor) and tensor.dim() > 0 and tensor.numel() > 0:
            return tensor.shape[0]
    return None


class HFMemoryForCausalLM(HFMemoryPreTrainedModel, GenerationMixin):
    """An architecture's ``HFMemoryModel`` with a language-modelling head (and the MoE auxiliary loss when the
    architecture records router logits)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    base_model_class: type[HFMemoryModel]

    def __init__(self, config):
        super().__init__(config)
        self.model = self.base_model_class(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @deprecate_kwarg("cache_params", "5.40.0", new_name="cache")
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        if self.config.lm_head_multiplier != 1.0:  # muP (Falcon-H1)
            logits = logits * self.config.lm_head_multiplier
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        extra, output_class = {}, CausalLMOutputWithPast
        if "router_logits" in self._can_record_outputs:
            output_class = MoeCausalLMOutputWithPast
            extra["router_logits"] = outputs.router_logits
            if outputs.router_logits:
                mask = attention_mask if isinstance(attention_mask, torch.Tensor) else None
                extra["aux_loss"] = load_balancing_loss(outputs.router_logits, self.config.num_experts,
                                                        self.config.num_experts_per_tok, mask)
                if loss is not None:
                    loss = loss + self.config.router_aux_loss_coef * extra["aux_loss"]
        return output_class(loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states,
                                 attentions=outputs.attentions, **extra)
