"""Titans' neural memory as a token mixer: the memory learns within a sequence, a left-padded row reads and
writes its memory as the same row unpadded, the chunk size is that of the operator, and every parameter learns."""

from __future__ import annotations

import torch

from hf_memory.modeling.titans.configuration_titans import TitansConfig
from hf_memory.modeling.titans.modeling_titans import NeuralMemory, NeuralMemoryState
def _memory(**overrides):
    overrides = {"memory_chunk_size": 4, **overrides}
    config = TitansConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, **overrides)
    torch.manual_seed(0)
    return NeuralMemory(config, 0)


def test_a_left_padded_row_gives_its_unpadded_outputs():
    memory = _memory()
    x = torch.randn(2, 19, 32)
    mask = torch.ones(2, 19, dtype=torch.long)
    mask[1, :6] = 0
    with torch.no_grad():
        batched, _ = memory(x, attention_mask=mask)
        alone, _ = memory(x[1:, 6:])
    torch.testing.assert_close(batched[1, 6:], alone[0], rtol=1e-5, atol=1e-5)


def test_the_mixer_gives_the_same_outputs_and_gradients_through_the_token_by_token_reference(monkeypatch):
    import hf_memory.modeling.titans.modeling_titans as titans
    from hf_memory.ops.neural_memory import neural_memory_chunked, neural_memory_reference

    x = torch.randn(2, 15, 32)
    mask = torch.ones(2, 15, dtype=torch.long)
    mask[0, :5] = 0
    results = []
    for implementation in (neural_memory_chunked, neural_memory_reference):
        monkeypatch.setattr(titans, "neural_memory",
                            lambda *args, use_fused_kernels, implementation=implementation, **kwargs:
                            implementation(*args, **kwargs))
        memory = _memory()
        out, _ = memory(x, attention_mask=mask)
        out[mask.bool()].square().sum().backward()
        results.append((out[mask.bool()], [p.grad for p in memory.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-4, atol=1e-5)
    for ours, theirs in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-5)


def test_every_memory_parameter_gets_a_gradient():
    memory = _memory()
    out, _ = memory(torch.randn(2, 13, 32))
    out.square().sum().backward()
    for name, parameter in memory.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_decoding_with_the_state_equals_the_full_forward_across_chunk_boundaries():
    """Prefill, a multi-token piece, then token by token: the memory learns at test time exactly as in the full
    forward (chunks of 4 committed as they fill, per row, rows out of step through left padding)."""
    memory = _memory(memory_chunk_size=4)
    x = torch.randn(2, 23, 32)
    mask = torch.ones(2, 23, dtype=torch.long)
    mask[1, :5] = 0
    with torch.no_grad():
        full, _ = memory(x, attention_mask=mask)
        state = NeuralMemoryState()
        pieces = [memory(x[:, :6], attention_mask=mask[:, :6], state=state)[0],
                  memory(x[:, 6:11], attention_mask=mask[:, :11], state=state)[0]]
        for t in range(11, 23):
            pieces.append(memory(x[:, t : t + 1], attention_mask=mask[:, : t + 1], state=state)[0])
    decoded = torch.cat(pieces, dim=1)
    assert (full - decoded)[mask.bool()].abs().max() <= 1e-5
    assert state.tokens == 23 and torch.equal(state.pending, torch.tensor([23 % 4, 18 % 4]))
    reordered = NeuralMemoryState()
    with torch.no_grad():
        memory(x, attention_mask=mask, state=reordered)
    reordered.reorder_cache(torch.tensor([1, 0]))
    torch.testing.assert_close(reordered.weights[0][0], state.weights[0][1], rtol=1e-5, atol=1e-6)
