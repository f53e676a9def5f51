"""Named configurations, declared by each architecture in its folder (``modeling/<name>/__init__.py``): a
``<name>-tiny`` preset (seconds on CPU; used by tests, docs and the demo) and the sizes published in its
paper, with their source."""

from __future__ import annotations


def list_presets() -> dict[str, str]:
    """Preset name -> its source."""
    from hf_memory import PRESETS

    return {name: preset.source for name, preset in PRESETS.items()}


def get_config(name: str, **overrides):
    """The config of preset ``name``, with ``overrides`` applied (validated like any config; a key that is no
    field of the architecture's config is refused, naming the closest one)."""
    from hf_memory import ARCHITECTURES, PRESETS
    from hf_memory.configuration_utils import reject_unknown_keys

    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    preset = PRESETS[name]
    config_class = ARCHITECTURES[preset.architecture].config_class
    reject_unknown_keys(config_class, overrides)
    return config_class(**{**preset.config, **overrides})
