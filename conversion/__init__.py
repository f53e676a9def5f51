"""Converters from public checkpoint formats into hf_memory architectures (installed as hf_memory.conversion)."""
