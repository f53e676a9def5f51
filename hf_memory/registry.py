"""What an architecture declares to be registered: ``ARCHITECTURE = Architecture(...)`` in its folder's
``__init__.py`` (``modeling/<name>/``), plus its name in ``hf_memory.ARCHITECTURE_NAMES``. Nothing else in the
package names an architecture."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Preset:
    """A named configuration: ``config`` overrides of the architecture's config class, and where they come from
    (``arXiv`` for the sizes a paper published; ``-tiny`` presets are the seconds-on-CPU sizes of the tests)."""

    config: dict
    source: str
    architecture: str = ""  # filled by Architecture


@dataclass(frozen=True)
class Architecture:
    name: str
    config_class: type
    auto_map: dict  # Auto* class name -> model class
    presets: dict[str, Preset] = field(default_factory=dict)
    # config overrides the architecture must refuse, and the field its ValueError names (the conformance suite
    # checks them; fields every architecture shares are checked for all)
    invalid_configs: list[tuple[dict, str]] = field(default_factory=list)

    def __post_init__(self):
        for name, preset in self.presets.items():
            object.__setattr__(self.presets[name], "architecture", self.name)
