"""Training throughput of hf-memory's Gated DeltaNet against flash-linear-attention's own
``GatedDeltaNetForCausalLM`` at the same configuration, same device, same run; plus kernel parity.

    python benchmarks/gated_deltanet_throughput.py                      # CUDA: ~340M-class config, bf16
    python benchmarks/gated_deltanet_throughput.py --size tiny --device cpu

Prints a markdown table (and writes it to --output): tokens/s of a full training step (forward, backward,
AdamW), peak memory, and the max difference between fused kernels and the PyTorch reference. Rows whose
implementation is not installed say so instead of a number.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import hf_memory
from hf_memory.ops.gated_delta import gated_delta_rule

# hf-memory's names (Qwen3-Next's); value heads are 2x the key head size (the paper's expand_v = 2)
SIZES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, linear_num_key_heads=2, linear_key_head_dim=16,
                 linear_value_head_dim=32, intermediate_size=128, vocab_size=128),
    "340m": dict(hidden_size=1024, num_hidden_layers=24, linear_num_key_heads=4, linear_key_head_dim=256,
                 linear_value_head_dim=512, intermediate_size=2816, vocab_size=32000),
    "1.3b": dict(hidden_size=2048, num_hidden_layers=21, linear_num_key_heads=6, linear_key_head_dim=256,
                 linear_value_head_dim=512, intermediate_size=5632, vocab_size=32000),
}


def time_training(model, batch: int, length: int, steps: int, device, warmup: int = 2) -> tuple[float, float]:
    """(tokens per second, peak memory in GiB) of forward + backward + AdamW."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(3, model.config.vocab_size, (batch, length), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(warmup + steps):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return batch * length * steps / seconds, peak


def build_ours(dims: dict, dtype, device, use_fused_kernels: bool):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = hf_memory.get_config("gated-deltanet-1.3b", **dims, use_fused_kernels=use_fused_kernels)
    return AutoModelForCausalLM.from_config(config).to(device=device, dtype=dtype)


def build_fla(dims: dict, dtype, device):
    from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM

    torch.manual_seed(0)
    config = GatedDeltaNetConfig(
        hidden_size=dims["hidden_size"], num_hidden_layers=dims["num_hidden_layers"],
        num_heads=dims["linear_num_key_heads"], head_dim=dims["linear_key_head_dim"], expand_v=2,
        intermediate_size=dims["intermediate_size"],
        vocab_size=dims["vocab_size"], use_short_conv=True, conv_size=4, use_gate=True,
    )
    return GatedDeltaNetForCausalLM(config).to(device=device, dtype=dtype)


def kernel_parity(device, dtype, length: int = 512) -> str:
    """Max |fused - reference| of outputs and gradients of the gated delta rule at one size."""
    if device.type != "cuda":
        return "n/a (kernels run on CUDA only)"
    torch.manual_seed(0)
    shape = (2, length, 4, 128)
    q, k = (F.normalize(torch.randn(shape, device=device), dim=-1).to(dtype) for _ in range(2))
    v = torch.randn(2, length, 4, 256, device=device, dtype=dtype)
    g = -torch.rand(2, length, 4, device=device) * 0.1
    beta = torch.rand(2, length, 4, device=device, dtype=dtype)
    leaves = [t.requires_grad_() for t in (q, k, v, g, beta)]
    results = []
    for use_fused_kernels in (True, False):
        for t in leaves:
            t.grad = None
        o, state = gated_delta_rule(*leaves, use_fused_kernels=use_fused_kernels)
        (o.float().square().mean() + state.square().mean()).backward()
        results.append([o.float(), state] + [t.grad.float() for t in leaves])
    errors = [(a - b).abs().max().item() for a, b in zip(*results)]
    return f"output {errors[0]:.2e}, state {errors[1]:.2e}, grads max {max(errors[2:]):.2e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="340m")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="bfloat16 on CUDA, float32 on CPU by default")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--output", default="benchmarks/results/gated_deltanet_throughput.md")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    dims = SIZES[args.size]

    rows = []
    candidates = [("hf-memory GDN, use_fused_kernels=True", lambda: build_ours(dims, dtype, device, True)),
                  ("hf-memory GDN, use_fused_kernels=False", lambda: build_ours(dims, dtype, device, False)),
                  ("flash-linear-attention GatedDeltaNetForCausalLM", lambda: build_fla(dims, dtype, device))]
    for name, build in candidates:
        try:
            model = build()
        except Exception as error:  # not installed / not importable here
            rows.append(f"| {name} | not run: {type(error).__name__}: {str(error)[:80]} | | |")
            continue
        params = sum(p.numel() for p in model.parameters())
        tokens_per_second, peak = time_training(model, args.batch, args.length, args.steps, device)
        rows.append(f"| {name} | {tokens_per_second:,.0f} | {peak:.2f} | {params / 1e6:.1f}M |")
        print(rows[-1], flush=True)  # a run cut off by a time limit keeps the rows it measured
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    table = "\n".join([
        f"Gated DeltaNet training throughput: size {args.size}, batch {args.batch} x {args.length} tokens, "
        f"{str(dtype).replace('torch.', '')}, {device_name}, torch {torch.__version__}",
        "",
        "| implementation | train tokens/s | peak GiB | params |",
        "|---|---|---|---|",
        *rows,
        "",
        f"kernel parity (fused vs reference, {str(dtype).replace('torch.', '')}): {kernel_parity(device, dtype)}",
    ])
    print(table)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(table + "\n")


if __name__ == "__main__":
    main()
