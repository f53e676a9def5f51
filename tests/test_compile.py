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


DECODE_PRESETS = [name for name in TINY_PRESETS if not name.startswith("mor")]  # MoR: KV sized by the routing


@pytest.mark.parametrize("preset", DECODE_PRESETS)
def test_a_decode_step_traces_into_one_graph_and_equals_eager_across_a_segment_fold(preset):
    """A cached decode step has no host sync either: where a segment fills (Infini-attention, RMT) the fold into
    the memory is a ``torch.cond``. The prompt leaves one slot in its segment, so the first step folds and the
    second reads the folded memory; both equal eager."""
    import copy

    import torch._dynamo as dynamo

    dynamo.reset()  # the models share their forward's code: recompiles of earlier tests would count against it
    model = build(preset)
    segment = getattr(model.config, "segment_size", None)
    ids = random_ids(model.config, 2, 2 * segment - 1 if segment else 42)
    steps = random_ids(model.config, 2, 2, seed=1)
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # a graph break is an error
    with torch.no_grad():
        prompt_cache = model(input_ids=ids, use_cache=True).cache
        eager_cache, compiled_cache = copy.deepcopy(prompt_cache), copy.deepcopy(prompt_cache)
        for t in range(steps.shape[1]):
            expected = model(input_ids=steps[:, t : t + 1], cache=eager_cache, use_cache=True)
            got = compiled(input_ids=steps[:, t : t + 1], cache=compiled_cache, use_cache=True)
            torch.testing.assert_close(got.logits, expected.logits)
            eager_cache, compiled_cache = expected.cache, got.cache
