"""hf-memory: memory architectures of modern language models as first-class transformers models.

``import hf_memory`` registers every architecture with ``AutoConfig``, ``AutoModel`` and
``AutoModelForCausalLM``; no optional kernel package is imported here (see ``hf_memory.kernels``).
An architecture is its folder ``modeling/<name>/`` (declaring ``ARCHITECTURE``) and its name below.
"""

from __future__ import annotations

import importlib

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from hf_memory.presets import get_config, list_presets
from hf_memory.registry import Architecture, Preset

__version__ = "0.1.0"

ARCHITECTURE_NAMES = ("gated_deltanet", "jamba", "hymba", "infini_attention", "rmt", "mor", "titans")

ARCHITECTURES: dict[str, Architecture] = {
    name: importlib.import_module(f"hf_memory.modeling.{name}").ARCHITECTURE for name in ARCHITECTURE_NAMES
}
PRESETS: dict[str, Preset] = {name: p for a in ARCHITECTURES.values() for name, p in a.presets.items()}

_AUTO_CLASSES = {"AutoModel": AutoModel, "AutoModelForCausalLM": AutoModelForCausalLM}

for _architecture in ARCHITECTURES.values():
    AutoConfig.register(_architecture.config_class.model_type, _architecture.config_class, exist_ok=True)
    for _auto_name, _model_class in _architecture.auto_map.items():
        _AUTO_CLASSES[_auto_name].register(_architecture.config_class, _model_class, exist_ok=True)

__all__ = ["ARCHITECTURES", "PRESETS", "get_config", "list_presets", "__version__"]
