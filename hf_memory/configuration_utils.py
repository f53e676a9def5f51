"""Validation shared by every hf_memory config: each bad value raises ``ValueError`` naming its field.

A config's ``validate_architecture()`` runs these checks; its ``__post_init__`` calls it before transformers'
own post-init (which would silently remap legacy layer names such as ``"mamba"``) so that the error is a plain
``ValueError`` naming the field, as ``PreTrainedConfig`` raises for its own fields.
"""

from __future__ import annotations

import difflib
import functools
import math
from collections.abc import Iterable
from dataclasses import fields
from typing import ClassVar

from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassFieldValidationError
from transformers import PreTrainedConfig
from transformers import configuration_utils as hf_configuration_utils
from transformers.activations import ACT2FN
from transformers.generation import GenerationConfig

# keyword arguments transformers itself gives a config beyond its dataclass fields
TRANSFORMERS_KWARGS = frozenset({
    "attn_implementation", "experts_implementation", "output_attentions", "torch_dtype", "rope_scaling",
    "rope_theta", "partial_rotary_factor", "name_or_path", "_name_or_path", "_commit_hash", "transformers_version",
    "model_type", "auto_map", "per_layer_config", "num_labels", "_attn_implementation_internal",
    "_experts_implementation_internal", "quantization_config", "use_kernels",
})


def strict_config(cls):
    """``huggingface_hub``'s ``@strict`` (typed fields, ``validate_*`` methods), with a wrongly typed field
    (``hidden_size="64"``) reported as the ``ValueError`` naming it that every other bad value raises."""
    cls = strict(cls)
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        try:
            init(self, *args, **kwargs)
        except StrictDataclassFieldValidationError as error:
            raise ValueError(f"invalid config field `{error.field}`: {error.__cause__}") from error

    cls.__init__ = __init__
    return cls


def register_layer_type(name: str) -> None:
    """Make transformers' base config accept a layer type of ours (``Trainer`` re-reads checkpoints' configs with
    ``PreTrainedConfig``, whose validation knows only transformers' own layer types)."""
    if name not in hf_configuration_utils.ALLOWED_ATTN_LAYER_TYPES:
        hf_configuration_utils.ALLOWED_ATTN_LAYER_TYPES = (*hf_configuration_utils.ALLOWED_ATTN_LAYER_TYPES, name)


def require(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ValueError(f"invalid config field `{field}`: {message}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def require_positive(config, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        require(_is_int(value) and value > 0, name, f"must be a positive integer, got {value!r}")


def require_finite(config, *names: str, positive: bool = False) -> None:
    for name in names:
        value = getattr(config, name)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        require(ok and (value > 0 or not positive), name,
                f"must be a finite{' positive' if positive else ''} number, got {value!r}")


def require_layer_types(config, allowed: Iterable[str], field: str = "layer_types") -> None:
    require_positive(config, "num_hidden_layers")
    allowed = tuple(allowed)
    layer_types = getattr(config, field)
    require(
        isinstance(layer_types, (list, tuple)) and len(layer_types) == config.num_hidden_layers,
        field,
        f"must list one type per layer (num_hidden_layers={config.num_hidden_layers}), got {layer_types!r}",
    )
    for i, layer_type in enumerate(layer_types):
        require(layer_type in allowed, field, f"entry {i} is {layer_type!r}; this architecture has {list(allowed)}")


def require_common(config) -> None:
    """The fields every architecture shares: sizes, norms, activation, positions, RoPE, dropout."""
    require_positive(config, "vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size",
                     "max_position_embeddings")
    require_finite(config, "rms_norm_eps", positive=True)
    require_finite(config, "initializer_range")
    require(config.initializer_range >= 0, "initializer_range", f"must be >= 0, got {config.initializer_range}")
    require(config.hidden_act in ACT2FN, "hidden_act",
            f"unknown activation {config.hidden_act!r}; known: {sorted(ACT2FN)[:12]}...")
    require(isinstance(config.attention_dropout, (int, float)) and 0.0 <= config.attention_dropout < 1.0,
            "attention_dropout", f"must be in [0, 1), got {config.attention_dropout!r}")


def require_attention(config, rope: bool = True) -> None:
    """Attention heads: positive, KV heads dividing query heads, an even head_dim where RoPE rotates it."""
    require_positive(config, "num_attention_heads", "num_key_value_heads", "head_dim")
    require(config.num_attention_heads % config.num_key_value_heads == 0, "num_key_value_heads",
            f"must divide num_attention_heads ({config.num_attention_heads}), got {config.num_key_value_heads}")
    require(not rope or config.head_dim % 2 == 0, "head_dim", f"must be even for RoPE, got {config.head_dim}")


def require_rope(config) -> None:
    rope = config.rope_parameters
    require(isinstance(rope, dict), "rope_parameters", f"must be a dict, got {rope!r}")
    theta = rope.get("rope_theta")
    require(isinstance(theta, (int, float)) and math.isfinite(theta) and theta > 0, "rope_parameters",
            f"rope_theta must be a finite positive number, got {theta!r}")


def reject_unknown_keys(config_class, keys: Iterable[str]) -> None:
    """A key that is neither a field of ``config_class`` nor a keyword transformers itself passes is a typo:
    refuse it, naming the closest field."""
    known = {f.name for f in fields(config_class)} | TRANSFORMERS_KWARGS
    known |= set(GenerationConfig._get_default_generation_params())
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            raise ValueError(f"unknown config field `{key}` for {config_class.__name__}{hint}")


def reject_typos(config_class, keys: Iterable[str]) -> None:
    """Extra keyword arguments close to a field name (``hiden_size``) are refused; others (attributes
    transformers or other libraries add to configs) pass."""
    names = sorted(f.name for f in fields(config_class))
    for key in keys:
        if key in TRANSFORMERS_KWARGS:
            continue
        close = difflib.get_close_matches(key, names, n=1, cutoff=0.85)
        if close:
            raise ValueError(f"unknown config field `{key}` for {config_class.__name__}; did you mean `{close[0]}`?")


@strict_config
class HFMemoryConfig(PreTrainedConfig):
    """What every architecture's config does on construction: refuse typos, fill the defaults derived from
    other fields, check ``layer_types`` before transformers remaps legacy names (``"mamba"``), run
    transformers' post-init, then the architecture's ``validate_architecture()``.

    The fields below are the ones every architecture shares with Llama, with Llama's defaults; an architecture
    declares its sizes and its own fields, and redeclares one of these only to change its default."""

    layer_type_choices: ClassVar[tuple[str, ...]] = ()  # the layer types the architecture has; the first is the default
    # muP factors on the embeddings and the logits (fields of the architectures that have them: Falcon-H1)
    embedding_multiplier: ClassVar[float] = 1.0
    lm_head_multiplier: ClassVar[float] = 1.0

    layer_types: list[str] | None = None
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    def __post_init__(self, **kwargs):
        reject_typos(type(self), kwargs)
        self.fill_defaults()
        require_layer_types(self, self.layer_type_choices)
        super().__post_init__(**kwargs)
        self.validate_architecture()

    def fill_defaults(self) -> None:
        """``layer_types`` all of the first choice, MHA, ``head_dim = hidden_size / num_attention_heads``."""
        if self.layer_types is None and _is_int(self.num_hidden_layers):
            self.layer_types = [self.layer_type_choices[0]] * self.num_hidden_layers
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and _is_int(self.hidden_size) and _is_int(self.num_attention_heads):
            self.head_dim = self.hidden_size // max(self.num_attention_heads, 1)

    def validate_layer_type(self):
        require_layer_types(self, self.layer_type_choices)
