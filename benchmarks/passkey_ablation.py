"""Passkey retrieval across segments: a tiny Infini-attention model against the same model with its memory
disabled (local attention within each segment only), same seed, batches and budget. Accuracy is reported
by the segment that holds the needle (always an earlier segment than the question).

    python benchmarks/passkey_ablation.py
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import hf_memory
from hf_memory.tasks import PasskeySpec, passkey_batch, train_recall

VARIANTS = {"Infini-attention (memory on)": {"use_memory": True}, "local attention only (memory off)": {"use_memory": False}}


@torch.no_grad()
def accuracy_by_segment(model, batch) -> tuple[float, list[float]]:
    model.eval()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    correct = (logits[:, -2].argmax(-1) == batch["input_ids"][:, -1]).float()
    segments = batch["needle_segment"]
    return correct.mean().item(), [correct[segments == s].mean().item() for s in range(int(segments.max()) + 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="infini-attention-tiny")
    parser.add_argument("--segments", type=int, default=4)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--gate-lr", type=float, default=3e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="also write the table here (markdown)")
    args = parser.parse_args()

    rows = []
    for variant, overrides in VARIANTS.items():
        torch.manual_seed(args.seed)
        config = hf_memory.get_config(args.preset, **overrides)
        spec = PasskeySpec(config.vocab_size, config.segment_size, args.segments)
        test = passkey_batch(spec, 1024, torch.Generator().manual_seed(10_000 + args.seed))
        model = AutoModelForCausalLM.from_config(config)
        start = time.perf_counter()
        groups = model.memory_parameter_groups(args.lr, gate_lr=args.gate_lr)
        losses = train_recall(model, spec, args.steps, args.batch_size, args.lr, args.seed, False, groups)
        overall, by_segment = accuracy_by_segment(model, test)
        rows.append(f"| {variant} | {overall:.1%} | " + " | ".join(f"{a:.1%}" for a in by_segment)
                    + f" | {losses[-1]:.3f} | {time.perf_counter() - start:.0f} |")
        print(rows[-1], flush=True)
    header = " | ".join(f"needle in segment {s}" for s in range(args.segments - 1))
    table = "\n".join([
        f"Passkey retrieval, preset {args.preset} ({config.memory_update} memory update): {args.segments} segments of "
        f"{config.segment_size} tokens, the question in the last one; {args.steps} steps x {args.batch_size}, "
        f"lr {args.lr} (gates {args.gate_lr}), seed {args.seed}; chance {1 / (config.vocab_size - spec.first_passkey):.1%}",
        "",
        f"| variant | accuracy | {header} | final train loss | seconds |",
        "|---|---|" + "---|" * (args.segments - 1) + "---|---|",
        *rows,
    ])
    print(table)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(table + "\n")


if __name__ == "__main__":
    main()
