"""Mixture-of-Recursions at tiny scale, on CPU: does a tiny MoR model (Middle-Cycle sharing, N_r = 3 recursions,
expert-choice routing) learn a recursion depth that depends on the token, and does it reach a vanilla
transformer's held-out loss with fewer parameters and fewer FLOPs?

    python benchmarks/mor_tiny_scale.py --out mor_tiny_scale.json      # ~20 min on one CPU thread
    python benchmarks/mor_tiny_scale.py --quick                          # smoke test, ~20 s

Task (built here): a synthetic language of pointer chasing mixed with copyable filler. A sequence is BOS and
BLOCKS blocks of ``filler (F tokens) | digits d_0..d_{k-1} (each in 0..k-1) | query Q(h, q) | answer``:
the answer is d^h(q), the digit reached from block position q after h hops (h uniform in 1..HOPS), so a query
needs h attention look-ups; the filler is the same F tokens in every block of a sequence (copyable from the
first block on). Digits, queries and the first block's filler are random: they carry no label. The labelled
tokens are the copied filler (easy) and the answers (hard, graded by h); the held-out loss is the mean
cross-entropy over them, and its floor is 0.

Variants, trained with the same batches, steps, AdamW and schedule, seeds 0..SEEDS-1 (the init from the seed):
  * vanilla, L layers: ``routing="none", num_recursions=1`` (L unique Llama layers);
  * MoR: ``mor-tiny`` with L applied layers, Middle-Cycle (unique first and last layer, a block of
    K = (L - 2) / 3 layers applied up to 3 times), expert-choice, capacities 1, 2/3, 1/3;
  * recursive: the same shared layers, ``routing="none"`` (every token takes all 3 recursions);
  * vanilla, K + 2 layers: the MoR model's unique layers (about its parameter count), no sharing.

Reported per variant: exact parameter count, training FLOPs per token, held-out loss and answer accuracy in
eval mode (MoR's routing then causal: a token continues where its router logit >= 0). For MoR also: the depth
histogram, the mean depth per token class, and the sampling accuracy (per recursion of capacity < 1, the
fraction of candidate tokens whose eval-mode decision, logit >= 0, equals the training-mode top-k choice, both
read off one training-mode forward under no_grad), and how many tokens take the same depth in eval as in
training mode. Every figure is the mean over seeds with its min - max range.

Choices, and what they rest on (one CPU thread, about 100 s per model and seed): L = 5 applied layers (a one-layer
shared block), since deeper vanilla models trained no better in this budget and with L = 8 a token at depth 1
already passes 4 attention layers, enough for every hop count that trained at all. Digits, queries and the first
filler are unlabelled: with them in the loss (irreducible) the router sent its deepest recursions to those
tokens. The router BCE coefficient is 1e-2, not the paper's 1e-3: with 1e-3 the sampling accuracy was 0.86-0.93
and which token classes went deep changed from seed to seed. The hop count needs little depth at the query: the
3-layer vanilla model learns 4 hops (presumably the digits precompute d^2, d^4 among themselves: pointer doubling).

FLOPs per token (forward; training counts 3x: forward + backward): 2 x the parameters of every applied layer's
linear maps (q, k, v, o, gate, up, down; no k and v where recursive KV sharing reuses the first recursion's) x the
fraction of tokens that reach the layer, + 4 x hidden x the mean number of (query, key) pairs per token at that
layer (QK^T and AV), + 2 x hidden per router call, + 2 x hidden x vocab (LM head). Norms, RoPE and softmax are
not counted. The fractions are measured on the held-out batch in training mode (the capacities) and in eval mode
(what inference runs).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass

import torch
from transformers import AutoModelForCausalLM

import hf_memory
from hf_memory.tasks import IGNORE

from report import emit


# ------------------------------------------------------------------------------------------------- the task
@dataclass(frozen=True)
class PointerTask:
    """Token layout: 0 pad | 1 bos | digits [2, 2 + k) | queries Q(h, q) [2 + k, 2 + k + hops * k) | filler."""

    digits: int = 4
    hops: int = 4
    filler: int = 3
    blocks: int = 6
    filler_vocab: int = 16

    @property
    def first_query(self) -> int:
        return 2 + self.digits

    @property
    def first_filler(self) -> int:
        return self.first_query + self.hops * self.digits

    @property
    def vocab_size(self) -> int:
        return self.first_filler + self.filler_vocab

    @property
    def block(self) -> int:
        return self.filler + self.digits + 2

    @property
    def length(self) -> int:
        return 1 + self.blocks * self.block

    def classes(self) -> list[str]:
        return ["bos", "filler, first block", "filler, copied", "digit"] + \
            [f"query, {h} hop{'s' * (h > 1)}" for h in range(1, self.hops + 1)] + ["answer"]


def task_batch(task: PointerTask, batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``labels`` [B, T], and ``token_class`` [B, T]: the index in ``task.classes()`` of the
    token at each position (a query's class says how many hops its answer, the next token, takes)."""
    k, hops = task.digits, task.hops
    filler = torch.randint(task.first_filler, task.vocab_size, (batch, task.filler), generator=generator)
    ids, labelled, classes = [torch.full((batch, 1), 1)], [torch.zeros(batch, 1, dtype=torch.bool)], \
        [torch.zeros(batch, 1, dtype=torch.long)]
    for b in range(task.blocks):
        digits = torch.randint(0, k, (batch, k), generator=generator)
        start = torch.randint(0, k, (batch,), generator=generator)
        h = torch.randint(1, hops + 1, (batch,), generator=generator)
        answer = start
        for step in range(1, hops + 1):
            answer = torch.where(h >= step, digits.gather(1, answer[:, None])[:, 0], answer)
        ids += [filler, digits + 2, (task.first_query + (h - 1) * k + start)[:, None], (answer + 2)[:, None]]
        labelled += [torch.full((batch, task.filler), b > 0), torch.zeros(batch, k + 1, dtype=torch.bool),
                     torch.ones(batch, 1, dtype=torch.bool)]
        classes += [torch.full((batch, task.filler), 1 if b == 0 else 2), torch.full((batch, k), 3),
                    (3 + h)[:, None], torch.full((batch, 1), 4 + hops)]
    ids, labelled = torch.cat(ids, 1), torch.cat(labelled, 1)
    return {"input_ids": ids, "labels": torch.where(labelled, ids, IGNORE), "token_class": torch.cat(classes, 1)}


# ------------------------------------------------------------------------------------------------- the variants
def variants(layers: int, recursions: int) -> dict[str, dict]:
    unique = (layers - 2) // recursions + 2
    return {
        f"vanilla, {layers} layers": dict(routing="none", num_recursions=1),
        f"MoR expert-choice, {layers} applied / {unique} unique layers": dict(num_recursions=recursions),
        f"recursive, all tokens {recursions} recursions ({unique} unique)": dict(routing="none",
                                                                                num_recursions=recursions),
        f"vanilla, {unique} layers": dict(routing="none", num_recursions=1, num_hidden_layers=unique),
    }


def make_config(args, task: PointerTask, overrides: dict):
    size = dict(vocab_size=task.vocab_size, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                num_hidden_layers=args.layers, max_position_embeddings=max(64, task.length),
                router_alpha=args.router_alpha, router_aux_loss_coef=args.router_aux_loss_coef,
                kv_cache_scheme=args.kv_cache)
    if overrides.get("routing") == "none":  # the router fields belong to expert-choice
        size = {key: value for key, value in size.items() if not key.startswith("router_")}
    return hf_memory.get_config("mor-tiny", **{**size, **overrides})


# ------------------------------------------------------------------------------------------------- measurements
def layer_linear_params(config, keys_and_values: bool = True) -> int:
    """Parameters of one decoder layer's linear maps (q, k, v, o, gate, up, down; without k and v where the layer
    reads the first recursion's keys and values)."""
    hidden, heads, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    head_dim = hidden // heads
    return hidden * heads * head_dim * 2 + hidden * kv * head_dim * 2 * keys_and_values \
        + 3 * hidden * config.intermediate_size


def forward_flops_per_token(config, depth: torch.Tensor) -> tuple[float, list[float]]:
    """Forward FLOPs per token (see the module docstring) for the recursion depths ``depth`` [B, T] (every token
    real); also the fraction of tokens reaching each applied layer."""
    batch, length = depth.shape
    tokens = batch * length
    position = torch.arange(length)
    d = config.hidden_size
    routed = config.routing == "expert_choice"
    flops, fractions = 2 * d * config.vocab_size, []
    for layer in range(config.num_hidden_layers):
        if config.layer_types[layer] == "full_attention" or config.num_recursions == 1:
            reach, keys, linear = torch.ones_like(depth, dtype=torch.bool), None, layer_linear_params(config)
        else:
            recursion = (layer - 1) // config.block_size
            reach = depth > recursion
            keys = reach if config.kv_cache_scheme == "recursion_wise" or recursion == 0 else None
            linear = layer_linear_params(config, keys_and_values=keys is not None)
            if routed and (layer - 1) % config.block_size == 0:  # the router, once per recursion on its candidates
                flops += 2 * d * float((depth >= recursion).sum()) / tokens
        if keys is None:  # every earlier token's key: causal
            pairs = float(((position + 1)[None] * reach).sum())
        else:
            pairs = float((keys.long().cumsum(1) * reach).sum())
        fraction = float(reach.float().mean())
        fractions.append(fraction)
        flops += 2 * linear * fraction + 4 * d * pairs / tokens
    return flops, fractions


def explained_variance(depth: torch.Tensor, groups: torch.Tensor) -> float:
    """The share of the variance of ``depth`` that ``groups`` (same shape) explains: 1 - within-group variance /
    total variance (1: the depth is a function of the group; 0: the group says nothing about it)."""
    depth, groups = depth.flatten().double(), groups.flatten()
    total = float(((depth - depth.mean()) ** 2).sum())
    if total == 0:
        return float("nan")
    within = sum(float(((depth[groups == g] - depth[groups == g].mean()) ** 2).sum()) for g in groups.unique())
    return 1 - within / total


@torch.no_grad()
def evaluate(model, config, held_out: dict, classes: list[str]) -> dict:
    """Held-out loss and answer accuracy in eval mode, the same loss in training mode (top-k routing), depth
    statistics and sampling accuracy."""
    ids, labels, token_class = held_out["input_ids"], held_out["labels"], held_out["token_class"]
    hops = len(classes) - 5  # the query classes are 4 .. 3 + hops
    result, depth_of = {}, {}
    for mode in ("eval", "train"):
        model.train(mode == "train")
        out = model(input_ids=ids, use_cache=False)
        logits, targets = out.logits[:, :-1].float(), labels[:, 1:]
        scored = targets != IGNORE
        nll = torch.nn.functional.cross_entropy(logits[scored], targets[scored], reduction="none")
        correct = (logits.argmax(-1) == targets)[scored].float()
        target_class = token_class[:, :-1][scored]  # the class of the position that predicts the label
        depth = out.recursion_depth
        flops, fractions = forward_flops_per_token(config, depth)
        result[mode] = dict(
            loss=float(nll.mean()), answer_accuracy=float(correct[(target_class >= 4) & (target_class < 4 + hops)]
                                                          .mean()),
            loss_by_class={classes[c]: float(nll[target_class == c].mean()) for c in target_class.unique().tolist()},
            accuracy_by_class={classes[c]: float(correct[target_class == c].mean())
                               for c in target_class.unique().tolist()},
            flops_per_token=3 * flops, forward_flops_per_token=flops, layer_fractions=fractions,
            depth_histogram=[float((depth == r).float().mean()) for r in range(1, config.num_recursions + 1)],
            depth_by_class={name: float(depth[token_class == c].float().mean()) for c, name in enumerate(classes)},
            depth_explained_by_class=explained_variance(depth, token_class),
            depth_explained_by_token=explained_variance(depth, ids),
        )
        if mode == "train" and out.router_logits is not None and config.routing == "expert_choice":
            agreement = []
            for r, logit in enumerate(out.router_logits):
                if config.capacities[r] >= 1.0:
                    continue
                candidates, chosen = depth >= r, depth >= r + 1
                agreement.append(float(((logit >= 0) == chosen)[candidates].float().mean()))
            result["sampling_accuracy"] = agreement
            result["depth_agreement"] = float((depth == depth_of["eval"]).float().mean())
        depth_of[mode] = depth
    model.train()
    return result


def train_variant(args, task: PointerTask, name: str, overrides: dict, seed: int) -> dict:
    config = make_config(args, task, overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    held_out = task_batch(task, args.eval_batch, torch.Generator().manual_seed(10_000 + seed))
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    warmup = min(args.warmup, args.steps // 2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, max(0, s - warmup) / max(1, args.steps - warmup)))))
    model.train()
    start, losses = time.perf_counter(), []
    for _ in range(args.steps):
        batch = task_batch(task, args.batch_size, generator)
        loss = model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    result = evaluate(model, config, held_out, task.classes())
    params = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel() + model.get_output_embeddings().weight.numel()
    return dict(variant=name, seed=seed, overrides=overrides, parameters=params,
                non_embedding_parameters=params - embedding, applied_layers=config.num_hidden_layers,
                unique_layers=config.num_unique_layers, final_train_loss=sum(losses[-20:]) / len(losses[-20:]),
                seconds=seconds, **result)


# ------------------------------------------------------------------------------------------------- the report
def spread(values: list[float], fmt: str = "{:.3f}") -> str:
    """``mean [min – max]`` over seeds (the value alone when every seed gives the same)."""
    if fmt.format(min(values)) == fmt.format(max(values)):
        return fmt.format(values[0])
    return f"{fmt.format(sum(values) / len(values))} [{fmt.format(min(values))} – {fmt.format(max(values))}]"


def tables(args, task: PointerTask, runs: dict[str, list[dict]]) -> list[str]:
    classes = task.classes()
    seeds = len(next(iter(runs.values())))
    lines = [
        f"Pointer chasing with copyable filler ({task.blocks} blocks of {task.filler} filler + {task.digits} digits + "
        f"query + answer, {task.length} tokens, answers of 1-{task.hops} hops), vocabulary {task.vocab_size}, hidden "
        f"{args.hidden}, FFN {2 * args.hidden}; {args.steps} steps x {args.batch_size} sequences, AdamW lr {args.lr} "
        f"(warmup {min(args.warmup, args.steps // 2)}, cosine to 0), seeds 0-{seeds - 1}; held-out {args.eval_batch} "
        f"sequences per seed. "
        f"Cells: mean [min – max] over seeds. Loss: cross-entropy over the labelled tokens (copied filler and "
        f"answers), eval mode. MoR: router_alpha {args.router_alpha}, "
        f"router_aux_loss_coef (BCE) {args.router_aux_loss_coef}, KV cache {args.kv_cache}.",
        "",
        "| variant | parameters (non-embedding) | applied / unique layers | training FLOPs per token, with the "
        "train-mode (top-k) · eval-mode depths | held-out loss | answer accuracy | "
        + " | ".join(f"accuracy, {h}-hop answers" for h in range(1, task.hops + 1)) + " | seconds |",
        "|---|---|---|---|---|---|" + "---|" * task.hops + "---|",
    ]
    for name, variant_runs in runs.items():
        first = variant_runs[0]
        flops_train = [r["train"]["flops_per_token"] / 1e6 for r in variant_runs]
        flops_eval = [r["eval"]["flops_per_token"] / 1e6 for r in variant_runs]
        flops = spread(flops_train, "{:.2f}")
        lines.append(
            f"| {name} | {first['parameters']:,} ({first['non_embedding_parameters']:,}) | "
            f"{first['applied_layers']} / {first['unique_layers']} | {flops} M · {spread(flops_eval, '{:.2f}')} M | "
            f"{spread([r['eval']['loss'] for r in variant_runs])} | "
            f"{spread([r['eval']['answer_accuracy'] for r in variant_runs], '{:.3f}')} | "
            + " | ".join(spread([r["eval"]["accuracy_by_class"][classes[3 + h]] for r in variant_runs], "{:.3f}")
                         for h in range(1, task.hops + 1))
            + f" | {sum(r['seconds'] for r in variant_runs) / len(variant_runs):.0f} |")
    lines += ["", "Held-out loss per seed (eval mode):", "",
              "| variant | " + " | ".join(f"seed {seed}" for seed in range(seeds)) + " |", "|---|" + "---|" * seeds,
              *(f"| {name} | " + " | ".join(f"{run['eval']['loss']:.4f}" for run in variant_runs) + " |"
                for name, variant_runs in runs.items())]
    names = list(runs)
    for other in names[1:]:
        if names[0].startswith("vanilla") and other.startswith("MoR"):
            lines.append(f"| ratio {other} / {names[0]} | " + " | ".join(
                f"{mor['eval']['loss'] / base['eval']['loss']:.2f}" for mor, base in zip(runs[other], runs[names[0]]))
                + " |")
    for name, variant_runs in runs.items():
        if "sampling_accuracy" not in variant_runs[0]:
            continue
        recursions = len(variant_runs[0]["eval"]["depth_histogram"])
        lines += [
            "",
            f"{name}: recursion depth per position (the class of the token at the position; a query predicts its "
            f"answer). Eval mode unless marked.",
            "",
            "| measure | " + " | ".join(f"depth {r}" for r in range(1, recursions + 1)) + " |",
            "|---|" + "---|" * recursions,
            *(f"| share of tokens at each depth, {mode} mode | "
              + " | ".join(spread([run[mode]["depth_histogram"][r] for run in variant_runs]) for r in range(recursions))
              + " |" for mode in ("eval", "train")),
            "",
            "| token class | mean depth, eval mode | mean depth, train mode (top-k) |",
            "|---|---|---|",
            *(f"| {c} | {spread([run['eval']['depth_by_class'][c] for run in variant_runs], '{:.2f}')} | "
              f"{spread([run['train']['depth_by_class'][c] for run in variant_runs], '{:.2f}')} |" for c in classes),
            "",
            "| routing | value |",
            "|---|---|",
            *(f"| share of the depth variance explained by the {what}, {mode} mode | "
              f"{spread([run[mode][f'depth_explained_by_{key}'] for run in variant_runs])} |"
              for key, what in (("class", "token class"), ("token", "token id")) for mode in ("eval", "train")),
            *(f"| sampling accuracy, recursion {r + 2} (eval decision logit >= 0 vs train top-k) | "
              f"{spread([run['sampling_accuracy'][r] for run in variant_runs])} |"
              for r in range(len(variant_runs[0]["sampling_accuracy"]))),
            f"| tokens at the same depth in eval and train mode | "
            f"{spread([run['depth_agreement'] for run in variant_runs])} |",
            "| held-out loss with train-mode (top-k) routing | "
            f"{spread([run['train']['loss'] for run in variant_runs])} |",
        ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=3, help="train every variant from seeds 0 .. SEEDS-1")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-batch", type=int, default=512)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=5, help="applied layers L (2 + 3 x the shared block)")
    parser.add_argument("--router-alpha", type=float, default=0.1)
    parser.add_argument("--router-aux-loss-coef", type=float, default=1e-2,
                        help="the BCE towards the top-k choice (paper: 1e-3)")
    parser.add_argument("--kv-cache", default="recursion_wise", choices=["recursion_wise", "recursive_sharing"])
    parser.add_argument("--digits", type=int, default=4)
    parser.add_argument("--hops", type=int, default=4)
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--variants", default=None, help="comma-separated indices into the variant list (default all)")
    parser.add_argument("--quick", action="store_true", help="a smoke test: 30 steps, 1 seed, 64 held-out sequences")
    parser.add_argument("--out", default=None, help="write the raw numbers here (JSON)")
    parser.add_argument("--output", default=None, help="also write the tables here (markdown)")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.seeds, args.eval_batch = 30, 1, 64
    torch.set_num_threads(1)

    task = PointerTask(digits=args.digits, hops=args.hops, blocks=args.blocks)
    chosen = variants(args.layers, 3)
    if args.variants is not None:
        names = list(chosen)
        chosen = {names[int(i)]: chosen[names[int(i)]] for i in args.variants.split(",")}
    runs = {name: [] for name in chosen}
    start = time.perf_counter()
    for seed in range(args.seeds):
        for name, overrides in chosen.items():
            run = train_variant(args, task, name, overrides, seed)
            runs[name].append(run)
            print(f"seed {seed} | {name} | held-out loss {run['eval']['loss']:.4f} | answers "
                  f"{run['eval']['answer_accuracy']:.1%} | {run['seconds']:.0f} s", flush=True)
    emit(tables(args, task, runs), args.output)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(args=vars(args), task=asdict(task), runs=runs), f, indent=1)


if __name__ == "__main__":
    main()
