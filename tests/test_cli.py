"""The ``hf-memory`` command line: destinations are never clobbered, sources are checked before anything is
built, errors are one line, every option is explained."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file
from transformers import JambaConfig, JambaForCausalLM, LlamaConfig, LlamaForCausalLM

from hf_memory import cli

TINY_LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
TINY_JAMBA = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                  expert_layer_offset=1, num_experts=2, num_experts_per_tok=1, mamba_d_state=4, mamba_dt_rank=4)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny transformers Llama and Jamba folders, saved once; tests copy the ones they damage."""
    root = tmp_path_factory.mktemp("sources")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).save_pretrained(root / "llama")
    JambaForCausalLM(JambaConfig(**TINY_JAMBA)).save_pretrained(root / "jamba")
    return root


def copy_of(checkpoints, name, tmp_path):
    return shutil.copytree(checkpoints / name, tmp_path / name)


def run(argv, capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("hf-memory: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# ---------------------------------------------------------------------------------------------- destinations
def test_convert_refuses_a_non_empty_destination_without_force(checkpoints, tmp_path, capsys):
    destination = tmp_path / "out"
    destination.mkdir()
    (destination / "notes.txt").write_text("mine")
    code, _, err = run(["convert", "--from", "llama", checkpoints / "llama", destination], capsys)
    assert_one_line_error(code, err, "is not empty", "--force")
    assert [p.name for p in destination.iterdir()] == ["notes.txt"]


def test_convert_with_force_overwrites_only_the_files_it_writes(checkpoints, tmp_path, capsys):
    destination = tmp_path / "out"
    destination.mkdir()
    (destination / "notes.txt").write_text("mine")
    (destination / "config.json").write_text("{}")
    # a shard name that transformers' save_pretrained would delete as "left over from a previous save"
    (destination / "model-00001-of-00002.safetensors").write_bytes(b"someone else's shard")
    code, _, err = run(["convert", "--from", "llama", checkpoints / "llama", destination, "--force"], capsys)
    assert code == 0, err
    assert (destination / "notes.txt").read_text() == "mine"
    assert (destination / "model-00001-of-00002.safetensors").read_bytes() == b"someone else's shard"
    assert json.loads((destination / "config.json").read_text())["model_type"] == "hfm_infini_attention"
    assert "kept 2 file(s)" in err and "notes.txt" in err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")], "staging folder left behind"


def test_demo_refuses_a_non_empty_output_before_training(tmp_path, capsys, monkeypatch):
    import hf_memory.tasks

    monkeypatch.setattr(hf_memory.tasks, "train_recall", lambda *a, **k: pytest.fail("trained before refusing"))
    (tmp_path / "notes.txt").write_text("mine")
    code, _, err = run(["demo", "--steps", 1, "--output", tmp_path], capsys)
    assert_one_line_error(code, err, "--output", "is not empty", "--force")


def test_demo_with_force_keeps_other_files_and_writes_a_synthetic_task_card(tmp_path, capsys, monkeypatch):
    import hf_memory.tasks

    # the card and the folder are under test, not the training (tests/test_export_and_cli.py trains)
    monkeypatch.setattr(hf_memory.tasks, "train_recall", lambda *args, **kwargs: [4.8])
    monkeypatch.setattr(hf_memory.tasks, "recall_accuracy", lambda model, batch: 0.5)
    (tmp_path / "notes.txt").write_text("mine")
    code, out, err = run(["demo", "--steps", 2, "--batch-size", 8, "--output", tmp_path, "--force",
                          "--license", "mit"], capsys)
    assert code == 0, err
    assert (tmp_path / "notes.txt").read_text() == "mine"
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.license == "mit"
    assert "MQAR" in card.text and "for 2 steps" in card.text and "50.0%" in card.text
    assert "synthetic-task toy model" in card.text and "not for real text" in card.text
    assert "Training not recorded" not in card.text


def test_a_bad_license_is_refused_when_the_command_line_is_read(tmp_path, capsys, monkeypatch):
    import hf_memory.tasks

    monkeypatch.setattr(hf_memory.tasks, "train_recall", lambda *a, **k: pytest.fail("trained before refusing"))
    with pytest.raises(SystemExit) as exit:
        cli.main(["demo", "--output", str(tmp_path / "out"), "--license", "MIT License"])
    assert exit.value.code == 2
    assert "argument --license: license 'MIT License' is not a Hub licence id" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- sources
@pytest.mark.parametrize("argv, found, expected", [
    (["--from", "jamba", "llama"], "'llama' checkpoint", "--from jamba expects model_type 'jamba'"),
    (["--from", "llama", "jamba"], "'jamba' checkpoint", "--from llama expects model_type 'llama'"),
    (["--to", "jamba", "jamba"], "'jamba' checkpoint", "--to jamba expects model_type 'hfm_jamba'"),
])
def test_convert_refuses_a_checkpoint_of_another_model_type(checkpoints, tmp_path, capsys, argv, found, expected):
    *flags, source = argv
    code, _, err = run(["convert", *flags, checkpoints / source, tmp_path / "out"], capsys)
    assert_one_line_error(code, err, found, expected)
    assert not (tmp_path / "out").exists()


def test_convert_refuses_a_source_without_the_causal_lm_head(checkpoints, tmp_path, capsys):
    source = copy_of(checkpoints, "llama", tmp_path)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForSequenceClassification"]}))
    code, _, err = run(["convert", "--from", "llama", source, tmp_path / "out"], capsys)
    assert_one_line_error(code, err, "LlamaForSequenceClassification", "expects LlamaForCausalLM")


@pytest.mark.parametrize("name, fmt, dropped", [
    ("llama", "llama", "model.layers.1.mlp.up_proj.weight"),
    ("jamba", "jamba", "model.layers.0.mamba.x_proj.weight"),
])
def test_convert_names_missing_and_unmapped_source_weights(checkpoints, tmp_path, capsys, name, fmt, dropped):
    source = copy_of(checkpoints, name, tmp_path)
    weights = load_file(source / "model.safetensors")
    del weights[dropped]
    weights["model.extra_memory.weight"] = torch.zeros(2)
    save_file(weights, source / "model.safetensors", metadata={"format": "pt"})
    code, _, err = run(["convert", "--from", fmt, source, tmp_path / "out"], capsys)
    assert_one_line_error(code, err, "do not map one to one", f"missing 1 ({dropped})",
                          "unmapped 1 (model.extra_memory.weight)")
    assert not (tmp_path / "out").exists()


def test_missing_source_is_reported_as_a_missing_path_not_a_hub_id(tmp_path, capsys):
    code, _, err = run(["convert", "--from", "llama", "x/y", tmp_path / "out"], capsys)
    assert_one_line_error(code, err, "SRC 'x/y' does not exist")
    assert "repo" not in err.lower().split("download")[0]


def test_truncated_weight_file_is_named(checkpoints, tmp_path, capsys):
    source = copy_of(checkpoints, "llama", tmp_path)
    weights = (source / "model.safetensors").read_bytes()
    (source / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    code, _, err = run(["convert", "--from", "llama", source, tmp_path / "out"], capsys)
    assert_one_line_error(code, err, f"SRC weight file '{source / 'model.safetensors'}' is truncated or corrupt")


def test_corrupt_config_json_is_named(checkpoints, tmp_path, capsys):
    source = copy_of(checkpoints, "llama", tmp_path)
    (source / "config.json").write_text('{"model_type": "llama",')
    code, _, err = run(["convert", "--from", "llama", source, tmp_path / "out"], capsys)
    assert_one_line_error(code, err, f"'{source / 'config.json'}' is not valid JSON")


def test_unknown_converter_option_is_refused_naming_the_known_ones(checkpoints, tmp_path, capsys):
    code, _, err = run(["convert", "--from", "llama", checkpoints / "llama", tmp_path / "out", "--set", "seg=8"],
                       capsys)
    assert_one_line_error(code, err, "--set seg", "segment_size", "memory_update")


def test_converted_card_declares_the_given_license_and_where_the_weights_come_from(checkpoints, tmp_path, capsys):
    code, _, err = run(["convert", "--from", "jamba", checkpoints / "jamba", tmp_path / "out", "--license",
                        "apache-2.0"], capsys)
    assert code == 0, err
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.license == "apache-2.0"
    assert "Converted with `hf-memory convert --from jamba` from a `jamba` checkpoint" in card.text


# ---------------------------------------------------------------------------------------------- errors and help
def test_debug_flag_raises_the_error_with_its_traceback(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cli.main(["--debug", "convert", "--from", "llama", str(tmp_path / "nope"), str(tmp_path / "out")])
    with pytest.raises(FileNotFoundError, match="does not exist"):  # also after the command
        cli.main(["convert", "--from", "llama", str(tmp_path / "nope"), str(tmp_path / "out"), "--debug"])


def test_unexpected_errors_are_one_line_with_exit_code_1(monkeypatch, capsys):
    monkeypatch.setattr(cli, "presets", lambda args: 1 / 0)  # build_parser reads the module's command functions
    code = cli.main(["presets"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert err.startswith("hf-memory: error: ZeroDivisionError:") and "--debug" in err


def _commands(parser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command", ["demo", "convert", "presets"])
def test_every_option_has_help_and_every_command_an_example(command, capsys):
    parser = _commands(cli.build_parser())[command]
    for action in parser._actions:
        assert action.help and action.help != argparse.SUPPRESS, f"{command}: {action.dest} has no help"
    assert "example" in parser.epilog and f"hf-memory {command}" in parser.epilog
    with pytest.raises(SystemExit) as exit:
        cli.main([command, "--help"])
    assert exit.value.code == 0 and "example" in capsys.readouterr().out
