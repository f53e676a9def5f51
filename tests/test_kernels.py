"""Kernel dispatch: the device decides first, then availability, then the switches; fused kernels agree
with the PyTorch references forward and backward (on CUDA, when the kernel packages are installed)."""

from __future__ import annotations

import importlib.util
import logging
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import build, random_ids, run_python

from hf_memory import kernels
from hf_memory.ops import gated_delta, short_conv

CUDA = torch.cuda.is_available()
HAS_FLA = importlib.util.find_spec("fla") is not None
HAS_CAUSAL_CONV1D = importlib.util.find_spec("causal_conv1d") is not None


@pytest.fixture
def fake_kernel(monkeypatch):
    """Pretend the fused chunk kernel is installed; it records its calls and computes with the reference."""
    calls = []

    def chunk_kernel(q, k, v, g, beta, scale, initial_state, output_final_state):
        calls.append(dict(q=q, scale=scale, initial_state=initial_state))
        return gated_delta.gated_delta_rule_chunked(q, k, v, g, beta, initial_state, scale=scale)

    monkeypatch.setitem(kernels._loaded, "chunk_gated_delta_rule", chunk_kernel)
    monkeypatch.delenv(kernels.DISABLE_ENV, raising=False)
    return calls


def _inputs(length=20, head_dim=16):
    q = F.normalize(torch.randn(2, length, 2, head_dim), dim=-1)
    k = F.normalize(torch.randn(2, length, 2, head_dim), dim=-1)
    v = torch.randn(2, length, 4, head_dim)
    g = -torch.rand(2, length, 4)
    beta = torch.rand(2, length, 4)
    return q, k, v, g, beta


def test_cpu_tensors_never_reach_a_fused_kernel_even_when_it_is_installed(fake_kernel):
    gated_delta.gated_delta_rule(*_inputs())
    assert fake_kernel == []
    assert kernels.fused_kernel("chunk_gated_delta_rule", torch.zeros(1)) is None


def test_cuda_tensors_use_the_fused_kernel_with_the_reference_layout(fake_kernel, monkeypatch):
    monkeypatch.setattr(kernels, "on_cuda", lambda *tensors: True)
    q, k, v, g, beta = _inputs()
    state = torch.randn(2, 4, 16, 16)
    o, final = gated_delta.gated_delta_rule(q, k, v, g, beta, state)
    assert len(fake_kernel) == 1
    assert fake_kernel[0]["q"].shape[2] == 4  # key heads repeated for the 4 value heads
    assert fake_kernel[0]["scale"] == 16**-0.5
    monkeypatch.setattr(kernels, "on_cuda", lambda *tensors: False)
    o_ref, final_ref = gated_delta.gated_delta_rule(q, k, v, g, beta, state)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(final, final_ref)


def test_one_step_kernel_receives_the_gate_and_beta_by_name_under_flash_linear_attentions_signature(monkeypatch):
    """flash-linear-attention >= 0.4 declares ``(q, k, v, g, gk, gv, beta, scale, ...)``: a beta passed fifth
    would become a key-wise gate (this decoded wrong on an H200 before it was passed by name)."""
    calls = []

    def fused_recurrent(q, k, v, g=None, gk=None, gv=None, beta=None, scale=None, initial_state=None,
                        output_final_state=False):
        calls.append(dict(gk=gk, gv=gv))
        return gated_delta.gated_delta_rule_recurrent(q, k, v, g, beta, initial_state)

    monkeypatch.setitem(kernels._loaded, "fused_recurrent_gated_delta_rule", fused_recurrent)
    monkeypatch.delenv(kernels.DISABLE_ENV, raising=False)
    monkeypatch.setattr(kernels, "on_cuda", lambda *tensors: True)
    q, k, v, g, beta = _inputs(length=1)
    state = torch.randn(2, 4, 16, 16)
    o, final = gated_delta.gated_delta_rule(q, k, v, g, beta, state)
    assert calls == [dict(gk=None, gv=None)]
    o_ref, final_ref = gated_delta.gated_delta_rule(q, k, v, g, beta, state, use_fused_kernels=False)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(final, final_ref)


def test_a_single_token_that_needs_a_gradient_takes_the_chunk_kernel(fake_kernel, monkeypatch):
    """flash-linear-attention's one-step kernel is forward-only (its backward raises NotImplementedError)."""
    monkeypatch.setitem(kernels._loaded, "fused_recurrent_gated_delta_rule",
                        lambda *args, **kwargs: pytest.fail("forward-only kernel used under autograd"))
    monkeypatch.setattr(kernels, "on_cuda", lambda *tensors: True)
    q, k, v, g, beta = _inputs(length=1)
    gated_delta.gated_delta_rule(q, k, v.requires_grad_(), g, beta)
    assert len(fake_kernel) == 1


def test_head_sizes_below_16_take_the_reference(fake_kernel, monkeypatch):
    """flash-linear-attention multiplies with tl.dot, which needs dimensions of at least 16."""
    monkeypatch.setattr(kernels, "on_cuda", lambda *tensors: True)
    gated_delta.gated_delta_rule(*_inputs(head_dim=8))
    assert fake_kernel == []
    gated_delta.gated_delta_rule(*_inputs(head_dim=16))
    assert len(fake_kernel) == 1


@pytest.mark.parametrize("switch", ["config", "env-all", "env-op"])
def test_kernels_can_be_forced_off_by_config_or_environment(fake_kernel, monkeypatch, switch):
    monkeypatch.setattr(kernels, "on_cuda", lambda *tensors: True)
    enabled = switch != "config"
    if switch == "env-all":
        monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    if switch == "env-op":
        monkeypatch.setenv(kernels.DISABLE_ENV, "causal_conv1d_fn, chunk_gated_delta_rule")
    gated_delta.gated_delta_rule(*_inputs(), use_fused_kernels=enabled)
    assert fake_kernel == []


def test_each_choice_is_logged_once(fake_kernel, monkeypatch, caplog):
    monkeypatch.setattr(kernels, "_logged", set())
    with caplog.at_level(logging.INFO, logger="hf_memory.kernels"):
        for _ in range(3):
            gated_delta.gated_delta_rule(*_inputs())
    assert [r.getMessage() for r in caplog.records] == ["hf_memory: chunk_gated_delta_rule -> reference"]


def test_model_config_switch_reaches_every_layer():
    model = build("gated-deltanet-tiny", use_fused_kernels=False)
    assert all(not layer.mixer.use_fused_kernels for layer in model.model.layers)


def test_import_registers_architectures_without_importing_any_kernel_package():
    run_python(textwrap.dedent("""
        import sys
        kernel_packages = lambda: {m for m in sys.modules if m.split(".")[0] in {"fla", "causal_conv1d", "mamba_ssm", "triton"}}
        # what transformers itself loads (its masking utilities import triton when it is installed)
        import transformers.cache_utils, transformers.generation, transformers.masking_utils, transformers.modeling_utils
        baseline = kernel_packages()
        import hf_memory
        from transformers import AutoConfig
        AutoConfig.for_model("hfm_gated_deltanet")
        assert kernel_packages() == baseline, sorted(kernel_packages() - baseline)
    """))


def test_model_types_do_not_collide_with_transformers_or_flash_linear_attention():
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    import hf_memory

    fla_model_types = {"gated_deltanet", "delta_net", "gla", "mamba", "mamba2", "samba", "hgrn", "rwkv7", "titans"}
    for architecture in hf_memory.ARCHITECTURES.values():
        model_type = architecture.config_class.model_type
        assert model_type not in CONFIG_MAPPING_NAMES and model_type not in fla_model_types
        assert model_type.startswith("hfm_")


# ------------------------------------------------------------------------------------------ CUDA only
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")


@gpu
@pytest.mark.skipif(not HAS_FLA, reason="needs flash-linear-attention")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length", [1, 100, 256])
def test_fla_gated_delta_rule_matches_reference_forward_and_backward(dtype, length):
    torch.manual_seed(0)
    q, k, v, g, beta = (t.cuda() for t in _inputs(length, head_dim=32))
    state = torch.randn(2, 4, 32, 32, device="cuda") * 0.1
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)] + [g.requires_grad_(), beta.to(dtype).requires_grad_()]
    results = {}
    for use_fused_kernels in (True, False):
        for t in leaves:
            t.grad = None
        o, final = gated_delta.gated_delta_rule(*leaves, state, use_fused_kernels=use_fused_kernels)
        (o.float().square().sum() + final.sum()).backward()
        results[use_fused_kernels] = [o.float(), final] + [t.grad.float() for t in leaves]
    tolerance = 1e-3 if dtype == torch.float32 else 5e-2
    for fused, reference in zip(results[True], results[False]):
        torch.testing.assert_close(fused, reference, rtol=tolerance, atol=tolerance)


@gpu
@pytest.mark.skipif(not HAS_FLA, reason="needs flash-linear-attention")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fla_one_step_kernel_matches_the_recurrence_when_decoding(dtype):
    torch.manual_seed(0)
    q, k, v, g, beta = (t.cuda().to(dtype) if t.dim() == 4 else t.cuda() for t in _inputs(1, head_dim=32))
    state = torch.randn(2, 4, 32, 32, device="cuda") * 0.1
    with torch.no_grad():
        fused, reference = (gated_delta.gated_delta_rule(q, k, v, g, beta, state, use_fused_kernels=flag)
                            for flag in (True, False))
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    for a, b in zip(fused, reference):
        torch.testing.assert_close(a.float(), b.float(), rtol=tolerance, atol=tolerance)


@gpu
@pytest.mark.skipif(not HAS_CAUSAL_CONV1D, reason="needs causal-conv1d")
def test_causal_conv1d_kernel_matches_reference_forward_and_backward():
    torch.manual_seed(0)
    x = torch.randn(2, 64, 50, device="cuda", requires_grad=True)
    weight = torch.randn(64, 4, device="cuda", requires_grad=True)
    outputs = []
    for use_fused_kernels in (True, False):
        x.grad = weight.grad = None
        y = short_conv.short_conv(x, weight, None, "silu", use_fused_kernels=use_fused_kernels)
        y.square().sum().backward()
        outputs.append((y, x.grad.clone(), weight.grad.clone()))
    for fused, reference in zip(*outputs):
        torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-4)


@gpu
def test_model_on_cuda_gives_the_same_logits_with_and_without_kernels(preset):
    fused, reference = (build(preset, use_fused_kernels=flag).cuda() for flag in (True, False))
    ids = random_ids(fused.config, 2, 70).cuda()
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, reference(ids).logits, rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------------------------- Mamba-1 scan
HAS_MAMBA_SSM = importlib.util.find_spec("mamba_ssm") is not None


def _mamba_inputs(length=20, device="cpu"):
    generator = torch.Generator().manual_seed(0)
    u = torch.randn(2, 16, length, generator=generator)
    delta = F.softplus(torch.randn(2, 16, length, generator=generator))
    A = -torch.rand(16, 4, generator=generator) * 3
    B = torch.randn(2, 4, length, generator=generator)
    C = torch.randn(2, 4, length, generator=generator)
    D = torch.randn(16, generator=generator)
    return [t.to(device) for t in (u, delta, A, B, C, D)]


def test_selective_scan_uses_the_prefill_kernel_only_from_an_empty_state(monkeypatch):
    from hf_memory.ops import selective_scan as scan_ops

    calls = []

    def prefill_kernel(u, delta, A, B, C, D, return_last_state):
        calls.append(u.shape)
        return scan_ops.selective_scan_sequential(u, delta, A, B, C, D)

    monkeypatch.setitem(kernels._loaded, "selective_scan_fn", prefill_kernel)
    monkeypatch.delenv(kernels.DISABLE_ENV, raising=False)
    u, delta, A, B, C, D = _mamba_inputs()
    scan_ops.selective_scan(u, delta, A, B, C, D)
    assert calls == []  # CPU tensors
    monkeypatch.setattr(kernels, "on_cuda", lambda *tensors: True)
    y, state = scan_ops.selective_scan(u, delta, A, B, C, D)
    assert calls == [u.shape]
    y_ref, state_ref = scan_ops.selective_scan_sequential(u, delta, A, B, C, D)
    torch.testing.assert_close(y, y_ref)
    scan_ops.selective_scan(u, delta, A, B, C, D, initial_state=state)  # a continuation: reference path
    assert len(calls) == 1


def test_one_step_kernel_is_skipped_when_a_gradient_is_needed(monkeypatch):
    from hf_memory.ops import selective_scan as scan_ops

    calls = []
    monkeypatch.setitem(kernels._loaded, "selective_state_update", lambda *args, **kwargs: calls.append(1))
    monkeypatch.setattr(kernels, "on_cuda", lambda *tensors: True)
    u, delta, A, B, C, D = (t[..., :1] if t.dim() == 3 else t for t in _mamba_inputs())
    state = torch.zeros(2, 16, 4, requires_grad=True)
    scan_ops.selective_scan(u, delta, A, B, C, D, initial_state=state)
    assert calls == []


@gpu
@pytest.mark.skipif(not HAS_MAMBA_SSM, reason="needs mamba-ssm")
@pytest.mark.parametrize("length", [1, 100])
def test_mamba_ssm_selective_scan_matches_reference_forward_and_backward(length):
    from hf_memory.ops import selective_scan as scan_ops

    leaves = [t.requires_grad_() for t in _mamba_inputs(length, "cuda")]
    state = torch.randn(2, 16, 4, device="cuda") if length == 1 else None
    results = {}
    for use_fused_kernels in (True, False):
        for t in leaves:
            t.grad = None
        with torch.set_grad_enabled(length > 1):  # the one-step kernel is inference-only
            y, final = scan_ops.selective_scan(*leaves, initial_state=state, use_fused_kernels=use_fused_kernels)
            outputs = [y, final]
            if length > 1:
                (y.square().sum() + final.sum()).backward()
                outputs += [t.grad.clone() for t in leaves]
        results[use_fused_kernels] = outputs
    for fused, reference in zip(results[True], results[False]):
        torch.testing.assert_close(fused, reference, rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------- the project's Triton kernels
HAS_TRITON = importlib.util.find_spec("triton") is not None


TRITON_MEMORY_CHECK = """
        import torch
        from hf_memory.ops.compressive_memory import empty_memory, retrieve, update
        from hf_memory.ops.triton_memory import memory_retrieve
        torch.manual_seed(0)
        torch.set_default_device(DEVICE)
        q = torch.randn(2, 4, 21, 16)
        k, v = torch.randn(2, 2, 21, 16), torch.randn(2, 2, 21, 32)
        memory, norm = update(*empty_memory(k, v), k, v, rule="delta")
        leaves = [t.clone().requires_grad_() for t in (q, memory, norm)]
        results = []
        for read in (memory_retrieve, retrieve):
            for t in leaves:
                t.grad = None
            out = read(*leaves, eps=1e-6)
            out.square().sum().backward()
            results.append([out] + [t.grad.clone() for t in leaves])
        for fused, reference in zip(*results):
            assert (fused - reference).abs().max() <= 1e-5 * max(1.0, reference.abs().max().item()), \\
                (fused - reference).abs().max()
        from hf_memory.ops.triton_memory import memory_write
        keep = torch.ones(2, 21)
        keep[0, :5] = 0
        for rule in ("linear", "delta"):
            leaves = [t.clone().requires_grad_() for t in (memory, norm, k, v)]
            results = []
            for write in (memory_write, update):
                for t in leaves:
                    t.grad = None
                new_memory, new_norm = write(*leaves, keep, rule)
                (new_memory.square().sum() + new_norm.square().sum()).backward()
                results.append([new_memory, new_norm] + [t.grad.clone() for t in leaves])
            for fused, reference in zip(*results):
                assert (fused - reference).abs().max() <= 1e-5 * max(1.0, reference.abs().max().item()), rule
        print("ok")
"""


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_triton_memory_read_and_write_match_reference_forward_and_backward_under_the_interpreter():
    # TRITON_INTERPRET is read when triton is imported: the fresh process runs the kernels on CPU
    run_python('DEVICE = "cpu"' + textwrap.dedent(TRITON_MEMORY_CHECK), env_extra={"TRITON_INTERPRET": "1"})


@gpu
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_triton_memory_read_and_write_match_reference_forward_and_backward_on_cuda():
    run_python('DEVICE = "cuda"' + textwrap.dedent(TRITON_MEMORY_CHECK), env_extra={"TRITON_INTERPRET": "0"})


def test_memory_read_dispatches_to_the_triton_kernel_only_for_cuda_and_supported_dims(monkeypatch):
    from hf_memory.ops import compressive_memory

    calls = []
    monkeypatch.setitem(kernels._loaded, "compressive_memory_retrieve",
                        lambda q, m, z, eps: calls.append(q.shape) or compressive_memory.retrieve(q, m, z, eps))
    monkeypatch.delenv(kernels.DISABLE_ENV, raising=False)
    q, memory, norm = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 16, 16).abs(), torch.rand(1, 2, 16)
    compressive_memory.read_memory(q, memory, norm)
    assert calls == []  # CPU
    monkeypatch.setattr(kernels, "on_cuda", lambda *tensors: True)
    compressive_memory.read_memory(q, memory, norm)
    assert len(calls) == 1
    compressive_memory.read_memory(q[..., :12], memory[:, :, :12], norm[..., :12])  # d_k = 12: reference
    compressive_memory.read_memory(q, memory, norm, use_fused_kernels=False)
    assert len(calls) == 1
    writes = []
    monkeypatch.setitem(kernels._loaded, "compressive_memory_write",
                        lambda *args: writes.append(1) or compressive_memory.update(*args))
    k, v = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
    compressive_memory.write_memory(memory, norm, k, v, None, "delta")
    compressive_memory.write_memory(memory, norm, k, v, None, "delta", use_fused_kernels=False)
    assert writes == [1]
