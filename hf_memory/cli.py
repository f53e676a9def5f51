"""``hf-memory`` command line.

commands:
    hf-memory demo      build a tiny model, train it on CPU on multi-query associative recall, report recall
                        accuracy, generate, and write a Hub-ready folder (no download: everything is built in)
    hf-memory convert   --from FORMAT SRC DST (jamba, llama, falcon_h1, hymba), or --to FORMAT SRC DST (jamba,
                        falcon_h1)
    hf-memory presets   list the named configurations and their sources
    hf-memory bench     every architecture and a Llama baseline on one footing: recall vs distance, state bytes,
                        speed (hf_memory.bench)
"""

from __future__ import annotations

import argparse
import ast
import functools
import inspect
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch


def demo(args: argparse.Namespace) -> int:
    import hf_memory
    from hf_memory.tasks import (
        DEMO_TRAINING, FIRST_KEY, MQARSpec, mqar_batch, recall_accuracy, scaled_curriculum, train_recall,
    )
    from transformers import AutoModelForCausalLM

    check_destination(args.output, args.force, "--output")  # before training, not after
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
    stages = scaled_curriculum(DEMO_TRAINING["curriculum"], args.steps)
    warm_up = ", ".join(f"{n} on {pairs} pair{'s' * (pairs > 1)}" for pairs, n in stages)
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
    advice = f"try more steps (--steps {2 * args.steps}) or another --seed"
    if args.preset != DEFAULT_PRESET:
        advice += f", or the default preset {DEFAULT_PRESET} (92-99% on every seed measured)"
    if after >= 0.9:
        print(f"memory works: {after:.1%} of queried values recalled (chance {chance:.1%})")
    elif after >= 10 * chance:
        print(f"memory partly works: {after:.1%} recalled (chance {chance:.1%}; a full solution is > 90%); {advice}")
    else:
        print(f"memory did not learn: {after:.1%} recalled, chance is {chance:.1%}; {advice}")

    save = functools.partial(model.save_pretrained, license=args.license, **demo_card(args, spec, after))
    write_folder(args.output, args.force, save, "--output")
    print(f"wrote a Hub-ready folder to {args.output}/ (weights, config with auto_map, modeling code, model card); "
          f"load it with AutoModelForCausalLM.from_pretrained({args.output!r}, trust_remote_code=True)")
    return 0


def demo_card(args: argparse.Namespace, spec, recall: float) -> dict[str, str]:
    """The demo model's card: a toy trained on synthetic recall, and how (so it is never mistaken for an LM)."""
    return {
        "training": (
            f"Trained from random initialisation by `hf-memory demo` (preset `{args.preset}`) for {args.steps} steps "
            f"(batch {args.batch_size}, learning rate {args.lr}, seed {args.seed}) on synthetic multi-query "
            f"associative recall (MQAR): random sequences of {spec.num_pairs} key-value token pairs, then "
            f"{spec.num_queries} keys queried again. No natural-language data. Recall accuracy on 512 held-out "
            f"sequences: {recall:.1%} (chance {1 / spec.num_values:.1%})."
        ),
        "intended_use": ("A synthetic-task toy model for trying hf-memory end to end (training, generation, export, "
                         "loading). It has learned only MQAR, not language: it is not for real text."),
        "limitations": "It knows no language: on real text its outputs are meaningless.",
    }


# ---------------------------------------------------------------------------------------------- destinations
def check_destination(destination, force: bool, name: str = "DST") -> None:
    """Refuse a file, or a non-empty folder unless ``force`` (then only the files written are replaced)."""
    path = Path(destination)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name} {str(destination)!r} is a file; pass a folder path")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise ValueError(f"{name} {str(destination)!r} is not empty; pass --force to overwrite the files hf-memory "
                         f"writes there (other files are kept), or choose another folder")


def write_folder(destination, force: bool, write: Callable[[str], object], name: str = "DST") -> list[str]:
    """Let ``write(folder)`` fill a fresh staging folder, then move its files into ``destination``.

    Files already in ``destination`` are replaced only when ``write`` wrote a file of the same name; nothing
    else there is deleted (``save_pretrained`` alone would remove stale weight shards). Returns the names written.
    """
    check_destination(destination, force, name)
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    try:
        write(str(staging))
        destination.mkdir(exist_ok=True)
        written = [path.relative_to(staging) for path in sorted(staging.rglob("*")) if path.is_file()]
        for relative in written:
            (destination / relative).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / relative, destination / relative)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    kept = sorted({p.name for p in destination.iterdir()} - {r.parts[0] for r in written})
    if kept:
        print(f"kept {len(kept)} file(s) in {destination} that hf-memory did not write: {', '.join(kept)}",
              file=sys.stderr)
    return [str(relative) for relative in written]


# ---------------------------------------------------------------------------------------------- convert
def converter_options(function, items: list[str] | None, flag: str) -> dict:
    """``--set KEY=VALUE`` items as keyword arguments, refusing keys the converter does not take."""
    known = [name for name in inspect.signature(function).parameters if name not in ("source", "destination", "dtype")]
    options = {}
    for item in items or []:
        key, equals, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not equals or not key:
            raise ValueError(f"--set {item!r} is not KEY=VALUE, e.g. --set segment_size=2048")
        if key not in known:
            raise ValueError(f"--set {key}: {flag} takes no such option; it takes {known or 'none'}")
        try:
            options[key] = ast.literal_eval(value)  # numbers, True / None, quoted strings
        except (ValueError, SyntaxError):
            options[key] = value  # a bare word, e.g. memory_update=linear
    return options


def converted_card(args: argparse.Namespace, source_config: dict) -> dict[str, str]:
    """Card options of a converted model: its weights are the source's, so are their training and licence."""
    training = (f"Converted with `hf-memory convert --from {args.source_format}` from a "
                f"`{source_config.get('model_type')}` checkpoint (`{Path(args.source).resolve().name}`): the weights "
                f"are that checkpoint's, so its training data, intended use and licence apply (see its model "
                f"card). Weights the source does not have are new and untrained.")
    return {"license": args.license, "training": training}


def convert(args: argparse.Namespace) -> int:
    from hf_memory.conversion import converter, read_source_config
    from hf_memory.export import render_model_card

    direction, fmt = ("from", args.source_format) if args.source_format else ("to", args.target_format)
    function = converter(direction, fmt)
    options = converter_options(function, args.set, f"--{direction} {fmt}")
    if direction == "to" and args.license:
        raise ValueError(f"--license applies to hf-memory folders (--from); --to {fmt} writes transformers' own "
                         f"format, which has no hf-memory model card")
    if Path(args.source).resolve() == Path(args.destination).resolve():
        raise ValueError("DST is SRC; write the converted checkpoint to another folder")
    check_destination(args.destination, args.force)
    source_config = read_source_config(args.source)  # a missing SRC is reported as such, before anything else
    dtype = getattr(torch, args.dtype) if args.dtype else None

    def write(folder: str) -> None:
        model = function(args.source, folder, dtype=dtype, **options)
        if direction == "from":  # the card learns the licence and where the weights come from
            card = render_model_card(model, **converted_card(args, source_config))
            (Path(folder) / "README.md").write_text(card, encoding="utf-8")

    write_folder(args.destination, args.force, write)
    print(f"converted {args.source} ({fmt if direction == 'from' else 'hf-memory'}) -> {args.destination} "
          f"({'hf-memory' if direction == 'from' else fmt})")
    return 0


def presets(args: argparse.Namespace) -> int:
    import hf_memory

    for name, source in hf_memory.list_presets().items():
        print(f"{name:28s} {source}")
    return 0


# ---------------------------------------------------------------------------------------------- parser
DEFAULT_PRESET = "gated-deltanet-1layer-tiny"  # see DEMO_TRAINING in hf_memory/tasks.py
DESCRIPTION = ("Memory architectures of language models as transformers models: a demo, conversion, presets, "
               "a benchmark.")
DEMO_DESCRIPTION = """\
Build a tiny model, train it on CPU on multi-query associative recall (a synthetic task),
report recall accuracy, generate, and write a Hub-ready folder whose model card says it is
a synthetic-task toy. Nothing is downloaded."""
DEMO_EPILOG = """example:
  hf-memory demo --seed 3 --output my-demo --license mit
  python -c "from transformers import AutoModelForCausalLM; \\
      AutoModelForCausalLM.from_pretrained('my-demo', trust_remote_code=True)"
"""
CONVERT_EPILOG = """examples:
  hf-memory convert --from jamba path/to/jamba-checkpoint jamba-hf-memory --license apache-2.0
  hf-memory convert --from llama path/to/llama-checkpoint infini-llama --set segment_size=2048
  hf-memory convert --from llama path/to/llama-checkpoint rmt-llama --set architecture=rmt --set segment_size=1024
  hf-memory convert --from llama path/to/llama-checkpoint mor-llama --set architecture=mor --set num_recursions=2
  hf-memory convert --to jamba jamba-hf-memory jamba-transformers
  hf-memory convert --from falcon_h1 path/to/falcon-h1-checkpoint falcon-h1-hf-memory
  hf-memory convert --from hymba path/to/Hymba-1.5B-Base hymba-hf-memory
SRC is a local folder (download a Hub repository first: hf download REPO --local-dir DIR).
"""
PRESETS_EPILOG = """example:
  hf-memory presets
"""


def add_demo_parser(commands) -> None:
    run = commands.add_parser("demo", help="train a tiny memory model on associative recall and export it",
                              description=DEMO_DESCRIPTION, epilog=DEMO_EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--preset", default=DEFAULT_PRESET, help="named configuration to build (see `hf-memory presets`; default: %(default)s)")
    run.add_argument("--steps", type=int, default=700, help="training steps (default: %(default)s)")
    run.add_argument("--batch-size", type=int, default=64, help="sequences per training step (default: %(default)s)")
    run.add_argument("--lr", type=float, default=1e-2, help="learning rate (default: %(default)s)")
    run.add_argument("--pairs", type=int, default=4, help="key-value pairs per sequence, all queried (default: %(default)s)")
    run.add_argument("--seed", type=int, default=0, help="random seed of the model, the data and the test set (default: %(default)s)")
    run.add_argument("--threads", type=int, default=1,
                     help="CPU threads for torch (default: %(default)s; the model is tiny and a busy machine slows "
                          "many threads down)")
    run.add_argument("--output", default="hf-memory-demo", help="folder to write the Hub-ready model to; new or empty unless --force (default: %(default)s)")
    add_writing_options(run)
    run.set_defaults(func=demo)


BENCH_DESCRIPTION = """\
Train every registered architecture's tiny preset, resized to one parameter budget, and a Llama
baseline of the same budget on the same synthetic tasks (passkey at increasing distance, MQAR with
more pairs, copy across segments) with the same steps, data and seeds; evaluate each level, levels
beyond training included; measure cache bytes per sequence, prefill and decode speed. Writes
bench.md (table), bench.json (raw numbers) and bench.png (plot). Nothing is downloaded."""
BENCH_EPILOG = """examples:
  hf-memory bench                                   # all architectures, budget small (2 CPU cores: ~15 min)
  hf-memory bench --arch gated_deltanet,titans --tasks passkey --out my-bench
"""


def add_bench_parser(commands) -> None:
    from hf_memory.bench import BUDGETS

    bench = commands.add_parser("bench", help="compare every architecture on recall, state bytes and speed",
                                description=BENCH_DESCRIPTION, epilog=BENCH_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("--arch", default=None, metavar="A,B",
                       help="architectures to run, comma-separated (default: all registered; the Llama baseline "
                            "always runs)")
    bench.add_argument("--tasks", default=None, metavar="T,U", help="tasks: passkey, mqar, copy (default: all)")
    bench.add_argument("--budget", default="small", choices=list(BUDGETS),
                       help="small: 2 CPU cores in ~15 min; paper: 10x the steps and batch, 5 seeds, for a GPU "
                            "(default: %(default)s)")
    bench.add_argument("--out", default="benchmarks/results/bench", metavar="DIR",
                       help="folder for bench.md, bench.json, bench.png (default: %(default)s)")
    bench.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                       help="training runs at a time on CPU, one thread each (default: %(default)s)")
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    add_debug_option(bench)
    bench.set_defaults(func=bench_command)


def bench_command(args: argparse.Namespace) -> int:
    from hf_memory.bench import main as bench_main

    return bench_main(args)


def add_convert_parser(commands) -> None:
    conversion = commands.add_parser("convert", help="convert a checkpoint folder from / to a public format",
                                     description="Convert a local checkpoint folder SRC into a new folder DST.",
                                     epilog=CONVERT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    formats = conversion.add_mutually_exclusive_group(required=True)
    formats.add_argument("--from", dest="source_format", metavar="FORMAT",
                         help="format of SRC, written as hf-memory: jamba (transformers' Jamba -> hf-memory Jamba), "
                              "llama (transformers' Llama -> Infini-attention, or RMT / MoR with --set architecture=rmt / mor), falcon_h1 (transformers' Falcon-H1 "
                              "-> hf-memory parallel hybrid), hymba (NVIDIA's published Hymba -> hf-memory Hymba)")
    formats.add_argument("--to", dest="target_format", metavar="FORMAT",
                         help="format to write from an hf-memory SRC: jamba (hf-memory Jamba, Mamba-1 mixers -> "
                              "transformers' Jamba), falcon_h1 (the Falcon-H1 layout -> transformers' Falcon-H1)")
    conversion.add_argument("source", metavar="SRC", help="local checkpoint folder holding config.json and weights")
    conversion.add_argument("destination", metavar="DST", help="folder to write (must be new or empty, or --force)")
    conversion.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                            help="dtype to convert in and save (default: as saved in SRC)")
    conversion.add_argument("--set", action="append", metavar="KEY=VALUE",
                            help="converter option, repeatable: segment_size=2048, memory_update=linear (llama); "
                                 "architecture=rmt num_memory_tokens=16 use_memory=False memory_type=armt (llama -> RMT); "
                                 "architecture=mor num_recursions=3 sharing=cycle initialization=average "
                                 "routing=token_choice router_gating=none (llama -> MoR)")
    add_writing_options(conversion)
    conversion.set_defaults(func=convert)


def add_writing_options(command) -> None:
    command.add_argument("--force", action="store_true",
                         help="write into a non-empty folder: overwrite the files written, keep every other file")
    command.add_argument("--license", default=None, metavar="ID", type=license_id,
                         help="Hub licence id for the model card, e.g. mit or apache-2.0 (default: none declared)")
    add_debug_option(command)


def license_id(value: str) -> str:
    """``--license``: checked when the command line is read, so a typo fails before any training or loading."""
    from hf_memory.export import card_license

    try:
        return card_license(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_debug_option(command, default=argparse.SUPPRESS) -> None:
    command.add_argument("--debug", action="store_true", default=default,
                         help="on error, show the full traceback instead of one line")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-memory", description=DESCRIPTION,
                                     epilog="run `hf-memory COMMAND --help` for a command's options and an example",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_debug_option(parser, default=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_demo_parser(commands)
    add_convert_parser(commands)
    add_bench_parser(commands)
    listing = commands.add_parser("presets", help="list named configurations", epilog=PRESETS_EPILOG,
                                  description="List the named configurations and their sources.",
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    add_debug_option(listing)
    listing.set_defaults(func=presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command; an error prints as one line on stderr (exit 2 for bad input, 1 otherwise)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as error:  # noqa: BLE001 - every error becomes one line, or a traceback with --debug
        if args.debug:
            raise
        bad_input = isinstance(error, (ValueError, OSError))
        message = " ".join(str(error).split()) or type(error).__name__
        if not bad_input:
            message = f"{type(error).__name__}: {message} (run with --debug for the traceback)"
        print(f"hf-memory: error: {message}", file=sys.stderr)
        return 2 if bad_input else 1


if __name__ == "__main__":
    sys.exit(main())
