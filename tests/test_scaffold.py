"""The shared scaffold: an architecture is a config, a mixer table and its parameter names. A parallel hybrid
(Hymba-style: attention and SSM heads side by side in one layer, transformers' "hybrid" layer type and cache
layer) composes from the existing mixers with no change to the scaffold."""

from __future__ import annotations

import torch
from conftest import crossing_length, random_ids, tiny_config
from torch import nn

from hf_memory.configuration_utils import strict_config
from hf_memory.layers.attention import Attention
from hf_memory.modeling.jamba.configuration_jamba import JambaHybridConfig
from hf_memory.modeling.jamba.modeling_jamba import JambaHybridPreTrainedModel, build_mamba_mixer
from hf_memory.modeling_utils import HFMemoryForCausalLM, HFMemoryModel


@strict_config
class ParallelConfig(JambaHybridConfig):
    model_type = "hfm_test_parallel"
    layer_type_choices = ("linear_attention", "hybrid")


class ParallelMixer(nn.Module):
    """Attention and a Mamba mixer on the same input, averaged: a mixer that owns two mixers."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.attention = Attention(config, layer_idx, use_rope=False)
        self.ssm = build_mamba_mixer(config, layer_idx)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, cache=None, **kwargs):
        attended, weights = self.attention(hidden_states, attention_mask["full_attention"], position_embeddings,
                                           cache, **kwargs)
        scanned, _ = self.ssm(hidden_states, attention_mask=attention_mask["linear_attention"], cache=cache)
        return (attended + scanned) / 2, weights


class ParallelPreTrainedModel(JambaHybridPreTrainedModel):
    config_class = ParallelConfig
    mixers = {"hybrid": ParallelMixer, "linear_attention": build_mamba_mixer}


class ParallelModel(ParallelPreTrainedModel, HFMemoryModel):
    pass


class ParallelForCausalLM(ParallelPreTrainedModel, HFMemoryForCausalLM):
    base_model_class = ParallelModel


def test_a_parallel_hybrid_composes_from_existing_mixers_and_decodes_like_its_forward():
    torch.manual_seed(0)
    layer_types = ["linear_attention", "hybrid", "linear_attention", "hybrid"]
    config = ParallelConfig(**{**tiny_config("jamba-tiny").to_dict(), "layer_types": layer_types})
    model = ParallelForCausalLM(config).eval()
    assert any(isinstance(m, ParallelMixer) for m in model.modules())
    ids = random_ids(model.config, 2, crossing_length(model.config))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :9], use_cache=True)
        steps = [out.logits]
        for t in range(9, ids.shape[1]):
            out = model(ids[:, t : t + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits)
    assert (full - torch.cat(steps, dim=1)).abs().max() <= 1e-4
