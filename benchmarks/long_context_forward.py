"""Long-context forward of a hybrid with sliding-window attention: time and peak memory per length.

    python benchmarks/long_context_forward.py --preset gated-deltanet-h1-tiny --lengths 4096 16384

Each (length, attention implementation) runs in a fresh process (1 thread, no gradient, no cache); peak memory
is the process's max RSS growth over the call. Sliding-window layers run blockwise (O(T * window)) there.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

CHILD = """
import resource, sys, time, torch, hf_memory
from transformers import AutoModelForCausalLM
torch.set_num_threads(1)
preset, length, implementation = sys.argv[1], int(sys.argv[2]), sys.argv[3]
model = AutoModelForCausalLM.from_config(hf_memory.get_config(preset, attn_implementation=implementation)).eval()
ids = torch.randint(3, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
with torch.no_grad():
    model(ids, use_cache=False)
seconds = time.perf_counter() - start
print(f"{seconds:.2f} {(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024:.0f}")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="gated-deltanet-h1-tiny")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--implementations", nargs="+", default=["eager", "sdpa"])
    args = parser.parse_args()
    print(f"{args.preset}: forward, batch 1, 1 thread, fresh process per row\n")
    print("| tokens | attention | seconds | peak RSS growth (MiB) |\n|---:|---|---:|---:|")
    for length in args.lengths:
        for implementation in args.implementations:
            result = subprocess.run([sys.executable, "-c", CHILD, args.preset, str(length), implementation],
                                    capture_output=True, text=True, check=True)
            seconds, mib = result.stdout.split()[-2:]
            print(f"| {length} | {implementation} | {seconds} | {mib} |")


if __name__ == "__main__":
    main()
