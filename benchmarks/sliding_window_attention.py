"""Sliding-window attention on CPU: transformers' dense paths against hf_memory's blockwise op.

  * ``eager``: ``create_sliding_window_causal_mask`` (eager: additive fp32 [B, 1, T, T]) + ``eager_attention_forward``
  * ``sdpa``: ``create_sliding_window_causal_mask`` (sdpa: boolean [B, 1, T, T]) + ``sdpa_attention_forward``
  * ``blockwise``: ``hf_memory.ops.sliding_window.sliding_window_attention`` (no [T, T] mask at all)

Each (method, T, window) runs in a fresh interpreter (Linux): peak memory is the process's max RSS (``getrusage``)
after the first call minus its resident set (``/proc/self/statm``) just before it, mask building included; time is
the best warm call of up to ``--repeats``. Forward under ``torch.no_grad`` unless ``--backward`` (then forward +
backward of the sum). Prints a markdown table.

    python benchmarks/sliding_window_attention.py [--threads 1] [--repeats 3] [--backward]
        [--configs 4096:64,16384:64,16384:2048] [--methods eager,sdpa,blockwise]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CONFIGS = "4096:64,16384:64,16384:2048"  # T:window, ...
METHODS = "eager,sdpa,blockwise"
BATCH, HEADS, HEAD_DIM = 1, 4, 16

CHILD = r"""
import json, os, resource, sys, time
from types import SimpleNamespace
import torch
from transformers import PreTrainedConfig
from transformers.masking_utils import create_sliding_window_causal_mask
from transformers.models.llama.modeling_llama import eager_attention_forward
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from hf_memory.ops.sliding_window import sliding_window_attention

method, length, window, threads, repeats, backward = json.loads(sys.argv[1])
batch, heads, head_dim = {batch}, {heads}, {head_dim}
torch.set_num_threads(threads)
q, k, v = (torch.randn(batch, heads, length, head_dim, requires_grad=backward) for _ in range(3))
scaling = head_dim**-0.5
module = SimpleNamespace(num_key_value_groups=1, training=False, is_causal=True)

def dense(implementation, forward):
    config = PreTrainedConfig()
    config.sliding_window = window
    config._attn_implementation = implementation
    mask = create_sliding_window_causal_mask(
        config=config, inputs_embeds=q.new_zeros(batch, length, 1), attention_mask=None, cache=None,
        position_ids=torch.arange(length)[None],
    )
    return forward(module, q, k, v, mask, scaling=scaling)[0]

run = {{
    "eager": lambda: dense("eager", eager_attention_forward),
    "sdpa": lambda: dense("sdpa", sdpa_attention_forward),
    "blockwise": lambda: sliding_window_attention(q, k, v, window=window, scaling=scaling),
}}[method]

def call():
    if backward:
        run().sum().backward()
    else:
        with torch.no_grad():
            run()

def max_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB

before = int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20  # resident now
start = time.perf_counter()
call()
times = [time.perf_counter() - start]
peak = max_rss_mib() - before
while len(times) < repeats and sum(times) < 30:
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
print(json.dumps({{"peak_mib": peak, "seconds": min(times[1:] or times)}}))
""".format(batch=BATCH, heads=HEADS, head_dim=HEAD_DIM)


def measure(method: str, length: int, window: int, threads: int, repeats: int, backward: bool) -> dict:
    arguments = json.dumps([method, length, window, threads, repeats, backward])
    result = subprocess.run([sys.executable, "-c", CHILD, arguments], capture_output=True, text=True)
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"rc {result.returncode}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a shared CPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backward", action="store_true", help="forward + backward instead of no-grad forward")
    parser.add_argument("--configs", default=CONFIGS, help="comma-separated T:window pairs")
    parser.add_argument("--methods", default=METHODS, help="comma-separated subset of eager,sdpa,blockwise")
    args = parser.parse_args()
    pass_name = "forward + backward" if args.backward else "forward (no grad)"
    print(f"B={BATCH}, H={HEADS}, d={HEAD_DIM}, fp32, {args.threads} threads, {pass_name}\n")
    print("| T | window | method | time (s) | peak RSS rise (MiB) |")
    print("|---:|---:|---|---:|---:|")
    configs = [tuple(int(n) for n in pair.split(":")) for pair in args.configs.split(",")]
    for length, window in configs:
        for method in args.methods.split(","):
            row = measure(method, length, window, args.threads, args.repeats, args.backward)
            if "error" in row:
                print(f"| {length} | {window} | {method} | failed: {row['error']} | |", flush=True)
            else:
                print(f"| {length} | {window} | {method} | {row['seconds']:.3f} | {row['peak_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
