"""Converters from public checkpoint formats into hf_memory architectures and back (installed as
hf_memory.conversion). Each format's module is imported only when it is asked for."""

from __future__ import annotations

import importlib

# (direction, format) -> (module, function)
CONVERTERS = {
    ("from", "jamba"): ("hf_memory.conversion.jamba", "convert_from_jamba"),
    ("to", "jamba"): ("hf_memory.conversion.jamba", "convert_to_jamba"),
    ("from", "llama"): ("hf_memory.conversion.llama", "convert_from_llama"),
}


def converter(direction: str, fmt: str):
    """The function converting ``direction`` ("from" / "to") the public format ``fmt``."""
    if (direction, fmt) not in CONVERTERS:
        known = sorted(f"--{d} {f}" for d, f in CONVERTERS)
        raise ValueError(f"no converter {direction} {fmt!r}; available: {known}")
    module, function = CONVERTERS[(direction, fmt)]
    return getattr(importlib.import_module(module), function)
