"""The parallel hybrid (Hymba / Falcon-H1 layout): parity with transformers' Falcon-H1, meta tokens, the meta +
window mask, cross-layer KV sharing and the bounded cache."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_training_step, build, random_ids
from transformers import AutoModelForCausalLM, DynamicCache, FalconH1Config, FalconH1ForCausalLM

from hf_memory import cli
from hf_memory.conversion.hymba import LAYER_NAMES
from hf_memory.layers.attention import eager_attention
from hf_memory.modeling.hymba.modeling_hymba import FLEX_MIN_QUERIES, meta_layout
from hf_memory.ops.position_masked_attention import (
    additive_position_mask,
    flex_block_mask,
    flex_position_attention,
    position_mask,
)

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

TINY_FALCON_H1 = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, mamba_d_ssm=128, mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=16,
    mamba_d_conv=4, mamba_chunk_size=16, mamba_rms_norm=False, projectors_bias=True, attention_in_multiplier=0.9,
    key_multiplier=1.3, attention_out_multiplier=0.8, ssm_in_multiplier=1.1, ssm_out_multiplier=0.7,
    ssm_multipliers=[0.5, 1.5, 0.8, 1.2, 0.9], mlp_multipliers=[1.2, 0.6], embedding_multiplier=2.0,
    lm_head_multiplier=0.5, tie_word_embeddings=False, max_position_embeddings=512, pad_token_id=0, bos_token_id=1,
    eos_token_id=2,
)


def _tiny_transformers_falcon_h1(seed=0, **overrides) -> FalconH1ForCausalLM:
    torch.manual_seed(seed)
    model = FalconH1ForCausalLM(FalconH1Config(**{**TINY_FALCON_H1, **overrides}, attn_implementation="eager")).eval()
    with torch.no_grad():  # break the symmetric default init so that every weight matters
        for name, parameter in model.named_parameters():
            if any(key in name for key in ("A_log", ".D", "dt_bias", "norm", "bias")):
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model


@pytest.mark.parametrize("gated_norm", [False, True])
def test_convert_from_transformers_falcon_h1_reproduces_logits_and_greedy_generations(tmp_path, gated_norm):
    source = _tiny_transformers_falcon_h1(mamba_rms_norm=gated_norm, mamba_norm_before_gate=False)
    source.save_pretrained(tmp_path / "falcon")
    assert cli.main(["convert", "--from", "falcon_h1", str(tmp_path / "falcon"), str(tmp_path / "ours")]) == 0
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    assert ours.config.model_type == "hfm_hymba" and ours.config.fusion == "sum"
    ids = random_ids(ours.config, 2, 41)
    with torch.no_grad():
        expected, actual = source(ids).logits, ours(ids).logits
    assert (expected - actual).abs().max().item() <= 1e-4
    kwargs = dict(attention_mask=torch.ones_like(ids[:, :9]), max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert torch.equal(source.generate(ids[:, :9], **kwargs), ours.generate(ids[:, :9], **kwargs))


def test_convert_to_transformers_falcon_h1_round_trips_bit_exactly(tmp_path):
    ours = build("falcon-h1-tiny")
    ours.save_pretrained(tmp_path / "ours")
    assert cli.main(["convert", "--to", "falcon_h1", str(tmp_path / "ours"), str(tmp_path / "falcon")]) == 0
    theirs = FalconH1ForCausalLM.from_pretrained(tmp_path / "falcon", attn_implementation="eager").eval()
    ids = random_ids(ours.config, 2, 29)
    with torch.no_grad():
        assert (theirs(ids).logits - ours(ids).logits).abs().max().item() <= 1e-4
    assert cli.main(["convert", "--from", "falcon_h1", str(tmp_path / "falcon"), str(tmp_path / "back")]) == 0
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back")
    original = ours.state_dict()
    assert set(back.state_dict()) == set(original)
    assert all(torch.equal(tensor, original[name]) for name, tensor in back.state_dict().items())


def test_converting_a_hymba_layout_to_falcon_h1_is_refused(tmp_path):
    build("hymba-tiny").save_pretrained(tmp_path / "ours")
    with pytest.raises(ValueError, match="Falcon-H1 layout"):
        cli.main(["--debug", "convert", "--to", "falcon_h1", str(tmp_path / "ours"), str(tmp_path / "falcon")])


def test_meta_tokens_never_reach_logits_or_hidden_states_but_change_them():
    model = build("hymba-tiny")
    ids = random_ids(model.config, 2, 13)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True, output_attentions=True)
        assert out.logits.shape[1] == 13
        assert all(h.shape[1] == 13 for h in out.hidden_states)
        assert all(a.shape[2] == 13 and a.shape[3] == 13 + model.config.num_memory_tokens for a in out.attentions)
        model.model.memory_tokens.mul_(3.0)
        assert (model(ids).logits - out.logits).abs().max() > 1e-3


def test_sliding_window_queries_always_see_the_meta_tokens():
    positions = torch.arange(12)[None]  # 4 meta tokens, then 8 tokens
    visible = position_mask(positions, positions, window=3, num_sinks=4)[0]
    for q in range(12):
        expected = {k for k in range(q + 1) if k < 4 or q - k < 3}
        assert {k for k in range(12) if visible[q, k]} == expected


def _masked_attention_inputs(device="cpu", length=19, pads=(0, 5)):
    """GQA (4 query heads, 2 KV heads), values wider than keys, rows left-padded by ``pads``, 3 meta tokens."""
    generator = torch.Generator().manual_seed(0)
    q, k = (torch.randn(len(pads), h, length, 16, generator=generator) for h in (4, 2))
    v = torch.randn(len(pads), 2, length, 32, generator=generator)
    positions = torch.stack([(torch.arange(length) - p).clamp(min=-1) for p in pads])
    return [t.to(device) for t in (q, k, v, positions)]


def _reference_masked_attention(q, k, v, positions, window, num_sinks):
    bias = additive_position_mask(positions, positions, window, num_sinks, q.dtype)
    return eager_attention(torch.nn.Module(), q, k, v, bias, scaling=0.25)[0]


@pytest.mark.parametrize("window", [None, 4])
def test_flex_attention_with_the_position_block_mask_equals_the_additive_mask_reference(window):
    """The block mask is built from the same predicate: uncompiled flex attention (forward only on CPU) gives the
    reference's output on every real query of left-padded rows."""
    from torch.nn.attention.flex_attention import flex_attention

    q, k, v, positions = _masked_attention_inputs()
    reference = _reference_masked_attention(q, k, v, positions, window, num_sinks=3)
    flex = flex_position_attention(flex_attention, q, k, v, flex_block_mask(positions, positions, window, 3),
                                   scaling=0.25)
    real = positions >= 0
    assert flex.shape == reference.shape == (2, 19, 4, 32)
    torch.testing.assert_close(flex[real], reference[real], rtol=1e-5, atol=1e-5)
    dropped = window is not None and (reference[0, -1] - _reference_masked_attention(
        q, k, v, positions, window, num_sinks=0)[0, -1]).abs().max() > 1e-3
    assert window is None or dropped  # the meta tokens matter to the last query


@gpu
@pytest.mark.parametrize("window", [None, 4])
def test_compiled_flex_attention_matches_the_reference_forward_and_backward_on_cuda(window):
    from hf_memory.ops.position_masked_attention import compiled_flex_attention

    q, k, v, positions = _masked_attention_inputs("cuda", length=300, pads=(0, 37))
    real = (positions >= 0)[:, :, None, None]
    outputs = []
    for attention in ("reference", "flex"):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        if attention == "flex":
            block_mask = flex_block_mask(positions, positions, window, 3)
            out = flex_position_attention(compiled_flex_attention, *inputs, block_mask, 0.25)
        else:
            out = _reference_masked_attention(*inputs, positions, window, 3)
        (out * real).square().sum().backward()
        outputs.append((out * real, *(t.grad for t in inputs)))
    for fused, reference in zip(*outputs):
        torch.testing.assert_close(fused, reference, rtol=2e-3, atol=2e-3)


@gpu
def test_hymba_trains_the_same_with_flex_attention_as_with_the_reference_on_cuda():
    """Left-padded batch through hymba-tiny on CUDA: logits and every gradient agree with fused kernels on (flex
    attention from FLEX_MIN_QUERIES queries, mamba-ssm where installed) and off (eager attention)."""
    fused, reference = (build("hymba-tiny", use_fused_kernels=flag, attn_implementation=name).cuda()
                        for flag, name in ((True, "sdpa"), (False, "eager")))
    assert_same_training_step(fused, reference, length=FLEX_MIN_QUERIES + 40, pads=7)


def test_a_kv_consumer_has_no_key_value_projections_and_reads_its_producers_keys():
    model = build("hymba-tiny")
    producer, consumer = (model.model.layers[i].mixer for i in (1, 2))
    assert hasattr(producer.self_attn, "k_proj") and not hasattr(consumer.self_attn, "k_proj")
    # the producer leaves its K, V in ``shared_kv``; the consumer's output follows them, its input held fixed
    hidden = torch.randn(1, 12, model.config.hidden_size)
    positions = torch.arange(12)[None]
    embeddings = model.model.rotary_emb(hidden, positions)
    shared = {}
    with torch.no_grad():
        producer(hidden, position_embeddings=embeddings, position_ids=positions, shared_kv=shared)
        keys, values, key_positions = shared[1]
        out, _ = consumer(hidden, position_embeddings=embeddings, position_ids=positions, shared_kv=shared)
        shared[1] = (keys * 2.0, values, key_positions)
        changed, _ = consumer(hidden, position_embeddings=embeddings, position_ids=positions, shared_kv=shared)
    assert (out - changed).abs().max() > 1e-4


def test_cache_keeps_meta_tokens_plus_the_window_and_nothing_for_consumers():
    model = build("hymba-tiny")
    config = model.config
    ids = random_ids(config, 2, 40)
    cache = DynamicCache(config=config)
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
    assert cache.get_seq_length() == 40
    M, window = config.num_memory_tokens, config.sliding_window
    for i, layer in enumerate(cache.layers):
        assert layer.recurrent_states[0].dtype == torch.float32
        if config.kv_source(i) != i:
            assert layer.keys is None
        elif config.layer_types[i] == "parallel_sliding_attention":
            assert layer.keys.shape[-2] == M + window - 1
            assert torch.equal(layer.key_positions[0, :M], torch.arange(M))
        else:
            assert layer.keys.shape[-2] == M + 40


def _published_hymba_folder(model, folder):
    """Write ``model`` in NVIDIA's published layout: its config.json fields and parameter names, every layer's
    q / k / v / x / z packed into ``mamba.in_proj`` (q / x / z in a KV consumer)."""
    import json

    from safetensors.torch import save_file

    config = model.config
    inverse = {ours: theirs for theirs, ours in LAYER_NAMES.items()}
    weights = {}
    for name, tensor in model.state_dict().items():
        if not name.startswith("model.layers."):
            weights[name] = tensor.clone()
            continue
        index, key = name[len("model.layers."):].split(".", 1)
        if key in inverse:
            weights[f"model.layers.{index}.{inverse[key]}"] = tensor.clone()
    for i, layer in enumerate(model.model.layers):
        attention, parts = layer.mixer.self_attn, [layer.mixer.self_attn.q_proj.weight]
        if hasattr(attention, "k_proj"):
            parts += [attention.k_proj.weight, attention.v_proj.weight]
        weights[f"model.layers.{i}.mamba.in_proj.weight"] = torch.cat(parts + [layer.mixer.mamba.in_proj.weight])
    weights.pop("lm_head.weight", None)  # tied: the published file may omit it
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "model.safetensors"))
    published = dict(
        model_type="hymba", architectures=["HymbaForCausalLM"], vocab_size=config.vocab_size,
        hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, kq_head_dim=config.head_dim, v_head_dim=-1,
        attn_hidden_size=-1, mamba_expand=config.mamba_expand, mamba_d_state=config.mamba_d_state,
        mamba_d_conv=config.mamba_d_conv, mamba_dt_rank=config.mamba_dt_rank, mamba_conv_bias=True,
        mamba_proj_bias=False, mamba_inner_layernorms=True, num_memory_tokens=config.num_memory_tokens,
        sliding_window=config.sliding_window - 1, global_attn_idx=[i for i, t in enumerate(config.layer_types)
                                                                  if t == "parallel_attention"],
        kv_reuse_group=config.kv_reuse_groups, rope=True, rope_type="ntk", rope_theta=10000.0,
        max_position_embeddings=1024, orig_max_position_embeddings=256, kq_norm="none", num_experts=1,
        mlp_hidden_act="silu", hidden_act="silu", tie_word_embeddings=True, rms_norm_eps=config.rms_norm_eps,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    (folder / "config.json").write_text(json.dumps(published))


def test_convert_from_the_published_hymba_layout_maps_every_weight_and_keeps_the_logits(tmp_path):
    ntk_theta = 10000.0 * (2 * 1024 / 256 - 1) ** (16 / 14)
    model = build("hymba-tiny", tie_word_embeddings=True, rope_parameters={"rope_type": "default",
                                                                           "rope_theta": ntk_theta})
    (tmp_path / "published").mkdir()
    _published_hymba_folder(model, tmp_path / "published")
    assert cli.main(["convert", "--from", "hymba", str(tmp_path / "published"), str(tmp_path / "ours")]) == 0
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    assert ours.config.sliding_window == model.config.sliding_window
    assert ours.config.kv_reuse_groups == model.config.kv_reuse_groups
    ids = random_ids(model.config, 2, 30)
    with torch.no_grad():
        assert (ours(ids).logits - model(ids).logits).abs().max().item() <= 1e-5


def test_a_published_hymba_in_proj_of_the_wrong_size_is_refused_by_name(tmp_path):
    from safetensors.torch import load_file, save_file

    (tmp_path / "published").mkdir()
    _published_hymba_folder(build("hymba-tiny", tie_word_embeddings=True), tmp_path / "published")
    weights = load_file(str(tmp_path / "published" / "model.safetensors"))
    weights["model.layers.2.mamba.in_proj.weight"] = weights["model.layers.1.mamba.in_proj.weight"].clone()
    save_file(weights, str(tmp_path / "published" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.layers\.2\.mamba\.in_proj\.weight has \d+ rows"):
        cli.main(["--debug", "convert", "--from", "hymba", str(tmp_path / "published"), str(tmp_path / "ours")])


def test_meta_tokens_equal_the_same_vectors_prepended_to_the_input_in_global_layers():
    # with every layer global, the meta tokens are exactly M learned inputs before the text: loss, logits and
    # every gradient equal those of the model without meta tokens fed [meta ; embeddings]
    kwargs = dict(layer_types=["parallel_attention"] * 4)
    with_meta = build("hymba-tiny", **kwargs).train()
    without = build("hymba-tiny", num_memory_tokens=0, **kwargs).train()
    without.load_state_dict({k: v for k, v in with_meta.state_dict().items() if "memory_tokens" not in k})
    ids = random_ids(with_meta.config, 3, 20)
    labels = ids.masked_fill(torch.arange(20) < 10, -100)
    M = with_meta.config.num_memory_tokens
    meta = with_meta.model.memory_tokens[None].expand(3, -1, -1)
    ours = with_meta(ids, labels=labels)
    reference = without(inputs_embeds=torch.cat([meta, without.model.embed_tokens(ids)], 1),
                        labels=torch.cat([torch.full((3, M), -100), labels], 1))
    assert (ours.logits - reference.logits[:, M:]).abs().max() <= 1e-6
    ours.loss.backward()
    reference.loss.backward()
    references = dict(without.named_parameters())
    for name, parameter in with_meta.named_parameters():
        if name in references:
            torch.testing.assert_close(parameter.grad, references[name].grad, rtol=1e-5, atol=1e-7)


def test_the_attention_mask_is_built_once_per_window_in_a_forward(monkeypatch):
    """Layers with the same window hold the same key positions: the mask is made once per forward and shared,
    in prefill and in decoding."""
    from hf_memory.modeling.hymba import modeling_hymba

    built = []
    original = modeling_hymba.additive_position_mask
    monkeypatch.setattr(modeling_hymba, "additive_position_mask", lambda *args: built.append(1) or original(*args))
    model = build("hymba-tiny")  # global, window, window, global
    ids = random_ids(model.config, 2, 20)
    with torch.no_grad():
        out = model(ids[:, :19], use_cache=True)
        assert len(built) == 2
        model(ids[:, 19:], cache=out.cache, use_cache=True)
    assert len(built) == 4


def test_flex_attention_takes_long_queries_and_sdpa_takes_short_ones_on_cuda(monkeypatch):
    """Dispatch, pinned on CPU with CUDA pretended: a prefill of FLEX_MIN_QUERIES queries or more goes through flex
    attention (the uncompiled function stands in for the compiled one) in every attention layer; a decoding step
    goes through SDPA with the dense mask (flex's decoding kernel found no configuration on an H200); both equal
    the eager reference."""
    from torch.nn.attention.flex_attention import flex_attention

    from hf_memory import kernels

    calls = []
    monkeypatch.setitem(kernels._loaded, "flex_attention", lambda *a, **k: calls.append(a[0].shape) or flex_attention(
        *a, **k))
    monkeypatch.setattr(kernels, "on_cuda", lambda *tensors: True)
    monkeypatch.delenv(kernels.DISABLE_ENV, raising=False)
    fused, reference = (build("hymba-tiny", attn_implementation=name) for name in ("sdpa", "eager"))
    ids = random_ids(fused.config, 1, FLEX_MIN_QUERIES + 1)
    with torch.no_grad():
        logits = []
        for model in (fused, reference):
            out = model(ids[:, :-1], use_cache=True)
            step = model(ids[:, -1:], cache=out.cache, use_cache=True)
            logits.append(torch.cat([out.logits, step.logits], dim=1))
    attention_layers = fused.config.num_hidden_layers
    assert len(calls) == attention_layers and all(shape[2] >= FLEX_MIN_QUERIES for shape in calls)
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)


def test_the_meta_token_layout_is_built_on_the_inputs_device_with_or_without_a_mask():
    """A prefill without an attention mask once built the layout on the CPU and failed on CUDA inputs."""
    for mask in (None, torch.ones(2, 7, dtype=torch.long, device="meta")):
        order, output_index = meta_layout(mask, 2, 4, 3, torch.device("meta"))
        assert order.device.type == output_index.device.type == "meta"
        assert order.shape == (2, 7) and output_index.shape == (2, 4)
