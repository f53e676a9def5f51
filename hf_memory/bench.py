"""``hf-memory bench``: every registered architecture, and a Llama baseline, on one footing.

Each architecture's tiny preset (its first ``*-tiny``; an architecture registered later joins with no change
here) is resized to one parameter budget through its MLP width (``intermediate_size``, found by bisection; the
exact counts are reported), then trained on each task of ``hf_memory.tasks.BENCH_TASKS`` with the same steps,
data and seeds, and evaluated per level, levels beyond those trained on included. Measured per architecture,
from the real cache objects and timed runs: cache bytes per sequence at each context, prefill tokens/s, decode
ms/token, train tokens/s. Written to ``--out``: ``bench.md`` (the command line first), ``bench.json`` (the raw
numbers) and ``bench.png`` (accuracy vs level per task, one line per architecture; state bytes vs context).
"""

from __future__ import annotations

import copy
import json
import math
import multiprocessing
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

BASELINE = "llama"


@dataclass(frozen=True)
class Budget:
    """What one ``--budget`` trains, evaluates and times; every architecture gets the same."""

    parameters: int  # each model within +-10% of it
    steps: int  # per (architecture, task, seed)
    batch_size: int
    lr: float
    seeds: tuple[int, ...]
    eval_sequences: int  # per level
    eval_levels: dict  # task name -> levels (beyond the task's train_levels: length extrapolation)
    state_contexts: tuple[int, ...]  # cache bytes per sequence after this many tokens
    decode_contexts: tuple[int, ...]  # decode ms/token after this many tokens
    decode_tokens: int
    prefill_tokens: int

    @property
    def longest_context(self) -> int:
        return max(self.state_contexts + self.decode_contexts + (self.prefill_tokens,)) + self.decode_tokens


EVAL_LEVELS = {"passkey": (4, 16, 28, 64, 256), "mqar": (1, 2, 4, 8, 16), "copy": (2, 4, 8, 16, 32)}
BUDGETS = {
    # 2 CPU cores, under 15 minutes for the seven architectures and the baseline
    "small": Budget(parameters=200_000, steps=200, batch_size=16, lr=3e-3, seeds=(0, 1, 2), eval_sequences=128,
                    eval_levels=EVAL_LEVELS, state_contexts=(1024, 8192, 32768), decode_contexts=(1024, 8192),
                    decode_tokens=16, prefill_tokens=1024),
    # a GPU: ten times the steps and the batch, five seeds, longer distances
    "paper": Budget(parameters=200_000, steps=3000, batch_size=64, lr=3e-3, seeds=(0, 1, 2, 3, 4),
                    eval_sequences=1024,
                    eval_levels={"passkey": (4, 16, 28, 64, 256, 1024), "mqar": (1, 2, 4, 8, 16, 32),
                                 "copy": (2, 4, 8, 16, 32, 64)},
                    state_contexts=(1024, 8192, 32768), decode_contexts=(1024, 8192), decode_tokens=64,
                    prefill_tokens=8192),
}


# ---------------------------------------------------------------------------------------------- models
def tiny_preset(architecture: str) -> str:
    import hf_memory

    presets = [name for name in hf_memory.ARCHITECTURES[architecture].presets if name.endswith("-tiny")]
    if not presets:
        raise ValueError(f"architecture {architecture!r} registers no '*-tiny' preset for the bench to resize")
    return presets[0]


def base_config(name: str, max_positions: int):
    """The config before resizing: an architecture's tiny preset, or the Llama baseline of the same width."""
    import hf_memory
    from transformers import LlamaConfig

    if name == BASELINE:
        return LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return hf_memory.get_config(tiny_preset(name), max_position_embeddings=max_positions)


def parameter_count(config) -> int:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())


def bench_config(name: str, parameters: int, max_positions: int):
    """``base_config`` with the MLP width that brings the parameter count nearest ``parameters``."""
    config = base_config(name, max_positions)

    def count(width: int) -> int:
        config.intermediate_size = width
        return parameter_count(config)

    low, high = 1, 1 << 16
    while high - low > 1:  # the count grows with the width
        middle = (low + high) // 2
        low, high = (middle, high) if count(middle) <= parameters else (low, middle)
    best = min((low, high), key=lambda width: abs(count(width) - parameters))
    reached = count(best)
    if abs(reached - parameters) > 0.1 * parameters:
        raise ValueError(f"{name}: no MLP width brings its {tiny_preset(name) if name != BASELINE else 'baseline'} "
                         f"config within 10% of {parameters:,} parameters (nearest: {reached:,} at width {best}); "
                         f"choose a larger budget")
    return config


def build_model(config, device: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config).to(device)


# ---------------------------------------------------------------------------------------------- training
def _bar_slot(slots) -> None:
    global BAR_POSITION
    with slots.get_lock():
        BAR_POSITION, slots.value = slots.value, slots.value + 1


BAR_POSITION = 0


def train_and_evaluate(name: str, task_name: str, seed: int, budget: Budget, device: str, progress: bool) -> dict:
    """One run: the model of ``name`` trained on ``task_name`` from ``seed``, then accuracy per level."""
    from hf_memory.tasks import BENCH_TASKS, IGNORE, recall_accuracy, train_recall

    torch.set_num_threads(1)
    config = bench_config(name, budget.parameters, budget.longest_context)
    task = _Counted(replace(BENCH_TASKS[task_name], vocab_size=config.vocab_size))
    torch.manual_seed(seed)
    model = build_model(config, device)
    start = time.perf_counter()
    losses = train_recall(model, task, budget.steps, budget.batch_size, budget.lr, seed, progress=progress,
                          warmup=budget.steps // 10, decay="cosine", description=f"{name} {task_name} seed {seed}",
                          bar_position=BAR_POSITION)
    seconds = time.perf_counter() - start
    diverged = next((step for step, loss in enumerate(losses) if not math.isfinite(loss)), None)

    levels = {}
    for level in budget.eval_levels[task_name]:
        batch = task.batch(level, budget.eval_sequences, torch.Generator().manual_seed(10_000 + seed))
        levels[level] = {"accuracy": recall_accuracy(model, batch), "sequences": budget.eval_sequences,
                         "scored_tokens": int((batch["labels"] != IGNORE).sum()), "length": batch["input_ids"].shape[1]}
    return {"name": name, "task": task_name, "seed": seed, "levels": levels, "final_loss": losses[-1],
            "diverged_at_step": diverged, "train_tokens_per_s": task.tokens / seconds}


class _Counted:
    """A task that counts the tokens of the training batches it hands out."""

    def __init__(self, task):
        self.task, self.tokens = task, 0

    def training_batch(self, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        batch = self.task.training_batch(batch_size, generator)
        self.tokens += batch["input_ids"].numel()
        return batch

    def batch(self, level: int, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return self.task.batch(level, batch_size, generator)


# ---------------------------------------------------------------------------------------------- state and speed
def cache_bytes(cache) -> int:
    """Bytes of every tensor a cache object holds (its layers' tensors, in lists and dicts too), each storage
    counted once."""
    storages, objects, total, stack = set(), set(), 0, [cache]
    while stack:
        value = stack.pop()
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            if storage.data_ptr() not in storages:
                storages.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif hasattr(value, "__dict__") and id(value) not in objects and not isinstance(value, (type, torch.nn.Module)):
            objects.add(id(value))
            stack.extend(vars(value).values())
    return total


def median_seconds(call, repeats: int) -> float:
    """Median wall time of ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def measure_state_and_speed(name: str, budget: Budget, device: str) -> dict:
    """Cache bytes per sequence after each context, prefill tokens/s, decode ms/token (batch 1, greedy, from a copy
    of the cache at each decode context). One pass over the longest context, ``budget.prefill_tokens`` at a time
    (bounding the attention scores held at once)."""
    torch.set_num_threads(1)
    config = bench_config(name, budget.parameters, budget.longest_context)
    torch.manual_seed(0)
    model = build_model(config, device).eval()
    synchronize = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    chunk = budget.prefill_tokens
    ids = torch.randint(5, config.vocab_size, (1, max(budget.state_contexts + budget.decode_contexts)),
                        generator=torch.Generator().manual_seed(0)).to(device)

    def timed_prefill() -> None:
        model(input_ids=ids[:, :chunk], use_cache=True)
        synchronize()

    timed_prefill()  # warm-up
    result = {"prefill_tokens_per_s": chunk / median_seconds(timed_prefill, repeats=3), "state_bytes": {},
              "decode_ms_per_token": {}}
    out, fed = None, 0
    for context in sorted(set(budget.state_contexts + budget.decode_contexts)):
        for start in range(fed, context, chunk):
            out = model(input_ids=ids[:, start:min(start + chunk, context)], cache=None if out is None else out.cache, use_cache=True)
        fed = context
        if context in budget.state_contexts:
            result["state_bytes"][context] = cache_bytes(out.cache)
        if context in budget.decode_contexts:
            cache, token = copy.deepcopy(out.cache), out.logits[:, -1:].argmax(-1)
            synchronize()
            start = time.perf_counter()
            for _ in range(budget.decode_tokens):
                step = model(input_ids=token, cache=cache, use_cache=True)
                cache, token = step.cache, step.logits[:, -1:].argmax(-1)
            synchronize()
            result["decode_ms_per_token"][context] = 1000 * (time.perf_counter() - start) / budget.decode_tokens
    return result


# ---------------------------------------------------------------------------------------------- the run
def run_bench(names: list[str], tasks: list[str], budget: Budget, out: str | Path, command: str,
              jobs: int = 1, device: str = "cpu", progress: bool = True, budget_name: str = "custom") -> dict:
    """Train, evaluate and time ``names`` (architectures; the baseline is added) on ``tasks``; write the table,
    the JSON and the plot to ``out`` and return the raw numbers."""
    import transformers

    _check_plotting()
    names = list(dict.fromkeys([*names, BASELINE]))
    configs = {name: bench_config(name, budget.parameters, budget.longest_context) for name in names}
    started = time.perf_counter()
    runs = [(name, task, seed) for name in names for task in tasks for seed in budget.seeds]
    if jobs > 1 and device == "cpu":  # one thread per process; a tiny model gains little from a second one
        context = multiprocessing.get_context("spawn")
        slots = context.Value("i", 0)
        with ProcessPoolExecutor(jobs, mp_context=context, initializer=_bar_slot, initargs=(slots,)) as pool:
            futures = [pool.submit(train_and_evaluate, *run, budget, device, progress) for run in runs]
            trained = [future.result() for future in futures]
            training_seconds = time.perf_counter() - started
            futures = [pool.submit(measure_state_and_speed, name, budget, device) for name in names]
            measured = [future.result() for future in futures]
    else:
        trained = [train_and_evaluate(*run, budget, device, progress) for run in runs]
        training_seconds = time.perf_counter() - started
        measured = [measure_state_and_speed(name, budget, device) for name in names]

    results = {
        "command": command,
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, 1 torch thread per process, "
                   f"{'CUDA ' + torch.cuda.get_device_name() if device.startswith('cuda') else 'CPU'}",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "budget": {"name": budget_name, **asdict(budget)},
        "jobs": jobs,
        "architectures": {},
    }
    for name, speed in zip(names, measured):
        entry = {
            "preset": tiny_preset(name) if name != BASELINE else "Llama (transformers), same width",
            "parameters": parameter_count(configs[name]),
            "intermediate_size": configs[name].intermediate_size,
            "tasks": {},
        }
        for task in tasks:
            mine = [run for run in trained if run["name"] == name and run["task"] == task]
            entry["tasks"][task] = {
                "seeds": [run["seed"] for run in mine],
                "final_loss": [run["final_loss"] for run in mine],
                "diverged_at_step": [run["diverged_at_step"] for run in mine],
                "levels": {level: _summary([run["levels"][level] for run in mine])
                           for level in budget.eval_levels[task]},
            }
        entry["train_tokens_per_s"] = statistics.median(run["train_tokens_per_s"] for run in trained
                                                        if run["name"] == name)
        entry.update(speed)
        results["architectures"][name] = entry
    results["seconds"] = {"training": training_seconds, "total": time.perf_counter() - started}
    write_outputs(results, tasks, Path(out))
    return results


def _summary(per_seed: list[dict]) -> dict:
    accuracies = [level["accuracy"] for level in per_seed]
    return {"accuracy": accuracies, "mean": statistics.fmean(accuracies), "min": min(accuracies),
            "max": max(accuracies), "sequences": per_seed[0]["sequences"],
            "scored_tokens": per_seed[0]["scored_tokens"], "length": per_seed[0]["length"]}


# ---------------------------------------------------------------------------------------------- output
def _check_plotting() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError("hf-memory bench draws its plot with matplotlib: pip install 'hf-memory[bench]' "
                          "(or pip install matplotlib)") from None


def write_outputs(results: dict, tasks: list[str], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    (out / "bench.md").write_text(render_table(results, tasks), encoding="utf-8")
    plot(results, tasks, out / "bench.png")


def _bytes(count: int) -> str:
    return f"{count / 2**20:.2f} MiB" if count >= 2**20 else f"{count / 2**10:.1f} KiB"


def render_table(results: dict, tasks: list[str]) -> str:
    from hf_memory.tasks import BENCH_TASKS

    budget, archs = results["budget"], results["architectures"]
    seeds = ", ".join(map(str, budget["seeds"]))
    lines = [
        f"`{results['command']}`", "",
        f"{results['date']}; {results['machine']}; torch {results['versions']['torch']}, transformers "
        f"{results['versions']['transformers']}; {results['jobs']} run(s) at a time; took "
        f"{results['seconds']['total'] / 60:.1f} min ({results['seconds']['training'] / 60:.1f} training).",
        "",
        f"Every model: {budget['steps']} AdamW steps x {budget['batch_size']} sequences per task (lr {budget['lr']}, "
        f"10% warmup, cosine), seeds {seeds}; parameters within 10% of {budget['parameters']:,}. Accuracy: "
        f"mean (min-max over the seeds) of the answer tokens predicted exactly (greedy), on "
        f"{budget['eval_sequences']} held-out sequences per level.",
        "",
        "| model | preset | parameters | MLP width |",
        "|---|---|---|---|",
    ]
    lines += [f"| {name} | {entry['preset']} | {entry['parameters']:,} | {entry['intermediate_size']} |"
              for name, entry in archs.items()]
    for task in tasks:
        spec = BENCH_TASKS[task]
        levels = list(next(iter(archs.values()))["tasks"][task]["levels"])
        trained = f"trained on {spec.level_name} {spec.train_levels[0]}-{spec.train_levels[1]}"
        lines += ["", f"**{task}** ({trained}; columns: {spec.level_name}, sequence length, answer tokens scored)", "",
                  "| model | " + " | ".join(f"{level} ({lv['length']} tok, n={lv['scored_tokens']})" for level, lv in
                                           next(iter(archs.values()))["tasks"][task]["levels"].items()) + " | |",
                  "|---|" + "---|" * (len(levels) + 1)]
        for name, entry in archs.items():
            record = entry["tasks"][task]
            cells = [f"{lv['mean']:.1%} ({lv['min']:.0%}-{lv['max']:.0%})" for lv in record["levels"].values()]
            diverged = [f"seed {seed}: NaN at step {step}" for seed, step in
                        zip(record["seeds"], record["diverged_at_step"]) if step is not None]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {'; '.join(diverged)} |")
    contexts = list(next(iter(archs.values()))["state_bytes"])
    decodes = list(next(iter(archs.values()))["decode_ms_per_token"])
    lines += ["", "**State and speed** (batch 1; state: every tensor of the cache after the context; "
                  "train: median over the runs above)", "",
              "| model | " + " | ".join(f"state at {int(c) // 1024}K" for c in contexts) + " | prefill tok/s | "
              + " | ".join(f"decode ms/tok at {int(c) // 1024}K" for c in decodes) + " | train tok/s |",
              "|---|" + "---|" * (len(contexts) + len(decodes) + 2)]
    for name, entry in archs.items():
        lines.append(f"| {name} | " + " | ".join(_bytes(b) for b in entry["state_bytes"].values())
                     + f" | {entry['prefill_tokens_per_s']:,.0f} | "
                     + " | ".join(f"{ms:.1f}" for ms in entry["decode_ms_per_token"].values())
                     + f" | {entry['train_tokens_per_s']:,.0f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, tasks: list[str], path: Path) -> None:
    """Accuracy vs level per task (mean, min-max band over the seeds; the dotted line: the longest level
    trained on) and cache bytes vs context, one line per model, the baseline dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hf_memory.tasks import BENCH_TASKS

    archs = results["architectures"]
    figure, axes = plt.subplots(1, len(tasks) + 1, figsize=(4.2 * (len(tasks) + 1), 4.0))
    colors = dict(zip(archs, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 2))
    style = {name: dict(color=colors[name], marker="o", linestyle="--" if name == BASELINE else "-")
             for name in archs}
    for axis, task in zip(axes, tasks):
        for name, entry in archs.items():
            levels = entry["tasks"][task]["levels"]
            x = [int(level) for level in levels]
            axis.plot(x, [lv["mean"] for lv in levels.values()], label=name, **style[name])
            axis.fill_between(x, [lv["min"] for lv in levels.values()], [lv["max"] for lv in levels.values()],
                              color=colors[name], alpha=0.1)
        spec = BENCH_TASKS[task]
        axis.axvline(spec.train_levels[1], color="black", linestyle=":", linewidth=1)
        axis.set(xscale="log", ylim=(-0.02, 1.02), xticks=x, xticklabels=[str(level) for level in x],
                 xlabel=f"{spec.level_name} (dotted: longest trained)", ylabel="accuracy", title=task)
        axis.minorticks_off()
    for name, entry in archs.items():
        contexts = [int(c) for c in entry["state_bytes"]]
        axes[-1].plot(contexts, list(entry["state_bytes"].values()), **style[name])
    axes[-1].set(xscale="log", yscale="log", xticks=contexts, xticklabels=[f"{c // 1024}K" for c in contexts],
                 xlabel="context (tokens)", ylabel="cache bytes per sequence", title="state")
    axes[-1].minorticks_off()
    figure.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=len(archs), frameon=False)
    figure.tight_layout(rect=(0, 0.08, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(args) -> int:
    import hf_memory
    from hf_memory.tasks import BENCH_TASKS

    names = _choices(args.arch, list(hf_memory.ARCHITECTURES), "--arch")
    tasks = _choices(args.tasks, list(BENCH_TASKS), "--tasks")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    command = "hf-memory bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else "hf-memory bench"
    results = run_bench(names, tasks, BUDGETS[args.budget], args.out, command.strip(), jobs=args.jobs,
                        device=device, budget_name=args.budget)
    print(render_table(results, tasks))
    print(f"wrote bench.md, bench.json and bench.png to {args.out}/")
    return 0


def _choices(value: str | None, available: list[str], flag: str) -> list[str]:
    if value is None:
        return available
    chosen = [item.strip() for item in value.split(",") if item.strip()]
    unknown = [item for item in chosen if item not in available]
    if unknown or not chosen:
        raise ValueError(f"{flag}: unknown {', '.join(map(repr, unknown)) or 'empty list'}; choose from "
                         f"{', '.join(available)}")
    return chosen
