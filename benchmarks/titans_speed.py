"""Titans on CPU, fp32, one thread: (1) forward tokens/s of the neural memory layer against the public
``titans-pytorch`` (lucidrains) NeuralMemory at the same heads, head size, memory depth, chunk size, length and
batch (interleaved in one process, median), with the forward of a whole small Titans MAG model for reference;
(2) decode ms/token, cache bytes and process memory of that model after 1K and 8K tokens of context.

    python benchmarks/titans_speed.py            # writes benchmarks/results/titans_speed.md (about 2 minutes)

(1) needs ``pip install titans-pytorch`` (0.5.5 measured; its rows are left out without it). Their layer is run
three ways: its defaults with ``batch_size`` = chunk size (a weight commit per chunk, as ours); the settings
under which it computes our function (tests/test_titans_peer.py: no input RMSNorms, no LayerNorm + residual
around the memory MLP, SiLU memory MLP, SiLU on q / k / v, q / k RMSNorm, ``batch_size`` = chunk size); and its
default ``batch_size=None`` (every gradient of a forward at the starting weights, one commit per forward: a
different function). Ours: the token mixer (projections, conv 4, SiLU, L2 norms, gates, clipped
chunk-wise memory, gated output norm) and the ``neural_memory_chunked`` operator alone on random inputs.
(2) prefills the prompt in pieces of 512 into ``DynamicCache(config=model.config)``, times rounds of 32
single-token steps interleaved across the contexts in one process, and, in a fresh process per context, sums
every tensor the cache layers hold and reads the process's memory.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import statistics
import time
from importlib.metadata import version
from pathlib import Path

import torch
import torch.nn.functional as F
from report import emit, in_fresh_process

HEADS, HEAD_DIM, DEPTH, EXPANSION, CHUNK = 4, 64, 2, 2, 16
MODEL = dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, head_dim=64, memory_num_heads=HEADS, memory_head_dim=HEAD_DIM, memory_depth=DEPTH,
             memory_expansion=EXPANSION, memory_chunk_size=CHUNK, sliding_window=512, num_persistent_tokens=4,
             max_position_embeddings=16384, attn_implementation="sdpa")


def titans_config():
    import hf_memory

    return hf_memory.get_config("titans-mag-tiny", **MODEL)


def peer_layers(hidden: int) -> dict:
    """titans-pytorch's NeuralMemory three ways (see the module docstring), or {} where it is not installed."""
    try:
        from titans_pytorch import NeuralMemory
        from titans_pytorch.memory_models import MemoryMLP
    except ImportError:
        return {}

    class SiLUMemoryMLP(MemoryMLP):
        def forward(self, x):
            for index, weight in enumerate(self.weights):
                x = x @ weight if index == 0 else F.silu(x) @ weight
            return x

    sizes = dict(dim=hidden, dim_head=HEAD_DIM, heads=HEADS, chunk_size=CHUNK)
    return {
        "titans-pytorch NeuralMemory, defaults, batch_size = chunk": NeuralMemory(
            **sizes, batch_size=CHUNK, model=MemoryMLP(HEAD_DIM, DEPTH, EXPANSION)),
        "titans-pytorch NeuralMemory, our function (the parity test's settings)": NeuralMemory(
            **sizes, batch_size=CHUNK, model=SiLUMemoryMLP(HEAD_DIM, DEPTH, EXPANSION), pre_rmsnorm=False,
            mem_model_norm_add_residual=False, qk_rmsnorm=True, activation=torch.nn.SiLU()),
        "titans-pytorch NeuralMemory, default batch_size=None (one commit per forward)": NeuralMemory(
            **sizes, model=MemoryMLP(HEAD_DIM, DEPTH, EXPANSION)),
    }


def forward_rows(batch: int, length: int, repeats: int) -> tuple[list[str], str]:
    from transformers import AutoModelForCausalLM

    from hf_memory.modeling.titans.modeling_titans import NeuralMemory
    from hf_memory.ops.neural_memory import neural_memory_chunked

    config = titans_config()
    torch.manual_seed(0)
    mixer = NeuralMemory(config, 0).eval()
    model = AutoModelForCausalLM.from_config(config).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, length, config.hidden_size, generator=g)
    ids = torch.randint(5, config.vocab_size, (batch, length), generator=g)
    shape = (batch, HEADS, length)
    q, k = (F.normalize(torch.randn(*shape, HEAD_DIM, generator=g), dim=-1) for _ in range(2))
    v = torch.randn(*shape, HEAD_DIM, generator=g)
    theta, eta, alpha = torch.rand(*shape, generator=g) * 0.2, 0.9 + 0.1 * torch.rand(*shape, generator=g), \
        0.05 * torch.rand(*shape, generator=g)
    weights = [w[None].expand(batch, *w.shape).float() for w in mixer.memory_init]
    runs = {
        "hf-memory Titans NeuralMemory mixer (conv 4, clip 1.0)": lambda: mixer(x),
        "hf-memory neural_memory_chunked operator alone": lambda: neural_memory_chunked(
            q, k, v, theta, eta, alpha, weights, chunk_size=CHUNK),
        **{name: (lambda layer=layer: layer(x)) for name, layer in peer_layers(config.hidden_size).items()},
        f"hf-memory Titans MAG model, {config.num_hidden_layers} layers (whole forward, logits)":
            lambda: model(input_ids=ids, use_cache=False),
    }
    seconds = {name: [] for name in runs}
    with torch.no_grad():
        for fn in runs.values():  # warm-up
            fn()
        for _ in range(repeats):  # interleaved: every layer sees the same machine state
            for name, fn in runs.items():
                start = time.perf_counter()
                fn()
                seconds[name].append(time.perf_counter() - start)
    ours = statistics.median(seconds[next(iter(runs))])
    rows = []
    for name, times in seconds.items():
        median = statistics.median(times)
        rows.append(f"| {name} | {median * 1e3:.0f} | {batch * length / median:,.0f} | {median / ours:.2f}x |")
        print(rows[-1], flush=True)
    parameters = sum(p.numel() for p in model.parameters())
    return rows, f"{parameters / 1e6:.1f}M parameters"


def cache_bytes(cache) -> tuple[int, dict]:
    """Bytes of every tensor the cache layers hold (lists of tensors included: the memory's weights and
    momentum), in total and per attribute name."""
    per_name: dict[str, int] = {}
    for layer in cache.layers:
        for name, value in vars(layer).items():
            tensors = value if isinstance(value, (list, tuple)) else [value]
            size = sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
            if size:
                per_name[name] = per_name.get(name, 0) + size
    return sum(per_name.values()), per_name


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def prefilled(model, context: int, piece: int):
    """A DynamicCache after ``context`` prompt tokens fed in pieces of ``piece``, and the next token."""
    from transformers import DynamicCache

    ids = torch.randint(5, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        for start in range(0, context, piece):
            out = model(input_ids=ids[:, start : start + piece], cache=cache, use_cache=True)
    return cache, out.logits[:, -1:].argmax(-1)


def decode(model, cache, token, steps: int):
    """``steps`` greedy single-token steps on ``cache``: seconds per token and the next token."""
    with torch.no_grad():
        start = time.perf_counter()
        for _ in range(steps):
            token = model(input_ids=token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
    return (time.perf_counter() - start) / steps, token


def build_model():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(titans_config()).eval()


def memory_worker(context: int, new_tokens: int, piece: int) -> dict:
    """In a fresh process: the cache's bytes after the prefill and after decoding, and the process's memory."""
    torch.set_num_threads(1)
    model = build_model()
    cache, token = prefilled(model, context, piece)
    prefill_bytes, _ = cache_bytes(cache)
    peak_prefill, rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, rss_mib()
    decode(model, cache, token, 4 + new_tokens)
    total, per_name = cache_bytes(cache)
    return {"cache_bytes": total, "prefill_cache_bytes": prefill_bytes, "per_name": per_name,
            "seen": cache.get_seq_length(), "peak_prefill_mib": peak_prefill,
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "decode_rss_change_mib": rss_mib() - rss_before}


def decode_rows(contexts, new_tokens: int, repeats: int, piece: int) -> tuple[list[str], list[str]]:
    model = build_model()
    caches = {context: prefilled(model, context, piece) for context in contexts}
    for context, (cache, token) in caches.items():  # untimed warm-up
        caches[context] = (cache, decode(model, cache, token, 4)[1])
    times = {context: [] for context in contexts}
    for _ in range(repeats):  # interleaved: every context sees the same machine state
        for context, (cache, token) in caches.items():
            seconds, token = decode(model, cache, token, new_tokens)
            caches[context] = (cache, token)
            times[context].append(seconds * 1e3)
    rows, parts = [], []
    for context in contexts:
        r = in_fresh_process(__file__, context, new_tokens, piece)
        print(context, times[context], json.dumps({k: v for k, v in r.items() if k != "per_name"}), flush=True)
        each = " / ".join(f"{ms:.1f}" for ms in times[context])
        rows.append(f"| {context} | {statistics.median(times[context]):.1f} ({each}) | {r['cache_bytes']:,} "
                    f"({r['cache_bytes'] / 2**20:.2f} MiB) | {r['prefill_cache_bytes']:,} | {r['peak_mib']:.0f} | "
                    f"{r['peak_prefill_mib']:.0f} | {r['decode_rss_change_mib']:+.1f} |")
        parts.append(f"{context}: " + ", ".join(f"{name} {size:,}" for name, size in sorted(r["per_name"].items())))
    return rows, parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved forward repeats (median)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--decode-repeats", type=int, default=3, help="interleaved decode rounds (median)")
    parser.add_argument("--piece", type=int, default=512, help="prefill piece length")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "titans_speed.md"))
    parser.add_argument("--worker", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(memory_worker(*args.worker)))
        return
    torch.set_num_threads(1)
    installed = importlib.util.find_spec("titans_pytorch") is not None
    peer = f"titans-pytorch {version('titans-pytorch')}" if installed else "titans-pytorch not installed: no rows of it"
    forward, size = forward_rows(args.batch, args.length, args.repeats)
    decode, parts = decode_rows(args.contexts, args.new_tokens, args.decode_repeats, args.piece)
    emit([
        f"CPU, fp32, 1 thread, torch {torch.__version__}, {peer}. Forward of one memory layer: hidden "
        f"{MODEL['hidden_size']}, {HEADS} heads x {HEAD_DIM}, memory depth {DEPTH} (hidden {EXPANSION}x), chunk "
        f"{CHUNK}, batch {args.batch} x {args.length} tokens; median of {args.repeats}, interleaved in one process "
        f"(the machine was shared with other jobs). The model row: {size}, {MODEL}.", "",
        "| layer | ms / forward | tokens / s | time vs our mixer |", "|---|---|---|---|", *forward, "",
        f"Decode of that Titans MAG model (batch 1, window {MODEL['sliding_window']}, memory chunk {CHUNK}): "
        f"prompt prefilled in pieces of {args.piece} into DynamicCache(config=model.config); ms / token: "
        f"{args.new_tokens} single-token steps per round after 4 untimed, rounds interleaved across contexts in one "
        f"process, median of {args.decode_repeats} (rounds in brackets). Cache bytes: every tensor of every cache "
        "layer (memory weights and momentum, pending chunk, conv history, window keys / values / positions), "
        f"and process memory, measured in a fresh process per context (prefill, then 4 + {args.new_tokens} "
        "steps); peak RSS includes the prefill.", "",
        "| context | ms / token | cache bytes after decode | cache bytes after prefill | peak RSS MiB | "
        "peak RSS after prefill MiB | RSS change over the decode MiB |",
        "|---|---|---|---|---|---|---|", *decode, "",
        "Cache bytes by tensor: " + "; ".join(parts),
    ], args.output)


if __name__ == "__main__":
    main()
