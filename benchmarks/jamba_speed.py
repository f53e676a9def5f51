"""Training-step and decode-step time of hf-memory's Jamba-style hybrid against transformers'
``JambaForCausalLM`` (torch path) with the same weights, side by side in one run.

    python benchmarks/jamba_speed.py                   # CPU, tiny and small sizes
    python benchmarks/jamba_speed.py --device cuda     # with mamba-ssm / causal-conv1d when installed

Prints a markdown table (and writes it to --output). Both models are built from one random transformers
Jamba, converted in memory with ``hf_memory.conversion.jamba``, and checked to give the same logits first.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import JambaConfig, JambaForCausalLM

from hf_memory.conversion.jamba import config_from_jamba, rename_from_jamba
from hf_memory.modeling.jamba.modeling_jamba import JambaHybridForCausalLM

SIZES = {
    "tiny": dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, attn_layer_period=4,
                 attn_layer_offset=2, num_experts=4, num_attention_heads=4, num_key_value_heads=2, mamba_d_state=8),
    "small": dict(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=8, attn_layer_period=8,
                  attn_layer_offset=4, num_experts=8, num_attention_heads=8, num_key_value_heads=2, mamba_d_state=16),
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step_seconds(model, ids: torch.Tensor, repeats: int) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    timings = []
    for _ in range(repeats + 1):  # the first step warms up
        synchronize(ids.device)
        start = time.perf_counter()
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(ids.device)
        timings.append(time.perf_counter() - start)
    return sorted(timings[1:])[len(timings[1:]) // 2]


@torch.no_grad()
def decode_step_seconds(model, prompt: torch.Tensor, new_tokens: int) -> float:
    model.eval()
    out = model(input_ids=prompt, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    cache = out.cache
    synchronize(prompt.device)
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=token, cache=cache, use_cache=True)
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
    synchronize(prompt.device)
    return (time.perf_counter() - start) / new_tokens


def build_pair(size: str, device: torch.device):
    torch.manual_seed(0)
    theirs = JambaForCausalLM(JambaConfig(**SIZES[size], attn_implementation="sdpa")).to(device)
    ours = JambaHybridForCausalLM(config_from_jamba(theirs.config)).to(device)
    ours.load_state_dict(rename_from_jamba(theirs.state_dict()), strict=True)
    ids = torch.randint(3, theirs.config.vocab_size, (1, 64), device=device)
    with torch.no_grad():
        error = (theirs.eval()(ids).logits - ours.eval()(ids).logits).abs().max().item()
    return theirs, ours, error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=sorted(SIZES))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--output", default="benchmarks/results/jamba_speed.md")
    args = parser.parse_args()
    device = torch.device(args.device)

    rows = []
    for size in args.sizes:
        theirs, ours, error = build_pair(size, device)
        ids = torch.randint(3, theirs.config.vocab_size, (args.batch, args.length), device=device)
        prompt = ids[:, : args.length // 2]
        results = {}
        for name, model in (("transformers JambaForCausalLM", theirs), ("hf-memory hfm_jamba", ours)):
            results[name] = (train_step_seconds(model, ids, args.repeats), decode_step_seconds(model, prompt, args.new_tokens))
        base_train, base_decode = results["transformers JambaForCausalLM"]
        for name, (train, decode) in results.items():
            rows.append(f"| {size} | {name} | {train * 1e3:.1f} | {base_train / train:.2f}x | {decode * 1e3:.2f} | "
                        f"{base_decode / decode:.2f}x | {error:.1e} |")
    table = "\n".join([
        f"Jamba training step (batch {args.batch} x {args.length}, forward+backward+AdamW, median of {args.repeats}) "
        f"and decode step (batch {args.batch}, {args.new_tokens} tokens after a {args.length // 2}-token prompt); "
        f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "",
        "| size | implementation | train step ms | speed-up | decode ms/token | speed-up | max logit diff |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ])
    print(table)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(table + "\n")


if __name__ == "__main__":
    main()
