"""Shared fixtures: every registered architecture's tiny presets, and ways to build and compare models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_memory

torch.set_num_threads(min(2, os.cpu_count() or 1))

TINY_PRESETS = [name for name in hf_memory.PRESETS if name.endswith("-tiny")]

# Per architecture: config overrides that must be rejected, and the field the error must name.
INVALID_CONFIGS = {name: architecture.invalid_configs for name, architecture in hf_memory.ARCHITECTURES.items()}


def tiny_config(name: str, **overrides):
    overrides.setdefault("attn_implementation", "eager")
    return hf_memory.get_config(name, **overrides)


def build(name: str, seed: int = 0, **overrides):
    """A tiny random causal LM from a preset, fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(name, **overrides)).eval()


def crossing_length(config) -> int:
    """A prompt length that crosses every chunk, window and segment boundary of the config at least twice."""
    spans = [getattr(config, field, None) or 0 for field in ("linear_chunk_size", "sliding_window", "segment_size")]
    if getattr(config, "mamba_version", None) == "mamba2":  # Mamba-1 has no chunks
        spans.append(config.mamba_chunk_size)
    return 2 * max(spans + [8]) + 7


def assert_same_training_step(fused, reference, length: int, pads: int, tolerance: float = 1e-3) -> None:
    """One left-padded training step through two copies of a model on the same device: the logits of real
    tokens and every parameter's gradient agree (a fused path against its reference)."""
    ids = random_ids(fused.config, 2, length).to(next(fused.parameters()).device)
    mask = torch.ones_like(ids)
    mask[1, :pads] = 0
    results = []
    for model in (fused, reference):
        out = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        out.loss.backward()
        results.append((out.logits[mask.bool()], {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=tolerance, atol=tolerance)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], rtol=tolerance, atol=tolerance, msg=name)


def random_ids(config, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, config.vocab_size, (batch, length), generator=generator)


def run_python(code: str, env_extra: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter; fail the test with its output if it exits non-zero."""
    env = {**os.environ, **(env_extra or {})}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout)
    assert result.returncode == 0, f"subprocess failed:\nSTDOUT:\n{result.stdout}\nSTDERR:\n{result.stderr}"
    return result


@pytest.fixture
def fake_hub(monkeypatch) -> list:
    """huggingface_hub.HfApi replaced, so nothing reaches the network: records each upload as (repo id, {file name:
    bytes}); create_repo puts a bare name under 'someone/' as the Hub puts it under the user."""
    import huggingface_hub

    uploads = []

    class FakeApi:
        def __init__(self, token=None):
            self.token = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id if '/' in repo_id else 'someone/' + repo_id}")

        def upload_folder(self, repo_id, folder_path, **kwargs):
            uploads.append((repo_id, {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    return uploads


@pytest.fixture(params=TINY_PRESETS)
def preset(request) -> str:
    return request.param


# Config overrides every architecture must refuse, each naming the field (typos name the closest one).
COMMON_INVALID_CONFIGS = [
    ({"rms_norm_eps": -1e-6}, "rms_norm_eps"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps"),
    ({"max_position_embeddings": 0}, "max_position_embeddings"),
    ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"hidden_size": "64"}, "hidden_size"),
    ({"hidden_act": "swishy"}, "hidden_act"),
    ({"hiden_size": 64}, "hiden_size"),
    ({"layer_types": ["mamba", "mamba"], "num_hidden_layers": 2}, "layer_types"),
    ({"num_hidden_layers": 3, "layer_types": ["full_attention", "full_attention"]}, "layer_types"),
]
