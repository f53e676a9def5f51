"""The forward without a cache traces into one graph (no host sync, no data-dependent Python branch): what
``torch.compile`` and CUDA graphs need, for every tiny preset. Where eager code sizes a tensor from the data (MoE
dispatch, MoR's gathered tokens, MAC's queries per segment) the traced forward takes the static size and masks."""

from __future__ import annotations

import pytest
import torch
from conftest import build, random_ids

import hf_memory

TINY_PRESETS = sorted(name for name in hf_memory.PRESETS if name.endswith("-tiny"))


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_the_forward_traces_into_one_graph_without_host_syncs(preset):
    import torch._dynamo as dynamo

    model = build(preset)
    ids = random_ids(model.config, 2, 42)  # Titans: chunks of 4, the last one unfinished
    dynamo.reset()
    explanation = dynamo.explain(model)(input_ids=ids, use_cache=False)
    reasons = [f"{b.user_stack[-1].filename}:{b.user_stack[-1].lineno} {b.reason}" for b in explanation.break_reasons
               if b.user_stack]
    assert explanation.graph_break_count == 0, reasons
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend="eager")(input_ids=ids, use_cache=False).logits,
                                   model(input_ids=ids, use_cache=False).logits)
