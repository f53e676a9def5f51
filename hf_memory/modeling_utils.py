"""What every hf_memory model shares: the PreTrainedModel base, padding and position helpers."""

from __future__ import annotations

import importlib
import math

import torch
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import DynamicCache

from hf_memory.layers.attention import RotaryEmbedding


def inverse_softplus_dt(size: int, dt_min: float, dt_max: float) -> torch.Tensor:
    """Mamba's time-step bias: softplus^-1(dt) with dt log-uniform in [dt_min, dt_max] (floored at 1e-4)."""
    dt = torch.exp(torch.rand(size) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=1e-4)
    return dt + torch.log(-torch.expm1(-dt))


def padding_mask(attention_mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """The 2-D [B, T] keep-mask of the current tokens (1 = real, 0 = pad), or None when there is no padding."""
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    mask = attention_mask[:, -length:]
    return None if bool(mask.all()) else mask


def positions_from_mask(attention_mask: torch.Tensor | None, length: int, past: int, device) -> torch.Tensor:
    """Position ids [B, T]: counted over real tokens when a 2-D mask is given (left padding), else past + t."""
    if attention_mask is not None and attention_mask.dim() == 2:
        positions = attention_mask.long().cumsum(-1) - 1
        return positions.clamp(min=0)[:, -length:].to(device)
    return (torch.arange(length, device=device) + past)[None]


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
    _supports_flex_attn = False
    _supports_attention_backend = True
    _is_stateful = True  # recurrent / memory state: no assisted decoding, no cache cropping

    def _embed_and_cache(self, input_ids, inputs_embeds, attention_mask, cache, use_cache):
        """Validate the inputs, embed them, and give back (embeddings, the cache to use or None)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if input_ids is not None and input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, sequence], got shape {tuple(input_ids.shape)}")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[0] != inputs_embeds.shape[0]:
            raise ValueError(
                f"attention_mask has batch {attention_mask.shape[0]}, inputs have batch {inputs_embeds.shape[0]}"
            )
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if not use_cache or (self.gradient_checkpointing and self.training):
            return inputs_embeds, None
        return inputs_embeds, DynamicCache(config=self.config) if cache is None else cache

    def _logits_and_loss(self, hidden_states, labels, logits_to_keep, **kwargs):
        """LM-head logits of the kept positions, and the shifted cross-entropy when labels are given."""
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None if labels is None else self.loss_function(logits, labels, self.vocab_size, **kwargs)
        return logits, loss

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, RotaryEmbedding):
            init.copy_(module.inv_freq, module.compute_inv_freq())

    def _from_hf_memory_package(self) -> bool:
        return type(self).__module__.startswith("hf_memory.")

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
