"""Jamba-style hybrid specifics: conversion from / to transformers' JambaForCausalLM (an independent
implementation of the same model), scans, MoE and its auxiliary loss, pads, Mamba-2 variant."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import build, random_ids
from transformers import AutoModelForCausalLM, DynamicCache, JambaConfig, JambaForCausalLM

from hf_memory import cli
from hf_memory.layers.moe import load_balancing_loss
from hf_memory.ops.selective_scan import selective_scan, selective_scan_stepwise, selective_scan_sequential

TINY_JAMBA = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, attn_layer_period=4,
    attn_layer_offset=2, expert_layer_period=2, expert_layer_offset=1, num_experts=4, num_experts_per_tok=2,
    num_attention_heads=4, num_key_value_heads=2, mamba_d_state=8, pad_token_id=0,
)


def _scan_inputs(batch=2, channels=24, state=6, length=45, seed=0):
    generator = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, channels, length, generator=generator)
    delta = F.softplus(torch.randn(batch, channels, length, generator=generator))
    A = -torch.rand(channels, state, generator=generator) * 4
    B = torch.randn(batch, state, length, generator=generator)
    C = torch.randn(batch, state, length, generator=generator)
    D = torch.randn(channels, generator=generator)
    h0 = torch.randn(batch, channels, state, generator=generator)
    return u, delta, A, B, C, D, h0


@pytest.mark.parametrize("length", [1, 7, 64, 100, 600])  # 600: three blocks of states without gradients
def test_stepwise_scan_equals_the_sequential_definition_and_single_steps(length):
    u, delta, A, B, C, D, h0 = _scan_inputs(length=length)
    y_seq, s_seq = selective_scan_sequential(u, delta, A, B, C, D, h0)
    y_par, s_par = selective_scan_stepwise(u, delta, A, B, C, D, h0)
    assert (y_seq - y_par).abs().max() <= 1e-5 * max(1.0, y_seq.abs().max().item())
    assert (s_seq - s_par).abs().max() <= 1e-5 * max(1.0, s_seq.abs().max().item())
    state, steps = h0, []
    for t in range(length):
        y, state = selective_scan(u[..., t : t + 1], delta[..., t : t + 1], A, B[..., t : t + 1],
                                  C[..., t : t + 1], D, state)
        steps.append(y)
    assert (torch.cat(steps, -1) - y_seq).abs().max() <= 1e-5 * max(1.0, y_seq.abs().max().item())


def test_stepwise_scan_gradients_match_the_sequential_definition():
    leaves = [t.requires_grad_() for t in _scan_inputs(length=33)]
    grads = []
    for scan in (selective_scan_sequential, selective_scan_stepwise):
        for t in leaves:
            t.grad = None
        y, s = scan(*leaves)
        (y.square().mean() + s.square().mean()).backward()
        grads.append([t.grad.clone() for t in leaves])
    for reference, parallel in zip(*grads):
        torch.testing.assert_close(parallel, reference, rtol=1e-4, atol=1e-5)


def test_stepwise_scan_backward_passes_gradcheck_in_float64():
    inputs = [t.double().requires_grad_() for t in _scan_inputs(batch=2, channels=5, state=3, length=8)]
    assert torch.autograd.gradcheck(selective_scan_stepwise, inputs)


def test_zero_time_step_leaves_the_ssm_state_unchanged():
    u, delta, A, B, C, D, h0 = _scan_inputs(length=10)
    delta[..., 4:] = 0
    _, after_four = selective_scan_sequential(u[..., :4], delta[..., :4], A, B[..., :4], C[..., :4], D, h0)
    _, after_all = selective_scan_stepwise(u, delta, A, B, C, D, h0)
    torch.testing.assert_close(after_all, after_four)


def _tiny_transformers_jamba(seed=0) -> JambaForCausalLM:
    torch.manual_seed(seed)
    model = JambaForCausalLM(JambaConfig(**TINY_JAMBA, attn_implementation="eager")).eval()
    with torch.no_grad():  # break the symmetric default init so that every weight matters
        for name, parameter in model.named_parameters():
            if "A_log" in name or name.endswith("D") or "layernorm" in name or "norm" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def test_convert_from_transformers_jamba_reproduces_logits_and_greedy_generations(tmp_path):
    source = _tiny_transformers_jamba()
    source.save_pretrained(tmp_path / "jamba")
    assert cli.main(["convert", "--from", "jamba", str(tmp_path / "jamba"), str(tmp_path / "ours")]) == 0
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    assert ours.config.model_type == "hfm_jamba"
    ids = random_ids(ours.config, 2, 37)
    with torch.no_grad():
        expected, actual = source(ids).logits, ours(ids).logits
    assert (expected - actual).abs().max().item() <= 1e-4
    kwargs = dict(attention_mask=torch.ones_like(ids[:, :9]), max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert torch.equal(source.generate(ids[:, :9], **kwargs), ours.generate(ids[:, :9], **kwargs))
    with torch.no_grad():
        theirs = source(ids, labels=ids, output_router_logits=True)
        mine = ours(ids, labels=ids, output_router_logits=True)
    assert abs(theirs.aux_loss.item() - mine.aux_loss.item()) <= 1e-5
    assert abs(theirs.loss.item() - mine.loss.item()) <= 1e-4


def test_convert_to_transformers_jamba_round_trips(tmp_path):
    ours = build("jamba-tiny")
    ours.save_pretrained(tmp_path / "ours")
    assert cli.main(["convert", "--to", "jamba", str(tmp_path / "ours"), str(tmp_path / "jamba")]) == 0
    theirs = JambaForCausalLM.from_pretrained(tmp_path / "jamba", attn_implementation="eager").eval()
    ids = random_ids(ours.config, 2, 29)
    with torch.no_grad():
        assert (theirs(ids).logits - ours(ids).logits).abs().max().item() <= 1e-4


def test_converting_a_mamba2_model_to_transformers_jamba_is_refused(tmp_path):
    build("jamba-mamba2-tiny").save_pretrained(tmp_path / "ours")
    with pytest.raises(ValueError, match="mamba1"):
        cli.main(["--debug", "convert", "--to", "jamba", str(tmp_path / "ours"), str(tmp_path / "jamba")])


def test_unknown_conversion_format_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no converter"):
        cli.main(["--debug", "convert", "--from", "gpt17", str(tmp_path), str(tmp_path / "out")])


def test_router_aux_loss_ignores_pad_tokens():
    logits = (torch.randn(2 * 6, 4), torch.randn(2 * 6, 4))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :3] = 0
    with_pads = load_balancing_loss(logits, 4, 2, mask)
    keep = mask.reshape(-1).bool()
    without_pads = load_balancing_loss(tuple(layer[keep] for layer in logits), 4, 2)
    torch.testing.assert_close(with_pads, without_pads)


@pytest.mark.parametrize("preset", ["jamba-tiny", "jamba-mamba2-tiny"])
def test_left_pads_leave_every_mamba_state_of_the_unpadded_sequence(preset):
    model = build(preset)
    row = random_ids(model.config, 1, 30)
    padded = torch.cat([torch.zeros(1, 7, dtype=torch.long), row], dim=1)
    mask = torch.cat([torch.zeros(1, 7, dtype=torch.long), torch.ones_like(row)], dim=1)
    caches = DynamicCache(config=model.config), DynamicCache(config=model.config)
    with torch.no_grad():
        model(row, cache=caches[0], use_cache=True)
        model(padded, attention_mask=mask, cache=caches[1], use_cache=True)
    for layer_type, alone, with_pads in zip(model.config.layer_types, *(c.layers for c in caches)):
        if layer_type == "linear_attention":
            assert (alone.recurrent_states[0] - with_pads.recurrent_states[0]).abs().max() <= 1e-5
            assert alone.recurrent_states[0].dtype == torch.float32


def test_decoding_calls_the_single_step_update_not_a_rescan(monkeypatch):
    from hf_memory.layers import mamba

    model = build("jamba-tiny")
    scanned_lengths = []

    def spy(u, *args, **kwargs):
        scanned_lengths.append(u.shape[-1])
        return selective_scan(u, *args, **kwargs)

    monkeypatch.setattr(mamba, "selective_scan", spy)
    out = model(random_ids(model.config, 1, 12), use_cache=True)
    scanned_lengths.clear()
    model(random_ids(model.config, 1, 1), cache=out.cache, use_cache=True)
    assert scanned_lengths == [1] * model.config.layer_types.count("linear_attention")
