"""Shared nn.Modules: norms, attention, MLP. Every architecture reuses these instead of writing its own."""
