"""``hf-memory bench``: the yardstick's task generators do what they claim, and the harness runs end to end."""

import json
import math
from dataclasses import replace

import pytest
import torch

import hf_memory.tasks
from hf_memory.bench import BASELINE, Budget, bench_config, cache_bytes, parameter_count, run_bench
from hf_memory.cli import main
from hf_memory.tasks import BENCH_TASKS, COPY, IGNORE, KEY, QUERY, copy_tokens, mqar_with_pairs, passkey_at_distance


@pytest.mark.parametrize("distance", [1, 5, 28, 100])
def test_passkey_sits_at_the_stated_distance_and_is_the_only_evidence_of_the_answer(distance):
    vocab = 128
    batch = passkey_at_distance(distance, 64, vocab, torch.Generator().manual_seed(distance))
    ids, labels = batch["input_ids"], batch["labels"]
    query = ids.shape[1] - 2
    assert (ids[:, query] == QUERY).all() and (labels[:, :-1] == IGNORE).all()
    answers = labels[:, -1]
    assert (ids[:, query - distance] == answers).all() and (ids[:, query - distance - 1] == KEY).all()
    context = ids[:, :query]
    passkey_tokens = context >= vocab // 2  # passkeys only: filler, KEY and QUERY lie below vocab / 2
    assert (passkey_tokens.sum(1) == 1).all() and passkey_tokens[:, query - distance].all()
    assert ((context == KEY).sum(1) == 1).all() and ((context == QUERY).sum(1) == 0).all()
    assert answers.unique().numel() > 16  # the answer varies: it is not guessable without the evidence


@pytest.mark.parametrize("pairs", [1, 4, 16])
def test_mqar_query_values_are_those_paired_with_their_keys_in_the_context(pairs):
    batch = mqar_with_pairs(pairs, 32, 128, torch.Generator().manual_seed(pairs))
    ids, labels = batch["input_ids"], batch["labels"]
    for row, row_labels in zip(ids, labels):
        keys, values = row[1 : 1 + 2 * pairs : 2], row[2 : 2 + 2 * pairs : 2]
        assert keys.unique().numel() == pairs  # each key once: its value is unambiguous
        scored = (row_labels != IGNORE).nonzero().flatten()
        assert len(scored) == pairs
        for position in scored:
            query_key = row[position - 1]
            assert row_labels[position] == values[keys == query_key].item()


@pytest.mark.parametrize("count", [1, 8, 33])
def test_copy_labels_are_the_tokens_count_plus_one_back(count):
    batch = copy_tokens(count, 16, 128, torch.Generator().manual_seed(count))
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.shape[1] == 2 * count + 2 and (ids[:, count + 1] == COPY).all()
    scored = (labels != IGNORE).nonzero()
    assert len(scored) == 16 * count
    for row, position in scored.tolist():
        assert labels[row, position] == ids[row, position - count - 1] == ids[row, position]


def test_training_batches_draw_levels_from_the_trained_range_only():
    generator = torch.Generator().manual_seed(0)
    task = BENCH_TASKS["copy"]
    counts = {(task.training_batch(2, generator)["input_ids"].shape[1] - 2) // 2 for _ in range(200)}
    assert counts == set(range(task.train_levels[0], task.train_levels[1] + 1))


def test_bench_models_share_one_parameter_budget_and_an_unreachable_budget_is_refused():
    for name in ("gated_deltanet", "jamba", "titans", BASELINE):
        assert abs(parameter_count(bench_config(name, 200_000, 512)) - 200_000) <= 20_000
    with pytest.raises(ValueError, match="jamba.*within 10% of 50,000 parameters"):
        bench_config("jamba", 50_000, 512)


SMOKE = Budget(parameters=100_000, steps=3, batch_size=2, lr=1e-3, seeds=(0, 1, 2), eval_sequences=4,
               eval_levels={"passkey": (4, 40), "mqar": (1, 2), "copy": (2, 12)}, state_contexts=(32, 64),
               decode_contexts=(32,), decode_tokens=2, prefill_tokens=32)


def test_bench_runs_end_to_end_and_writes_the_table_the_json_and_the_plot(tmp_path):
    results = run_bench(["gated_deltanet", "infini_attention"], ["passkey", "copy"], SMOKE, tmp_path,
                        "hf-memory bench --smoke", progress=False, budget_name="smoke")
    written = json.loads((tmp_path / "bench.json").read_text())
    assert written["command"] == "hf-memory bench --smoke" and written["budget"]["name"] == "smoke"
    assert list(written["architectures"]) == ["gated_deltanet", "infini_attention", BASELINE]
    for name, entry in written["architectures"].items():
        assert abs(entry["parameters"] - SMOKE.parameters) <= 0.1 * SMOKE.parameters
        assert set(entry["tasks"]) == {"passkey", "copy"}
        for task, record in entry["tasks"].items():
            assert record["seeds"] == [0, 1, 2] and len(record["final_loss"]) == 3
            assert list(record["levels"]) == [str(level) for level in SMOKE.eval_levels[task]]
            for level in record["levels"].values():
                assert len(level["accuracy"]) == 3 and level["min"] <= level["mean"] <= level["max"]
                assert level["sequences"] == 4 and level["scored_tokens"] > 0
        assert set(entry["state_bytes"]) == {"32", "64"} and set(entry["decode_ms_per_token"]) == {"32"}
        assert entry["prefill_tokens_per_s"] > 0 and entry["train_tokens_per_s"] > 0
    states = {name: entry["state_bytes"] for name, entry in written["architectures"].items()}
    assert states["gated_deltanet"]["32"] == states["gated_deltanet"]["64"]  # a fixed-size state
    assert states[BASELINE]["64"] == 2 * states[BASELINE]["32"]  # a KV cache grows with the context
    table = (tmp_path / "bench.md").read_text()
    assert table.startswith("`hf-memory bench --smoke`")
    assert "**passkey**" in table and "**copy**" in table and "infini_attention" in table
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert results["architectures"]["gated_deltanet"]["tasks"]["copy"]["levels"][12]["length"] == 26


def test_a_diverged_run_is_reported_not_dropped(tmp_path, monkeypatch):
    monkeypatch.setattr(hf_memory.tasks, "train_recall", lambda *args, **kwargs: [4.0, 3.0, math.nan])
    budget = replace(SMOKE, seeds=(0,), state_contexts=(32,))
    results = run_bench(["gated_deltanet"], ["passkey"], budget, tmp_path, "hf-memory bench", progress=False)
    assert results["architectures"]["gated_deltanet"]["tasks"]["passkey"]["diverged_at_step"] == [2]
    assert "seed 0: NaN at step 2" in (tmp_path / "bench.md").read_text()


def test_cache_bytes_counts_a_llama_kv_cache_exactly():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=32, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2)
    cache = LlamaForCausalLM(config)(input_ids=torch.ones(2, 10, dtype=torch.long), use_cache=True).cache
    assert cache_bytes(cache) == 3 * 2 * (2 * 2 * 10 * 8) * 4  # layers x (K, V) x (rows x heads x tokens x dim) x fp32


def test_bench_command_refuses_an_unknown_architecture_before_training(capsys):
    assert main(["bench", "--arch", "gated_deltanet,retnet"]) == 2
    error = capsys.readouterr().err
    assert "--arch: unknown 'retnet'" in error and "gated_deltanet" in error
