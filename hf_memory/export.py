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
import re
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
# What the saver can tell the card (``save_pretrained(folder, license="mit", training="...")``); all optional.
CARD_OPTIONS = ("license", "training", "intended_use", "limitations")

REPO_PLACEHOLDER = "<namespace>/<model-name>"
LOAD = 'model = AutoModelForCausalLM.from_pretrained("{}", trust_remote_code=True)  # or: import hf_memory'
PLACEHOLDER_NOTE = f"# {REPO_PLACEHOLDER}: this model's Hub id, or the folder it was saved in (not known when saved)"

UNRECORDED_NOTICE = ("\n> **Training not recorded: these weights may be random (untrained). Not for real text.**\n")
UNRECORDED_TRAINING = (
    "Not recorded. This card was written without a description of how the weights were trained, so they may be "
    "randomly initialised (untrained) or trained on unknown data. Whoever trains them can record it with "
    "`model.save_pretrained(folder, training=\"...\")`."
)
UNRECORDED_USE = ("Research on memory architectures (tests, conversion, decoding cost). With its training not "
                  "recorded, this model is not for generating or judging real text.")
DEFAULT_USE = ("Research on memory architectures of language models; whether it suits any other use depends on "
               "the training described above.")
COMMON_LIMITATIONS = (
    "- The paper results below are the paper's, not measurements of this checkpoint.\n"
    "- Loading with `trust_remote_code=True` runs the modeling files of this repository (they import only torch "
    "and transformers): read them first."
)
CODE_LICENSE = "The modeling code files next to the weights come from hf-memory (Apache-2.0)."


def card_license(license: str | None) -> str | None:
    """A Hub licence id (lower-case, e.g. "mit", "apache-2.0", "cc-by-4.0", "other"), or None for none."""
    if license is None:
        return None
    value = str(license).strip().lower()
    if not re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", value):
        raise ValueError(f"license {license!r} is not a Hub licence id; pass an id such as 'apache-2.0', 'mit', "
                         f"'cc-by-4.0' or 'other', or leave license unset to declare none")
    return value


def _text(field: str, value) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{field} must be a non-empty string describing the model, got {value!r}")
    return value.strip()


def _provenance(training=None, intended_use=None, limitations=None) -> dict[str, str]:
    """The card's training data, intended use and limitations; plain warnings when training is not recorded."""
    training, intended_use, limitations = (_text(field, value) for field, value in
                                           zip(CARD_OPTIONS[1:], (training, intended_use, limitations)))
    common = COMMON_LIMITATIONS
    if training is None:
        common = ("- **Training not recorded**: an untrained model produces meaningless text; do not use it on "
                  "real text until it is trained and its card says how.\n" + common)
    if limitations is not None:
        common = "- " + limitations + "\n" + common
    return {
        "notice": UNRECORDED_NOTICE if training is None else "",
        "training_data": training or UNRECORDED_TRAINING,
        "intended_use": intended_use or (UNRECORDED_USE if training is None else DEFAULT_USE),
        "limitations": common,
    }


def _load_snippet(repo_id: str | None) -> str:
    if repo_id is None:
        return PLACEHOLDER_NOTE + "\n" + LOAD.format(REPO_PLACEHOLDER)
    return LOAD.format(repo_id)


def fill_repo_id(card: str, repo_id: str) -> str:
    """A card rendered without a repo id, with ``repo_id`` in its load snippet."""
    return card.replace(PLACEHOLDER_NOTE + "\n", "").replace(LOAD.format(REPO_PLACEHOLDER), LOAD.format(repo_id))


def render_model_card(model, repo_id: str | None = None, license: str | None = None, training: str | None = None,
                      intended_use: str | None = None, limitations: str | None = None) -> str:
    """The architecture's card (``modeling/<name>/model_card.md``) with this model's numbers filled in.

    ``repo_id`` goes into the load snippet (a marked placeholder without it); ``license`` (a Hub licence id)
    into the metadata (none declared without it); ``training`` / ``intended_use`` / ``limitations`` describe
    the weights (without ``training`` the card says it is not recorded and the weights may be random).
    """
    config = model.config
    architecture_package = type(model).__module__.rsplit(".", 1)[0]  # hf_memory.modeling.<name>
    template = resources.files(architecture_package).joinpath("model_card.md").read_text("utf-8")
    n_params = sum(p.numel() for p in model.parameters())
    layer_types = getattr(config, "layer_types", None) or []
    counts = {t: layer_types.count(t) for t in dict.fromkeys(layer_types)}
    license = card_license(license)
    card = template.format(
        model_type=config.model_type,
        architecture=type(model).__name__,
        parameters=f"{n_params:,}",
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        layer_types=", ".join(f"{n} × `{t}`" for t, n in counts.items()) or "n/a",
        vocab_size=config.vocab_size,
        dtype=str(model.dtype).replace("torch.", ""),
        load=_load_snippet(repo_id),
        license_text=(f"`{license}`, as declared by whoever saved these weights. " if license else
                      "None declared: the author of these weights has not chosen a licence. ") + CODE_LICENSE,
        **_provenance(training, intended_use, limitations),
    )
    if license:  # into the YAML metadata, just before the closing "---"
        card = card.replace("\n---\n", f"\nlicense: {license}\n---\n", 1)
    return card


# ---------------------------------------------------------------------------------------------- folder
def write_hub_files(model, folder: str | os.PathLike, **card) -> list[str]:
    """Add bundled code, ``auto_map`` and README.md to a folder written by ``save_pretrained``.

    ``card``: ``repo_id`` and the ``CARD_OPTIONS`` of ``render_model_card``."""
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

    (folder / "README.md").write_text(render_model_card(model, **card), encoding="utf-8")
    return sorted(files) + ["config.json", "README.md"]


def upload_folder(folder, repo_id: str | None = None, commit_message: str | None = None, create_pr: bool = False,
                  private: bool | None = None, token: str | None = None, revision: str | None = None):
    """Create the Hub repository if needed and upload the folder as one commit."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_id = repo_id or Path(folder).resolve().name
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    readme = Path(folder) / "README.md"
    if readme.is_file():  # a card saved without a repo id learns it now
        readme.write_text(fill_repo_id(readme.read_text(encoding="utf-8"), repo_id), encoding="utf-8")
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        commit_message=commit_message or "Upload hf-memory model",
        create_pr=create_pr,
        revision=revision,
    )


def push_to_hub(model, repo_id: str, max_shard_size="5GB", **hub_kwargs):
    """``model.push_to_hub``: the same files as ``save_pretrained(folder, repo_id=repo_id)``, uploaded.

    ``CARD_OPTIONS`` (``license=``, ``training=`` ...) go to the model card."""
    hub_kwargs.pop("tags", None)
    card = {option: hub_kwargs.pop(option) for option in CARD_OPTIONS if option in hub_kwargs}
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, max_shard_size=max_shard_size, repo_id=repo_id, **card)
        return upload_folder(folder, repo_id=repo_id, **hub_kwargs)
