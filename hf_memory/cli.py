"""``hf-memory`` command line.

    hf-memory demo      build a tiny model, train it on CPU on multi-query associative recall, report recall
                        accuracy, generate, and write a Hub-ready folder (no download: everything is built in)
    hf-memory convert   --from FORMAT SRC DST (jamba, llama), or --to FORMAT SRC DST (jamba)
    hf-memory presets   list the named configurations and their sources
"""

from __future__ import annotations

import argparse
import ast
import sys
import time

import torch


def demo(args: argparse.Namespace) -> int:
    import hf_memory
    from hf_memory.tasks import DEMO_TRAINING, FIRST_KEY, MQARSpec, mqar_batch, recall_accuracy, train_recall
    from transformers import AutoModelForCausalLM

    # A ~100K-parameter model gains nothing from many threads, and on a busy machine torch's default thread
    # count made a step ~60x slower: one thread unless asked.
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = hf_memory.get_config(args.preset)
    spec = MQARSpec(vocab_size=config.vocab_size, num_pairs=args.pairs, num_queries=args.pairs)
    model = AutoModelForCausalLM.from_config(config)
    n_params = sum(p.numel() for p in model.parameters())
    chance = 1 / spec.num_values
    print(f"model: {args.preset} ({type(model).__name__}, {n_params:,} parameters, layers {config.layer_types})")
    print(f"task: MQAR, {spec.num_pairs} key-value pairs then {spec.num_queries} queries (chance {chance:.1%})")
    warm_up = ", ".join(f"{n} on {pairs} pair{'s' * (pairs > 1)}" for pairs, n in DEMO_TRAINING["curriculum"])
    print(f"training: {args.steps} steps x {args.batch_size} sequences ({warm_up} first), AdamW lr {args.lr}, "
          f"seed {args.seed}, {args.threads} CPU thread{'s' * (args.threads > 1)} (--threads N for more)")

    test = mqar_batch(spec, 512, torch.Generator().manual_seed(10_000 + args.seed))
    before = recall_accuracy(model, test)
    start = time.perf_counter()
    losses = train_recall(model, spec, args.steps, args.batch_size, args.lr, args.seed, **DEMO_TRAINING)
    seconds = time.perf_counter() - start
    after = recall_accuracy(model, test)
    print(f"recall accuracy on 512 held-out sequences: {before:.1%} before, {after:.1%} after "
          f"{args.steps} steps ({seconds:.0f} s, final loss {losses[-1]:.3f})")

    # Generation: the pairs plus one query key; the model should answer with that key's value.
    example = test["input_ids"][:1, : 1 + 2 * spec.num_pairs + 1]
    answer = test["input_ids"][0, 1 + 2 * spec.num_pairs + 1].item()
    generated = model.generate(example, attention_mask=torch.ones_like(example), max_new_tokens=1, do_sample=False)
    pairs = example[0, 1:-1].view(-1, 2).tolist()
    print(f"generate: pairs {[(k - FIRST_KEY, v - spec.first_value) for k, v in pairs]} as (key, value), "
          f"query key {example[0, -1].item() - FIRST_KEY} -> generated {spec.describe(generated[0, -1].item())} "
          f"(expected {spec.describe(answer)})")
    advice = f"try another --seed (seeds 3 and 4 reach 97-99%) or more steps (--steps {2 * args.steps})"
    if after >= 0.9:
        print(f"memory works: {after:.1%} of queried values recalled (chance {chance:.1%})")
    elif after >= 10 * chance:
        print(f"memory partly works: {after:.1%} recalled (chance {chance:.1%}; a full solution is > 90%); {advice}")
    else:
        print(f"memory did not learn: {after:.1%} recalled, chance is {chance:.1%}; {advice}")

    model.save_pretrained(args.output)
    print(f"wrote a Hub-ready folder to {args.output}/ (weights, config with auto_map, modeling code, model card); "
          f"load it with AutoModelForCausalLM.from_pretrained({args.output!r}, trust_remote_code=True)")
    return 0


def convert(args: argparse.Namespace) -> int:
    from hf_memory.conversion import converter

    direction, fmt = ("from", args.source_format) if args.source_format else ("to", args.target_format)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    options = {}
    for item in args.set or []:
        key, _, value = item.partition("=")
        try:
            options[key.replace("-", "_")] = ast.literal_eval(value)  # numbers, True / None, quoted strings
        except (ValueError, SyntaxError):
            options[key.replace("-", "_")] = value  # a bare word, e.g. memory_update=linear
    converter(direction, fmt)(args.source, args.destination, dtype=dtype, **options)
    print(f"converted {args.source} ({fmt if direction == 'from' else 'hf-memory'}) -> {args.destination} "
          f"({'hf-memory' if direction == 'from' else fmt})")
    return 0


def presets(args: argparse.Namespace) -> int:
    import hf_memory

    for name, source in hf_memory.list_presets().items():
        print(f"{name:28s} {source}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-memory", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("demo", help="train a tiny memory model on associative recall and export it")
    run.add_argument("--preset", default="gated-deltanet-tiny")
    run.add_argument("--steps", type=int, default=700)
    run.add_argument("--batch-size", type=int, default=64)
    run.add_argument("--lr", type=float, default=1e-2)
    run.add_argument("--pairs", type=int, default=4, help="key-value pairs per sequence (all are queried)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default 1: the model is tiny)")
    run.add_argument("--output", default="hf-memory-demo")
    run.set_defaults(func=demo)
    conversion = commands.add_parser("convert", help="convert a checkpoint folder from / to a public format")
    formats = conversion.add_mutually_exclusive_group(required=True)
    formats.add_argument("--from", dest="source_format",
                         help="format of SRC: jamba (transformers' Jamba), llama (-> Infini-attention)")
    formats.add_argument("--to", dest="target_format", help="format to write, e.g. jamba")
    conversion.add_argument("source", metavar="SRC")
    conversion.add_argument("destination", metavar="DST")
    conversion.add_argument("--dtype", default=None, help="e.g. float32 or bfloat16 (default: as saved)")
    conversion.add_argument("--set", action="append", metavar="KEY=VALUE",
                            help="converter option, e.g. segment_size=2048 or memory_update=linear (llama)")
    conversion.set_defaults(func=convert)
    listing = commands.add_parser("presets", help="list named configurations")
    listing.set_defaults(func=presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
