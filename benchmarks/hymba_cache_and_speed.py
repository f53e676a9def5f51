"""The parallel hybrid on CPU: (1) cache bytes per sequence of the hymba-1.5b layout at 1K and 8K tokens against
a Llama of the same width and depth; (2) forward and decode time against transformers' Falcon-H1 on the same
weights (interleaved in one process, ratio printed); (3) decode ms/token and cache bytes of a small Hymba at 1K
and 8K tokens of context.

    python benchmarks/hymba_cache_and_speed.py --output benchmarks/results/hymba_cache_and_speed.md

(1) is measured on a narrow model with hymba-1.5b's cache-shaping fields (32 layers, 25 x 128-wide value heads,
5 KV heads of 64 / 128, SSM 3200 x 16 with conv 4, 128 meta tokens, window 1025, its 14 KV-sharing groups, KV in
bf16 and SSM state in fp32): every tensor the cache holds is summed (``hf_memory.bench.cache_bytes``, each storage
once); the model's width does not enter the cache.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, FalconH1ForCausalLM

import hf_memory
from hf_memory.bench import cache_bytes, median_seconds
from hf_memory.conversion.falcon_h1 import config_to_falcon_h1, rename_to_falcon_h1

from report import emit


def prefill(model, context: int, chunk: int = 1024):
    """The cache after ``context`` tokens, fed in chunks (the SSM state and kept KV are the same either way)."""
    ids = torch.randint(5, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    cache = None
    with torch.no_grad():
        for start in range(0, context, chunk):
            cache = model(ids[:, start : start + chunk], cache=cache, use_cache=True).cache
    return cache


def hymba_cache_table(contexts) -> list[str]:
    preset = hf_memory.PRESETS["hymba-1.5b"].config
    narrow = hf_memory.get_config("hymba-1.5b", hidden_size=64, intermediate_size=64, vocab_size=256,
                                  mamba_d_ssm=3200, mamba_dt_rank=4)
    model = AutoModelForCausalLM.from_config(narrow).to(torch.bfloat16).eval()
    rows = []
    for context in contexts:
        measured = cache_bytes(prefill(model, context))
        layers, kv_heads, head_dim = preset["num_hidden_layers"], preset["num_key_value_heads"], preset["head_dim"]
        llama = 2 * layers * kv_heads * head_dim * context * 2  # K and V, bf16
        rows.append(f"| {context} | {measured / 2**20:.1f} MiB | {llama / 2**20:.1f} MiB | {llama / measured:.2f}x |")
    return rows


def decode_seconds(model, ids, new_tokens: int) -> float:
    """Seconds per greedily decoded token after prefilling ``ids`` (the prefill is not timed)."""
    with torch.no_grad():
        out = model(ids, use_cache=True)
        token, cache = out.logits[:, -1:].argmax(-1), out.cache
        start = time.perf_counter()
        for _ in range(new_tokens):
            out = model(token, cache=cache, use_cache=True)
            token, cache = out.logits[:, -1:].argmax(-1), out.cache
    return (time.perf_counter() - start) / new_tokens


def falcon_speed_rows(prompt: int, new_tokens: int, repeats: int) -> list[str]:
    config = hf_memory.get_config("falcon-h1-tiny", hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                  num_attention_heads=8, num_key_value_heads=2, head_dim=32, mamba_head_dim=32,
                                  mamba_chunk_size=128, vocab_size=4096, attn_implementation="sdpa")
    torch.manual_seed(0)
    ours = AutoModelForCausalLM.from_config(config).eval()
    theirs = FalconH1ForCausalLM(config_to_falcon_h1(config)).eval()
    theirs.load_state_dict(rename_to_falcon_h1(ours.state_dict()))
    ids = torch.randint(5, config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(ids).logits - theirs(ids).logits).abs().max() < 1e-3, "the two models disagree"

    def forward(model):
        with torch.no_grad():
            model(ids, use_cache=False)

    forward_s, decode_s = {"ours": [], "theirs": []}, {"ours": [], "theirs": []}
    for _ in range(repeats):  # interleaved: both see the same machine state
        for name, model in (("ours", ours), ("theirs", theirs)):
            forward_s[name].append(median_seconds(lambda: forward(model), 1))
            decode_s[name].append(decode_seconds(model, ids, new_tokens))
    f_ours, f_theirs = statistics.median(forward_s["ours"]), statistics.median(forward_s["theirs"])
    d_ours, d_theirs = statistics.median(decode_s["ours"]), statistics.median(decode_s["theirs"])
    return [
        f"| forward, {prompt} tokens | {f_ours * 1e3:.1f} ms | {f_theirs * 1e3:.1f} ms | {f_theirs / f_ours:.2f}x |",
        f"| decode after {prompt} tokens | {d_ours * 1e3:.2f} ms/token | {d_theirs * 1e3:.2f} ms/token | "
        f"{d_theirs / d_ours:.2f}x |",
    ]


def hymba_decode_rows(contexts, new_tokens: int) -> list[str]:
    config = hf_memory.get_config("hymba-tiny", hidden_size=256, intermediate_size=512, num_attention_heads=8,
                                  num_key_value_heads=2, head_dim=32, sliding_window=256, num_memory_tokens=16,
                                  vocab_size=4096, max_position_embeddings=16384, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    rows = []
    for context in contexts:
        cache = prefill(model, context)
        token = torch.tensor([[7]])
        with torch.no_grad():
            start = time.perf_counter()
            for _ in range(new_tokens):
                out = model(token, cache=cache, use_cache=True)
                token, cache = out.logits[:, -1:].argmax(-1), out.cache
        ms = (time.perf_counter() - start) / new_tokens * 1e3
        rows.append(f"| {context} | {ms:.1f} | {cache_bytes(cache) / 2**20:.2f} MiB |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=None, help="also write the tables here (markdown)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = [
        "Cache bytes per sequence, hymba-1.5b layout (KV bf16, SSM state fp32) vs a Llama of the same width and "
        "depth (32 layers, 5 KV heads x 64, bf16)", "",
        "| context | hf-memory Hymba | Llama | Llama / Hymba |", "|---|---|---|---|", *hymba_cache_table(args.contexts),
        "", f"CPU, {args.threads} thread(s): Falcon-H1 layout (hidden 256, 4 layers, Mamba-2 + attention, sdpa) on the "
            f"same weights, median of {args.repeats}, interleaved", "",
        "| measure | hf-memory | transformers Falcon-H1 | transformers / hf-memory |", "|---|---|---|---|",
        *falcon_speed_rows(args.prompt, args.new_tokens, args.repeats),
        "", "CPU decode of a small Hymba (hidden 256, 4 layers, window 256, 16 meta tokens, sdpa)", "",
        "| context | ms/token | cache |", "|---|---|---|", *hymba_decode_rows(args.contexts, args.new_tokens),
    ]
    emit(lines, args.output)


if __name__ == "__main__":
    main()
