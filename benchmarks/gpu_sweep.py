"""Every registered architecture on one CUDA device: correctness of the fused paths and of cached decoding in
fp32 on each tiny preset, then bf16 training throughput (fused kernels on vs off), peak memory and decode latency
on a few-hundred-million-parameter cut of each full-size preset.

    python benchmarks/gpu_sweep.py --output benchmarks/results/gpu_sweep.md

Correctness (tiny presets, fp32, a left-padded batch of 2): max |fused - reference| of the real tokens' logits,
and of the logits ``generate`` produced token by token from the cache against one full forward over the same
sequence. Speed (bf16 weights): tokens/s of forward + backward at batch x length, peak memory, and ms per decoded
token at batch 1 after a 1K-token prompt (the difference of two ``generate`` calls, so the prompt's cost cancels).
A model that fails reports the error in its row; the script goes on.
"""

from __future__ import annotations

import argparse
import time
import traceback

import torch

import hf_memory
from report import emit, measured_row

# A cut of each architecture's full-size preset: its widths, fewer layers (the layer-type pattern is kept).
SPEED_MODELS = {
    "gated_deltanet": [("gated-deltanet-1.3b", dict(num_hidden_layers=6)),
                       ("gated-deltanet-h1-1.3b", dict(num_hidden_layers=6))],
    "jamba": [("jamba-v0.1", dict(num_hidden_layers=8, hidden_size=1024, intermediate_size=2816, num_experts=4,
                                  num_attention_heads=8, num_key_value_heads=8, head_dim=128))],
    "hymba": [("hymba-1.5b", dict(num_hidden_layers=6))],
    "infini_attention": [("infini-attention-1b", dict(num_hidden_layers=6))],
    "rmt": [("rmt-1b", dict(num_hidden_layers=6))],
    "mor": [("mor-360m", dict())],
    "titans": [("titans-mag-760m", dict(num_hidden_layers=6))],
}


def cut_config(name: str, overrides: dict, **extra):
    full = hf_memory.get_config(name)
    layers = overrides.get("num_hidden_layers", full.num_hidden_layers)
    if layers < full.num_hidden_layers:  # keep the first layers' types and the last one (Hymba's global layer)
        overrides = {**overrides, "layer_types": full.layer_types[:layers - 1] + full.layer_types[-1:]}
        if getattr(full, "kv_reuse_groups", None):  # Hymba: KV sharing among the kept sliding-window layers
            kept = [[i for i in group if i < layers - 1] for group in full.kv_reuse_groups]
            overrides["kv_reuse_groups"] = [group for group in kept if len(group) > 1]
    return hf_memory.get_config(name, **overrides, **extra)


DEVICE = torch.device("cuda")


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def path_config(name: str, fused: bool, **overrides):
    """The fused path (fused kernels where the architecture has them, SDPA) or the reference (PyTorch, eager)."""
    if "use_fused_kernels" in hf_memory.get_config(name).to_dict():
        overrides["use_fused_kernels"] = fused
    return cut_config(name, overrides, attn_implementation="sdpa" if fused else "eager")


def check_tiny(name: str) -> list[str]:
    """fp32 on CUDA: fused vs reference logits, and cached greedy decoding vs one full forward."""
    from transformers import AutoModelForCausalLM

    models = {}
    for flag in (True, False):
        torch.manual_seed(0)
        config = path_config(name, flag)
        models[flag] = AutoModelForCausalLM.from_config(config).to(DEVICE).eval()
    config = models[True].config
    length = 2 * max([getattr(config, f, None) or 0 for f in ("linear_chunk_size", "sliding_window",
                                                              "segment_size")] + [16]) + 7
    ids = torch.randint(3, config.vocab_size, (2, length), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        fused, reference = (models[flag](ids, attention_mask=mask).logits[mask.bool()] for flag in (True, False))
        out = models[True].generate(ids, attention_mask=mask, max_new_tokens=24, min_new_tokens=24, do_sample=False,
                                    output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        full_mask = torch.cat([mask, torch.ones_like(out.sequences[:, length:])], dim=1)
        full = models[True](out.sequences, attention_mask=full_mask).logits[:, length - 1:-1]
        decoded = torch.stack(out.logits, dim=1)
    return [f"{max_error(fused, reference):.1e}", f"{max_error(decoded, full):.1e}"]


def time_training(model, batch: int, length: int, steps: int) -> tuple[float, float]:
    ids = torch.randint(3, model.config.vocab_size, (batch, length), device=DEVICE)
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(1 + steps):
        if step == 1:
            sync()
            start = time.perf_counter()
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        model.zero_grad(set_to_none=True)
    sync()
    peak = torch.cuda.max_memory_allocated() / 2**30 if DEVICE.type == "cuda" else float("nan")
    return batch * length * steps / (time.perf_counter() - start), peak


def time_prefill(model, batch: int, length: int, steps: int) -> float:
    """Forward tokens/s without gradients or cache (prefill / evaluation)."""
    ids = torch.randint(3, model.config.vocab_size, (batch, length), device=DEVICE)
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)  # warm-up
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            model(input_ids=ids, use_cache=False)
        sync()
    return batch * length * steps / (time.perf_counter() - start)


def time_decode(model, prompt: int, new_tokens: int) -> float:
    ids = torch.randint(3, model.config.vocab_size, (1, prompt), device=DEVICE)
    seconds = []
    with torch.no_grad():
        for n in (1, 1 + new_tokens):
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)  # warm-up
            sync()
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
            sync()
            seconds.append(time.perf_counter() - start)
    return 1000 * (seconds[1] - seconds[0]) / new_tokens


def speed(name: str, overrides: dict, args) -> list[str]:
    from transformers import AutoModelForCausalLM

    cells = []
    for flag in (True, False):
        torch.manual_seed(0)
        config = path_config(name, flag, **overrides)
        model = AutoModelForCausalLM.from_config(config).to(device=DEVICE, dtype=torch.bfloat16).train()
        if flag:
            cells.append(f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M")
        try:
            tokens_per_second, peak = time_training(model, args.batch, args.length, args.steps)
            cells += [f"{tokens_per_second / 1e3:.1f}K", f"{peak:.1f}"]
            cells.append(f"{time_prefill(model.eval(), args.batch, args.length, args.steps) / 1e3:.1f}K")
            if flag:
                cells.append(f"{time_decode(model, args.prompt, args.new_tokens):.1f}")
        except Exception as error:  # one path failing leaves the other's numbers
            traceback.print_exc()
            cells += [f"error: {type(error).__name__}", "", ""] + ([""] if flag else [])
        del model
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--architectures", nargs="*", default=list(hf_memory.ARCHITECTURES))
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-tiny", action="store_true", help="only the speed rows")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the script itself")
    parser.add_argument("--float32-matmul-precision", default="highest", choices=["highest", "high", "medium"],
                        help="torch.set_float32_matmul_precision for both sides (Titans' fp32 memory: tf32x3 / tf32)")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    torch.set_float32_matmul_precision(args.float32_matmul_precision)
    global DEVICE
    DEVICE = torch.device(args.device)
    missing = set(hf_memory.ARCHITECTURES) - set(SPEED_MODELS)
    assert not missing, f"add a speed model for {sorted(missing)}"
    device_name = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "CPU"
    lines = [f"GPU sweep on {device_name}, torch {torch.__version__}; fused kernels importable: "
             + ", ".join(f"{op}={hf_memory.kernels._load(op) is not None}" for op in hf_memory.kernels.FUSED_KERNELS),
             "", "| tiny preset (fp32) | fused + SDPA vs reference + eager logits | cached decode vs full forward |",
             "|---|---|---|"]
    tiny = [n for n in hf_memory.PRESETS if n.endswith("-tiny")
            and hf_memory.get_config(n).model_type.removeprefix("hfm_") in args.architectures and not args.skip_tiny]
    lines += [measured_row(name, lambda: check_tiny(name)) for name in tiny]
    if not args.skip_speed:
        lines += ["", f"bf16 (fp32 matmuls at {args.float32_matmul_precision!r} precision), forward + backward at batch"
                  f" {args.batch} x {args.length} tokens ({args.steps} timed steps after one warm-up); decode: batch 1,"
                  f" {args.prompt}-token prompt, {args.new_tokens} new tokens; prefill: the same batch, no gradient",
                  "", "| model | parameters | fused + SDPA: train tokens/s | peak GiB | prefill tokens/s "
                  "| decode ms/token "
                  "| reference + eager: train tokens/s | peak GiB | prefill tokens/s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for architecture in args.architectures:
            for name, overrides in SPEED_MODELS[architecture]:
                label = f"{name} cut to {overrides.get('num_hidden_layers', 'all')} layers"
                lines.append(measured_row(label, lambda: speed(name, overrides, args)))
    emit(lines, args.output)


if __name__ == "__main__":
    main()
