"""Decode cost of the three Titans variants (MAC, MAG, MAL) at 1K and 8K tokens of context, CPU, one thread: ms per
decoded token and the bytes every cache layer holds (memory weights, momentum and snapshot, the unfinished chunk,
conv histories, the window or segment of keys and values). All should be flat in the context length.

    python benchmarks/titans_variants_decode.py --output benchmarks/results/titans_variants_decode.md

Same 6.9M-parameter size as ``titans_speed.py`` (hidden 256, 4 layers, memory 4 heads x 64, depth 2, chunk 16), window
and MAC segment 512. The prompt is prefilled in pieces of 512; then 4 untimed and 32 timed single-token steps per
round; rounds interleaved across variants and contexts, median of 3.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, DynamicCache

import hf_memory
from report import emit

SIZE = dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, head_dim=64, memory_num_heads=4, memory_head_dim=64, memory_chunk_size=16,
            segment_size=512, sliding_window=512, num_persistent_tokens=4, max_position_embeddings=16384,
            attn_implementation="sdpa")


def cache_bytes(cache) -> int:
    tensors = [getattr(layer, name) for layer in cache.layers for name in layer.tensor_names]
    tensors += [w for layer in cache.layers for w in layer.weights + layer.momentum + (layer.snapshot or [])]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@torch.no_grad()
def prefill(model, context: int, piece: int = 512):
    ids = torch.randint(3, SIZE["vocab_size"], (1, context), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache(config=model.config)
    for start in range(0, context, piece):
        model(ids[:, start : start + piece], cache=cache, use_cache=True)
    return cache, ids[:, -1:]


@torch.no_grad()
def steps(model, cache, token, count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        model(token, cache=cache, use_cache=True)
    return (time.perf_counter() - start) / count * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = {}
    for variant in ("mac", "mag", "mal"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(hf_memory.get_config(f"titans-{variant}-tiny", **SIZE)).eval()
        for context in args.contexts:
            cache, token = prefill(model, context)
            steps(model, cache, token, 4)
            runs[variant, context] = dict(model=model, cache=cache, token=token, times=[])
    for _ in range(args.rounds):
        for run in runs.values():
            run["times"].append(steps(run["model"], run["cache"], run["token"], 32))
    rows = [f"| {variant.upper()} | {context} | {statistics.median(run['times']):.1f} "
            f"({' / '.join(f'{t:.1f}' for t in run['times'])}) | {cache_bytes(run['cache']) / 2**20:.2f} |"
            for (variant, context), run in runs.items()]
    emit([f"Titans decode, batch 1, CPU, 1 thread, torch {torch.__version__}; size {SIZE}; median of "
          f"{args.rounds} interleaved rounds of 32 steps (rounds in brackets).", "",
          "| variant | context tokens | ms / token | cache MiB |", "|---|---|---|---|", *rows], args.output)


if __name__ == "__main__":
    main()
