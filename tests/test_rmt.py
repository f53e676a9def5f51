"""Recurrent Memory Transformer specifics: memory is the only path between segments, positions restart per
segment, truncated back-propagation, memory replaced during generation, conversion from Llama."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_training_step, build, random_ids, tiny_config
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM

from hf_memory import cli


def _change(ids: torch.Tensor, start: int, end: int) -> torch.Tensor:
    changed = ids.clone()
    changed[:, start:end] = 3 + (changed[:, start:end] - 3 + 1) % (128 - 3)
    return changed


@pytest.mark.parametrize("preset", ["rmt-tiny", "armt-tiny"])
def test_later_segments_read_earlier_ones_only_through_memory(preset):
    with_memory, without = build(preset), build(preset, use_memory=False)
    ids = random_ids(with_memory.config, 1, 24)
    changed = _change(ids, 8, 16)
    with torch.no_grad():
        for model, reaches_later in ((with_memory, True), (without, False)):
            logits, changed_logits = model(ids).logits, model(changed).logits
            torch.testing.assert_close(changed_logits[:, :8], logits[:, :8])  # an earlier segment: untouched
            assert ((changed_logits[:, 16:] - logits[:, 16:]).abs().max() > 1e-4) == reaches_later


def test_a_segment_depends_on_the_segments_before_only_through_the_memory_it_reads():
    """Positions restart in every segment: segment X after three segments equals X read first with the memory
    those three segments left put in place of the learned M_0."""
    model = build("rmt-tiny")
    ids = random_ids(model.config, 1, 32, seed=3)
    with torch.no_grad():
        after_three = model(ids).logits[:, 24:]
        cache = DynamicCache(config=model.config)
        model(ids[:, :24], cache=cache, use_cache=True)
        model.model.memory_tokens.copy_(cache.layers[0].memory[0])
        read_first = model(ids[:, 24:]).logits
    torch.testing.assert_close(read_first, after_three, rtol=1e-5, atol=1e-5)


def test_generation_crosses_segment_boundaries_with_the_updated_memory():
    """Decoding across several boundaries equals the full forward, and the memory the cache holds after each
    boundary is the one the full forward hands on (published RMT code never updates memory while generating)."""
    model = build("rmt-tiny")
    ids = random_ids(model.config, 2, 40)
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        memories, logits = [], []
        for t in range(ids.shape[1]):
            logits.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
            if (t + 1) % 8 == 0:
                memories.append(cache.layers[0].memory.clone())
        for boundary, memory in enumerate(memories, start=1):
            reference = DynamicCache(config=model.config)
            model(ids[:, : 8 * boundary], cache=reference, use_cache=True)
            torch.testing.assert_close(memory, reference.layers[0].memory, rtol=1e-5, atol=1e-5)
    assert len(memories) == 5 and not torch.allclose(memories[0], memories[1])
    assert (torch.cat(logits, dim=1) - full).abs().max() <= 1e-4
    assert cache.layers[0].keys.shape[2] == model.config.num_memory_tokens + model.config.segment_size


@pytest.mark.parametrize("preset", ["rmt-tiny", "armt-tiny"])
def test_with_memory_off_cached_decode_resets_at_each_boundary_and_equals_the_full_forward(preset):
    model = build(preset, use_memory=False)
    ids = random_ids(model.config, 2, 30)
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        pieces = [model(ids[:, :5], cache=cache, use_cache=True).logits]
        pieces += [model(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(5, 30)]
    assert (torch.cat(pieces, dim=1) - full).abs().max() <= 1e-5
    assert cache.layers[0].keys.shape[2] == model.config.segment_size


@pytest.mark.parametrize("preset", ["rmt-tiny", "armt-tiny"])
@pytest.mark.parametrize("depth", [1, 2, None])
def test_bptt_depth_stops_gradients_after_that_many_memory_hand_offs(preset, depth):
    """A loss on the last of 5 segments reaches the tokens of the last depth + 1 segments (their memory
    hand-offs), and nothing before."""
    model = build(preset, bptt_depth=depth).train()
    embeddings = model.model.embed_tokens(random_ids(model.config, 1, 40)).detach().requires_grad_()
    model(inputs_embeds=embeddings).logits[:, 32:].sum().backward()
    reached = [bool(embeddings.grad[:, 8 * s : 8 * s + 8].abs().sum() > 0) for s in range(5)]
    first = 0 if depth is None else 4 - depth
    assert reached == [s >= first for s in range(5)]


@pytest.mark.parametrize("preset", ["rmt-tiny", "armt-tiny"])
def test_padding_never_reaches_the_memory(preset):
    """Whatever the pad tokens are, the memory a padded row leaves and its logits stay the same."""
    model = build(preset)
    ids = random_ids(model.config, 2, 21)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    memories, logits = [], []
    with torch.no_grad():
        for pad in (0, 77):
            cache = DynamicCache(config=model.config)
            padded = ids.clone()
            padded[1, :5] = pad
            logits.append(model(padded, attention_mask=mask, cache=cache, use_cache=True).logits[1, 5:])
            layer = cache.layers[0]
            memories.append(layer.memory[1] if layer.memory is not None else layer.associations[1])
    torch.testing.assert_close(memories[0], memories[1], rtol=0, atol=0)
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)


def _associative_block(key_dim=4):
    """An ARMT block on hidden states [key ; value] (4 + 4): keys and queries read the key half, values the value
    half, beta ~ 1."""
    from hf_memory.modeling.rmt.modeling_rmt import AssociativeMemory

    block = AssociativeMemory(build("armt-tiny", hidden_size=8, num_attention_heads=2, num_key_value_heads=1,
                                    associative_key_dim=key_dim).config)
    with torch.no_grad():
        for projection in (block.q_proj, block.k_proj):
            projection.weight.copy_(torch.cat([torch.eye(4), torch.zeros(4, 4)], dim=1))
        block.v_proj.weight.copy_(torch.diag(torch.tensor([0.0] * 4 + [1.0] * 4)))
        block.beta_proj.weight.zero_()
        block.beta_proj.bias.fill_(30.0)
    return block


def test_associative_memory_returns_the_last_value_written_for_a_key():
    """Write (k, v1), then (k, v2): reading k returns v2, not the mean (the z-corrected delta write of ARMT);
    an unrelated key stored alongside keeps its value."""
    block = _associative_block()
    key, other = torch.tensor([1.0, -0.5, 0.3, 0.0]), torch.tensor([0.0, 0.2, -1.0, 0.7])
    v1, v2, v3 = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    state = block.empty(1, "cpu")
    with torch.no_grad():
        for written in ([(key, v1), (other, v3)], [(key, v2)]):
            memory = torch.stack([torch.cat([k, v]) for k, v in written])[None]
            state = block.write(memory, *state)
        for k, expected in ((key, v2), (other, v3)):
            query = torch.cat([k, torch.zeros(4)])[None, None]
            read = block.read(query, *state) - query
            torch.testing.assert_close(read[0, 0, 4:], expected, rtol=1e-3, atol=1e-3)
            assert read[0, 0, :4].abs().max() < 1e-6


def _tiny_llama(tmp_path):
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, attn_implementation="eager",
    )).eval()
    llama.save_pretrained(tmp_path / "llama")
    return llama


def test_convert_from_llama_with_memory_off_equals_the_llama_within_one_segment(tmp_path):
    llama = _tiny_llama(tmp_path)
    assert cli.main(["convert", "--from", "llama", str(tmp_path / "llama"), str(tmp_path / "rmt"), "--set",
                     "architecture=rmt", "--set", "segment_size=16", "--set", "use_memory=False"]) == 0
    rmt = AutoModelForCausalLM.from_pretrained(tmp_path / "rmt", attn_implementation="eager").eval()
    assert rmt.config.model_type == "hfm_rmt" and not rmt.config.use_memory
    ids = random_ids(rmt.config, 2, 30)
    with torch.no_grad():
        expected, actual = llama(ids).logits, rmt(ids).logits
    assert (expected[:, :16] - actual[:, :16]).abs().max().item() <= 1e-4
    assert (expected[:, 16:] - actual[:, 16:]).abs().max().item() > 1e-3  # the second segment is read alone


def test_convert_from_llama_with_memory_copies_every_llama_weight_and_adds_only_the_first_memory(tmp_path):
    llama = _tiny_llama(tmp_path)
    assert cli.main(["convert", "--from", "llama", str(tmp_path / "llama"), str(tmp_path / "rmt"), "--set",
                     "architecture=rmt", "--set", "segment_size=16", "--set", "num_memory_tokens=4"]) == 0
    rmt = AutoModelForCausalLM.from_pretrained(tmp_path / "rmt").eval()
    ours, theirs = rmt.state_dict(), llama.state_dict()
    assert set(ours) - set(theirs) == {"model.memory_tokens"}
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name
    spread = llama.get_input_embeddings().weight.std().item()
    assert 0.5 * spread < rmt.model.memory_tokens.std().item() < 2 * spread


def test_convert_from_llama_to_armt_equals_the_llama_on_every_segment_read_alone(tmp_path):
    """ARMT's value projections start at zero: nothing is written until fine-tuning."""
    llama = _tiny_llama(tmp_path)
    assert cli.main(["convert", "--from", "llama", str(tmp_path / "llama"), str(tmp_path / "armt"), "--set",
                     "architecture=rmt", "--set", "memory_type=armt", "--set", "segment_size=16"]) == 0
    armt = AutoModelForCausalLM.from_pretrained(tmp_path / "armt", attn_implementation="eager").eval()
    assert armt.config.memory_type == "armt" and armt.model.associative is not None
    ids = random_ids(armt.config, 2, 32)
    with torch.no_grad():
        actual = armt(ids).logits
        for segment in (slice(0, 16), slice(16, 32)):
            assert (llama(ids[:, segment]).logits - actual[:, segment]).abs().max().item() <= 1e-4


def test_convert_from_llama_refuses_an_unknown_target_architecture(tmp_path):
    _tiny_llama(tmp_path)
    with pytest.raises(ValueError, match="architecture"):
        cli.main(["--debug", "convert", "--from", "llama", str(tmp_path / "llama"), str(tmp_path / "out"), "--set",
                  "architecture=titans"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("preset", ["rmt-tiny", "armt-tiny"])
def test_sdpa_with_the_segment_memory_mask_matches_eager_forward_and_backward_on_cuda(preset):
    """On CUDA the segment + memory mask goes to torch's fused SDPA kernels; eager attention is the reference."""
    sdpa, eager = (build(preset, attn_implementation=name).cuda().train() for name in ("sdpa", "eager"))
    assert_same_training_step(sdpa, eager, length=45, pads=6, tolerance=1e-4)


def _saved_bytes_and_gradients(model, ids, labels, through_labels: bool):
    """Bytes autograd saves for the backward of one forward, and the gradients: the loss from ``labels=``
    (the model learns which outputs a loss reads) or from the logits (it does not)."""
    saved = []

    def keep(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        if through_labels:
            loss = model(ids, labels=labels).loss
        else:
            logits = model(ids).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    loss.backward()
    return sum(saved), {name: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                        for name, p in model.named_parameters()}


@pytest.mark.parametrize("preset", ["rmt-tiny", "armt-tiny"])
def test_with_labels_only_at_the_end_truncated_bptt_records_fewer_segments_and_keeps_the_gradients(preset):
    """A loss on the last of 8 segments with bptt_depth=1: the segments whose memory is cut off before the loss
    run without autograd — memory falls with the depth — and every gradient is what the full graph gives."""
    ids = random_ids(tiny_config(preset), 2, 64)
    labels = torch.full_like(ids, -100)
    labels[:, 57:] = ids[:, 57:]
    sizes = {}
    for depth in (1, 3, None):
        model = build(preset, bptt_depth=depth).train()
        sizes[depth], grads = _saved_bytes_and_gradients(model, ids, labels, through_labels=True)
        _, reference = _saved_bytes_and_gradients(model, ids, labels, through_labels=False)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, reference[name], rtol=1e-5, atol=1e-6, msg=name)
    assert sizes[1] < sizes[3] < sizes[None]
    assert sizes[1] < 0.4 * sizes[None]
