"""The exported model card: the load snippet names the repository, the licence is the user's (none by default),
and the card says what the weights were trained on, what they are for and where they fall short."""

from __future__ import annotations

import pytest
from conftest import TINY_PRESETS, build
from huggingface_hub import ModelCard

from hf_memory.export import REPO_PLACEHOLDER, render_model_card

LOAD = 'AutoModelForCausalLM.from_pretrained("{}", trust_remote_code=True)'


@pytest.fixture(scope="module")
def model():
    return build("gated-deltanet-tiny")


def test_card_saved_without_a_repo_id_marks_the_placeholder_in_the_load_snippet(model):
    card = render_model_card(model)
    assert LOAD.format(REPO_PLACEHOLDER) in card and "<this repo>" not in card
    assert f"# {REPO_PLACEHOLDER}: this model's Hub id, or the folder it was saved in" in card


def test_push_to_hub_puts_the_repo_id_in_the_load_snippet(model, fake_hub):
    model.push_to_hub("someone/tiny-memory-model")
    [(repo_id, files)] = fake_hub
    card = files["README.md"].decode()
    assert repo_id == "someone/tiny-memory-model"
    assert LOAD.format("someone/tiny-memory-model") in card and REPO_PLACEHOLDER not in card


def test_save_pretrained_with_push_to_hub_fills_in_the_repo_id_the_hub_resolved(model, fake_hub, tmp_path):
    model.save_pretrained(tmp_path / "my-model", push_to_hub=True)
    [(repo_id, files)] = fake_hub
    card = files["README.md"].decode()
    assert repo_id == "someone/my-model" and LOAD.format("someone/my-model") in card
    assert REPO_PLACEHOLDER not in card


def test_card_declares_no_license_unless_one_is_given(model, tmp_path):
    model.save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.license is None and "license:" not in card.content.split("---")[1]
    assert "the author of these weights has not chosen a licence" in card.text


def test_card_declares_the_license_given_to_save_pretrained_and_push_to_hub(model, tmp_path, fake_hub):
    model.save_pretrained(tmp_path, license="MIT")
    assert ModelCard.load(tmp_path / "README.md").data.license == "mit"
    model.push_to_hub("someone/tiny", license="apache-2.0")
    assert ModelCard(fake_hub[0][1]["README.md"].decode()).data.license == "apache-2.0"


@pytest.mark.parametrize("options, field", [
    ({"license": "MIT License"}, "license"),
    ({"license": "mit\nbase_model: x"}, "license"),
    ({"training": ""}, "training"),
    ({"intended_use": 3}, "intended_use"),
])
def test_bad_card_options_are_refused_naming_the_field_before_anything_is_written(model, tmp_path, options, field):
    with pytest.raises(ValueError, match=f"^{field} "):
        model.save_pretrained(tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


def test_card_without_training_says_it_is_not_recorded_and_may_be_random(model):
    card = ModelCard(render_model_card(model))
    for section in ("## Training data", "## Intended use", "## Limitations"):
        assert section in card.text
    assert "Training not recorded: these weights may be random (untrained). Not for real text." in card.text
    assert "may be randomly initialised (untrained)" in card.text.split("## Training data")[1]


def test_card_records_the_given_training_intended_use_and_limitations(model):
    card = render_model_card(model, training="synthetic MQAR, 700 steps", intended_use="A toy. Not for real text.",
                             limitations="Knows no language.")
    assert card.split("## Training data")[1].split("##")[0].strip() == "synthetic MQAR, 700 steps"
    assert card.split("## Intended use")[1].split("##")[0].strip() == "A toy. Not for real text."
    assert "- Knows no language." in card.split("## Limitations")[1]
    assert "Training not recorded" not in card


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_every_architecture_card_keeps_paper_mechanism_and_taxonomy_and_parses(preset):
    card = ModelCard(render_model_card(build(preset), repo_id="someone/x", license="mit"))
    assert card.data.license == "mit" and card.data.library_name == "transformers"
    for section in ("## Memory mechanism", "Place in the memory taxonomy", "arxiv.org/abs/", "## Paper results",
                    "## Training data", "## Intended use", "## Limitations", "## License"):
        assert section in card.text, (preset, section)
    assert "{" + "load}" not in card.text and LOAD.format("someone/x") in card.text
