"""Model card templates, one per architecture, rendered by hf_memory.export."""
