"""Titans as a model (MAG, MAL): the memory learns during generation exactly as in the full forward, it carries
information past the attention window, persistent memory is seen by every query, and the paper-scale preset."""

from __future__ import annotations

import pytest
import torch
from conftest import build, random_ids
from transformers import AutoModelForCausalLM, DynamicCache

import hf_memory

VARIANTS = ["titans-mac-tiny", "titans-mag-tiny", "titans-mal-tiny"]


def _decode_in_pieces(model, ids, mask, pieces):
    """Logits of a prefill of ``pieces[0]`` tokens, then pieces of the given lengths, then token by token."""
    cache, logits, start = DynamicCache(config=model.config), [], 0
    for size in [*pieces, *[1] * (ids.shape[1] - sum(pieces))]:
        end = start + size
        out = model(ids[:, start:end], attention_mask=mask[:, :end], cache=cache, use_cache=True)
        logits.append(out.logits)
        start = end
    return torch.cat(logits, dim=1), cache


@pytest.mark.parametrize("preset", VARIANTS)
def test_cached_decoding_equals_the_full_forward_across_chunk_and_window_boundaries_with_rows_out_of_step(preset):
    """Chunks of 4 and a window of 8 crossed many times; row 1 is left-padded by 3 so its chunks close at other
    steps than row 0's; a prefill, a piece of 6, then one token at a time."""
    model = build(preset)
    ids = random_ids(model.config, 2, 37)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        decoded, _ = _decode_in_pieces(model, ids, mask, [11, 6])
    real = mask.bool()
    assert (decoded - full)[real].abs().max() <= 1e-5


@pytest.mark.parametrize("preset", VARIANTS)
def test_the_memory_learns_while_generating_and_commits_only_when_a_chunk_completes(preset):
    model = build(preset)
    chunk = model.config.memory_chunk_size
    ids = random_ids(model.config, 1, 2 * chunk + 1)
    layer = 0
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(ids[:, : chunk + 1], cache=cache, use_cache=True)  # one chunk committed, one token pending
        committed = [w.clone() for w in cache.layers[layer].weights]
        steps = []
        for t in range(chunk + 1, 2 * chunk + 1):
            model(ids[:, t : t + 1], cache=cache, use_cache=True)
            steps.append(all(torch.equal(w, c) for w, c in zip(cache.layers[layer].weights, committed)))
    assert steps == [True] * (chunk - 2) + [False, False]  # the step that completes the second chunk updates it
    assert int(cache.layers[layer].pending[0]) == 1


@pytest.mark.parametrize("preset", VARIANTS)
def test_the_memory_carries_a_token_past_the_attention_window_and_the_ablation_does_not(preset):
    """Two layers of window 8 reach 14 tokens back through attention; the first of 40 tokens changes the last
    token's logits only through the neural memory."""
    config = hf_memory.get_config(preset, attn_implementation="eager")
    reach = config.num_hidden_layers * (config.sliding_window - 1)
    changes = {}
    for use_memory in (True, False):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(hf_memory.get_config(preset, use_memory=use_memory,
                                                                      attn_implementation="eager")).eval()
        ids = random_ids(model.config, 1, 40)
        assert ids.shape[1] - 1 > reach
        other = ids.clone()
        other[0, 0] = (ids[0, 0] + 1) % model.config.vocab_size
        with torch.no_grad():
            changes[use_memory] = (model(ids).logits[0, -1] - model(other).logits[0, -1]).abs().max().item()
    assert changes[True] > 1e-4 and changes[False] == 0.0


def test_the_ablation_without_memory_has_no_memory_parameters():
    with_memory, without = (build("titans-mag-tiny", use_memory=flag) for flag in (True, False))
    assert any("memory" in name and "persistent" not in name for name, _ in with_memory.named_parameters())
    assert not any(".memory." in name for name, _ in without.named_parameters())


@pytest.mark.parametrize("preset", VARIANTS)
def test_persistent_memory_is_visible_to_every_query_however_far_from_the_start(preset):
    model = build(preset, use_memory=False)
    ids = random_ids(model.config, 1, 30)
    with torch.no_grad():
        before = model(ids).logits
        for module in model.modules():
            if hasattr(module, "persistent_values"):
                module.persistent_values.add_(1.0)
        after = model(ids).logits
    assert ((after - before).abs().amax(-1) > 1e-4).all()  # every position, the last far past the window


def test_the_memory_state_stays_fp32_in_a_bf16_model_and_training_reaches_every_parameter():
    model = build("titans-mal-tiny").to(torch.bfloat16).train()
    ids = random_ids(model.config, 2, 21)
    model(ids, labels=ids).loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
    assert all(w.dtype == torch.float32 for layer in cache.layers for w in layer.weights + layer.momentum)


def test_the_760m_preset_has_the_papers_scale():
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_memory.get_config("titans-mag-760m"))
    parameters = sum(p.numel() for p in model.parameters())
    assert 0.74e9 <= parameters <= 0.80e9, parameters


def test_memory_as_context_needs_segments_of_whole_memory_chunks():
    with pytest.raises(ValueError, match="segment_size"):
        hf_memory.get_config("titans-mac-tiny", segment_size=6)


def test_a_new_model_starts_with_the_memory_gates_and_initial_weights_it_declares():
    """theta / max_lr = sigmoid(-2) ~ 0.12, eta ~ 0.9, alpha ~ 0.01 and a fan-in scaled M_0 after transformers'
    weight initialisation (which once left these gates at sigmoid(0) = 0.5: a memory forgetting half per token)."""
    model = build("titans-mag-tiny")
    memory = model.model.layers[0].mixer.memory
    theta, eta, alpha = torch.sigmoid(memory.gate_bias).mean(-1).tolist()
    assert theta == pytest.approx(0.119, abs=1e-3) and eta == pytest.approx(0.900, abs=1e-3)
    assert alpha == pytest.approx(0.010, abs=1e-3)
    for w in memory.memory_init:
        assert w.std().item() == pytest.approx(w.shape[1] ** -0.5, rel=0.25)


@pytest.mark.parametrize("kernel", [1, 4])
def test_the_conv_history_holds_kernel_minus_one_inputs_whatever_the_length_fed(kernel):
    """A kernel of 1 once kept the whole input: the cache grew with the context."""
    model = build("titans-mag-tiny", memory_conv_kernel=kernel)
    ids = random_ids(model.config, 1, 48)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        for start in range(0, 48, 16):
            model(ids[:, start : start + 16], cache=cache, use_cache=True)
            assert cache.layers[0].conv.shape[-1] == kernel - 1


def test_memory_as_context_reads_each_segment_with_the_weights_the_previous_segments_left():
    """h = M*_{s-1}(q) (eq. 21): the second segment's context is read with the weights a cache holds after the
    first segment alone; the first with M_0."""
    model = build("titans-mac-tiny")
    segment = model.config.segment_size
    ids = random_ids(model.config, 1, 2 * segment)
    read = model.model.layers[0].mixer.read
    seen = []
    handle = read.register_forward_hook(lambda module, args, output: seen.append([w.clone() for w in args[0]]))
    with torch.no_grad():
        model(ids)
        handle.remove()
        cache = DynamicCache(config=model.config)
        model(ids[:, :segment], cache=cache, use_cache=True)
    assert len(seen) == 2
    initial = model.model.layers[0].mixer.memory.memory_init
    assert all(torch.equal(a[0], b) for a, b in zip(seen[0], initial))
    for a, b in zip(seen[1], cache.layers[0].weights):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not all(torch.equal(a[0], b) for a, b in zip(seen[1], initial))
