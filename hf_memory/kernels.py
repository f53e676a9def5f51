"""Kernel dispatch: one place that decides, per operator and per call, fused kernel or PyTorch reference.

A fused kernel is used only when all of these hold:
  * the tensors are on CUDA (transformers' Qwen3-Next sends CPU tensors to Triton kernels and crashes;
    here the device decides first),
  * the optional package imports (it is imported lazily, on the first CUDA call, never at import time),
  * the caller did not switch kernels off (``use_fused_kernels=False`` in the config or the op call) and the environment variable
    ``HF_MEMORY_DISABLE_KERNELS`` does not name the operator (a comma list, or ``1``/``all`` for every one).

Each choice is logged once per (operator, implementation).
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable

import torch

logger = logging.getLogger("hf_memory.kernels")

DISABLE_ENV = "HF_MEMORY_DISABLE_KERNELS"

# operator name -> (module, attribute) of the fused implementation
FUSED_KERNELS: dict[str, tuple[str, str]] = {
    "chunk_gated_delta_rule": ("fla.ops.gated_delta_rule", "chunk_gated_delta_rule"),
    "fused_recurrent_gated_delta_rule": ("fla.ops.gated_delta_rule", "fused_recurrent_gated_delta_rule"),
    "causal_conv1d_fn": ("causal_conv1d", "causal_conv1d_fn"),
    "mamba_chunk_scan_combined": ("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined"),
    "selective_state_update": ("mamba_ssm.ops.triton.selective_state_update", "selective_state_update"),
    "selective_scan_fn": ("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn"),
    "flex_attention": ("hf_memory.ops.position_masked_attention", "compiled_flex_attention"),
    # the project's own Triton kernels
    "compressive_memory_retrieve": ("hf_memory.ops.triton_memory", "memory_retrieve"),
    "compressive_memory_write": ("hf_memory.ops.triton_memory", "memory_write"),
    "neural_memory": ("hf_memory.ops.triton_neural_memory", "neural_memory_fused"),
}

_loaded: dict[str, Callable | None] = {}
_logged: set[tuple[str, str]] = set()


def kernels_disabled(op: str) -> bool:
    """Whether the environment switches the fused kernel for ``op`` off."""
    value = os.environ.get(DISABLE_ENV, "").strip().lower()
    if value in ("1", "true", "all", "yes"):
        return True
    return op.lower() in {v.strip() for v in value.split(",") if v.strip()}


def _load(op: str) -> Callable | None:
    if op not in _loaded:
        module_name, attr = FUSED_KERNELS[op]
        try:
            _loaded[op] = getattr(importlib.import_module(module_name), attr)
        except Exception as error:  # ImportError, or a CUDA/Triton setup error raised at import
            logger.info("hf_memory: fused kernel %s unavailable (%s); using the PyTorch reference", op, error)
            _loaded[op] = None
    return _loaded[op]


def _log_once(op: str, choice: str) -> None:
    if torch.compiler.is_compiling():  # a logger call would break the compiled graph
        return
    if (op, choice) not in _logged:
        _logged.add((op, choice))
        logger.info("hf_memory: %s -> %s", op, choice)


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will need a backward through these tensors (forward-only kernels must then be skipped)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def on_cuda(*tensors: torch.Tensor) -> bool:
    return all(t.is_cuda for t in tensors if t is not None)


def fused_kernel(op: str, *tensors: torch.Tensor, use_fused_kernels: bool = True) -> Callable | None:
    """Return the fused implementation of ``op`` for these tensors, or ``None`` for the PyTorch reference."""
    if op not in FUSED_KERNELS:
        raise KeyError(f"unknown operator {op!r}; known: {sorted(FUSED_KERNELS)}")
    kernel = _load(op) if (use_fused_kernels and on_cuda(*tensors) and not kernels_disabled(op)) else None
    _log_once(op, "fused" if kernel is not None else "reference")
    return kernel
