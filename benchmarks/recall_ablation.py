"""Memory at tiny scale: train a tiny preset and its memory ablation on multi-query associative recall (MQAR)
with the same budget, and print their recall accuracy side by side.

    python benchmarks/recall_ablation.py --preset jamba-tiny            # hybrid (1 attention layer) vs all-Mamba
    python benchmarks/recall_ablation.py --preset gated-deltanet-tiny   # GDN vs local attention of the same size

Each variant starts from the same seed, sees the same batches, and is scored on the same 512 held-out
sequences; chance is 1 / (number of value tokens).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import hf_memory
from hf_memory.tasks import MQARSpec, mqar_batch, recall_accuracy, train_recall

# preset -> variant name -> config overrides
ABLATIONS = {
    "gated-deltanet-tiny": {
        "Gated DeltaNet, 2 layers": {},
        "local attention only (window 4), 2 layers": {"layer_types": ["sliding_attention"] * 2, "sliding_window": 4},
    },
    "jamba-tiny": {
        "hybrid: 1 attention + 3 Mamba layers": {},
        "all 4 layers Mamba": {"layer_types": ["linear_attention"] * 4},
    },
    "jamba-mamba2-tiny": {
        "hybrid: 1 attention + 3 Mamba-2 layers": {},
        "all 4 layers Mamba-2": {"layer_types": ["linear_attention"] * 4},
    },
}


# preset -> task and optimiser settings that let the memory variant learn within a CPU budget
TRAINING = {
    "gated-deltanet-tiny": dict(pairs=4, steps=700, batch_size=64, lr=1e-2),
    "jamba-tiny": dict(pairs=8, steps=1000, batch_size=32, lr=3e-3),
    "jamba-mamba2-tiny": dict(pairs=8, steps=1000, batch_size=32, lr=3e-3),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="jamba-tiny", choices=sorted(ABLATIONS))
    parser.add_argument("--pairs", type=int, help="key-value pairs per sequence (default: per preset)")
    parser.add_argument("--steps", type=int, help="default: per preset")
    parser.add_argument("--batch-size", type=int, help="default: per preset")
    parser.add_argument("--lr", type=float, help="default: per preset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="also write the table here (markdown)")
    args = parser.parse_args()
    for name, value in TRAINING[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)

    rows = []
    for variant, overrides in ABLATIONS[args.preset].items():
        torch.manual_seed(args.seed)
        config = hf_memory.get_config(args.preset, **overrides)
        spec = MQARSpec(vocab_size=config.vocab_size, num_pairs=args.pairs, num_queries=args.pairs)
        test = mqar_batch(spec, 512, torch.Generator().manual_seed(10_000 + args.seed))
        model = AutoModelForCausalLM.from_config(config)
        start = time.perf_counter()
        losses = train_recall(model, spec, args.steps, args.batch_size, args.lr, args.seed, progress=False)
        accuracy = recall_accuracy(model, test)
        rows.append(f"| {variant} | {sum(p.numel() for p in model.parameters()):,} | {accuracy:.1%} | "
                    f"{losses[-1]:.3f} | {time.perf_counter() - start:.0f} |")
        print(rows[-1], flush=True)
    table = "\n".join([
        f"MQAR recall, preset {args.preset}: {args.pairs} key-value pairs then {args.pairs} queries, "
        f"{args.steps} steps x {args.batch_size} sequences, AdamW lr {args.lr}, seed {args.seed}, "
        f"chance {1 / spec.num_values:.1%}",
        "",
        "| variant | parameters | recall accuracy | final train loss | seconds |",
        "|---|---|---|---|---|",
        *rows,
    ])
    print(table)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(table + "\n")


if __name__ == "__main__":
    main()
