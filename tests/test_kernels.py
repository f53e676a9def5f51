"""Kernel dispatch: the device decides first, then availability, then the switches; fused kernels agree
with the PyTorch references forward and backward (on CUDA, when the kernel packages are installed)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import textwrap
from pathlib import Path

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


@pytest.mark.parametrize("new_tokens", [1, 3, 16, 17])  # 17: past the direct path, conv1d again
@pytest.mark.parametrize("history_length", [0, 2, 3, 6])
def test_short_conv_after_a_history_equals_the_conv_over_history_and_input(new_tokens, history_length):
    """Decode's direct windows x weights path (and conv1d beyond it) = the definition over the concatenation, with
    gradients; histories shorter than the kernel see zeros before the start."""
    torch.manual_seed(0)
    x = torch.randn(2, 24, new_tokens, requires_grad=True)
    history, weight, bias = torch.randn(2, 24, history_length), torch.randn(24, 4, requires_grad=True), torch.randn(24)
    y = short_conv.short_conv(x, weight, bias, "silu", history=history)
    reference = short_conv.causal_conv1d_reference(torch.cat([history, x], -1), weight, bias, "silu")[..., -new_tokens:]
    torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(y.square().sum(), (x, weight))
    for got, want in zip(grads, torch.autograd.grad(reference.square().sum(), (x, weight))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


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
# triton < 3.7's interpreter hands scalar arguments over as 1-element arrays, which NumPy 2 will not take as a loop
# bound (TypeError: only 0-dimensional arrays can be converted to Python scalars; seen with 3.6.0)
TRITON_INTERPRETER = HAS_TRITON and tuple(int(p) for p in importlib.metadata.version("triton").split(".")[:2]) >= (3, 7)
interpreter = pytest.mark.skipif(not TRITON_INTERPRETER, reason="needs triton >= 3.7 (its CPU interpreter)")


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


@interpreter
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


NEURAL_MEMORY_CHECK = """
        import torch
        import torch.nn.functional as F
        from hf_memory.ops.neural_memory import neural_memory_chunked
        from hf_memory.ops.triton_neural_memory import neural_memory_fused
        torch.manual_seed(0)
        torch.set_default_device(DEVICE)
        torch.set_float32_matmul_precision(PRECISION)  # the kernel's: "highest" -> tf32x3, "high" -> tf32
        B, H, T, D, C = 2, 2, 48, 24, 16  # head size 24, hidden 80: padded, and two blocks of hidden units
        cases = [(2, None, 1.0), (1, None, None), (1, [48, 37], 0.05), (2, [48, 37], None), (2, [10, 48], 0.05)]
        for depth, lengths, max_grad_norm in cases:
            if PRECISION == "high" and max_grad_norm is None:
                continue  # unclipped steps of 0.5 amplify TF32 rounding chaotically (off by 128 on an H200)
            hidden = 80 if depth == 2 else D
            q, k = (F.normalize(torch.randn(B, H, T, D), dim=-1) for _ in range(2))
            v = torch.randn(B, H, T, D)
            theta, eta, alpha = torch.rand(B, H, T) * 0.5, 0.5 + 0.5 * torch.rand(B, H, T), torch.rand(B, H, T) * 0.1
            sizes = [D] + [hidden] * (depth - 1) + [D]
            weights = [torch.randn(B, H, a, b) / a ** 0.5 for a, b in zip(sizes, sizes[1:])]
            momentum = [torch.randn_like(w) * 0.01 for w in weights]
            lengths = None if lengths is None else torch.tensor(lengths)
            real = torch.ones(B, T, dtype=torch.bool) if lengths is None else torch.arange(T)[None] < lengths[:, None]
            real = real[:, None, :, None]
            leaves = [t.clone().requires_grad_() for t in (q, k, v, theta, eta, alpha, *weights, *momentum)]
            results = []
            for memory in (neural_memory_fused, neural_memory_chunked):
                for t in leaves:
                    t.grad = None
                y, w, s = memory(*leaves[:6], leaves[6:6 + depth], leaves[6 + depth:], chunk_size=C,
                                 max_grad_norm=max_grad_norm, lengths=lengths)
                loss = (y * real).square().sum() + sum((x * torch.cos(x.detach())).sum() for x in w + s)
                loss.backward()
                results.append([y * real, *w, *s] + [t.grad.clone() for t in leaves])
            for index, (fused, reference) in enumerate(zip(*results)):
                error = (fused - reference).abs().max().item()
                assert error <= TOLERANCE * max(1.0, reference.abs().max().item()), (depth, lengths, index, error)
        print("ok")
"""


@interpreter
def test_triton_neural_memory_matches_the_chunked_reference_forward_and_backward_under_the_interpreter():
    run_python('DEVICE, PRECISION, TOLERANCE = "cpu", "highest", 1e-5' + textwrap.dedent(NEURAL_MEMORY_CHECK),
               env_extra={"TRITON_INTERPRET": "1"})


@gpu
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("precision, tolerance", [("highest", 1e-5), ("high", 1e-2)])
def test_triton_neural_memory_matches_the_chunked_reference_forward_and_backward_on_cuda(precision, tolerance):
    """tf32x3 (PyTorch's default "highest") to fp32 rounding; tf32 ("high", 10 mantissa bits on both sides) within
    1% on the clipped cases (the model's default): a wrong coefficient or a missed commit is off by O(1)."""
    settings = f'DEVICE, PRECISION, TOLERANCE = "cuda", "{precision}", {tolerance}'
    run_python(settings + textwrap.dedent(NEURAL_MEMORY_CHECK), env_extra={"TRITON_INTERPRET": "0"})


def test_neural_memory_dispatches_to_the_triton_kernel_only_for_cuda_and_the_sizes_it_covers(monkeypatch):
    from hf_memory.ops import neural_memory as memory_ops

    calls = []
    monkeypatch.setitem(kernels._loaded, "neural_memory",
                        lambda *args, **kwargs: calls.append(len(args[6])) or memory_ops.neural_memory_chunked(
                            *args, **kwargs))
    monkeypatch.delenv(kernels.DISABLE_ENV, raising=False)

    def run(depth=2, dim=16, chunk_size=16, requires_grad=False, **kwargs):
        q = torch.randn(1, 2, 128, dim, requires_grad=requires_grad)
        gates = [torch.rand(1, 2, 128) * 0.5 for _ in range(3)]
        sizes = [dim] + [2 * dim] * (depth - 1) + [dim]
        weights = [torch.randn(1, 2, a, b) for a, b in zip(sizes, sizes[1:])]
        memory_ops.neural_memory(q, q, q, *gates, weights, chunk_size=chunk_size, **kwargs)

    run()
    assert calls == []  # CPU
    monkeypatch.setattr(kernels, "on_cuda", lambda *tensors: True)
    run()
    run(depth=1, dim=24)
    assert calls == [2, 1]
    run(depth=3)  # deeper memories, heads below 16 or above 128, chunks of 8 or 128, kernels off: the reference
    run(dim=8)
    run(dim=160)
    run(chunk_size=8)
    run(chunk_size=128)
    run(use_fused_kernels=False)
    assert calls == [2, 1]
    run(requires_grad=True)  # training: the reference (the kernel's backward is PyTorch's recomputation)
    with torch.no_grad():
        run(requires_grad=True)
    assert calls == [2, 1, 2]
    calls.pop()
    run(dim=96, chunk_size=64)  # depth 2 in tf32x3 ("highest"): 64 x 128 padded entries do not fit; in tf32 they do
    run(dim=64, chunk_size=64)
    run(dim=96, chunk_size=32)
    run(depth=1, dim=96, chunk_size=64)
    assert calls == [2, 1, 2, 2, 1]
    torch.set_float32_matmul_precision("high")
    try:
        run(dim=96, chunk_size=64)
    finally:
        torch.set_float32_matmul_precision("highest")
    assert calls == [2, 1, 2, 2, 1, 2]


def check_titans_logits_with_and_without_the_triton_memory(device: str) -> None:
    """Without gradients (where the dispatch picks the kernel), Titans MAC / MAG / MAL with rows out of step: the
    kernel ran, and the logits equal the reference's. (Training takes the reference; the kernel's own backward is
    checked against it above.)"""
    kernel, calls = kernels._load("neural_memory"), []
    kernels._loaded["neural_memory"] = lambda *args, **kwargs: calls.append(1) or kernel(*args, **kwargs)
    try:
        for variant in ("mac", "mag", "mal"):
            overrides = dict(memory_chunk_size=16, segment_size=32, sliding_window=24)  # the kernel's smallest chunk
            models = [build(f"titans-{variant}-tiny", use_fused_kernels=flag, **overrides).to(device).eval()
                      for flag in (True, False)]
            ids = random_ids(models[0].config, 2, 70).to(device)
            mask = torch.ones_like(ids)
            mask[0, :9] = 0  # row 0 closes its chunks 9 tokens later
            calls.clear()
            with torch.no_grad():
                logits = [model(ids, attention_mask=mask).logits[mask.bool()] for model in models]
            assert calls, variant
            torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-5)
    finally:
        kernels._loaded["neural_memory"] = kernel


@gpu
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_titans_on_cuda_runs_the_triton_memory_and_gives_the_same_logits():
    check_titans_logits_with_and_without_the_triton_memory("cuda")


@interpreter
def test_titans_with_the_triton_memory_under_the_interpreter_runs_it_and_gives_the_same_logits():
    """The same check on CPU: the dispatch told it is on CUDA, the kernel run by triton's interpreter."""
    path = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    run_python("from hf_memory import kernels\n"
               "kernels.on_cuda = lambda *tensors: True\n"
               "from test_kernels import check_titans_logits_with_and_without_the_triton_memory as check\n"
               "check('cpu')\n", env_extra={"TRITON_INTERPRET": "1", "PYTHONPATH": path})


HOPPER_SHARED_MEMORY = 232448  # bytes a kernel may ask for on an H100 / H200 SM (the limit Triton reports there)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("depth, head_size, chunk, precision", [
    (1, 128, 64, "tf32x3"), (2, 128, 64, "tf32"), (2, 128, 32, "tf32x3"), (2, 64, 64, "tf32x3")])
def test_triton_neural_memory_fits_a_hopper_sm_at_the_largest_sizes_it_accepts(depth, head_size, chunk, precision):
    """Compiled for sm_90 ahead of time (no GPU needed), with the launch's options: at the largest sizes
    ``fused_fits`` lets through for each depth and precision the kernel's shared memory stays under the SM's limit.
    (An H200 refused 312 KiB at head size 96 before the hidden units went in blocks and the loops to one stage;
    tf32x3 at depth 2 with 64 x 128 padded entries asks for 416 KiB, which ``fused_fits`` keeps out.)"""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from hf_memory.ops import neural_memory as memory_ops
    from hf_memory.ops import triton_neural_memory as fused

    torch.set_float32_matmul_precision("highest" if precision == "tf32x3" else "high")
    try:
        assert memory_ops.fused_fits(head_size, 2 * head_size, depth, chunk)
        twice = memory_ops.fused_fits(head_size, 2 * head_size, depth, 2 * chunk)
        assert depth == 1 or precision == "tf32" or not twice  # the limit of what tf32x3 takes at depth 2
    finally:
        torch.set_float32_matmul_precision("highest")
    kernel = fused._linear_memory_kernel if depth == 1 else fused._mlp_memory_kernel
    constants = dict(D=head_size, D_PAD=triton.next_power_of_2(head_size), C=chunk, CLIP=True, SAVE=True,
                     PRECISION=precision)
    if depth == 2:
        constants.update(DH=2 * head_size, BH=fused.hidden_block(2 * head_size))  # blocks: the width does not matter
    signature = {name: "*i32" if name == "lengths_ptr" else "*fp32" for name in kernel.arg_names
                 if name.endswith("_ptr")}
    signature.update(length="i32", heads="i32", max_grad_norm="fp32", **dict.fromkeys(constants, "constexpr"))
    source = ASTSource(kernel, signature, constexprs={(kernel.arg_names.index(k),): v for k, v in constants.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=fused.LAUNCH)
    assert compiled.metadata.shared <= HOPPER_SHARED_MEMORY, compiled.metadata.shared
