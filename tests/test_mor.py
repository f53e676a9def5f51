"""Mixture-of-Recursions: parameter sharing as published, routing (expert- and token-choice) with the tokens'
own positions, router losses, recursion-wise and shared KV caches, early exit in decoding, conversion from
Llama, and the gathered shared-block attention against a dense reference."""

from __future__ import annotations

import pytest
import torch
from conftest import build, random_ids, tiny_config
from torch import nn
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM

from hf_memory.layers.attention import eager_attention
from hf_memory.modeling.mor.modeling_mor import MoRAttention, RecursionCacheLayer

ROUTED = [
    dict(routing="expert_choice"),
    dict(routing="expert_choice", causal_routing="aux_router"),
    dict(routing="token_choice"),
    dict(routing="none"),
]
SCHEMES = ["recursion_wise", "recursive_sharing"]


def _left_padded(config, lengths, seed=0):
    width = max(lengths)
    ids = torch.full((len(lengths), width), config.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, width - n :] = random_ids(config, 1, n, seed=seed + i)[0]
        mask[i, width - n :] = 1
    return ids, mask


# ---------------------------------------------------------------------------------------------- sharing
@pytest.mark.parametrize("sharing, layers, expected", [
    ("middle_cycle", 8, [0, 1, 2, 1, 2, 1, 2, 3]),
    ("cycle", 6, [0, 1, 0, 1, 0, 1]),
    ("sequence", 6, [0, 0, 0, 1, 1, 1]),
])
def test_sharing_maps_applied_layers_onto_unique_layers_as_published(sharing, layers, expected):
    routing = "none" if sharing == "sequence" else "expert_choice"
    model = build("mor-tiny", sharing=sharing, num_hidden_layers=layers, routing=routing)
    config = model.config
    assert [config.unique_layer(i) for i in range(layers)] == expected
    assert len(model.model.layers) == max(expected) + 1
    llama_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    routers = sum(p.numel() for n, p in model.named_parameters() if "router" in n)
    assert sum(p.numel() for p in model.parameters()) == (max(expected) + 1) * llama_layer + routers + \
        2 * config.vocab_size * config.hidden_size + config.hidden_size


def test_360m_preset_has_the_papers_118m_non_embedding_parameters():
    import hf_memory

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_memory.get_config("mor-360m"))
    config = model.config
    layout = (config.hidden_size, config.num_hidden_layers, config.block_size, config.num_unique_layers)
    assert layout == (960, 32, 10, 12)
    embedding = model.get_input_embeddings().weight.numel()  # tied with the LM head
    non_embedding = sum(p.numel() for n, p in model.named_parameters() if "router" not in n) - embedding
    assert abs(non_embedding - 118.0e6) < 0.1e6, non_embedding


# ---------------------------------------------------------------------------------------------- the function
def _llama_with_applied_layers(model) -> LlamaForCausalLM:
    """transformers' Llama with one layer per applied layer, holding the MoR's (shared) weights."""
    c = model.config
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=False,
        max_position_embeddings=c.max_position_embeddings, rope_parameters=c.rope_parameters,
        attn_implementation="eager")).eval()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("model.layers.") and "router" not in k}
    for layer in range(c.num_hidden_layers):
        for name, tensor in model.model.layers[c.unique_layer(layer)].state_dict().items():
            state[f"model.layers.{layer}.{name}"] = tensor
    llama.load_state_dict(state)
    return llama


@pytest.mark.parametrize("sharing", ["middle_cycle", "cycle", "sequence"])
def test_plain_recursive_model_equals_transformers_llama_with_the_tied_weights(sharing):
    model = build("mor-tiny", routing="none", sharing=sharing, num_hidden_layers=8 if sharing == "middle_cycle" else 6,
                  num_recursions=3 if sharing == "middle_cycle" else 2)
    llama = _llama_with_applied_layers(model)
    ids, mask = _left_padded(model.config, [30, 21])
    with torch.no_grad():
        ours, theirs = model(ids, attention_mask=mask).logits, llama(ids, attention_mask=mask).logits
    assert (ours - theirs)[mask.bool()].abs().max() <= 1e-5


def test_every_capacity_one_without_gating_equals_the_plain_recursive_model():
    mor = build("mor-tiny", capacities=[1.0, 1.0, 1.0], router_gating="none")
    plain = build("mor-tiny", routing="none")
    plain.load_state_dict(mor.state_dict(), strict=False)
    ids = random_ids(mor.config, 2, 25)
    for mode in ("train", "eval"):
        mor.train(mode == "train"), plain.train(mode == "train")
        with torch.no_grad():
            assert torch.equal(mor(ids).recursion_depth, torch.full((2, 25), 3))
            assert (mor(ids).logits - plain(ids).logits).abs().max() <= 1e-6


def _dense_layer(layer, hidden, rope, mask):
    """One Llama layer on the full sequence under an additive mask [B, 1, T, T]."""
    attention = layer.self_attn
    q, k, v = attention.project(layer.input_layernorm(hidden), rope)
    out, _ = eager_attention(attention, q, k, v, mask, attention.scaling)
    hidden = hidden + attention.o_proj(out.reshape(hidden.shape[0], hidden.shape[1], -1))
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def _dense_expert_choice_logits(model, ids):
    """The definition without gathering (training routing): every recursion runs the block on the whole
    sequence, each token's keys restricted to the routed tokens up to it; only routed tokens are updated."""
    inner, config = model.model, model.config
    length = ids.shape[1]
    positions = torch.arange(length, device=ids.device)[None]
    rope = inner.rotary_emb(inner.embed_tokens.weight, positions)
    causal = torch.ones(length, length, device=ids.device).tril().bool()

    def additive(keys):  # [B, T] keys allowed -> [B, 1, T, T]
        allowed = causal[None] & keys[:, None, :]
        allowed = allowed | torch.eye(length, dtype=torch.bool, device=ids.device)[None]  # skipped rows stay finite
        bias = torch.zeros(allowed.shape, device=ids.device)
        return bias.masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]

    hidden = _dense_layer(inner.layers[0], inner.embed_tokens(ids), rope, additive(torch.ones_like(ids).bool()))
    active = torch.ones_like(ids).bool()
    for r in range(config.num_recursions):
        weight = config.router_alpha * torch.sigmoid(inner.routers[r](hidden).squeeze(-1))
        count = max(1, int(config.capacities[r] * length + 1e-9))
        top = weight.masked_fill(~active, float("-inf")).topk(count, dim=1).indices
        selected = torch.zeros_like(active).scatter(1, top, True)
        block = hidden
        for layer in config.recursion_layers(r):
            block = _dense_layer(inner.layers[config.unique_layer(layer)], block, rope, additive(selected))
        hidden = torch.where(selected[..., None], hidden + weight[..., None] * block, hidden)
        active = selected
    hidden = _dense_layer(inner.layers[-1], hidden, rope, additive(torch.ones_like(ids).bool()))
    return model.lm_head(inner.norm(hidden))


@pytest.mark.parametrize("device, attn_implementation", [
    ("cpu", "eager"), ("cpu", "sdpa"),
    pytest.param("cuda", "sdpa", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
])
def test_gathered_recursions_keep_each_tokens_position_and_equal_the_dense_reference_forward_and_backward(
        device, attn_implementation):
    """The shared block runs on the gathered tokens of each recursion (on CUDA: SDPA over the gathered tokens,
    no full-sequence attention); the reference attends over the whole sequence with a mask."""
    model = build("mor-tiny", router_aux_loss_coef=0.0, attn_implementation=attn_implementation).train().to(device)
    reference = build("mor-tiny", router_aux_loss_coef=0.0).train().to(device)
    ids = random_ids(model.config, 3, 27).to(device)
    ours, theirs = model(ids).logits, _dense_expert_choice_logits(reference, ids)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    for out, m in ((ours, model), (theirs, reference)):
        nn.functional.cross_entropy(out[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------- routing
def test_training_routing_keeps_the_top_capacity_fraction_of_each_rows_real_tokens():
    model = build("mor-tiny").train()
    ids, mask = _left_padded(model.config, [30, 19, 7])
    depth = model(ids, attention_mask=mask).recursion_depth
    assert torch.equal(depth[mask == 0], torch.zeros_like(depth[mask == 0]))
    for row, real in enumerate([30, 19, 7]):
        for r, capacity in enumerate(model.config.capacities):
            assert int((depth[row] > r).sum()) == max(1, int(capacity * real + 1e-9)), (row, r)


def test_router_losses_are_returned_in_training_and_added_to_the_loss():
    for overrides in ROUTED[:3]:
        model = build("mor-tiny", **overrides)
        ids = random_ids(model.config, 2, 20)
        model.train()
        out = model(ids, labels=ids)
        ce = nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        assert out.aux_loss > 0
        torch.testing.assert_close(out.loss, ce + out.aux_loss)
        model.eval()
        with torch.no_grad():
            assert model(ids, labels=ids).aux_loss is None
    token = build("mor-tiny", routing="token_choice").train()
    logits = token(random_ids(token.config, 2, 20)).router_logits[0]
    assert logits.shape == (2, 20, 3)


def test_the_auxiliary_router_learns_from_the_detached_state_only():
    model = build("mor-tiny", causal_routing="aux_router", router_aux_loss_coef=1.0).train()
    model(random_ids(model.config, 2, 20)).aux_loss.backward()
    for name, parameter in model.named_parameters():
        touched = parameter.grad is not None and parameter.grad.abs().sum() > 0
        assert touched == ("causal_routers" in name), name


def test_routers_give_token_dependent_depths_at_inference():
    for overrides in ROUTED[:3]:
        model = build("mor-tiny", **overrides)
        with torch.no_grad():
            depth = model(random_ids(model.config, 2, 40)).recursion_depth
        assert len(depth.unique()) > 1, overrides


def test_hidden_states_hold_one_entry_per_applied_layer_even_when_no_token_reaches_a_depth():
    class Stop(nn.Module):  # a router whose logit is -5 for every token: nobody continues
        def forward(self, hidden):
            return hidden.new_full((*hidden.shape[:-1], 1), -5.0)

    model = build("mor-tiny")
    model.model.routers[2] = Stop()
    ids = random_ids(model.config, 2, 12)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    assert out.recursion_depth.max() == 2
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    recursion_3 = model.config.recursion_layers(2)
    for layer in recursion_3:  # the states after the skipped layers are the states before them
        assert torch.equal(out.hidden_states[layer + 1], out.hidden_states[recursion_3[0]])


# ---------------------------------------------------------------------------------------------- cache
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("routing", ROUTED, ids=["expert", "expert-aux-router", "token", "none"])
def test_cached_decode_of_a_left_padded_batch_equals_the_full_forward(routing, scheme):
    model = build("mor-tiny", kv_cache_scheme=scheme, **routing)
    ids, mask = _left_padded(model.config, [34, 25])
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        out = model(ids[:, :12], attention_mask=mask[:, :12], use_cache=True)
        pieces = [out.logits]
        out = model(ids[:, 12:20], attention_mask=mask[:, :20], cache=out.cache, use_cache=True)
        pieces.append(out.logits)
        for t in range(20, ids.shape[1]):
            out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=out.cache, use_cache=True)
            pieces.append(out.logits)
    assert (full.logits - torch.cat(pieces, 1))[mask.bool()].abs().max() <= 1e-4
    if routing["routing"] != "none":
        assert len(full.recursion_depth[mask.bool()].unique()) > 1  # the routing did route


@pytest.mark.parametrize("scheme", SCHEMES)
def test_each_shared_layer_caches_exactly_the_tokens_that_reached_it(scheme):
    model = build("mor-tiny", kv_cache_scheme=scheme)
    ids, mask = _left_padded(model.config, [30, 22])
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        depth = model(ids, attention_mask=mask, cache=cache, use_cache=True).recursion_depth
    stream = torch.arange(ids.shape[1]).expand_as(ids)
    for r in range(model.config.num_recursions):
        for layer in model.config.recursion_layers(r):
            held = cache.layers[layer]
            assert isinstance(held, RecursionCacheLayer)
            if scheme == "recursive_sharing" and r > 0:
                assert held.keys is None
                continue
            for row in range(2):
                kept = held.key_index[row][held.key_index[row] >= 0]
                assert torch.equal(kept, stream[row][depth[row] > r]), (r, row)
    assert cache.get_seq_length() == ids.shape[1]


def test_decoding_computes_nothing_beyond_each_tokens_depth_and_batches_the_rows_still_active():
    model = build("mor-tiny")
    calls = []

    def record(module, args, kwargs, output):
        step = kwargs.get("step")
        if step is not None:
            calls.append((step.layer, args[0].shape[0] if args else kwargs["hidden_states"].shape[0],
                          int((step.query_index >= 0).sum())))

    hooks = [m.register_forward_hook(record, with_kwargs=True) for m in model.modules() if isinstance(m, MoRAttention)]
    prompt = random_ids(model.config, 8, 10)
    exits = 0
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(6):
            calls.clear()
            out = model(token, cache=out.cache, use_cache=True)
            depth = out.recursion_depth[:, 0]
            for r in range(model.config.num_recursions):
                active = int((depth > r).sum())
                ran = [(rows, tokens) for layer, rows, tokens in calls if layer in model.config.recursion_layers(r)]
                if active == 0:
                    assert ran == []
                else:
                    assert ran == [(active, active)] * model.config.block_size
            exits += int((depth < model.config.num_recursions).sum())
            token = out.logits[:, -1:].argmax(-1)
    for hook in hooks:
        hook.remove()
    assert exits > 0  # some rows left the block early


def test_a_batch_decodes_each_row_as_it_decodes_alone():
    model = build("mor-tiny")
    prompts = random_ids(model.config, 4, 9)
    kwargs = dict(max_new_tokens=15, min_new_tokens=15, do_sample=False)
    together = model.generate(prompts, attention_mask=torch.ones_like(prompts), **kwargs)
    for row in range(4):
        alone = model.generate(prompts[row : row + 1], attention_mask=torch.ones_like(prompts[:1]), **kwargs)
        assert torch.equal(together[row], alone[0])


# ---------------------------------------------------------------------------------------------- conversion
def _tiny_llama(tmp_path, layers=6):
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256, tie_word_embeddings=False)).eval()
    llama.save_pretrained(tmp_path / "llama")
    return llama


@pytest.mark.parametrize("overrides", [dict(router_gating="none"), dict(routing="none")])
def test_llama_converted_with_one_recursion_at_full_capacity_equals_the_llama(tmp_path, overrides):
    from hf_memory.conversion.llama import convert_from_llama

    llama = _tiny_llama(tmp_path)
    convert_from_llama(str(tmp_path / "llama"), str(tmp_path / "mor"), architecture="mor", num_recursions=1,
                       **overrides)
    mor = AutoModelForCausalLM.from_pretrained(tmp_path / "mor").eval()
    ids = random_ids(mor.config, 2, 40)
    with torch.no_grad():
        assert (mor(ids).logits - llama(ids).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("initialization", ["stepwise", "average"])
def test_llama_conversion_initialises_the_shared_block_as_relaxed_recursive_transformers(tmp_path, initialization):
    from hf_memory.conversion.llama import convert_from_llama

    llama = _tiny_llama(tmp_path, layers=8)  # Middle-Cycle, 3 recursions: layers 0 | 1-6 as (1 2)(3 4)(5 6) | 7
    mor = convert_from_llama(str(tmp_path / "llama"), str(tmp_path / "mor"), architecture="mor", num_recursions=3,
                             initialization=initialization)
    source = [layer.self_attn.q_proj.weight for layer in llama.model.layers]
    ours = [layer.self_attn.q_proj.weight for layer in mor.model.layers]
    assert torch.equal(ours[0], source[0]) and torch.equal(ours[3], source[7])
    if initialization == "stepwise":  # round(linspace(1, 6, 2)) = 1, 6
        assert torch.equal(ours[1], source[1]) and torch.equal(ours[2], source[6])
    else:
        torch.testing.assert_close(ours[1], (source[1] + source[3] + source[5]) / 3)
        torch.testing.assert_close(ours[2], (source[2] + source[4] + source[6]) / 3)


def test_llama_conversion_refuses_a_recursion_count_that_does_not_divide_the_layers(tmp_path):
    from hf_memory.conversion.llama import convert_from_llama

    _tiny_llama(tmp_path, layers=6)
    with pytest.raises(ValueError, match=r"num_recursions can be one of \[1, 2, 4\]"):
        convert_from_llama(str(tmp_path / "llama"), str(tmp_path / "mor"), architecture="mor", num_recursions=3)


def test_config_fills_the_published_router_defaults_per_routing():
    expert, token = tiny_config("mor-tiny"), tiny_config("mor-tiny", routing="token_choice")
    assert (expert.router_function, expert.router_alpha, expert.router_aux_loss_coef) == ("sigmoid", 0.1, 1e-3)
    assert expert.capacities == [1.0, 2 / 3, 1 / 3]
    assert (token.router_function, token.router_alpha, token.router_aux_loss_coef, token.router_z_loss_coef) == \
        ("softmax", 1.0, 0.1, 1e-5)
