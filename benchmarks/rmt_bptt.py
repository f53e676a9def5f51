"""Training cost of RMT / ARMT against the truncation of back-propagation through memory (``bptt_depth``): time
of one training step (forward + backward) and the peak memory of the process, each in its own process, on CPU.

    python benchmarks/rmt_bptt.py --memory-type rmt
    python benchmarks/rmt_bptt.py --memory-type armt

``bptt_depth=k`` detaches the memory entering all but the last k segments, so the backward pass follows fewer
memory hand-offs. With a loss on every token (``--labels all``) each segment's own loss still needs that
segment's activations in the one backward pass a ``Trainer`` step makes, so memory is not expected to fall with
k. With labels only in the last segment (``--labels last``: answers after a long context) the segments cut off
from the loss run without autograd, so memory falls with k.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
from report import emit, in_fresh_process

SIZE = dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, max_position_embeddings=4096, associative_key_dim=32)


def measure(memory_type: str, depth: int | None, segments: int, segment_size: int, batch: int, steps: int,
            labelled: str) -> dict:
    """Train ``steps`` steps on random tokens; runs inside a fresh process."""
    import hf_memory  # noqa: F401
    from transformers import AutoModelForCausalLM

    config = hf_memory.get_config("rmt-tiny", **SIZE, memory_type=memory_type, segment_size=segment_size,
                                  num_memory_tokens=16, bptt_depth=depth)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, SIZE["vocab_size"], (batch, segments * segment_size), generator=generator)
    labels = ids.clone()
    if labelled == "last":
        labels[:, : -segment_size] = -100
    times = []
    for _ in range(steps + 1):  # the first step warms up
        start = time.perf_counter()
        model(input_ids=ids, labels=labels, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return {"seconds_per_step": sorted(times[1:])[len(times[1:]) // 2],
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memory-type", default="rmt", choices=["rmt", "armt"])
    parser.add_argument("--depths", default="1,2,4,8,none", help="comma list of bptt_depth values; none = all")
    parser.add_argument("--segments", type=int, default=16)
    parser.add_argument("--segment-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process; the median is shown")
    parser.add_argument("--labels", default="all", choices=["all", "last"], help="loss on every token or on the "
                        "last segment only")
    parser.add_argument("--output", default=None, help="default: benchmarks/results/<memory type>_bptt.md")
    parser.add_argument("--worker", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        memory_type, depth, segments, segment_size, batch, steps, labelled = args.worker
        depth = None if depth == "none" else int(depth)
        print(json.dumps(measure(memory_type, depth, int(segments), int(segment_size), int(batch), int(steps),
                                 labelled)))
        return

    rows = []
    for depth in args.depths.split(","):
        numbers = in_fresh_process(__file__, args.memory_type, depth, args.segments, args.segment_size,
                                   args.batch_size, args.steps, args.labels)
        rows.append(f"| {depth if depth != 'none' else 'all (' + str(args.segments) + ')'} | "
                    f"{numbers['seconds_per_step']:.2f} | {numbers['peak_rss_mib']:.0f} |")
        print(rows[-1], flush=True)
    emit([
        f"{args.memory_type.upper()} training step (forward + backward + AdamW) vs bptt_depth: {args.segments} "
        f"segments of "
        f"{args.segment_size} tokens, 16 memory tokens, batch {args.batch_size}, loss on "
        f"{'every token' if args.labels == 'all' else 'the last segment only'}, size {SIZE}; median of {args.steps} "
        f"steps, one process per row; CPU, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "",
        "| bptt_depth (memory hand-offs back-propagated) | seconds per step | peak process RSS MiB |",
        "|---|---|---|",
        *rows,
    ], args.output or f"benchmarks/results/{args.memory_type}_bptt_labels_{args.labels}.md")


if __name__ == "__main__":
    main()
