"""Converters from public checkpoint formats into hf_memory architectures and back (installed as
hf_memory.conversion). Each format's module is imported only when it is asked for.

Every converter checks its source before it builds anything: SRC must be a local checkpoint folder whose
``config.json`` declares the model the converter reads (``model_type`` and, when saved, ``architectures``),
whose weight files are readable, and whose weights map one to one onto the target model.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

# (direction, format) -> (module, function)
CONVERTERS = {
    ("from", "jamba"): ("hf_memory.conversion.jamba", "convert_from_jamba"),
    ("to", "jamba"): ("hf_memory.conversion.jamba", "convert_to_jamba"),
    ("from", "llama"): ("hf_memory.conversion.llama", "convert_from_llama"),
    ("from", "falcon_h1"): ("hf_memory.conversion.falcon_h1", "convert_from_falcon_h1"),
    ("to", "falcon_h1"): ("hf_memory.conversion.falcon_h1", "convert_to_falcon_h1"),
    ("from", "hymba"): ("hf_memory.conversion.hymba", "convert_from_hymba"),
}

# (direction, format) -> (model_type, causal-LM class) that the source folder's config.json must declare
SOURCES = {
    ("from", "jamba"): ("jamba", "JambaForCausalLM"),
    ("to", "jamba"): ("hfm_jamba", "JambaHybridForCausalLM"),
    ("from", "llama"): ("llama", "LlamaForCausalLM"),
    ("from", "falcon_h1"): ("falcon_h1", "FalconH1ForCausalLM"),
    ("to", "falcon_h1"): ("hfm_hymba", "HymbaForCausalLM"),
    ("from", "hymba"): ("hymba", "HymbaForCausalLM"),
}

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
SHOWN = 6  # weight names listed in an error before "... and N more"


def converter(direction: str, fmt: str):
    """The function converting ``direction`` ("from" / "to") the public format ``fmt``."""
    if (direction, fmt) not in CONVERTERS:
        known = sorted(f"--{d} {f}" for d, f in CONVERTERS)
        raise ValueError(f"no converter {direction} {fmt!r}; available: {known}")
    module, function = CONVERTERS[(direction, fmt)]
    return getattr(importlib.import_module(module), function)


# ---------------------------------------------------------------------------------------------- source checks
def read_source_config(source) -> dict:
    """SRC's ``config.json`` as a dict; refuses a missing path, a file, a folder without (valid) config.json."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"SRC {str(source)!r} does not exist (SRC is a local checkpoint folder; "
                                f"download a Hub repository first, e.g. `hf download REPO --local-dir DIR`)")
    if not path.is_dir():
        raise ValueError(f"SRC {str(source)!r} is a file; pass the checkpoint folder that holds config.json")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"SRC {str(source)!r} has no config.json: it is not a transformers checkpoint folder")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"SRC config file {str(config_file)!r} is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"SRC config file {str(config_file)!r} holds no JSON object")
    return config


def check_source(source, direction: str, fmt: str) -> dict:
    """Refuse SRC unless its config.json declares the model that ``--{direction} {fmt}`` reads; return it."""
    config = read_source_config(source)
    model_type, model_class = SOURCES[(direction, fmt)]
    found = config.get("model_type")
    if found != model_type:
        what = f"a {found!r} checkpoint" if found else "a checkpoint without model_type in config.json"
        raise ValueError(f"SRC {str(source)!r} is {what}, --{direction} {fmt} expects model_type {model_type!r}")
    architectures = config.get("architectures") or [model_class]
    if model_class not in architectures:
        raise ValueError(f"SRC {str(source)!r} holds {', '.join(architectures)}, --{direction} {fmt} expects "
                         f"{model_class} (a causal language model with its LM head)")
    return config


def _names(names) -> str:
    names = sorted(names)
    shown = ", ".join(names[:SHOWN])
    return shown + (f" ... and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


def refuse_unmapped(what: str, missing=(), unexpected=(), mismatched=()) -> None:
    """Raise, naming the weights, unless every weight maps one to one (nothing missing, left over or reshaped)."""
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} ({_names(missing)})")
    if unexpected:
        problems.append(f"unmapped {len(unexpected)} ({_names(unexpected)})")
    if mismatched:
        problems.append(f"wrong shape {len(mismatched)} ({_names(name for name, *_ in mismatched)})")
    if problems:
        raise ValueError(f"{what}: weights do not map one to one: {'; '.join(problems)}")


def transfer(source_model, target, state_dict: dict, what: str):
    """``target`` with ``state_dict`` (the source's weights under the target's names) loaded, in the source's
    dtype and with its generation config; refuses weights that do not map one to one."""
    target = target.to(source_model.dtype)
    missing, unexpected = target.load_state_dict(state_dict, strict=False)
    refuse_unmapped(what, missing, unexpected)
    target.generation_config = source_model.generation_config
    return target


def _unreadable_weight_file(folder: Path) -> tuple[Path, str] | None:
    """The first weight file (or shard index) in ``folder`` that cannot be read, and why."""
    from safetensors import safe_open

    for path in sorted(folder.iterdir()):
        try:
            if path.name.endswith(".index.json"):
                json.loads(path.read_text(encoding="utf-8"))["weight_map"]
            elif path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as weights:
                    weights.keys()
            elif path.suffix in WEIGHT_SUFFIXES:
                import torch

                torch.load(path, map_location="meta", weights_only=True)
        except Exception as error:  # noqa: BLE001 - any failure to read is the answer we look for
            return path, " ".join(str(error).split()) or type(error).__name__
    return None


def load_source(model_class, source, **kwargs):
    """``model_class.from_pretrained(source)``, refusing unreadable weight files and weights that do not map.

    A truncated or corrupt weight file is reported by name; missing, unexpected or reshaped weights are
    reported by name instead of being silently initialised at random.
    """
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()  # the refusal below names the weights; the load report would repeat it
    logging.disable_progress_bar()
    try:
        model, info = model_class.from_pretrained(source, output_loading_info=True, ignore_mismatched_sizes=True,
                                                  **kwargs)
    except Exception:
        unreadable = _unreadable_weight_file(Path(source))
        if unreadable is None:
            raise
        path, reason = unreadable
        raise ValueError(f"SRC weight file {str(path)!r} is truncated or corrupt ({reason})") from None
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
    refuse_unmapped(f"SRC {str(source)!r} as {model_class.__name__}", info["missing_keys"],
                    info["unexpected_keys"], info["mismatched_keys"])
    return model
