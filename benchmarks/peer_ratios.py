"""Every speed ratio against the implementation a user would pick instead, measured one way: A and B interleaved
in one process, one thread (``--threads``), a warm-up call each, then the median and the spread (min - max) of
``--repeats`` timings each. Ratio = B's median / A's median: above 1, hf-memory (A) is faster.

    python benchmarks/peer_ratios.py --output benchmarks/results/peer_ratios.md

Rows:
  * Gated DeltaNet operator, ``gated_delta_rule_chunked`` vs transformers' ``torch_chunk_gated_delta_rule``
    (Qwen3-Next) on the same inputs: forward and forward + backward at 2K and 8K tokens (1 batch row, 4 heads of
    64, chunks of 64), and the forward's share of this CPU's single-thread fp32 matmul rate (the FLOPs of the
    chunked form's matmuls and triangular solves over the time, against one 1024 x 1024 x 1024 matmul's rate),
    beside the share a batch of 512 products of 64 x 64 matrices (the chunked form's block size) reaches.
  * Titans memory layer vs ``titans-pytorch``'s NeuralMemory computing the same function (forward).
  * Jamba-style hybrid vs transformers' ``JambaForCausalLM`` holding the same weights (``jamba_speed.py``'s tiny
    and small sizes), on its default path and with ``use_mambapy=True`` (mambapy's parallel scan; that row says so
    when mambapy is not installed and transformers falls back to its loop): a training step (forward + backward,
    4 x 256 tokens) and a decode step (batch 4 after 128 tokens).
  * Infini-attention vs ``infini-transformer-pytorch`` (forward, 8K tokens), and segments of 8 vs 512.
  * Prefill (1 x 1024 tokens) and decode (after 1024 tokens) of the tiny presets of Jamba, Gated DeltaNet and
    Infini-attention, and of Gated DeltaNet and Infini-attention at width 512, vs a Llama of the same width, depth,
    heads, FFN and vocabulary.
  * Prefill of the GDN and Infini-attention tiny presets, eager vs ``torch.compile`` (inductor).

    python benchmarks/peer_ratios.py --rows jamba llama     # a subset: gated_delta titans jamba infini llama compiled
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from report import emit


def timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def interleaved(a: Callable, b: Callable, repeats: int) -> tuple[list[float], list[float]]:
    """Seconds of ``repeats`` calls of a and b, alternating, after one warm-up call of each."""
    a(), b()
    times_a, times_b = [], []
    for _ in range(repeats):
        times_a.append(timed(a))
        times_b.append(timed(b))
    return times_a, times_b


def cells(times_a: list[float], times_b: list[float]) -> str:
    a, b = statistics.median(times_a), statistics.median(times_b)
    return (f"{1e3 * a:.1f} ({1e3 * min(times_a):.1f}–{1e3 * max(times_a):.1f}) | "
            f"{1e3 * b:.1f} ({1e3 * min(times_b):.1f}–{1e3 * max(times_b):.1f}) | {b / a:.2f}x")


# ------------------------------------------------------------------------------------------ Gated DeltaNet
def gated_delta_inputs(length: int, heads: int = 4, dim: int = 64, requires_grad: bool = False):
    generator = torch.Generator().manual_seed(0)
    q, k = (F.normalize(torch.randn(1, length, heads, dim, generator=generator), dim=-1) for _ in range(2))
    v = torch.randn(1, length, heads, dim, generator=generator)
    g = -torch.rand(1, length, heads, generator=generator) * 0.1
    beta = torch.rand(1, length, heads, generator=generator)
    return [t.requires_grad_(requires_grad) for t in (q, k, v, g, beta)]


def gated_delta_flops(length: int, heads: int = 4, dim: int = 64, chunk: int = 64) -> float:
    """Multiply-adds x 2 of the chunked form's forward: per chunk the [C, C] products K K^T and Q K^T, the two
    triangular solves (C^2 d / 2 each side), and the state reads and writes (C d^2 each, four of them)."""
    per_chunk = 2 * chunk * chunk * dim + 2 * (chunk * chunk * dim / 2) * 2 + 4 * chunk * dim * dim
    return 2 * per_chunk * heads * (length / chunk)


def matmul_rate(size: int = 1024, batch: int = 1, repeats: int = 5) -> float:
    """FLOP/s of ``batch`` products of two size x size fp32 matrices (one ``@`` call)."""
    a, b = torch.randn(batch, size, size), torch.randn(batch, size, size)
    a @ b
    seconds = statistics.median(timed(lambda: a @ b) for _ in range(repeats))
    return 2 * batch * size**3 / seconds


def gated_delta_rows(repeats: int) -> list[str]:
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule

    from hf_memory.ops.gated_delta import gated_delta_rule_chunked

    def ours(inputs):
        return gated_delta_rule_chunked(*inputs, chunk_size=64)

    def theirs(inputs):
        return torch_chunk_gated_delta_rule(*inputs, chunk_size=64, output_final_state=True)

    rate = matmul_rate()
    # the chunked form's products are 64 x 64 blocks: the rate this CPU reaches on them bounds the operator's share
    block_rate = matmul_rate(64, batch=512)
    lines = []
    for length in (2048, 8192):
        inputs = gated_delta_inputs(length)
        with torch.no_grad():
            forward = interleaved(lambda: ours(inputs), lambda: theirs(inputs), repeats)
            difference = (ours(inputs)[0] - theirs(inputs)[0]).abs().max().item()
        share = gated_delta_flops(length) / statistics.median(forward[0]) / rate
        lines.append(f"| GDN operator, forward, {length} tokens | {cells(*forward)} | {share:.0%} of "
                     f"{rate / 1e9:.0f} GFLOP/s (1024^3 matmul); 64 x 64 products alone reach {block_rate / rate:.0%}; "
                     f"outputs differ by {difference:.1e} |")
        leaves = gated_delta_inputs(length, requires_grad=True)

        def step(operator):
            def run():
                for t in leaves:
                    t.grad = None
                o, state = operator(leaves)
                (o.square().sum() + state.sum()).backward()
            return run

        lines.append(f"| GDN operator, forward + backward, {length} tokens | "
                     f"{cells(*interleaved(step(ours), step(theirs), repeats))} | |")
        print(lines[-2], lines[-1], sep="\n", flush=True)
    return lines


# ------------------------------------------------------------------------------------------------- Titans
def titans_rows(repeats: int) -> list[str]:
    """Titans' memory layer (hf-memory's NeuralMemory mixer) vs titans-pytorch's NeuralMemory set to compute the same
    function (tests/test_titans_peer.py's settings), benchmarks/titans_speed.py's sizes: hidden 256, 4 heads of 64,
    depth 2, chunks of 16, batch 2 x 1024. Left out when titans-pytorch is not installed."""
    from titans_speed import peer_layers, titans_config

    from hf_memory.modeling.titans.modeling_titans import NeuralMemory

    config = titans_config()
    peers = peer_layers(config.hidden_size)
    if not peers:
        return ["| Titans memory layer vs titans-pytorch | not measured: titans-pytorch not installed | | | |"]
    peer = next(layer for name, layer in peers.items() if "our function" in name)
    torch.manual_seed(0)
    ours = NeuralMemory(config, 0).eval()
    x = torch.randn(2, 1024, config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        times = interleaved(lambda: ours(x), lambda: peer(x), repeats)
    line = f"| Titans memory layer forward, 2 x 1024 tokens, vs titans-pytorch (same function) | {cells(*times)} | |"
    print(line, flush=True)
    return [line]


# -------------------------------------------------------------------------------------------------- Jamba
def training_step(model, ids: torch.Tensor) -> Callable[[], None]:
    model.train()

    def run():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    return run


def decode_step(model, prompt: torch.Tensor, new_tokens: int) -> Callable[[], None]:
    """A call: ``new_tokens`` greedy decode steps from a cache filled with ``prompt`` once, up front (a fresh
    prefill per call would time the prompt too); each call continues the same cache, a few tokens longer."""
    model.eval()
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True)
    state = {"cache": out.cache, "token": out.logits[:, -1:].argmax(-1)}

    @torch.no_grad()
    def run():
        for _ in range(new_tokens):
            out = model(input_ids=state["token"], cache=state["cache"], use_cache=True)
            state["cache"], state["token"] = out.cache, out.logits[:, -1:].argmax(-1)
    return run


def jamba_rows(repeats: int) -> list[str]:
    from importlib.util import find_spec

    from jamba_speed import SIZES, build_pair
    from transformers import JambaConfig, JambaForCausalLM

    scan = "mambapy's pscan" if find_spec("mambapy") else "mambapy NOT installed: transformers' loop"
    lines = []
    for size in ("tiny", "small"):
        theirs, ours, error = build_pair(size, torch.device("cpu"))
        mambapy = JambaForCausalLM(JambaConfig(**SIZES[size], attn_implementation="sdpa", use_mambapy=True))
        mambapy.load_state_dict(theirs.state_dict())
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(3, theirs.config.vocab_size, (4, 256), generator=generator)
        for name, peer in (("default", theirs), (f"use_mambapy=True, {scan}", mambapy)):
            train = interleaved(training_step(ours, ids), training_step(peer, ids), repeats)
            decode = interleaved(decode_step(ours, ids[:, :128], 8), decode_step(peer, ids[:, :128], 8), repeats)
            lines += [f"| Jamba {size} vs transformers' Jamba ({name}): training step, 4 x 256 tokens | "
                      f"{cells(*train)} | same weights: logits differ by {error:.1e} |",
                      f"| Jamba {size} vs transformers' Jamba ({name}): 8 decode steps, batch 4 after 128 | "
                      f"{cells(*decode)} | |"]
            print(*lines[-2:], sep="\n", flush=True)
    return lines


# ---------------------------------------------------------------------------------------- Infini-attention
def infini_rows(repeats: int) -> list[str]:
    """Forward (no gradient) over 1 x 8192 tokens: hf-memory's Infini-attention vs ``infini-transformer-pytorch``
    (its model fed segment by segment with its memories, as its wrapper does) at width 128, 2 layers, 4 heads of
    32, segments of 512, linear memory (its default); our FFN is SwiGLU of 344 (its GELU of 4 x 128 has the same
    parameters). Then our segment 8 vs segment 512 on the same model (the per-token cost of short segments)."""
    from transformers import AutoModelForCausalLM

    import hf_memory

    def ours_with(segment_size):
        config = hf_memory.get_config("infini-attention-tiny", hidden_size=128, intermediate_size=344,
                                      num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2,
                                      segment_size=segment_size, memory_update="linear", vocab_size=256,
                                      max_position_embeddings=8192)
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config).eval()

    ids = torch.randint(3, 256, (1, 8192), generator=torch.Generator().manual_seed(0))
    ours, short = ours_with(512), ours_with(8)
    lines = []
    try:
        from infini_transformer_pytorch import InfiniTransformer
    except ImportError:
        lines.append("| Infini-attention vs infini-transformer-pytorch | not measured: not installed | | | |")
    else:
        torch.manual_seed(0)
        peer = InfiniTransformer(num_tokens=256, dim=128, depth=2, dim_head=32, heads=4).eval()

        def theirs():
            memories = None
            for segment in ids.split(512, dim=-1):
                memories = peer(segment, past_memories=memories, return_new_memories=True).past_memories

        with torch.no_grad():
            times = interleaved(lambda: ours(input_ids=ids, use_cache=False), theirs, repeats)
        sizes = " vs ".join(f"{sum(p.numel() for p in m.parameters()) / 1e3:.0f}K" for m in (ours, peer))
        lines.append(f"| Infini-attention forward, 1 x 8192 tokens, segments of 512, vs infini-transformer-pytorch | "
                     f"{cells(*times)} | {sizes} parameters |")
    with torch.no_grad():
        times = interleaved(lambda: ours(input_ids=ids, use_cache=False), lambda: short(input_ids=ids, use_cache=False),
                            repeats)
    lines.append(f"| Infini-attention forward, 1 x 8192 tokens: segments of 512 (A) vs segments of 8 (B) | "
                 f"{cells(*times)} | target: B within 1.5x of A |")
    print(*lines, sep="\n", flush=True)
    return lines


# ---------------------------------------------------------------------------------------------- vs Llama
def llama_rows(repeats: int) -> list[str]:
    """Prefill and decode of the tiny presets (width 64: a decode step is mostly per-operator overhead) and of the
    Gated DeltaNet and Infini-attention presets at width 512 (8 heads of 64, FFN 2048, vocabulary 4096: the
    projections' arithmetic dominates) against a Llama of the same width, depth, heads, FFN and vocabulary."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    import hf_memory

    width_512 = dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=8, intermediate_size=2048,
                     vocab_size=4096)
    gdn_heads_512 = dict(linear_num_key_heads=8, linear_num_value_heads=8, linear_key_head_dim=64,
                         linear_value_head_dim=64)
    models = [("jamba-tiny", {}), ("gated-deltanet-tiny", {}), ("infini-attention-tiny", {}),
              ("gated-deltanet-tiny", {**width_512, **gdn_heads_512}), ("infini-attention-tiny", width_512)]
    lines = []
    for preset, overrides in models:
        config = hf_memory.get_config(preset, **overrides)
        name = preset if not overrides else f"{preset.removesuffix('-tiny')} at width 512"
        torch.manual_seed(0)
        ours = AutoModelForCausalLM.from_config(config).eval()
        llama = LlamaForCausalLM(LlamaConfig(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads, max_position_embeddings=4096,
            attn_implementation="sdpa")).eval()
        ids = torch.randint(3, config.vocab_size, (1, 1024), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            prefill = interleaved(lambda: ours(input_ids=ids, use_cache=False),
                                  lambda: llama(input_ids=ids, use_cache=False), repeats)
        decode = interleaved(decode_step(ours, ids, 16), decode_step(llama, ids, 16), repeats)
        sizes = " vs ".join(f"{sum(p.numel() for p in m.parameters()) / 1e3:,.0f}K" for m in (ours, llama))
        lines += [f"| {name} vs a same-size Llama: prefill, 1 x 1024 tokens | {cells(*prefill)} | "
                  f"{sizes} parameters |",
                  f"| {name} vs a same-size Llama: 16 decode steps after 1024 tokens | {cells(*decode)} | |"]
        print(*lines[-2:], sep="\n", flush=True)
    return lines


# ---------------------------------------------------------------------------------------------- compiled
def compiled_rows(repeats: int) -> list[str]:
    """Prefill (1 x 1024 tokens, no gradient) of tiny presets, eager (A) vs ``torch.compile`` with inductor (B),
    after the compile (its time in the note; the presets' forwards trace into one graph: tests/test_compile.py)."""
    from transformers import AutoModelForCausalLM

    import hf_memory

    lines = []
    for preset in ("gated-deltanet-tiny", "infini-attention-tiny"):
        config = hf_memory.get_config(preset)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
        compiled = torch.compile(model)
        ids = torch.randint(3, config.vocab_size, (1, 1024), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            start = time.perf_counter()
            difference = (compiled(input_ids=ids, use_cache=False).logits
                          - model(input_ids=ids, use_cache=False).logits).abs().max().item()
            seconds = time.perf_counter() - start
            times = interleaved(lambda: model(input_ids=ids, use_cache=False),
                                lambda: compiled(input_ids=ids, use_cache=False), repeats)
        lines.append(f"| {preset} prefill, 1 x 1024 tokens: eager (A) vs torch.compile, inductor (B) | "
                     f"{cells(*times)} | compile {seconds:.0f} s; logits differ by {difference:.1e} |")
        print(lines[-1], flush=True)
    return lines


ROWS = {"gated_delta": gated_delta_rows, "titans": titans_rows, "jamba": jamba_rows, "infini": infini_rows,
        "llama": llama_rows, "compiled": compiled_rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = [f"Peer ratios on CPU, {args.threads} thread(s), torch {torch.__version__}: median (min–max) ms of "
             f"{args.repeats} interleaved repeats after a warm-up; ratio = peer / hf-memory (> 1: hf-memory faster)",
             "", "| comparison | hf-memory ms | peer ms | ratio | note |", "|---|---|---|---|---|"]
    for name in args.rows:
        lines += ROWS[name](args.repeats)
    emit(lines, args.output)


if __name__ == "__main__":
    main()
