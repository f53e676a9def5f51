"""Passkey retrieval across segments: a tiny segment-wise model (Infini-attention, RMT) against the same model
with its memory disabled (each segment read alone), same seed, batches and budget. Accuracy is reported by
the segment that holds the needle (always an earlier segment than the question).

    python benchmarks/passkey_ablation.py --preset infini-attention-tiny
    python benchmarks/passkey_ablation.py --preset rmt-tiny --segments 9
    python benchmarks/passkey_ablation.py --preset titans-mag-tiny     # the needle beyond the attention window
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM

import hf_memory
from hf_memory.tasks import PasskeySpec, passkey_batch, train_recall

from report import emit, spread_cells

# ``train_recall`` settings beyond lr, steps and batch size (warmup, decay, betas, weight_decay)
RECIPE = {}

MEMORY_OFF = {"memory off (each segment read alone)": {"use_memory": False}}
VARIANTS = {  # architecture -> variant -> config overrides
    "infini_attention": {"Infini-attention (memory on)": {"use_memory": True}, **MEMORY_OFF},
    "rmt": {"RMT": {"memory_type": "rmt"}, "ARMT (associative memory)": {"memory_type": "armt"}, **MEMORY_OFF},
    "titans": {"Titans (neural memory on)": {"use_memory": True},
               "memory off (window + persistent memory only)": {"use_memory": False}},
}


def describe_memory(config, args) -> str:
    if config.model_type == "hfm_rmt":
        return f"{config.num_memory_tokens} memory tokens"
    if config.model_type == "hfm_titans":
        return (f"{config.variant.upper()}, memory depth {config.memory_depth} in chunks of {config.memory_chunk_size}, "
                f"{config.num_hidden_layers} layers of window {config.sliding_window}")
    return f"{config.memory_update} memory update, gates lr {args.gate_lr}"


@torch.no_grad()
def accuracy_by_segment(model, batch) -> tuple[float, list[float]]:
    model.eval()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    correct = (logits[:, -2].argmax(-1) == batch["input_ids"][:, -1]).float()
    segments = batch["needle_segment"]
    return correct.mean().item(), [correct[segments == s].mean().item() for s in range(int(segments.max()) + 1)]


def train_variant(args, overrides: dict, seed: int) -> dict:
    """Train one variant from ``seed``; its accuracy overall and by needle segment, final loss and seconds."""
    torch.manual_seed(seed)
    if args.segment_size:
        overrides = {**overrides, "segment_size": args.segment_size}
    config = hf_memory.get_config(args.preset, **overrides)
    spec = PasskeySpec(config.vocab_size, config.segment_size, args.segments)
    test = passkey_batch(spec, 1024, torch.Generator().manual_seed(10_000 + seed))
    model = AutoModelForCausalLM.from_config(config)
    start = time.perf_counter()
    groups = None  # Infini-attention's memory gates get their own learning rate
    if hasattr(model, "memory_parameter_groups"):
        groups = model.memory_parameter_groups(args.lr, gate_lr=args.gate_lr)
    losses = train_recall(model, spec, args.steps, args.batch_size, args.lr, seed, False, groups,
                          curriculum=args.curriculum, **RECIPE)
    overall, by_segment = accuracy_by_segment(model, test)
    return dict(accuracy=overall, by_segment=by_segment, loss=losses[-1], seconds=time.perf_counter() - start,
                config=config, chance=1 / (config.vocab_size - spec.first_passkey))


def summary_row(variant: str, runs: list[dict]) -> str:
    """Mean and range of accuracy over seeds, each seed's accuracy, mean accuracy by needle segment, loss, seconds."""
    accuracies = [run["accuracy"] for run in runs]
    segments = [sum(run["by_segment"][s] for run in runs) / len(runs) for s in range(len(runs[0]["by_segment"]))]
    return (f"| {variant} | {spread_cells(accuracies)} | " + " | ".join(f"{a:.1%}" for a in segments)
            + f" | {sum(run['loss'] for run in runs) / len(runs):.3f} | "
            f"{sum(run['seconds'] for run in runs) / len(runs):.0f} |")


def stage(text: str) -> tuple[int, int]:
    segments, _, steps = text.partition(":")
    return int(segments), int(steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="infini-attention-tiny")
    parser.add_argument("--segments", type=int, default=4)
    parser.add_argument("--segment-size", type=int, default=None, help="tokens per segment (default: the preset's)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--gate-lr", type=float, default=3e-2, help="Infini-attention's memory gates")
    parser.add_argument("--curriculum", type=stage, nargs="*", default=[], metavar="SEGMENTS:STEPS",
                        help="stages trained first on fewer segments, e.g. 3:100 5:100")
    parser.add_argument("--variants", nargs="*", default=[], help="only the variants whose name contains one of these")
    parser.add_argument("--seeds", type=int, default=3, help="train every variant from seeds 0 .. SEEDS-1")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a tiny model gains little from more)")
    parser.add_argument("--output", default=None, help="also write the table here (markdown)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    variants = {name: overrides for name, overrides in VARIANTS[hf_memory.PRESETS[args.preset].architecture].items()
                if not args.variants or any(word.lower() in name.lower() for word in args.variants)}
    runs = {variant: [] for variant in variants}
    for seed in range(args.seeds):
        for variant, overrides in variants.items():
            runs[variant].append(train_variant(args, overrides, seed))
            run = runs[variant][-1]
            print(f"seed {seed} | {variant} | {run['accuracy']:.1%} | loss {run['loss']:.3f} | "
                  f"{run['seconds']:.0f} s", flush=True)
    config = run["config"]
    header = " | ".join(f"needle in segment {s}" for s in range(args.segments - 1))
    recipe = ", ".join([f"{k} {v}" for k, v in RECIPE.items()]
                       + [f"first {n} steps on {segments} segments" for segments, n in args.curriculum])
    memory = describe_memory(config, args)
    emit([
        f"Passkey retrieval, preset {args.preset} ({memory}): {args.segments} segments of "
        f"{config.segment_size} tokens, the question in the last one; {args.steps} steps x {args.batch_size}, "
        f"lr {args.lr}{', ' + recipe if recipe else ''}, seeds 0-{args.seeds - 1}, "
        f"{args.threads} thread(s); chance {run['chance']:.1%}. Accuracy by needle segment is the mean over seeds.",
        "",
        f"| variant | accuracy, mean | range (min – max) | per seed | {header} | final train loss, mean "
        "| seconds per seed |",
        "|---|---|---|---|" + "---|" * (args.segments - 1) + "---|---|",
        *(summary_row(variant, variant_runs) for variant, variant_runs in runs.items()),
    ], args.output)


if __name__ == "__main__":
    main()
