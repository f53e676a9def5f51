"""Models shard with torch FSDP2 (2 CPU processes, gloo) and checkpoint cleanly: the gathered, saved model
equals the same training run done in one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_memory
from hf_memory.tasks import MQARSpec, mqar_batch

STEPS = 4


def _single_process_run(preset: str):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_memory.get_config(preset, attn_implementation="eager"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    generator = torch.Generator().manual_seed(1)
    spec = MQARSpec(vocab_size=model.config.vocab_size, num_pairs=4, num_queries=4)
    for _ in range(STEPS):
        model(**mqar_batch(spec, 16, generator), use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


@pytest.mark.parametrize("preset", ["gated-deltanet-h1-tiny", "titans-mac-tiny", "titans-mag-tiny"])
def test_fsdp2_two_process_training_checkpoints_the_same_model_as_one_process(preset, tmp_path):
    worker = Path(__file__).with_name("fsdp_worker.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(worker), preset, str(STEPS), str(tmp_path / "fsdp")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp_path / "fsdp" / "losses.json").read_text())
    assert report["sharded"].startswith("FSDP")
    assert report["losses"][-1] < report["losses"][0]

    sharded = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp")
    reference = _single_process_run(preset)
    for (name, expected), actual in zip(reference.state_dict().items(), sharded.state_dict().values()):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5, msg=name)
