"""Memory beyond the attention window: a tiny Hymba whose every layer is sliding-window attention ∥ SSM heads,
against the same model with the SSM heads off (window attention only) and without meta tokens — same seed,
batches and budget. The passkey sits in an earlier window-sized block than the question, out of the question's
window; stacked window layers still reach back layers x (window - 1) tokens, so accuracy is reported by the
needle's block: the farthest block is partly beyond that reach. Training starts with a stage of 2 blocks (the
needle in the block just before the question's window): with the needle 1 to 3 blocks back from the first
step, the single-label task left 2 of 3 seeds at chance within 1200 steps.

    python benchmarks/hymba_passkey_ablation.py --seeds 3 --jobs 2 --output benchmarks/results/passkey_hymba_tiny.md
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor

import torch
from transformers import AutoModelForCausalLM

import hf_memory
from hf_memory.tasks import PasskeySpec, passkey_batch, train_recall

from passkey_ablation import accuracy_by_segment, summary_row
from report import emit

WINDOW_ONLY = {"layer_types": ["parallel_sliding_attention"] * 4, "kv_reuse_groups": [[1, 2]]}
VARIANTS = {
    "Hymba: window attention ∥ SSM heads, 4 meta tokens": WINDOW_ONLY,
    "SSM heads off (window attention + meta tokens)": {**WINDOW_ONLY, "use_ssm": False},
    "no meta tokens (window attention ∥ SSM heads)": {**WINDOW_ONLY, "num_memory_tokens": 0},
}


def train_variant(args, overrides: dict, seed: int) -> dict:
    torch.manual_seed(seed)
    config = hf_memory.get_config("hymba-tiny", **overrides)
    spec = PasskeySpec(config.vocab_size, segment_size=config.sliding_window, num_segments=args.blocks)
    test = passkey_batch(spec, 1024, torch.Generator().manual_seed(10_000 + seed))
    model = AutoModelForCausalLM.from_config(config)
    start = time.perf_counter()
    losses = train_recall(model, spec, args.steps, args.batch_size, args.lr, seed, progress=False,
                          curriculum=((2, args.two_block_steps),))
    overall, by_block = accuracy_by_segment(model, test)
    return dict(accuracy=overall, by_segment=by_block, loss=losses[-1], seconds=time.perf_counter() - start,
                chance=1 / (config.vocab_size - spec.first_passkey), window=config.sliding_window,
                length=spec.length)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=4, help="window-sized blocks of filler; the needle is in one "
                                                              "of the first blocks-1")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--two-block-steps", type=int, default=300, help="first stage: 2 blocks (needle in block 0)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seeds", type=int, default=3, help="train every variant from seeds 0 .. SEEDS-1")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (one torch thread each)")
    parser.add_argument("--output", default=None, help="also write the table here (markdown)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    jobs = [(seed, variant) for seed in range(args.seeds) for variant in VARIANTS]
    runs = {variant: [] for variant in VARIANTS}
    with ProcessPoolExecutor(args.jobs, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        futures = [pool.submit(train_variant, args, VARIANTS[variant], seed) for seed, variant in jobs]
        for (seed, variant), future in zip(jobs, futures):
            run = future.result()
            runs[variant].append(run)
            print(f"seed {seed} | {variant} | {run['accuracy']:.1%} | loss {run['loss']:.3f} | {run['seconds']:.0f} s",
                  flush=True)
    window, query = run["window"], run["length"] - 2
    reach = 4 * (window - 1)  # hymba-tiny's 4 layers
    blocks = " | ".join(f"needle in block {b} ({query - (b + 1) * window + 1}-{query - b * window - 2} back)"
                        for b in range(args.blocks - 1))
    emit([
        f"Passkey beyond the window, preset hymba-tiny with every layer sliding-window (window {run['window']}), "
        f"{run['length']} tokens, needle in one of the first {args.blocks - 1} window-sized blocks; {args.steps} "
        f"steps x {args.batch_size} (the first {args.two_block_steps} on 2 blocks), AdamW lr {args.lr}, seeds "
        f"0-{args.seeds - 1}; chance {run['chance']:.1%}. The question's window holds the last {window} tokens; "
        f"the 4 stacked window layers reach {reach} tokens back. Accuracy by block is the mean over seeds.",
        "",
        f"| variant | passkey accuracy, mean | range (min – max) | per seed | {blocks} | final train loss, mean "
        "| seconds per seed |",
        "|---|---|---|---|" + "---|" * (args.blocks - 1) + "---|---|",
        *(summary_row(variant, variant_runs) for variant, variant_runs in runs.items()),
    ], args.output)


if __name__ == "__main__":
    main()
