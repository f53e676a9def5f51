"""One sub-package per architecture: its configuration and modeling files (installed as hf_memory.modeling)."""
