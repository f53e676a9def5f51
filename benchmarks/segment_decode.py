"""Decode cost of a segment-wise memory model (Infini-attention, RMT, ARMT) against a Llama of the same size
(converted from it, same weights) at 1K and 8K tokens of context, on CPU: time per decoded token, cache size,
and the peak memory of the process (each measurement runs in its own process so that peaks do not mix).

    python benchmarks/segment_decode.py --architecture infini_attention
    python benchmarks/segment_decode.py --architecture rmt
    python benchmarks/segment_decode.py --architecture armt

These keep at most one segment of KV plus a fixed-size memory per layer, so their numbers should stay flat as
the context grows; the Llama's KV cache grows with it.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time

import torch
from report import emit, in_fresh_process

SIZE = dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, max_position_embeddings=16384)


NAMES = {"infini_attention": "Infini-attention", "rmt": "RMT (16 memory tokens)", "armt": "ARMT (16 memory tokens)"}


def cache_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        for value in vars(layer).values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


def measure(kind: str, folder: str, context: int, new_tokens: int) -> dict:
    """Prefill ``context`` tokens, then decode ``new_tokens`` greedily; runs inside a fresh process."""
    import hf_memory  # noqa: F401  (registers the hf-memory classes)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(f"{folder}/{kind}", attn_implementation="sdpa").eval()
    ids = torch.randint(5, SIZE["vocab_size"], (1, context), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        token, cache = out.logits[:, -1:].argmax(-1), out.cache
        start = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=token, cache=cache, use_cache=True)
            token, cache = out.logits[:, -1:].argmax(-1), out.cache
        seconds = (time.perf_counter() - start) / new_tokens
    return {"ms_per_token": seconds * 1e3, "cache_mib": cache_bytes(cache) / 2**20,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--architecture", default="infini_attention", choices=sorted(NAMES))
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--segment-size", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="processes per measurement; the median is shown")
    parser.add_argument("--output", default=None, help="default: benchmarks/results/<architecture>_decode.md")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, folder, context, new_tokens = args.worker
        print(json.dumps(measure(kind, folder, int(context), int(new_tokens))))
        return

    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_memory.conversion.llama import convert_from_llama

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**SIZE)).save_pretrained(f"{folder}/llama")
        options = {} if args.architecture == "infini_attention" else dict(architecture="rmt",
                                                                          memory_type=args.architecture)
        convert_from_llama(f"{folder}/llama", f"{folder}/memory", segment_size=args.segment_size, **options)
        for kind in ("llama", "memory"):
            for context in args.contexts:
                runs = []
                for _ in range(args.repeats):  # separate processes: timings on a shared CPU vary by ~20%
                    runs.append(in_fresh_process(__file__, kind, folder, context, args.new_tokens))
                numbers = sorted(runs, key=lambda run: run["ms_per_token"])[len(runs) // 2]
                name = ("Llama (full KV cache)" if kind == "llama"
                        else f"{NAMES[args.architecture]} (segment {args.segment_size})")
                rows.append(f"| {name} | {context} | {numbers['ms_per_token']:.2f} | {numbers['cache_mib']:.2f} | "
                            f"{numbers['peak_rss_mib']:.0f} |")
                print(rows[-1], flush=True)
    emit([
        f"Decode after a long prompt, batch 1, {args.new_tokens} greedy tokens, median of {args.repeats} processes; "
        f"size {SIZE}; CPU, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        "",
        "| model | context tokens | ms / decoded token | cache MiB | peak process RSS MiB |",
        "|---|---|---|---|---|",
        *rows,
    ], args.output or f"benchmarks/results/{args.architecture}_decode.md")


if __name__ == "__main__":
    main()
