"""Validation shared by every hf_memory config: each bad value raises ``ValueError`` naming its field."""

from __future__ import annotations

from collections.abc import Iterable


def require(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ValueError(f"invalid config field `{field}`: {message}")


def require_positive(config, *fields: str) -> None:
    for field in fields:
        value = getattr(config, field)
        require(isinstance(value, int) and value > 0, field, f"must be a positive integer, got {value!r}")


def require_layer_types(config, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    layer_types = config.layer_types
    require(
        isinstance(layer_types, (list, tuple)) and len(layer_types) == config.num_hidden_layers,
        "layer_types",
        f"must list one type per layer ({config.num_hidden_layers}), got {layer_types!r}",
    )
    for i, layer_type in enumerate(layer_types):
        require(layer_type in allowed, "layer_types", f"entry {i} is {layer_type!r}; allowed: {list(allowed)}")
