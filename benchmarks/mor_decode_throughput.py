"""Mixture-of-Recursions decode throughput with early exit and depth-wise batching, on CPU.

Four models decode after the same random prompts, token by token with their caches, interleaved in one process
(A, B, C, D, A, B, ... for ``--repeats`` rounds, after a warm-up round), one thread unless ``--threads``. The
tokens fed are random too (a random-weight model's greedy choice repeats one token, which would give every step
the same depth), each step computing the logits a generation loop picks from:

  * ``MoR``: Middle-Cycle, a block of K layers applied up to N_r times, expert-choice routing deciding per
    token at inference (router logit >= 0); a token stopped at depth d computes nothing deeper, and only the
    rows still active at a depth enter that depth's block call;
  * ``MoR, full depth``: the same weights with every capacity 1.0 (every token takes all N_r recursions);
  * ``Llama, same unique parameters``: transformers' ``LlamaForCausalLM`` with K + 2 layers;
  * ``Llama, same depth``: transformers' ``LlamaForCausalLM`` with 2 + K * N_r layers (the vanilla model of the
    same compute per token at full depth).

The weights are random. An untrained router's decisions follow no capacity, so each router gets a bias
calibrated on 32 random prompts to pass the capacity fractions (1, 2/3, 1/3 of the tokens by default: mean
depth 2), as a router trained with the auxiliary loss does; the decoded tokens' depth histogram is printed with
the speeds. All models use sdpa attention.

    python benchmarks/mor_decode_throughput.py [--batch-sizes 1 16] [--out benchmarks/results/mor_decode.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hf_memory  # noqa: E402
from report import emit  # noqa: E402


def mor_config(args, **overrides):
    return hf_memory.get_config(
        "mor-tiny", vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, num_recursions=args.recursions,
        num_hidden_layers=2 + args.block * args.recursions, max_position_embeddings=4096, attn_implementation="sdpa",
        **overrides)


def llama(args, layers: int) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                         num_hidden_layers=layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                         max_position_embeddings=4096, tie_word_embeddings=False, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


@torch.no_grad()
def calibrate_routers(model, args) -> None:
    """Give router r a bias that passes capacities[r] / capacities[r - 1] of the tokens reaching it (routers in
    order: each one's inputs depend on the routers before it)."""
    inner, capacities = model.model, model.config.capacities
    prompts = torch.randint(3, args.vocab, (32, args.prompt), generator=torch.Generator().manual_seed(123))
    for r, router in enumerate(inner.routers):
        biased = torch.nn.Linear(router.in_features, 1, bias=True)
        biased.weight.copy_(router.weight)
        biased.bias.zero_()
        inner.routers[r] = biased
        if r == 0 or capacities[r] >= 1.0:
            continue
        out = model(prompts, output_router_logits=True)
        logits = out.router_logits[r][out.recursion_depth >= r]
        biased.bias.fill_(-torch.quantile(logits, 1 - capacities[r] / capacities[r - 1]).item())


@torch.no_grad()
def decode(model, prompt: torch.Tensor, tokens: torch.Tensor) -> tuple[float, torch.Tensor | None]:
    """Seconds to feed ``tokens`` [B, N] one step at a time after the prompt (prefill excluded), and the MoR
    depths they took."""
    out = model(prompt, use_cache=True)
    depths = []
    start = time.perf_counter()
    for step in range(tokens.shape[1]):
        out = model(tokens[:, step : step + 1], cache=out.cache, use_cache=True)
        out.logits[:, -1].argmax(-1)  # the greedy choice a generation loop makes
        if getattr(out, "recursion_depth", None) is not None:
            depths.append(out.recursion_depth)
    return time.perf_counter() - start, torch.cat(depths, 1) if depths else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=1376)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--block", type=int, default=4, help="K: layers of the shared block")
    parser.add_argument("--recursions", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    mor = AutoModelForCausalLM.from_config(mor_config(args)).eval()
    full = AutoModelForCausalLM.from_config(mor_config(args, capacities=[1.0] * args.recursions)).eval()
    full.load_state_dict(mor.state_dict())
    calibrate_routers(mor, args)
    depth_applied = 2 + args.block * args.recursions
    models = {
        "MoR (early exit)": mor,
        "MoR, full depth": full,
        f"Llama, same unique parameters ({args.block + 2} layers)": llama(args, args.block + 2),
        f"Llama, same depth ({depth_applied} layers)": llama(args, depth_applied),
    }
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}

    lines = [f"# MoR decode throughput on CPU ({args.threads} thread(s), {torch.__version__})", "",
             f"`python benchmarks/mor_decode_throughput.py {' '.join(sys.argv[1:])}`".replace(" `", "`"), "",
             f"hidden {args.hidden}, {args.heads}/{args.kv_heads} heads, FFN {args.ffn}, vocabulary {args.vocab}; "
             f"MoR: Middle-Cycle, block of {args.block} layers x {args.recursions} recursions, expert-choice "
             f"(random weights, router biases calibrated to capacities "
             f"{[round(c, 3) for c in mor.config.capacities]}); prompt {args.prompt} tokens, "
             f"{args.new_tokens} decoded tokens per row; median (min-max) of {args.repeats} interleaved repeats "
             "after one warm-up.", ""]
    for batch in args.batch_sizes:
        generator = torch.Generator().manual_seed(batch)
        prompt = torch.randint(3, args.vocab, (batch, args.prompt), generator=generator)
        tokens = torch.randint(3, args.vocab, (batch, args.new_tokens), generator=generator)
        times = {name: [] for name in models}
        depths = None
        for repeat in range(args.repeats + 1):
            for name, model in models.items():
                seconds, d = decode(model, prompt, tokens)
                if repeat:
                    times[name].append(seconds)
                if d is not None and name.startswith("MoR (early"):
                    depths = d
        histogram = torch.bincount(depths.flatten(), minlength=args.recursions + 1)[1:].tolist()
        mean_depth = depths.float().mean().item()
        base = statistics.median(times["MoR, full depth"])
        lines += [f"## batch {batch}", "",
                  f"MoR decode depths (recursions 1..{args.recursions}): {histogram}, mean {mean_depth:.2f}; "
                  f"share of the full-depth layer work: {(2 + args.block * mean_depth) / depth_applied:.2f}", "",
                  "| model | parameters | tokens/s | ms/token (per row) | vs MoR full depth |", "|---|---|---|---|---|"]
        for name in models:
            median = statistics.median(times[name])
            rate = [batch * args.new_tokens / t for t in times[name]]
            lines.append(f"| {name} | {params[name]:,} | {batch * args.new_tokens / median:.0f} "
                         f"({min(rate):.0f}-{max(rate):.0f}) | {1000 * median / args.new_tokens:.2f} | "
                         f"{base / median:.2f}x |")
        lines.append("")
    emit(lines, args.out)


if __name__ == "__main__":
    main()
