"""Bad input is refused with a ValueError naming the problem, before any kernel runs, for every architecture:
configs (see also the conformance suite's invalid-config cases), inputs, caches, and weight files."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build, random_ids, tiny_config
from transformers import AutoModelForCausalLM, DynamicCache

import hf_memory


def test_config_typo_in_a_preset_override_names_the_closest_field():
    with pytest.raises(ValueError, match="did you mean `linear_chunk_size`"):
        hf_memory.get_config("gated-deltanet-tiny", chunk_size=8)
    with pytest.raises(ValueError, match="did you mean `segment_size`"):
        hf_memory.get_config("infini-attention-tiny", segmnt_size=8)


def test_a_layer_count_set_at_load_that_disagrees_with_layer_types_is_refused(preset, tmp_path):
    build(preset).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="`layer_types`"):
        AutoModelForCausalLM.from_pretrained(tmp_path, num_hidden_layers=5)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 5}))
    with pytest.raises(ValueError, match="`layer_types`"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


BAD_INPUTS = {
    "an id >= vocab_size": (lambda c: torch.full((1, 6), c.vocab_size), None, "vocab_size"),
    "a negative id": (lambda c: torch.full((1, 6), -1), None, "vocab_size"),
    "float ids": (lambda c: torch.ones(1, 6), None, "integer"),
    "no tokens": (lambda c: torch.ones(1, 0, dtype=torch.long), None, "no tokens"),
    "a mask of another length": (lambda c: torch.ones(1, 6, dtype=torch.long), torch.ones(1, 4), "covers 4 tokens"),
    "a mask of another batch": (lambda c: torch.ones(1, 6, dtype=torch.long), torch.ones(2, 6), "batch"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_are_refused_naming_the_problem(preset, case):
    model = build(preset)
    ids, mask, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=message):
        model(ids(model.config), attention_mask=mask)


def test_inputs_embeds_of_the_wrong_width_are_refused(preset):
    model = build(preset)
    with pytest.raises(ValueError, match="hidden_size"):
        model(inputs_embeds=torch.randn(1, 5, model.config.hidden_size + 1))


def test_a_cache_built_for_another_model_is_refused(preset):
    model = build(preset)
    other = "infini-attention-tiny" if "infini" not in preset else "gated-deltanet-tiny"
    with pytest.raises(ValueError, match="cache"):
        model(random_ids(model.config, 1, 5), cache=DynamicCache(config=tiny_config(other)), use_cache=True)


def test_a_cache_of_another_batch_size_is_refused(preset):
    model = build(preset)
    with torch.no_grad():
        cache = model(random_ids(model.config, 2, 5), use_cache=True).cache
    with pytest.raises(ValueError, match="batch of 2"):
        model(random_ids(model.config, 3, 1), cache=cache, use_cache=True)


@pytest.mark.parametrize("keep_bytes", [100, -8])
def test_a_truncated_weight_file_is_reported_by_name(tmp_path, keep_bytes):
    build("gated-deltanet-tiny").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:keep_bytes])
    with pytest.raises(OSError, match="model.safetensors"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
