"""Mamba-2 SSD operator: the chunked form equals the recurrence (forward and backward), dt = 0 steps are neutral,
parity with an independent implementation (transformers' Mamba-2 torch path and the closed form), kernel dispatch
(CPU never reaches a fused kernel), and, on CUDA with mamba_ssm, the Triton kernels against the reference."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys

import pytest
import torch

from hf_memory import kernels
from hf_memory.ops import ssd as ssd_ops
from hf_memory.ops.ssd import ssd, ssd_chunked, ssd_recurrent

CUDA = torch.cuda.is_available()
HAS_MAMBA_SSM = importlib.util.find_spec("mamba_ssm") is not None
ATOL = 1e-5  # fp32 max abs error allowed between exact forms


def _inputs(batch=2, length=37, heads=4, head_dim=8, groups=2, state_size=16, seed=0, device="cpu"):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device)

    x = randn(batch, length, heads, head_dim)
    dt = (torch.rand(batch, length, heads, generator=generator) * 0.5 + 0.01).to(device)  # already softplus'd
    A = -(torch.rand(heads, generator=generator) * 3 + 0.1).to(device)
    B = randn(batch, length, groups, state_size)
    C = randn(batch, length, groups, state_size)
    D = randn(heads)
    state = randn(batch, heads, head_dim, state_size)
    return x, dt, A, B, C, D, state


def _max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _one_token_at_a_time(x, dt, A, B, C, D, state):
    outputs = []
    for t in range(x.shape[1]):
        y, state = ssd(x[:, t : t + 1], dt[:, t : t + 1], A, B[:, t : t + 1], C[:, t : t + 1], D, state)
        outputs.append(y)
    return torch.cat(outputs, dim=1), state


@pytest.mark.parametrize("groups", [1, 4], ids=["G=1", "G=H"])
@pytest.mark.parametrize(
    "length,chunk_size", [(1, 64), (5, 4), (16, 16), (37, 8), (37, 64), (100, 16), (150, 64)]
)
def test_chunked_equals_recurrent_equals_token_by_token(length, chunk_size, groups):
    x, dt, A, B, C, D, state = _inputs(length=length, groups=groups)
    for use_d, use_state in [(False, False), (True, True), (True, False), (False, True)]:
        d, s0 = (D if use_d else None), (state if use_state else None)
        y_ref, final_ref = ssd_recurrent(x, dt, A, B, C, d, s0)
        results = [ssd_chunked(x, dt, A, B, C, d, s0, chunk_size=chunk_size)]
        if use_d == use_state:  # the dispatcher and the decode loop on two of the four variants (time)
            results += [_one_token_at_a_time(x, dt, A, B, C, d, s0), ssd(x, dt, A, B, C, d, s0, chunk_size=chunk_size)]
        for y, final in results:
            assert y.shape == x.shape and y.dtype == x.dtype
            assert final.shape == (2, 4, 8, 16) and final.dtype == torch.float32
            assert _max_error(y, y_ref) <= ATOL
            assert _max_error(final, final_ref) <= ATOL
    if s0 is not None:  # the caller's state is never updated in place
        torch.testing.assert_close(state, _inputs(length=length, groups=groups)[-1], rtol=0, atol=0)


def test_low_precision_inputs_give_output_in_their_dtype_and_an_fp32_state():
    x, dt, A, B, C, D, state = _inputs(length=20)
    x, B, C = x.bfloat16(), B.bfloat16(), C.bfloat16()
    for function in (ssd_recurrent, ssd_chunked, ssd):
        y, final = function(x, dt, A, B, C, D, state)
        assert y.dtype == torch.bfloat16 and final.dtype == torch.float32
    y_ref, final_ref = ssd_recurrent(x, dt, A, B, C, D, state)
    y_chunk, final_chunk = ssd_chunked(x, dt, A, B, C, D, state, chunk_size=8)
    torch.testing.assert_close(y_chunk, y_ref)
    assert _max_error(final_chunk, final_ref) <= ATOL


@pytest.mark.parametrize("groups", [1, 4], ids=["G=1", "G=H"])
def test_chunked_gradients_match_the_recurrent_definition(groups):
    inputs = _inputs(length=29, groups=groups)
    grads = {}
    for name, function in [("recurrent", ssd_recurrent), ("chunked", lambda *a: ssd_chunked(*a, chunk_size=8))]:
        leaves = [t.clone().requires_grad_() for t in inputs]
        y, final = function(*leaves)
        (y.square().sum() + (final * torch.linspace(-1, 1, final.shape[-1])).sum()).backward()
        grads[name] = [t.grad for t in leaves]
    for name, chunked, recurrent in zip(["x", "dt", "A", "B", "C", "D", "state"], grads["chunked"], grads["recurrent"]):
        torch.testing.assert_close(chunked, recurrent, rtol=1e-4, atol=1e-4, msg=f"d{name}")


def test_dt_zero_steps_leave_the_state_unchanged():
    x, dt, A, B, C, D, state = _inputs(length=24)
    dt_pad = dt.clone()
    dt_pad[:, 10:15] = 0  # x, B, C stay arbitrary at these positions
    dt_pad[0, :3] = 0  # left padding on one row
    for function in (ssd_recurrent, lambda *a: ssd_chunked(*a, chunk_size=8)):
        _, state_9 = function(x[:, :10], dt_pad[:, :10], A, B[:, :10], C[:, :10], D, state)
        _, state_14 = function(x[:, :15], dt_pad[:, :15], A, B[:, :15], C[:, :15], D, state)
        torch.testing.assert_close(state_14, state_9, rtol=0, atol=ATOL)
        # the same as the sequence with the pad positions removed
        keep = [t for t in range(24) if not 10 <= t < 15]
        y_pad, final_pad = function(x, dt_pad, A, B, C, D, state)
        y_cut, final_cut = function(x[:, keep], dt_pad[:, keep], A, B[:, keep], C[:, keep], D, state)
        torch.testing.assert_close(final_pad, final_cut, rtol=0, atol=ATOL)
        torch.testing.assert_close(y_pad[:, keep], y_cut, rtol=0, atol=ATOL)
        # a row that starts with dt = 0 from a zero state has written nothing
        _, zero_start = function(x[:, :3], dt_pad[:, :3], A, B[:, :3], C[:, :3], D, None)
        assert zero_start[0].abs().max() == 0


def test_strong_decays_never_overflow_forward_or_backward():
    x, dt, A, B, C, D, state = _inputs(length=70)
    dt = (dt * 20).requires_grad_()  # log-decays down to about -30 per step, -2000 per chunk
    A = (A * 10).requires_grad_()
    y, final = ssd_chunked(x, dt, A, B, C, D, state, chunk_size=64)
    (y.sum() + final.sum()).backward()
    assert torch.isfinite(y).all() and torch.isfinite(final).all()
    assert torch.isfinite(dt.grad).all() and torch.isfinite(A.grad).all()
    y_ref, final_ref = ssd_recurrent(x, dt, A, B, C, D, state)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=ATOL)


def test_empty_sequence_returns_the_initial_state():
    x, dt, A, B, C, D, state = _inputs(length=0)
    y, final = ssd(x, dt, A, B, C, D, state)
    assert y.shape == x.shape
    torch.testing.assert_close(final, state)


def test_shape_errors_name_the_expected_layout():
    x, dt, A, B, C, D, state = _inputs(groups=3, heads=4)
    with pytest.raises(ValueError, match="H % G"):
        ssd(x, dt, A, B, C, D, state)


# ------------------------------------------------------------------- independent implementations
def _transformers_torch_path(name):
    """transformers' Mamba-2 pure-torch function, unwrapped from its hub-kernel / mamba_ssm dispatch decorators."""
    module = pytest.importorskip("transformers.models.mamba2.modeling_mamba2")
    if not hasattr(module, name):
        pytest.skip(f"this transformers version has no standalone {name}")
    return inspect.unwrap(getattr(module, name))


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("length,chunk_size", [(37, 8), (64, 16), (100, 64)])
def test_matches_transformers_mamba2_torch_chunk_scan(length, chunk_size, groups):
    chunk_scan = _transformers_torch_path("mamba2_chunk_scan")
    x, dt, A, B, C, D, state = _inputs(length=length, groups=groups)
    y_ref, final_ref = chunk_scan(x, dt, A, B, C, chunk_size, D=D, initial_states=state, return_final_states=True)
    y, final = ssd_chunked(x, dt, A, B, C, D, state, chunk_size=chunk_size)
    assert _max_error(y, y_ref) <= ATOL and _max_error(final, final_ref) <= ATOL
    y, final = ssd_recurrent(x, dt, A, B, C, D, state)
    assert _max_error(y, y_ref) <= ATOL and _max_error(final, final_ref) <= ATOL


def test_decode_step_matches_transformers_mamba2_torch_state_update():
    state_update = _transformers_torch_path("mamba2_selective_state_update")
    x, dt, A, B, C, D, state = _inputs(length=1, groups=2)
    heads, head_dim, state_size = 4, 8, 16
    theirs = state.clone()
    y_ref = state_update(
        theirs, x[:, 0], dt[:, 0, :, None].expand(-1, -1, head_dim),
        A[:, None, None].expand(heads, head_dim, state_size), B[:, 0], C[:, 0], D=D[:, None].expand(heads, head_dim),
    )
    y, final = ssd(x, dt, A, B, C, D, state)
    assert _max_error(y[:, 0], y_ref) <= ATOL and _max_error(final, theirs) <= ATOL


def test_matches_the_closed_form():
    """In float64: y_t = sum_{s<=t} C_t^T (prod_{r=s+1..t} exp(dt_r A)) dt_s B_s x_s
    + (prod_{r<=t} exp(dt_r A)) h_0 C_t + D x_t, and the final state likewise."""
    x, dt, A, B, C, D, state = (t.double() for t in _inputs(length=23, groups=2))
    heads_per_group = 2
    B_h, C_h = (t.repeat_interleave(heads_per_group, dim=2) for t in (B, C))
    log_decay = (dt * A).cumsum(1)  # [B, T, H]
    ratio = (log_decay[:, :, None] - log_decay[:, None, :]).exp()  # [B, t, s, H]: prod_{r=s+1..t}
    ratio = ratio * torch.ones(23, 23, dtype=torch.bool).tril()[None, :, :, None]
    y = torch.einsum("btshn->btsh", C_h[:, :, None] * B_h[:, None]) * ratio * dt[:, None]
    y = torch.einsum("btsh,bshp->bthp", y, x)
    y = y + torch.einsum("bthn,bhpn->bthp", C_h, state) * log_decay.exp()[..., None] + D[:, None] * x
    final = state * log_decay[:, -1].exp()[..., None, None] + torch.einsum(
        "bsh,bshp,bshn->bhpn", (log_decay[:, -1:] - log_decay).exp() * dt, x, B_h
    )
    for y_ours, final_ours in [ssd_chunked(*(t.float() for t in (x, dt, A, B, C, D, state)), chunk_size=8),
                               ssd_recurrent(*(t.float() for t in (x, dt, A, B, C, D, state)))]:
        assert _max_error(y_ours, y) <= ATOL and _max_error(final_ours, final) <= ATOL


# ------------------------------------------------------------------------------------ kernel dispatch
@pytest.fixture
def fake_kernels(monkeypatch):
    """Pretend mamba_ssm is installed; its kernels record their calls and compute with the reference."""
    calls = []

    def chunk_scan(x, dt, A, B, C, chunk_size, D=None, initial_states=None, return_final_states=False):
        calls.append(dict(op="chunk", x=x, chunk_size=chunk_size, initial_states=initial_states))
        return ssd_chunked(x, dt, A, B, C, D, initial_states, chunk_size=chunk_size)

    def state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
        calls.append(dict(op="update", state=state, x=x, dt=dt, A=A, B=B, D=D))
        y, new_state = ssd_recurrent(
            x[:, None], dt[:, None, :, 0], A[:, 0, 0], B[:, None], C[:, None], None if D is None else D[:, 0], state
        )
        state.copy_(new_state)
        return y[:, 0]

    monkeypatch.setitem(kernels._loaded, "mamba_chunk_scan_combined", chunk_scan)
    monkeypatch.setitem(kernels._loaded, "selective_state_update", state_update)
    monkeypatch.delenv(kernels.DISABLE_ENV, raising=False)
    return calls


def test_cpu_tensors_never_reach_a_fused_kernel_even_when_it_is_installed(fake_kernels):
    x, dt, A, B, C, D, state = _inputs(length=20)
    ssd(x, dt, A, B, C, D, state)
    ssd(x[:, :1], dt[:, :1], A, B[:, :1], C[:, :1], D, state)
    assert fake_kernels == []
    assert kernels.fused_kernel("mamba_chunk_scan_combined", x) is None
    assert kernels.fused_kernel("selective_state_update", x) is None


def test_cuda_tensors_use_the_fused_kernels_with_the_reference_layout(fake_kernels, monkeypatch):
    x, dt, A, B, C, D, state = _inputs(length=20)
    monkeypatch.setattr(kernels, "on_cuda", lambda *tensors: True)
    y, final = ssd(x, dt, A, B, C, D, state, chunk_size=16)
    y_step, final_step = ssd(x[:, :1], dt[:, :1], A, B[:, :1], C[:, :1], D, state)
    assert [call["op"] for call in fake_kernels] == ["chunk", "update"]
    assert fake_kernels[0]["chunk_size"] == 16 and fake_kernels[0]["initial_states"].dtype == torch.float32
    update = fake_kernels[1]
    assert update["x"].shape == (2, 4, 8) and update["dt"].shape == (2, 4, 8) and update["B"].shape == (2, 2, 16)
    assert update["A"].shape == (4, 8, 16) and update["D"].shape == (4, 8)
    assert update["state"] is not state  # the kernel updates a copy in place, never the caller's state
    torch.testing.assert_close(state, _inputs(length=20)[-1], rtol=0, atol=0)
    monkeypatch.setattr(kernels, "on_cuda", lambda *tensors: False)
    y_ref, final_ref = ssd(x, dt, A, B, C, D, state, chunk_size=16)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(final, final_ref)
    y_ref, final_ref = ssd(x[:, :1], dt[:, :1], A, B[:, :1], C[:, :1], D, state)
    torch.testing.assert_close(y_step, y_ref)
    torch.testing.assert_close(final_step, final_ref)


def test_decode_kernel_is_skipped_when_a_gradient_is_needed(fake_kernels, monkeypatch):
    """selective_state_update has no backward: a one-token training step must stay differentiable."""
    monkeypatch.setattr(kernels, "on_cuda", lambda *tensors: True)
    x, dt, A, B, C, D, state = _inputs(length=1)
    x.requires_grad_()
    y, _ = ssd(x, dt, A, B, C, D, state)
    y.sum().backward()
    assert fake_kernels == [] and x.grad is not None


@pytest.mark.parametrize("switch", ["config", "env-all", "env-op"])
def test_kernels_can_be_forced_off_by_config_or_environment(fake_kernels, monkeypatch, switch):
    monkeypatch.setattr(kernels, "on_cuda", lambda *tensors: True)
    if switch == "env-all":
        monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    if switch == "env-op":
        monkeypatch.setenv(kernels.DISABLE_ENV, "selective_state_update,mamba_chunk_scan_combined")
    x, dt, A, B, C, D, state = _inputs(length=20)
    ssd(x, dt, A, B, C, D, state, use_fused_kernels=switch != "config")
    ssd(x[:, :1], dt[:, :1], A, B[:, :1], C[:, :1], D, state, use_fused_kernels=switch != "config")
    assert fake_kernels == []


def test_the_operator_module_imports_without_any_kernel_package(monkeypatch):
    """Re-executing the module with mamba_ssm and triton made unimportable (a None entry in sys.modules) must work."""
    for package in ("mamba_ssm", "triton"):
        monkeypatch.setitem(sys.modules, package, None)
    module = importlib.reload(ssd_ops)
    x, dt, A, B, C, D, state = _inputs(length=5)
    module.ssd(x, dt, A, B, C, D, state)


# ------------------------------------------------------------------------------------------ CUDA only
gpu = pytest.mark.skipif(not (CUDA and HAS_MAMBA_SSM), reason="needs CUDA and mamba_ssm")


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length", [2, 100, 256])
def test_mamba_chunk_scan_kernel_matches_reference_forward_and_backward(dtype, length):
    x, dt, A, B, C, D, state = _inputs(length=length, head_dim=64, state_size=64, device="cuda")
    state = state * 0.1
    leaves = [x.to(dtype), dt, A, B.to(dtype), C.to(dtype), D.cuda(), state.cuda()]
    leaves = [t.clone().requires_grad_() for t in leaves]
    results = {}
    for use_fused_kernels in (True, False):
        for t in leaves:
            t.grad = None
        y, final = ssd(*leaves, chunk_size=64, use_fused_kernels=use_fused_kernels)
        (y.float().square().sum() + final.sum()).backward()
        results[use_fused_kernels] = [y.float(), final] + [t.grad.float() for t in leaves]
    tolerance = 2e-3 if dtype == torch.float32 else 5e-2
    names = ["y", "final", "dx", "ddt", "dA", "dB", "dC", "dD", "dstate"]
    for name, fused, reference in zip(names, results[True], results[False]):
        scale = reference.abs().max().clamp_min(1)
        torch.testing.assert_close(fused / scale, reference / scale, rtol=tolerance, atol=tolerance, msg=name)


@gpu
@pytest.mark.parametrize("groups", [1, 4])
def test_selective_state_update_kernel_matches_the_recurrence(groups):
    x, dt, A, B, C, D, state = _inputs(length=1, groups=groups, head_dim=64, state_size=64, device="cuda")
    D, state = D.cuda(), state.cuda()
    with torch.no_grad():
        y, final = ssd(x, dt, A, B, C, D, state, use_fused_kernels=True)
        y_ref, final_ref = ssd(x, dt, A, B, C, D, state, use_fused_kernels=False)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final, final_ref, rtol=1e-4, atol=1e-4)
