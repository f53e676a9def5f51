"""Titans' neural memory alone as an associative memory: a stream of N (key, value) pairs is written once, token by
token (chunk size 1, the exact rule), by the memory's own test-time gradient steps; then every key is read back and
counts as recalled when the read-out is nearest (cosine) to its own value among the N values. No training: the
memory is the operator ``hf_memory.ops.neural_memory`` with fixed gates.

    python benchmarks/titans_associative_recall.py --output benchmarks/results/titans_associative_recall.md

Keys and values are random unit vectors of ``--dim``; 64 independent streams per seed, seeds 0-2. Rows: a linear
memory (depth 1, M_0 = 0: with momentum off and no forgetting, the delta rule) and a 2-layer SiLU MLP (hidden
2 x dim, fan-in scaled random M_0), momentum off or eta = 0.9, step theta from a small sweep (best shown), the
update's gradient clipped to norm 1 as in the model.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from hf_memory.ops.neural_memory import mlp_forward, neural_memory_chunked
from report import emit


def recall(pairs: int, dim: int, depth: int, theta: float, eta: float, seed: int, streams: int = 64) -> float:
    generator = torch.Generator().manual_seed(seed)
    keys = F.normalize(torch.randn(streams, 1, pairs, dim, generator=generator), dim=-1)
    values = F.normalize(torch.randn(streams, 1, pairs, dim, generator=generator), dim=-1)
    sizes = [dim] + [2 * dim] * (depth - 1) + [dim]
    if depth == 1:
        weights = [torch.zeros(streams, 1, dim, dim)]
    else:
        weights = [(torch.randn(a, b, generator=generator) / a**0.5).expand(streams, 1, a, b)
                   for a, b in zip(sizes, sizes[1:])]
    gate = torch.ones(streams, 1, pairs)
    _, weights, _ = neural_memory_chunked(keys, keys, values, theta * gate, eta * gate, 0 * gate, weights,
                                          chunk_size=1, max_grad_norm=1.0)
    read = F.normalize(mlp_forward(weights, keys)[0], dim=-1)  # [B, 1, N, d]
    nearest = (read @ values.transpose(-1, -2)).argmax(-1)
    return (nearest == torch.arange(pairs)).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--pairs", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    parser.add_argument("--thetas", type=float, nargs="+", default=[0.1, 0.3, 1.0, 3.0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for depth in (1, 2):
        for eta in (0.0, 0.9):
            cells = []
            for pairs in args.pairs:
                sweep = [([recall(pairs, args.dim, depth, theta, eta, seed) for seed in range(args.seeds)], theta)
                         for theta in args.thetas]
                runs, theta = max(sweep, key=lambda run: sum(run[0]))
                mean = sum(runs) / len(runs)
                cells.append(f"{mean:.1%} ({min(runs):.1%}–{max(runs):.1%}), theta {theta:g}")
            name = "linear (delta rule)" if depth == 1 else "2-layer MLP"
            rows.append(f"| {name} | {'off' if eta == 0 else eta} | " + " | ".join(cells) + " |")
            print(rows[-1], flush=True)
    emit([f"Recall of N random (key, value) pairs written once into the neural memory (dim {args.dim}, chunk 1, "
          f"no forgetting, clip 1.0): mean (range) over seeds 0-{args.seeds - 1}, 64 streams each, at the best "
          f"theta of {args.thetas}; chance 1/N.", "",
          "| memory | momentum eta | " + " | ".join(f"N = {n}" for n in args.pairs) + " |",
          "|---|---|" + "---|" * len(args.pairs), *rows], args.output)


if __name__ == "__main__":
    main()
