"""Titans' neural memory on the GPU: the Triton kernel (``hf_memory.ops.triton_neural_memory``, every chunk in one
launch) against the PyTorch chunked reference (``neural_memory_chunked``, a loop of small ops per chunk), on the
same random inputs, interleaved in one process, median of ``--repeats`` timings after a warm-up, at both fp32
matmul precisions (``torch.set_float32_matmul_precision``, which both sides follow): "highest" (the kernel in
tf32x3, the reference in IEEE fp32) and "high" (both in TF32).

    python benchmarks/titans_kernel_throughput.py --output benchmarks/results/titans_kernel_h200.md

Rows: memory depth 2 (expansion 2) and 1, at the 760M preset's memory (16 heads of 96, chunks of 64) and at
heads of 64, batch x length tokens; a shape the kernel does not cover at a precision (``fused_fits``) says so.
Columns: tokens/s of the forward alone (no gradient: prefill) and of forward +
backward (the kernel's backward recomputes each chunk with PyTorch), peak memory of forward + backward, and the
largest difference of the outputs. ``--device cpu`` is a dry run of the script (run it with TRITON_INTERPRET=1).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from report import emit, measured_row

from hf_memory.ops.neural_memory import fused_fits, neural_memory_chunked

SHAPES = [  # heads, head size, memory depth, chunk size
    (16, 96, 2, 64),
    (16, 96, 2, 32),
    (16, 96, 1, 64),
    (16, 64, 2, 64),
]


def inputs(batch, heads, length, dim, depth, device):
    torch.manual_seed(0)
    q, k = (F.normalize(torch.randn(batch, heads, length, dim, device=device), dim=-1) for _ in range(2))
    v = torch.randn(batch, heads, length, dim, device=device)
    theta = torch.rand(batch, heads, length, device=device) * 0.1
    eta = 0.8 + 0.2 * torch.rand(batch, heads, length, device=device)
    alpha = torch.rand(batch, heads, length, device=device) * 0.01
    sizes = [dim] + [2 * dim] * (depth - 1) + [dim]
    weights = [torch.randn(batch, heads, a, b, device=device) / a**0.5 for a, b in zip(sizes, sizes[1:])]
    return [q, k, v, theta, eta, alpha], weights


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(memory, tensors, weights, chunk, backward):
    with torch.set_grad_enabled(backward):
        leaves = [t.detach().requires_grad_(backward) for t in tensors + weights]
        y, final, _ = memory(*leaves[:6], leaves[6:], chunk_size=chunk)
        if backward:
            (y.square().mean() + sum(w.square().mean() for w in final)).backward()
    return y.detach()


def measure(heads, dim, depth, chunk, args, device, neural_memory_fused) -> list[str]:
    tensors, weights = inputs(args.batch, heads, args.length, dim, depth, device)
    tokens = args.batch * args.length
    cells, peaks = [], {}
    for backward in (False, True):
        times = {neural_memory_fused: [], neural_memory_chunked: []}
        for memory in times:  # warm-up (compiles the kernel for this shape)
            run(memory, tensors, weights, chunk, backward)
        for _ in range(args.repeats):
            for memory in times:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                sync(device)
                start = time.perf_counter()
                run(memory, tensors, weights, chunk, backward)
                sync(device)
                times[memory].append(time.perf_counter() - start)
                if device.type == "cuda" and backward:
                    peaks[memory] = torch.cuda.max_memory_allocated() / 2**30
        fused, reference = (statistics.median(t) for t in times.values())
        cells += [f"{tokens / fused / 1e3:.1f}K", f"{tokens / reference / 1e3:.1f}K", f"{reference / fused:.2f}x"]
    difference = (run(neural_memory_fused, tensors, weights, chunk, False)
                  - run(neural_memory_chunked, tensors, weights, chunk, False)).abs().max().item()
    peak = " / ".join(f"{p:.2f}" for p in peaks.values()) if peaks else "n/a"
    return cells + [peak, f"{difference:.1e}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precisions", nargs="+", default=["highest", "high"])
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    from hf_memory.ops.triton_neural_memory import neural_memory_fused

    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (interpreter)"
    lines = [f"Titans neural memory, {name}, torch {torch.__version__}: batch {args.batch} x {args.length} tokens, "
             f"fp32, median of {args.repeats} (interleaved)", "",
             "| fp32 matmul precision | heads x size | depth | chunk | forward: Triton tokens/s | reference | speed-up "
             "| fwd + bwd: Triton tokens/s | reference | speed-up | peak GiB Triton / reference | max abs diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for precision in args.precisions:
        torch.set_float32_matmul_precision(precision)
        for heads, dim, depth, chunk in SHAPES:
            covered = fused_fits(dim, 2 * dim, depth, chunk)
            lines.append(measured_row(f"{precision} | {heads} x {dim} | {depth} | {chunk}", lambda: (
                measure(heads, dim, depth, chunk, args, device, neural_memory_fused) if covered
                else ["not covered: the reference runs"])))
    emit(lines, args.output)


if __name__ == "__main__":
    main()
