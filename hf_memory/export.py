"""Hub-ready export: self-contained modeling code, ``auto_map`` and a model card next to the weights.

The modeling code of an architecture imports shared pieces from ``hf_memory`` (ops, layers, cache helpers).
A Hub folder must load where hf_memory is not installed, so the export *bundles* the code: it follows the
module-level ``hf_memory`` imports of the config and model modules, writes each module it reaches as one flat
file in the folder, and rewrites those imports into relative ones (``from .gated_delta import ...``), which
is the layout transformers' remote-code loader understands. Optional kernel packages are only ever imported
through ``importlib`` inside ``hf_memory.kernels``, so the bundle requires nothing beyond torch and
transformers.
"""

from __future__ import annotations

import ast
import json
import os
import sys
import tempfile
from importlib import resources
from pathlib import Path

PACKAGE = "hf_memory"


# ---------------------------------------------------------------------------------------------- code bundle
def _resolve(module_name: str, node: ast.ImportFrom) -> str | None:
    """Absolute module named by ``from X import ...`` inside ``module_name``, if it is part of hf_memory."""
    if node.level:
        base = module_name.split(".")[: -node.level]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    return target if target == PACKAGE or target.startswith(PACKAGE + ".") else None


def _source_of(module_name: str) -> tuple[str, str]:
    module = sys.modules.get(module_name) or __import__(module_name, fromlist=["_"])
    path = Path(module.__file__)
    if path.name == "__init__.py":
        raise ValueError(
            f"exportable modules must import from concrete modules, not from the package {module_name!r}"
        )
    return path.stem, path.read_text(encoding="utf-8")


def bundle_modules(*root_modules: str) -> dict[str, str]:
    """Flat file name -> rewritten source for the roots and every hf_memory module they import at top level."""
    pending, seen, flat_name = list(root_modules), set(), {}
    sources: dict[str, tuple[str, str]] = {}
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        stem, text = _source_of(name)
        if stem in flat_name.values():
            raise ValueError(f"two exported modules share the file name {stem}.py: rename one of them")
        flat_name[name] = stem
        sources[name] = (stem, text)
        for node in ast.parse(text).body:
            if isinstance(node, ast.Import) and any(a.name.split(".")[0] == PACKAGE for a in node.names):
                raise ValueError(f"{name}: use `from hf_memory.x import y` (not `import hf_memory.x`) to be exportable")
            if isinstance(node, ast.ImportFrom) and (target := _resolve(name, node)) is not None:
                pending.append(target)

    files = {}
    for name, (stem, text) in sources.items():
        lines = text.splitlines(keepends=True)
        edits = []
        for node in ast.parse(text).body:
            if isinstance(node, ast.ImportFrom) and (target := _resolve(name, node)) is not None:
                rewritten = ast.ImportFrom(module=flat_name[target], names=node.names, level=1)
                edits.append((node.lineno, node.end_lineno, ast.unparse(rewritten) + "\n"))
        for start, end, replacement in sorted(edits, reverse=True):
            lines[start - 1 : end] = [replacement]
        files[f"{stem}.py"] = "".join(lines)
    return files


# ---------------------------------------------------------------------------------------------- model card
def render_model_card(model) -> str:
    """The architecture's card from ``model_cards/<card>.md`` with this model's numbers filled in."""
    config = model.config
    template = resources.files("hf_memory.model_cards").joinpath(f"{model.model_card}.md").read_text("utf-8")
    n_params = sum(p.numel() for p in model.parameters())
    layer_types = getattr(config, "layer_types", None) or []
    counts = {t: layer_types.count(t) for t in dict.fromkeys(layer_types)}
    return template.format(
        model_type=config.model_type,
        architecture=type(model).__name__,
        parameters=f"{n_params:,}",
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        layer_types=", ".join(f"{n} × `{t}`" for t, n in counts.items()) or "n/a",
        vocab_size=config.vocab_size,
        dtype=str(model.dtype).replace("torch.", ""),
    )


# ---------------------------------------------------------------------------------------------- folder
def write_hub_files(model, folder: str | os.PathLike) -> list[str]:
    """Add bundled code, ``auto_map`` and README.md to a folder written by ``save_pretrained``."""
    folder = Path(folder)
    config_module = type(model.config).__module__
    model_module = type(model).__module__
    files = bundle_modules(config_module, model_module)
    for file_name, text in files.items():
        (folder / file_name).write_text(text, encoding="utf-8")

    config_file = folder / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config_stem, model_stem = config_module.rsplit(".", 1)[1], model_module.rsplit(".", 1)[1]
    auto_map = {"AutoConfig": f"{config_stem}.{type(model.config).__name__}"}
    for auto_class, model_class in sys.modules[model_module].AUTO_MAP.items():
        auto_map[auto_class] = f"{model_stem}.{model_class.__name__}"
    config["auto_map"] = auto_map
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    (folder / "README.md").write_text(render_model_card(model), encoding="utf-8")
    return sorted(files) + ["config.json", "README.md"]


def upload_folder(folder, repo_id: str | None = None, commit_message: str | None = None, create_pr: bool = False,
                  private: bool | None = None, token: str | None = None, revision: str | None = None):
    """Create the Hub repository if needed and upload the folder as one commit."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_id = repo_id or Path(folder).resolve().name
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        commit_message=commit_message or "Upload hf-memory model",
        create_pr=create_pr,
        revision=revision,
    )


def push_to_hub(model, repo_id: str, max_shard_size="5GB", **hub_kwargs):
    """``model.push_to_hub``: the same files as ``save_pretrained`` (code, card included), uploaded."""
    hub_kwargs.pop("tags", None)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, max_shard_size=max_shard_size)
        return upload_folder(folder, repo_id=repo_id, **hub_kwargs)
