"""hf-memory: memory architectures of modern language models as first-class transformers models.

``import hf_memory`` registers every architecture with ``AutoConfig``, ``AutoModel`` and
``AutoModelForCausalLM``; no optional kernel package is imported here (see ``hf_memory.kernels``).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from hf_memory.modeling.gated_deltanet import configuration_gated_deltanet as _gdn_config
from hf_memory.modeling.gated_deltanet import modeling_gated_deltanet as _gdn_modeling
from hf_memory.modeling.infini_attention import configuration_infini_attention as _infini_config
from hf_memory.modeling.infini_attention import modeling_infini_attention as _infini_modeling
from hf_memory.modeling.jamba import configuration_jamba as _jamba_config
from hf_memory.modeling.jamba import modeling_jamba as _jamba_modeling
from hf_memory.presets import PRESETS, get_config, list_presets

__version__ = "0.1.0"


@dataclass(frozen=True)
class Architecture:
    name: str
    config_class: type
    auto_map: dict  # Auto* class name -> model class


ARCHITECTURES = {
    "gated_deltanet": Architecture("gated_deltanet", _gdn_config.GatedDeltaNetConfig, _gdn_modeling.AUTO_MAP),
    "jamba": Architecture("jamba", _jamba_config.JambaHybridConfig, _jamba_modeling.AUTO_MAP),
    "infini_attention": Architecture(
        "infini_attention", _infini_config.InfiniAttentionConfig, _infini_modeling.AUTO_MAP
    ),
}

_AUTO_CLASSES = {"AutoModel": AutoModel, "AutoModelForCausalLM": AutoModelForCausalLM}


def _register(architecture: Architecture) -> None:
    AutoConfig.register(architecture.config_class.model_type, architecture.config_class, exist_ok=True)
    for auto_name, model_class in architecture.auto_map.items():
        _AUTO_CLASSES[auto_name].register(architecture.config_class, model_class, exist_ok=True)


for _architecture in ARCHITECTURES.values():
    _register(_architecture)

__all__ = ["ARCHITECTURES", "PRESETS", "get_config", "list_presets", "__version__"]
