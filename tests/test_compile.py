"""The forward without a cache traces into one graph (no host sync, no data-dependent Python branch): what
``torch.compile`` and CUDA graphs need. Pinned for the presets that get there; the others still break (issue 12):
MoR's routing, Titans MAC's segment loop."""

from __future__ import annotations

import pytest
import torch
from conftest import build, random_ids

GRAPH_BREAK_FREE = ["gated-deltanet-tiny", "gated-deltanet-1layer-tiny", "gated-deltanet-h1-tiny", "jamba-tiny",
                    "jamba-mamba2-tiny", "hymba-tiny", "falcon-h1-tiny", "infini-attention-tiny", "rmt-tiny", "armt-tiny", "titans-mag-tiny",
                    "titans-mal-tiny"]


@pytest.mark.parametrize("preset", GRAPH_BREAK_FREE)
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
