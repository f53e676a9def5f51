"""The conformance suite: every registered architecture, through its tiny preset(s), behaves like a
transformers causal LM — Auto classes, save/load, cached decoding, generate, padding, gradients, Trainer,
Hub export — and rejects bad configs by naming the field."""

from __future__ import annotations

import ast
import json
import sys
import textwrap

import pytest
import torch
from conftest import COMMON_INVALID_CONFIGS, INVALID_CONFIGS, build, crossing_length, random_ids, run_python, tiny_config
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, DynamicCache

import hf_memory


def test_every_architecture_has_a_tiny_preset_and_invalid_config_cases():
    covered = {hf_memory.PRESETS[name].architecture for name in hf_memory.PRESETS if name.endswith("-tiny")}
    assert covered == set(hf_memory.ARCHITECTURES)
    assert all(INVALID_CONFIGS[name] for name in hf_memory.ARCHITECTURES)


def test_auto_classes_resolve_from_config_and_model_type(preset):
    config = tiny_config(preset)
    architecture = hf_memory.ARCHITECTURES[hf_memory.PRESETS[preset].architecture]
    assert type(AutoConfig.for_model(config.model_type)) is type(config)
    assert type(AutoModel.from_config(config)) is architecture.auto_map["AutoModel"]
    assert type(AutoModelForCausalLM.from_config(config)) is architecture.auto_map["AutoModelForCausalLM"]


def test_save_then_load_gives_identical_logits(preset, tmp_path):
    model = build(preset)
    ids = random_ids(model.config, 2, crossing_length(model.config))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(loaded) is type(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_full_forward_equals_prefill_then_token_by_token_decode(preset, attn_implementation):
    model = build(preset, attn_implementation=attn_implementation)
    length = crossing_length(model.config)
    ids = random_ids(model.config, 2, length)
    prefill = length // 3
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :prefill], use_cache=True)
        steps = [out.logits]
        for t in range(prefill, length):
            out = model(ids[:, t : t + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits)
    decoded = torch.cat(steps, dim=1)
    assert (full - decoded).abs().max().item() <= 1e-4


def test_prefill_in_several_multi_token_pieces_equals_full_forward(preset):
    model = build(preset)
    length = crossing_length(model.config)
    ids = random_ids(model.config, 2, length)
    cuts = [0, 5, length // 2, length - 3, length]
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache, pieces = DynamicCache(config=model.config), []
        for start, end in zip(cuts, cuts[1:]):
            pieces.append(model(ids[:, start:end], cache=cache, use_cache=True).logits)
    assert (full - torch.cat(pieces, dim=1)).abs().max().item() <= 1e-4


def test_greedy_generate_with_cache_equals_without_cache(preset):
    model = build(preset)
    prompt = random_ids(model.config, 2, crossing_length(model.config) // 2)
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=40, min_new_tokens=40, do_sample=False)
    with_cache = model.generate(prompt, use_cache=True, **kwargs)
    without_cache = model.generate(prompt, use_cache=False, **kwargs)
    assert with_cache.shape == (2, prompt.shape[1] + 40)
    assert torch.equal(with_cache, without_cache)


def test_beam_search_reorders_cache_like_recomputation(preset):
    model = build(preset)
    prompt = random_ids(model.config, 2, 11)
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=12, min_new_tokens=12, num_beams=3,
                  do_sample=False, num_return_sequences=2)
    with_cache = model.generate(prompt, use_cache=True, **kwargs)
    without_cache = model.generate(prompt, use_cache=False, **kwargs)
    assert with_cache.shape == (4, prompt.shape[1] + 12)
    assert torch.equal(with_cache, without_cache)


def _left_pad(rows: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    return ids, mask


def test_left_padded_batch_gives_each_rows_unpadded_logits_and_generations(preset):
    model = build(preset)
    length = crossing_length(model.config)
    rows = [random_ids(model.config, 1, length, seed=1)[0], random_ids(model.config, 1, length - 13, seed=2)[0]]
    ids, mask = _left_pad(rows, model.config.pad_token_id)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        for i, row in enumerate(rows):
            alone = model(row[None]).logits[0]
            assert (batched[i, -len(row) :] - alone).abs().max().item() <= 1e-4
    generated = model.generate(ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    for i, row in enumerate(rows):
        alone = model.generate(row[None], attention_mask=torch.ones_like(row[None]), max_new_tokens=10,
                               min_new_tokens=10, do_sample=False)
        assert torch.equal(generated[i, -10:], alone[0, -10:])


def test_every_trainable_parameter_gets_a_finite_nonzero_gradient(preset):
    model = build(preset).train()
    ids = random_ids(model.config, 2, crossing_length(model.config))
    model(ids, labels=ids).loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, f"{name} has no gradient"
        assert torch.isfinite(parameter.grad).all(), f"{name} has a non-finite gradient"
        assert parameter.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def test_gradient_checkpointing_gives_the_same_gradients(preset):
    ids = None
    grads = []
    for checkpointing in (False, True):
        model = build(preset).train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            assert model.is_activation_checkpointing
        ids = random_ids(model.config, 2, crossing_length(model.config)) if ids is None else ids
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_trainer_run_on_synthetic_recall_lowers_the_loss(preset, tmp_path):
    from transformers import Trainer, TrainingArguments

    from hf_memory.tasks import MQARDataset, MQARSpec

    model = build(preset)
    spec = MQARSpec(vocab_size=model.config.vocab_size, num_pairs=4, num_queries=4)
    train, held_out = MQARDataset(spec, 1024, seed=0), MQARDataset(spec, 128, seed=1)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=40, per_device_train_batch_size=32, per_device_eval_batch_size=64,
        learning_rate=1e-2, warmup_steps=5, weight_decay=0.0, logging_steps=10, report_to=[], use_cpu=True,
        save_strategy="no", disable_tqdm=True, seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=held_out)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < before - 0.5, (before, after)


def test_dynamic_cache_from_config_holds_each_layers_state_in_fp32(preset):
    model = build(preset).to(torch.bfloat16)
    ids = random_ids(model.config, 3, crossing_length(model.config))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
    assert len(cache.layers) == model.config.num_hidden_layers
    for i, (layer_type, layer) in enumerate(zip(model.config.layer_types, cache.layers)):
        if layer_type == "linear_attention":
            assert layer.recurrent_states[0].dtype == torch.float32
            assert layer.recurrent_states[0].shape[0] == 3
            assert layer.conv_states[0].shape[0] == 3
        elif layer_type == "sliding_attention":
            assert layer.keys.shape[-2] <= model.config.sliding_window
        elif layer_type.startswith("parallel_"):  # SSM state + the attention heads' KV (meta tokens included)
            assert layer.recurrent_states[0].dtype == torch.float32 and layer.conv_states[0].shape[0] == 3
            meta = model.config.num_memory_tokens
            if model.config.kv_source(i) != i:  # a KV consumer reads its producer's keys
                assert layer.keys is None
            elif layer_type == "parallel_sliding_attention":
                assert layer.keys.shape[-2] <= meta + model.config.sliding_window - 1
            else:
                assert layer.keys.shape[-2] == meta + ids.shape[1]
        elif layer_type == "infini_attention":  # compressive memory + at most one segment of KV
            assert layer.memory.dtype == layer.norm.dtype == torch.float32
            assert layer.memory.shape[0] == 3 and layer.keys.shape[-2] <= model.config.segment_size
        elif layer_type == "recurrent_memory_attention":  # memory + KV of [read memory ; one segment]
            m, hidden = model.config.num_memory_tokens, model.config.hidden_size
            if model.config.memory_type == "armt":  # an associative matrix per layer, no read memory tokens
                assert layer.associations.dtype == layer.normalizer.dtype == torch.float32
                assert layer.associations.shape[0] == 3 and layer.associations.shape[-1] == hidden
                assert layer.memory is None and layer.keys.shape[-2] == model.config.segment_size
            else:
                assert layer.memory.dtype == torch.float32 and layer.memory.shape == (3, m, hidden)
                assert layer.keys.shape[-2] == m + model.config.segment_size
        elif layer_type == "recursive_attention":  # KV of the tokens that reached the layer, their stream indices
            if layer.keys is None:  # a deeper recursion under recursive KV sharing
                assert model.config.kv_cache_scheme == "recursive_sharing"
                continue
            reached = (layer.key_index >= 0).sum(1)
            assert layer.key_index.shape[0] == 3 and layer.keys.shape[-2] == int(reached.max()) <= ids.shape[1]
        elif layer_type.startswith("titans_"):  # neural memory weights + momentum, the unfinished chunk, and the
            config = model.config              # window (MAG, MAL) or the unfinished segment with its context (MAC)
            assert all(w.dtype == s.dtype == torch.float32 and w.shape[0] == 3
                       for w, s in zip(layer.weights, layer.momentum))
            assert len(layer.weights) == config.memory_depth and layer.pending_k.shape[2] == config.memory_chunk_size
            if layer_type == "titans_mac":
                assert layer.keys.shape[-2] == layer.context_keys.shape[-2] == config.segment_size
                assert all(w.dtype == torch.float32 for w in layer.snapshot)
            else:
                assert layer.keys.shape[-2] == config.sliding_window - 1
        else:
            assert layer.keys.shape[-2] == ids.shape[1]


def test_cropping_a_recurrent_or_memory_cache_is_refused_with_a_clear_error(preset):
    model = build(preset)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(random_ids(model.config, 1, 9), cache=cache, use_cache=True)
    with pytest.raises((RuntimeError, NotImplementedError), match="crop"):
        cache.crop(-2)
    if "linear_attention" in model.config.layer_types:
        cache.activate_past_recording()
        with pytest.raises(NotImplementedError, match="cannot be cropped"):
            model(random_ids(model.config, 1, 1), cache=cache, use_cache=True)


def test_invalid_configs_raise_value_error_naming_the_field(preset):
    architecture = hf_memory.PRESETS[preset].architecture
    for overrides, field in INVALID_CONFIGS[architecture] + COMMON_INVALID_CONFIGS:
        if "layer_types" in overrides:
            overrides = {"num_hidden_layers": 2, **overrides}
        with pytest.raises(ValueError, match=f"`{field}`"):
            hf_memory.get_config(preset, **overrides)


def test_saved_folder_carries_auto_map_code_and_a_hub_model_card(preset, tmp_path):
    from huggingface_hub import ModelCard

    model = build(preset)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}
    for target in config["auto_map"].values():
        assert (tmp_path / f"{target.split('.')[0]}.py").exists()
    for code in tmp_path.glob("*.py"):
        for node in ast.walk(ast.parse(code.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                top = node.module.split(".")[0]
                assert top in {"torch", "transformers", "huggingface_hub"} | sys.stdlib_module_names, code.name
            if isinstance(node, ast.Import):
                assert not any(alias.name.startswith("hf_memory") for alias in node.names), code.name
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-generation"
    assert "arxiv.org/abs/" in card.text


def test_export_loads_with_trust_remote_code_in_a_fresh_process_without_hf_memory(preset, tmp_path):
    model = build(preset)
    ids = random_ids(model.config, 2, crossing_length(model.config))
    model.save_pretrained(tmp_path / "model")
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(ids).logits}, tmp_path / "reference.pt")
    run_python(textwrap.dedent(f"""
        import sys
        sys.modules["hf_memory"] = None  # any import of hf_memory now fails
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True,
                                                     attn_implementation="eager").eval()
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        reference = torch.load({str(tmp_path / "reference.pt")!r})
        with torch.no_grad():
            logits = model(reference["ids"]).logits
        assert torch.equal(logits, reference["logits"]), (logits - reference["logits"]).abs().max()
        out = model.generate(reference["ids"][:, :5], max_new_tokens=5, do_sample=False)
        assert out.shape == (2, 10)
        print("remote code OK")
    """))


def test_push_to_hub_uploads_the_same_files_as_save_pretrained(preset, tmp_path, fake_hub):
    model = build(preset)
    model.push_to_hub("someone/tiny-memory-model")
    model.save_pretrained(tmp_path, repo_id="someone/tiny-memory-model")  # the card's load snippet names the repo
    assert len(fake_hub) == 1 and fake_hub[0][0] == "someone/tiny-memory-model"
    uploaded = fake_hub[0][1]
    assert set(uploaded) == {p.name for p in tmp_path.iterdir()}
    for name in ("config.json", "README.md", "model.safetensors"):
        assert uploaded[name] == (tmp_path / name).read_bytes(), name


# ------------------------------------------------------------------ transformers' model API, as Llama has it
def _manual_decode(model, ids, prefill, cache_kwarg):
    """Logits of a hand-written decode loop passing the cache under ``cache_kwarg``."""
    with torch.no_grad():
        out = model(ids[:, :prefill], use_cache=True)
        steps = [out.logits]
        for t in range(prefill, ids.shape[1]):
            out = model(ids[:, t : t + 1], use_cache=True, **{cache_kwarg: out.cache})
            steps.append(out.logits)
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("old_name", ["past_key_values", "cache_params"])
def test_deprecated_cache_argument_names_still_carry_the_cache_with_a_future_warning(preset, old_name):
    model = build(preset)
    ids = random_ids(model.config, 2, crossing_length(model.config))
    expected = _manual_decode(model, ids, 9, "cache")
    with pytest.warns(FutureWarning, match=old_name):
        logits = _manual_decode(model, ids, 9, old_name)
    assert torch.equal(logits, expected)


def test_return_dict_false_returns_the_tuple_llama_returns(preset):
    model = build(preset)
    ids = random_ids(model.config, 2, 12)
    with torch.no_grad():
        as_dict = model(ids, labels=ids, use_cache=False)
        as_tuple = model(ids, labels=ids, use_cache=False, return_dict=False)
    assert isinstance(as_tuple, tuple)
    assert torch.equal(as_tuple[0], as_dict.loss) and torch.equal(as_tuple[1], as_dict.logits)


def test_output_hidden_states_set_in_the_config_at_load_is_honoured(preset, tmp_path):
    build(preset).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, output_hidden_states=True).eval()
    ids = random_ids(model.config, 2, 12)
    with torch.no_grad():
        out = model(ids)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    # the first hidden state is the first layer's input: the embeddings (times a muP embedding_multiplier)
    assert torch.equal(out.hidden_states[0], model.get_input_embeddings()(ids) * model.config.embedding_multiplier)


SOFTMAX_LAYER_TYPES = {"full_attention", "sliding_attention", "infini_attention", "recurrent_memory_attention",
                       "parallel_attention", "parallel_sliding_attention", "recursive_attention", "titans_mac",
                       "titans_mag", "titans_mal"}
# layer types that only some tokens reach (Mixture-of-Recursions): a token's map row is zero where it skipped
ROUTED_LAYER_TYPES = {"recursive_attention"}


def test_output_attentions_returns_one_map_per_softmax_attention_layer(preset):
    model = build(preset)
    ids = random_ids(model.config, 2, 12)
    with torch.no_grad():
        out = model(ids, output_attentions=True)
    expected = sum(t in SOFTMAX_LAYER_TYPES for t in model.config.layer_types)
    assert len(out.attentions) == expected
    layer_types = [t for t in model.config.layer_types if t in SOFTMAX_LAYER_TYPES]
    for weights, layer_type in zip(out.attentions, layer_types):
        assert weights.shape[:3] == (2, model.config.num_attention_heads, 12)
        sums = weights.sum(-1)
        if layer_type in ROUTED_LAYER_TYPES:  # rows of the tokens that reached the layer sum to 1, the others are 0
            reached = sums[:, 0] > 0.5
            assert reached.any()
            torch.testing.assert_close(sums, reached[:, None].expand_as(sums).float())
        else:
            torch.testing.assert_close(sums, torch.ones(weights.shape[:3]))


def test_set_attn_implementation_reaches_every_softmax_attention(preset):
    model = build(preset, attn_implementation="sdpa")
    ids = random_ids(model.config, 2, crossing_length(model.config))
    with torch.no_grad():
        sdpa = model(ids).logits
        model.set_attn_implementation("eager")
        out = model(ids, output_attentions=True)
    assert len(out.attentions) == sum(t in SOFTMAX_LAYER_TYPES for t in model.config.layer_types)
    assert (out.logits - sdpa).abs().max() <= 1e-4


def test_static_cache_generation_equals_dynamic_cache_generation(preset):
    model = build(preset)
    prompt = random_ids(model.config, 2, crossing_length(model.config) // 2)
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert torch.equal(model.generate(prompt, cache_implementation="static", **kwargs), model.generate(prompt, **kwargs))


def test_head_dim_is_the_attention_head_size_everywhere(preset):
    model = build(preset)
    config = model.config
    attentions = [m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "num_key_value_groups")]
    unique_layer = getattr(config, "unique_layer", lambda layer: layer)  # layers that share weights count once
    assert len(attentions) == len({unique_layer(i) for i, t in enumerate(config.layer_types) if t in SOFTMAX_LAYER_TYPES})
    for module in attentions:
        assert module.head_dim == config.head_dim
        assert module.q_proj.out_features == config.num_attention_heads * config.head_dim


def test_rope_parameters_select_transformers_rope_types(preset):
    config = tiny_config(preset)
    if build(preset).model.rotary_emb is None:
        pytest.skip("no layer of this preset uses RoPE")
    ids = random_ids(config, 1, crossing_length(config))
    logits = {}
    for rope in ({"rope_type": "default", "rope_theta": 10000.0},
                 {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}):
        model = build(preset, rope_parameters=rope)
        assert model.model.rotary_emb.rope_type == rope["rope_type"]
        with torch.no_grad():
            logits[rope["rope_type"]] = model(ids).logits
    assert (logits["default"] - logits["linear"]).abs().max() > 1e-4


def test_trainer_resumes_from_a_checkpoint_to_the_uninterrupted_weights(preset, tmp_path):
    from transformers import Trainer, TrainingArguments

    from hf_memory.tasks import MQARDataset, MQARSpec

    spec = MQARSpec(vocab_size=tiny_config(preset).vocab_size, num_pairs=4, num_queries=4)
    data = MQARDataset(spec, 64, seed=0)

    def trainer(output_dir, max_steps):
        args = TrainingArguments(output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=16,
                                 learning_rate=1e-3, lr_scheduler_type="constant", save_strategy="steps", save_steps=2,
                                 report_to=[], use_cpu=True,
                                 disable_tqdm=True, seed=0, logging_strategy="no")
        return Trainer(model=build(preset), args=args, train_dataset=data)

    whole = trainer(tmp_path / "whole", 4)
    whole.train()
    trainer(tmp_path / "part", 2).train()
    resumed = trainer(tmp_path / "part", 4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    for (name, expected), actual in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-6, msg=name)
