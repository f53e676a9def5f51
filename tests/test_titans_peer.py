"""Titans' neural memory against the public ``titans-pytorch`` (lucidrains, pip ``titans-pytorch``, module
``titans_pytorch``; written against 0.5.5) on shared weights, fp32. Skipped where it is not installed.

The two compute the same function once these differences are set aside:

* their loss is the mean over features, ours 1/2 the sum: their step size lr is our theta = lr * 2 / d;
* their memory MLP is ``x @ W`` per layer with GELU between layers, wrapped in LayerNorm + residual: theirs is
  given our SiLU MLP (their ``model=`` argument) and ``mem_model_norm_add_residual=False``;
* they take every gradient of a forward at its starting weights unless ``batch_size`` is set: here
  ``batch_size`` = chunk size, so gradients are taken at each chunk's start, as ours;
* their momentum and forgetting act once per chunk, with gates from the chunk's mean input: chunk size 1 is
  the exact per-token rule of both; for larger chunks they agree with momentum off and forgetting applied at
  the chunk's first token (ours then accumulates the chunk's steps exactly as their one step per chunk);
* their gradient "clip" is a tanh soft-clamp of the lr-weighted chunk gradient per parameter tensor: off in both;
* their input RMSNorms, retrieval gate and head-combining projection surround the memory: the norms are off, the
  gate and projection are applied to our read-out with their own modules (or the read-out is compared before);
* their q and k are not normalised by default: their q / k RMSNorm with gain d^-1/2 is our L2 norm; for our
  mixer, their SiLU on q / k / v (``activation=``) is ours with a conv of kernel 1 and weight 1 (the identity).

Retrieval is the same rule in both: a token reads the weights committed by the whole chunks up to and including
it (their query sequence is shifted by one position against their per-chunk weights).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

titans_pytorch = pytest.importorskip("titans_pytorch")

from titans_pytorch.memory_models import MemoryMLP  # noqa: E402

import hf_memory  # noqa: E402
from hf_memory.modeling.titans.modeling_titans import NeuralMemory, NeuralMemoryState  # noqa: E402
from hf_memory.ops.neural_memory import neural_memory_chunked, neural_memory_reference  # noqa: E402

DIM, HEADS, HEAD_DIM, BATCH = 32, 2, 16, 2
TOLERANCE = 1e-5  # max abs error relative to the largest magnitude compared
MAX_LR = HEAD_DIM / 8  # their lr at most d / 8: our theta at most 1/4 (no clip: larger steps diverge at depth 2)
OPERATORS = {"reference": neural_memory_reference, "chunked": neural_memory_chunked}


class SiLUMemoryMLP(MemoryMLP):
    """Their ``MemoryMLP`` (weights [d_in, d_out], ``x @ W``) with our SiLU between layers instead of GELU."""

    def forward(self, x):
        for index, weight in enumerate(self.weights):
            x = x @ weight if index == 0 else F.silu(x) @ weight
        return x


def peer_memory(depth: int, chunk_size: int, max_lr: float, seed: int = 0, **kwargs):
    """Their NeuralMemory with the settings under which it is our function; M_0 random per head (their per-head
    initial weights start as one tensor shared by the heads)."""
    torch.manual_seed(seed)
    memory = titans_pytorch.NeuralMemory(
        DIM, chunk_size=chunk_size, batch_size=chunk_size, dim_head=HEAD_DIM, heads=HEADS,
        model=SiLUMemoryMLP(HEAD_DIM, depth, 2.0), pre_rmsnorm=False, mem_model_norm_add_residual=False,
        max_grad_norm=None, qk_rmsnorm=True, default_step_transform_max_lr=max_lr, **kwargs)
    with torch.no_grad():
        for weight in memory.memory_model_parameters:
            weight.data = torch.randn(weight.shape) * 0.5
        for norm in (memory.q_norm, memory.k_norm):  # RMSNorm * (gamma + 1) = the L2 norm
            norm.gamma.fill_(HEAD_DIM**-0.5 - 1.0)
            norm.rmsnorm.eps = 1e-12
        for layer, bias in ((memory.to_momentum, 2.0), (memory.to_decay_factor, -3.0)):  # eta ~0.88, alpha ~0.05
            if layer is not None:
                layer[0].bias.add_(bias)
    return memory.eval()


def peer_run(memory, x):
    """Their forward: the output and the final weights and momentum as lists [B, H, d_in, d_out] in our layout."""
    with torch.no_grad():
        out, state = memory(x)
    weights, momentum = state.states
    names = memory.memory_model_parameter_names
    ours = [weights[name].reshape(BATCH, HEADS, *weights[name].shape[1:]) for name in names]
    moments = [momentum[name][0].reshape(w.shape) for name, w in zip(names, ours)] if len(momentum.keys()) else None
    return out, ours, moments


def peer_operands(memory, x):
    """q, k, v [B, H, T, d] and their per-token step size, momentum and forgetting gates [B, H, T]."""
    heads = memory.split_heads
    q = memory.q_norm(heads(memory.to_queries(x)))
    k, v = memory.k_norm(heads(memory.to_keys(x))), heads(memory.to_values(x))
    lr = memory.adaptive_step_transform(memory.to_adaptive_step[0](x)).transpose(1, 2)
    gates = [None if layer is None else torch.sigmoid(layer[0](x)).transpose(1, 2)
             for layer in (memory.to_momentum, memory.to_decay_factor)]
    return q, k, v, lr, *gates


def initial_weights(memory):
    return [w[None].expand(BATCH, *w.shape) for w in memory.memory_model_parameters]


def peer_output(memory, x, y):
    """Our read-out y [B, H, T, d] through their retrieval gate and head combination."""
    return memory.combine_heads(memory.merge_heads(y * memory.retrieve_gate(x)))


def assert_close(ours, theirs, what: str):
    error = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    assert error <= TOLERANCE, f"{what}: max abs error {error:.2e} of the largest value (bound {TOLERANCE:.0e})"


def assert_memory_learned(final, initial):
    """The compared weights moved well away from M_0: the parity is of an update, not of two idle memories."""
    for after, before in zip(final, initial):
        assert ((after - before).norm() / before.norm()).item() > 0.1


@pytest.mark.parametrize("operator", sorted(OPERATORS))
@pytest.mark.parametrize("depth", [1, 2])
def test_chunk_size_one_momentum_and_forgetting_equal_titans_pytorch(depth, operator):
    """The exact sequential rule (chunk 1, their batch_size 1): outputs, final weights and momentum."""
    memory = peer_memory(depth, chunk_size=1, max_lr=MAX_LR)
    x = torch.randn(BATCH, 24, DIM, generator=torch.Generator().manual_seed(1))
    out, weights, momentum = peer_run(memory, x)
    with torch.no_grad():
        q, k, v, lr, eta, alpha = peer_operands(memory, x)
        y, ours, moments = OPERATORS[operator](q, k, v, lr * 2 / HEAD_DIM, eta, alpha, initial_weights(memory),
                                               chunk_size=1, max_grad_norm=None)
        assert_close(peer_output(memory, x, y), out, "output")
    for layer, (mine, theirs) in enumerate(zip(ours, weights)):
        assert_close(mine, theirs, f"weights of layer {layer}")
    for layer, (mine, theirs) in enumerate(zip(moments, momentum)):
        assert_close(mine, theirs, f"momentum of layer {layer}")
    assert_memory_learned(ours, initial_weights(memory))


@pytest.mark.parametrize("operator", sorted(OPERATORS))
@pytest.mark.parametrize("depth", [1, 2])
def test_chunks_of_four_with_gradients_at_the_chunk_start_equal_titans_pytorch_without_momentum(depth, operator):
    """Chunks of 4 (their batch_size 4): every gradient at the chunk's starting weights, their one step per chunk
    with the chunk's forgetting = ours with no momentum and the forgetting at the chunk's first token; each token
    reads the weights of the whole chunks up to it."""
    chunk = 4
    memory = peer_memory(depth, chunk_size=chunk, max_lr=MAX_LR, momentum=False)
    x = torch.randn(BATCH, 24, DIM, generator=torch.Generator().manual_seed(2))
    out, weights, _ = peer_run(memory, x)
    with torch.no_grad():
        q, k, v, lr, _, _ = peer_operands(memory, x)
        means = x.unflatten(1, (-1, chunk)).mean(2)  # their gates read the chunk's mean input
        alpha = torch.zeros(BATCH, HEADS, x.shape[1] // chunk, chunk)
        alpha[..., 0] = torch.sigmoid(memory.to_decay_factor[0](means)).transpose(1, 2)
        eta = torch.zeros_like(lr)
        y, ours, _ = OPERATORS[operator](q, k, v, lr * 2 / HEAD_DIM, eta, alpha.flatten(2), initial_weights(memory),
                                         chunk_size=chunk, max_grad_norm=None)
        assert_close(peer_output(memory, x, y), out, "output")
    for layer, (mine, theirs) in enumerate(zip(ours, weights)):
        assert_close(mine, theirs, f"weights of layer {layer}")
    assert_memory_learned(ours, initial_weights(memory))


def our_mixer(memory, depth: int, max_lr: float):
    """Our NeuralMemory mixer holding their weights: conv kernel 1 with weight 1 (the identity, so q, k, v are
    SiLU(W x) as with their ``activation=nn.SiLU()``), their projections, gate layers and M_0."""
    config = hf_memory.get_config(
        "titans-mag-tiny", hidden_size=DIM, memory_num_heads=HEADS, memory_head_dim=HEAD_DIM, memory_depth=depth,
        memory_expansion=2, memory_chunk_size=1, memory_conv_kernel=1, memory_max_lr=max_lr * 2 / HEAD_DIM,
        memory_max_grad_norm=None)
    mixer = NeuralMemory(config, 0).eval()
    with torch.no_grad():
        for conv in (mixer.q_conv1d, mixer.k_conv1d, mixer.v_conv1d):
            conv.weight.fill_(1.0)
        for mine, theirs in ((mixer.q_proj, memory.to_queries), (mixer.k_proj, memory.to_keys),
                             (mixer.v_proj, memory.to_values)):
            mine.weight.copy_(theirs[0].weight)
        gates = (mixer.step_proj, memory.to_adaptive_step), (mixer.momentum_proj, memory.to_momentum), \
            (mixer.forget_proj, memory.to_decay_factor)
        for row, (mine, theirs) in enumerate(gates):
            mine.weight.copy_(theirs[0].weight)
            mixer.gate_bias[row].copy_(theirs[0].bias)
        for mine, theirs in zip(mixer.memory_init, memory.memory_model_parameters):
            mine.copy_(theirs)
    return mixer


def read_outs(mixer, memory):
    """Hooks catching each side's memory read-out [B, H, T, d] before its output norm / gate."""
    caught = {"ours": [], "theirs": []}
    mixer.o_norm.register_forward_hook(lambda module, args, out: caught["ours"].append(args[0].transpose(1, 2)))
    memory.multihead_rmsnorm.register_forward_hook(lambda module, args, out: caught["theirs"].append(out))
    return caught


@pytest.mark.parametrize("depth", [1, 2])
def test_memory_mixer_reads_and_learns_as_titans_pytorch(depth):
    """Our token mixer (projections, SiLU, L2-normalised q and k, per-token gates, learned M_0) on their weights,
    chunk 1: the memory's read-out and the state's weights and momentum after the prompt."""
    memory = peer_memory(depth, chunk_size=1, max_lr=MAX_LR, activation=nn.SiLU())
    mixer = our_mixer(memory, depth, MAX_LR)
    caught = read_outs(mixer, memory)
    x = torch.randn(BATCH, 20, DIM, generator=torch.Generator().manual_seed(3))
    _, weights, momentum = peer_run(memory, x)
    state = NeuralMemoryState()
    with torch.no_grad():
        mixer(x, state=state)
    assert_close(caught["ours"][0], caught["theirs"][0][:, :, 1 : x.shape[1] + 1], "memory read-out")
    for layer, (mine, theirs) in enumerate(zip(state.weights, weights)):
        assert_close(mine, theirs, f"weights of layer {layer}")
    for layer, (mine, theirs) in enumerate(zip(state.momentum, momentum)):
        assert_close(mine, theirs, f"momentum of layer {layer}")
    assert_memory_learned(state.weights, initial_weights(memory))


def test_token_by_token_decoding_matches_titans_pytorch_decoding():
    """Both decoding paths, one token per call with the carried state (ours: NeuralMemoryState; theirs: their
    NeuralMemState), read the same memory at every step and end with the same weights."""
    memory = peer_memory(2, chunk_size=1, max_lr=MAX_LR, activation=nn.SiLU())
    mixer = our_mixer(memory, 2, MAX_LR)
    caught = read_outs(mixer, memory)
    x = torch.randn(BATCH, 10, DIM, generator=torch.Generator().manual_seed(4))
    ours, theirs = NeuralMemoryState(), None
    with torch.no_grad():
        for t in range(x.shape[1]):
            mixer(x[:, t : t + 1], state=ours)
            _, theirs = memory(x[:, t : t + 1], state=theirs)
    for t, (mine, peer) in enumerate(zip(caught["ours"], caught["theirs"])):
        assert_close(mine, peer[:, :, -1:], f"read-out of token {t}")
    final = theirs.states[0]
    for layer, name in enumerate(memory.memory_model_parameter_names):
        assert_close(ours.weights[layer], final[name].reshape(ours.weights[layer].shape), f"weights of layer {layer}")
