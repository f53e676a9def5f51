"""Infini-attention specifics: segment locality without memory, memory across segments, truncated
gradients, gate parameter groups, and conversion from transformers' LlamaForCausalLM."""

from __future__ import annotations

import pytest
import torch
from conftest import build, random_ids
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hf_memory import cli


def _with_open_gates(model):
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.memory_gate.fill_(1.0)
    return model


def test_without_memory_a_segment_sees_nothing_of_earlier_segments():
    model = build("infini-attention-tiny", use_memory=False)
    ids = random_ids(model.config, 1, 24)
    changed = ids.clone()
    changed[:, :8] = (changed[:, :8] + 1) % model.config.vocab_size
    with torch.no_grad():
        logits, changed_logits = model(ids).logits, model(changed).logits
    torch.testing.assert_close(changed_logits[:, 8:], logits[:, 8:])


def test_with_memory_later_segments_read_earlier_ones_and_the_current_one_does_not():
    model = _with_open_gates(build("infini-attention-tiny"))
    ids = random_ids(model.config, 1, 24)
    changed = ids.clone()
    changed[:, 8:16] = (changed[:, 8:16] + 1) % model.config.vocab_size
    with torch.no_grad():
        logits, changed_logits = model(ids).logits, model(changed).logits
    torch.testing.assert_close(changed_logits[:, :8], logits[:, :8])  # earlier segment: untouched
    assert (changed_logits[:, 16:] - logits[:, 16:]).abs().max() > 1e-4  # later segment: reads the memory


def test_memory_detach_every_segment_stops_gradients_between_segments():
    for detach_every, crosses in ((None, True), (1, False)):
        model = _with_open_gates(build("infini-attention-tiny", memory_detach_every=detach_every)).train()
        embeddings = model.model.embed_tokens(random_ids(model.config, 1, 16)).detach().requires_grad_()
        model(inputs_embeds=embeddings).logits[:, 8:].sum().backward()
        assert (embeddings.grad[:, :8].abs().sum() > 0) == crosses


def test_memory_gates_get_their_own_learning_rate_and_no_weight_decay():
    model = build("infini-attention-tiny")
    groups = model.memory_parameter_groups(1e-4, gate_lr=1e-2, weight_decay=0.1)
    gates = {id(layer.self_attn.memory_gate) for layer in model.model.layers}
    assert {id(p) for p in groups[1]["params"]} == gates
    assert groups[1]["lr"] == 1e-2 and groups[1]["weight_decay"] == 0.0
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(model.parameters()))
    torch.optim.AdamW(groups).step()  # the groups are accepted as they are


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8}


@pytest.mark.parametrize("rope", [None, LLAMA3_ROPE], ids=["default-rope", "llama3-rope"])
def test_convert_from_llama_matches_the_source_within_the_first_segment(tmp_path, rope):
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, attn_implementation="eager", rope_parameters=rope,
    )).eval()
    llama.save_pretrained(tmp_path / "llama")
    assert cli.main(["convert", "--from", "llama", str(tmp_path / "llama"), str(tmp_path / "infini"),
                     "--set", "segment_size=16"]) == 0
    infini = AutoModelForCausalLM.from_pretrained(tmp_path / "infini", attn_implementation="eager").eval()
    assert infini.config.model_type == "hfm_infini_attention" and infini.config.segment_size == 16
    assert infini.config.rope_parameters == llama.config.rope_parameters
    ids = random_ids(infini.config, 2, 30)
    with torch.no_grad():
        expected, actual = llama(ids).logits, infini(ids).logits
    assert (expected[:, :16] - actual[:, :16]).abs().max().item() <= 1e-4
    assert (expected[:, 16:] - actual[:, 16:]).abs().max().item() > 1e-3  # local attention + memory from here on


def test_passkey_task_puts_the_needle_in_an_earlier_segment_and_asks_at_the_end():
    from hf_memory.tasks import KEY, QUERY, PasskeySpec, passkey_batch

    spec = PasskeySpec(vocab_size=128, segment_size=8, num_segments=4)
    batch = passkey_batch(spec, 256, torch.Generator().manual_seed(0))
    ids = batch["input_ids"]
    assert ids.shape == (256, spec.length) and (ids[:, -2] == QUERY).all()
    row, position = torch.where(ids == KEY)
    assert torch.equal(row, torch.arange(256))  # exactly one needle per row
    assert torch.equal(ids[row, position + 1], ids[:, -1])  # the answer is the passkey after KEY
    assert torch.equal(position // spec.segment_size, batch["needle_segment"])
    assert (batch["needle_segment"] < spec.num_segments - 1).all()
    assert ((batch["labels"] != -100).sum(1) == 1).all()


@pytest.mark.parametrize("rule", ["linear", "delta"])
def test_prefill_of_all_segments_at_once_equals_token_by_token_decode(rule):
    """The prefill batches the segments' attention and reads (linear: the memories as a cumulative sum); the
    decode path steps one token at a time through the cached segment: same logits, left padding included."""
    model = _with_open_gates(build("infini-attention-tiny", memory_update=rule))
    ids = random_ids(model.config, 2, 29)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        out = model(ids[:, :5], attention_mask=mask[:, :5], use_cache=True)
        steps = [out.logits]
        for t in range(5, ids.shape[1]):
            out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits)
    stepped = torch.cat(steps, dim=1)
    real = mask.bool()
    torch.testing.assert_close(stepped[real], full[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rule,detach_every", [("linear", None), ("delta", None), ("delta", 1)])
@pytest.mark.parametrize("split", [13, 30])
def test_several_new_tokens_after_a_cache_run_in_one_call_and_equal_the_full_forward(rule, detach_every, split):
    """A continuation of several tokens takes the prefill path started from the cached memory and unfinished
    segment (rows out of step: left pads of 4 and 9): its logits equal the full forward's, and the cache it leaves
    equals the one token-by-token decoding leaves. Each way of computing the memories is covered: the linear rule's
    cumulative sum, the delta rule's one-tensor loop, and the segment loop that ``memory_detach_every`` takes."""
    import copy

    model = _with_open_gates(build("infini-attention-tiny", memory_update=rule, memory_detach_every=detach_every))
    ids = random_ids(model.config, 3, 45)
    mask = torch.ones_like(ids)
    mask[1, :4], mask[2, :9] = 0, 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        prompt = model(ids[:, :split], attention_mask=mask[:, :split], use_cache=True).cache
        at_once = model(ids[:, split:], attention_mask=mask, cache=copy.deepcopy(prompt), use_cache=True)
        cache = prompt
        for t in range(split, ids.shape[1]):
            cache = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache, use_cache=True).cache
    torch.testing.assert_close(at_once.logits, full[:, split:], rtol=1e-5, atol=1e-5)
    for name in ("memory", "norm", "keys", "raw_keys", "values", "count", "tokens"):
        for ours, stepped in zip(at_once.cache.layers, cache.layers):
            got, expected = getattr(ours, name), getattr(stepped, name)
            if name in ("keys", "raw_keys", "values"):  # slots past a row's count hold whatever was there
                filled = torch.arange(got.shape[2])[None] < ours.count[:, None]
                got, expected = got.transpose(1, 2)[filled], expected.transpose(1, 2)[filled]
            torch.testing.assert_close(torch.as_tensor(got), torch.as_tensor(expected), rtol=1e-5, atol=1e-5)
