"""Gated DeltaNet specifics: chunked == recurrent == decode, parity with transformers' Qwen3-Next (an
independent implementation) on shared inputs and shared weights, pad neutralisation, GVA, fp32 state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import build, random_ids
from transformers import DynamicCache

import hf_memory
from hf_memory.modeling.gated_deltanet.modeling_gated_deltanet import GatedDeltaNetMixer
from hf_memory.ops.gated_delta import (gated_delta_rule, gated_delta_rule_chunked, gated_delta_rule_recurrent,
                                       unit_lower_triangular_inverse)


def _inputs(batch=2, length=50, heads=3, d_k=16, d_v=24, seed=0, value_heads=None):
    generator = torch.Generator().manual_seed(seed)
    value_heads = value_heads or heads
    q = F.normalize(torch.randn(batch, length, heads, d_k, generator=generator), dim=-1)
    k = F.normalize(torch.randn(batch, length, heads, d_k, generator=generator), dim=-1)
    v = torch.randn(batch, length, value_heads, d_v, generator=generator)
    g = -F.softplus(torch.randn(batch, length, value_heads, generator=generator)) * 0.3
    beta = torch.rand(batch, length, value_heads, generator=generator)
    state = torch.randn(batch, value_heads, d_k, d_v, generator=generator) * 0.1
    return q, k, v, g, beta, state


def _step_by_step(q, k, v, g, beta, state):
    outputs = []
    for t in range(q.shape[1]):
        o, state = gated_delta_rule_recurrent(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1],
                                              g[:, t : t + 1], beta[:, t : t + 1], state)
        outputs.append(o)
    return torch.cat(outputs, dim=1), state


@pytest.mark.parametrize("length,chunk_size,chunks_per_block",
                         [(50, 16, 16), (64, 64, 16), (7, 16, 16), (129, 32, 16), (129, 32, 2), (50, 12, 1)])
def test_chunked_equals_recurrent_equals_single_step_decode(length, chunk_size, chunks_per_block):
    q, k, v, g, beta, state = _inputs(length=length)
    o_rec, s_rec = gated_delta_rule_recurrent(q, k, v, g, beta, state)
    o_chunk, s_chunk = gated_delta_rule_chunked(q, k, v, g, beta, state, chunk_size=chunk_size,
                                                chunks_per_block=chunks_per_block)
    o_step, s_step = _step_by_step(q, k, v, g, beta, state)
    assert (o_rec - o_chunk).abs().max() <= 1e-5 and (s_rec - s_chunk).abs().max() <= 1e-5
    assert (o_rec - o_step).abs().max() <= 1e-5 and (s_rec - s_step).abs().max() <= 1e-5


def test_chunked_form_gradients_match_the_recurrent_definition():
    tensors = [t.clone().requires_grad_() for t in _inputs(length=37)]
    o, s = gated_delta_rule_recurrent(*tensors)
    (o.square().sum() + s.sum()).backward()
    reference = [t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    o, s = gated_delta_rule_chunked(*tensors, chunk_size=16, chunks_per_block=2)  # 3 chunks: two blocks
    (o.square().sum() + s.sum()).backward()
    for expected, t in zip(reference, tensors):
        torch.testing.assert_close(t.grad, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("size", [1, 5, 16, 64])
def test_unit_lower_triangular_inverse_equals_the_triangular_solve(size):
    """On the chunked form's own A: beta_t k_t^T k_i below the diagonal, unit keys, beta up to 2."""
    generator = torch.Generator().manual_seed(size)
    keys = F.normalize(torch.randn(3, size, 16, generator=generator), dim=-1)
    a = (2 * torch.rand(3, size, 1, generator=generator) * keys @ keys.transpose(-1, -2)).tril(-1)
    identity = torch.eye(size).expand(3, -1, -1)
    expected = torch.linalg.solve_triangular(identity + a, identity, upper=False)
    torch.testing.assert_close(unit_lower_triangular_inverse(a), expected, rtol=1e-4, atol=1e-5)


def test_recurrence_is_online_sgd_on_the_key_value_regression_loss():
    """One step equals S - beta * grad_S(1/2 ||S k - v||^2) after decay by alpha (the paper's reading)."""
    q, k, v, g, beta, state = _inputs(batch=1, length=1, heads=1)
    _, new_state = gated_delta_rule_recurrent(q, k, v, g, beta, state)
    decayed = (state * g.exp()[0, 0, 0]).requires_grad_()
    loss = 0.5 * (decayed.transpose(-1, -2) @ k[0, 0, 0] - v[0, 0, 0]).square().sum()
    (grad,) = torch.autograd.grad(loss, decayed)
    torch.testing.assert_close(new_state, decayed.detach() - beta[0, 0, 0] * grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("value_heads", [3, 6])
def test_parity_with_transformers_qwen3_next_reference_kernels(value_heads):
    qwen3_next = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    q, k, v, g, beta, state = _inputs(length=70, heads=3, value_heads=value_heads)
    ours, our_state = gated_delta_rule(q, k, v, g, beta, state, chunk_size=32)
    for theirs_fn in (qwen3_next.torch_chunk_gated_delta_rule, qwen3_next.torch_recurrent_gated_delta_rule):
        theirs, their_state = theirs_fn(q, k, v, g=g, beta=beta, initial_state=state, output_final_state=True)
        assert (ours - theirs).abs().max() <= 1e-5
        assert (our_state - their_state).abs().max() <= 1e-5


def _qwen3_next_layer_from(mixer: GatedDeltaNetMixer, config):
    """transformers' Qwen3NextGatedDeltaNet carrying the mixer's weights (its fused, head-grouped layout)."""
    from transformers import Qwen3NextConfig
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet

    shared = ("hidden_size", "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
              "linear_value_head_dim", "linear_conv_kernel_dim", "rms_norm_eps")  # the same names in both configs
    qwen_config = Qwen3NextConfig(**{name: getattr(config, name) for name in shared}, hidden_act="silu",
                                  num_hidden_layers=1, layer_types=["linear_attention"])
    layer = Qwen3NextGatedDeltaNet(qwen_config, layer_idx=0)
    heads = config.linear_num_key_heads
    groups = config.linear_num_value_heads // heads
    d_k, d_v = config.linear_key_head_dim, config.linear_value_head_dim
    qkvz, ba = [], []
    for h in range(heads):
        qkvz += [mixer.q_proj.weight[h * d_k : (h + 1) * d_k], mixer.k_proj.weight[h * d_k : (h + 1) * d_k],
                 mixer.v_proj.weight[h * groups * d_v : (h + 1) * groups * d_v],
                 mixer.g_proj.weight[h * groups * d_v : (h + 1) * groups * d_v]]
        ba += [mixer.b_proj.weight[h * groups : (h + 1) * groups], mixer.a_proj.weight[h * groups : (h + 1) * groups]]
    with torch.no_grad():
        layer.in_proj_qkvz.weight.copy_(torch.cat(qkvz))
        layer.in_proj_ba.weight.copy_(torch.cat(ba))
        layer.conv1d.weight.copy_(torch.cat([mixer.q_conv1d.weight, mixer.k_conv1d.weight, mixer.v_conv1d.weight]))
        layer.A_log.copy_(mixer.A_log)
        layer.dt_bias.copy_(mixer.dt_bias)
        layer.norm.weight.copy_(mixer.o_norm.weight)
        layer.out_proj.weight.copy_(mixer.o_proj.weight)
    return layer.eval()


@pytest.mark.parametrize("value_heads", [2, 4])
def test_layer_parity_with_qwen3_next_gated_deltanet_on_shared_weights(value_heads):
    config = hf_memory.get_config("gated-deltanet-tiny", linear_num_value_heads=value_heads)
    torch.manual_seed(0)
    mixer = build("gated-deltanet-tiny", linear_num_value_heads=value_heads).model.layers[0].mixer
    with torch.no_grad():
        mixer.o_norm.weight.uniform_(0.5, 1.5)
    theirs = _qwen3_next_layer_from(mixer, config)
    x = torch.randn(2, 45, config.hidden_size)
    with torch.no_grad():
        assert (mixer(x)[0] - theirs(x)).abs().max() <= 1e-5
        ours_cache, their_cache = DynamicCache(config=config), DynamicCache(config=config)
        mixer(x[:, :30], cache=ours_cache)
        theirs(x[:, :30], cache=their_cache)
        ours_step, their_step = mixer(x[:, 30:31], cache=ours_cache)[0], theirs(x[:, 30:31], cache=their_cache)
        assert (ours_step - their_step).abs().max() <= 1e-5
        assert (ours_cache.layers[0].recurrent_states[0] - their_cache.layers[0].recurrent_states[0]).abs().max() <= 1e-5


def test_left_pads_leave_the_recurrent_state_of_the_unpadded_sequence():
    model = build("gated-deltanet-tiny")
    row = random_ids(model.config, 1, 30)
    padded = torch.cat([torch.zeros(1, 9, dtype=torch.long), row], dim=1)
    mask = torch.cat([torch.zeros(1, 9, dtype=torch.long), torch.ones_like(row)], dim=1)
    caches = DynamicCache(config=model.config), DynamicCache(config=model.config)
    with torch.no_grad():
        model(row, cache=caches[0], use_cache=True)
        model(padded, attention_mask=mask, cache=caches[1], use_cache=True)
    for alone, with_pads in zip(*(c.layers for c in caches)):
        assert (alone.recurrent_states[0] - with_pads.recurrent_states[0]).abs().max() <= 1e-5
        assert (alone.conv_states[0] - with_pads.conv_states[0]).abs().max() <= 1e-5


def test_zeroing_pad_inputs_alone_is_not_enough_the_gates_are_neutralised_too():
    """The spec's pitfall: with pads only zeroed, alpha < 1 at pads still decays a state that holds something
    (here right padding after real tokens); with the gates neutralised the state is the unpadded one."""
    model = build("gated-deltanet-tiny")
    mixer = model.model.layers[0].mixer
    config = model.config
    x = torch.randn(1, 25, config.hidden_size)
    padded = torch.cat([x, torch.zeros(1, 6, config.hidden_size)], dim=1)
    mask = torch.cat([torch.ones(1, 25), torch.zeros(1, 6)], dim=1).long()
    states = []
    with torch.no_grad():
        for inputs, attention_mask in [(x, None), (padded, None), (padded, mask)]:
            cache = DynamicCache(config=config)
            mixer(inputs, attention_mask=attention_mask, cache=cache)
            states.append(cache.layers[0].recurrent_states[0])
    unpadded, zeroed_only, neutralised = states
    assert (unpadded - zeroed_only).abs().max() > 1e-3
    assert (unpadded - neutralised).abs().max() <= 1e-5


def test_bf16_model_keeps_the_recurrent_state_in_fp32_and_tracks_fp32_logits():
    model = build("gated-deltanet-tiny")
    ids = random_ids(model.config, 2, 40)
    with torch.no_grad():
        reference = model(ids).logits
        model = model.to(torch.bfloat16)
        out = model(ids, use_cache=True)
    assert out.cache.layers[0].recurrent_states[0].dtype == torch.float32
    assert (out.logits.float() - reference).abs().max() < 5e-2


def test_negative_eigenvalue_option_doubles_beta():
    model = build("gated-deltanet-tiny", allow_neg_eigval=True)
    mixer = model.model.layers[0].mixer
    x = torch.randn(1, 5, model.config.hidden_size)
    _, beta = mixer.gates(x)
    torch.testing.assert_close(beta, 2 * torch.sigmoid(mixer.b_proj(x)))
    ids = random_ids(model.config, 1, 30)
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :20], use_cache=True)
        steps = [out.logits]
        for t in range(20, 30):
            out = model(ids[:, t : t + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits)
    assert (full - torch.cat(steps, 1)).abs().max() <= 1e-4


def test_paper_presets_have_the_published_parameter_counts():
    from transformers import AutoModelForCausalLM

    for name, low, high in [("gated-deltanet-1.3b", 1.2e9, 1.5e9), ("gated-deltanet-h1-1.3b", 1.2e9, 1.5e9)]:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_memory.get_config(name))
        count = sum(p.numel() for p in model.parameters())
        assert low <= count <= high, (name, count)


def test_head_dim_of_the_h1_preset_is_its_attention_head_size_not_the_key_size():
    config = hf_memory.get_config("gated-deltanet-h1-1.3b")
    assert config.head_dim == config.hidden_size // config.num_attention_heads == 128
    assert config.linear_key_head_dim == 256
