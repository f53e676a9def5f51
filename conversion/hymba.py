"""NVIDIA's published Hymba checkpoints (``nvidia/Hymba-1.5B-Base`` layout: remote-code ``HymbaForCausalLM``,
``model_type`` "hymba") -> hf-memory's parallel hybrid (``hfm_hymba``).

The published code runs only on CUDA (mamba-ssm kernels, flex attention built on the GPU at construction), so
the weights are read from the folder's files, not through that code. Its layer packs every input projection in
one matrix, ``mamba.in_proj`` = [q | k | v | x | z] rows ([q | x | z] in a layer that reuses another's KV),
which is split here into the attention heads' q / k / v and the SSM's [x | z]; ``pre_avg_layernorm1/2`` are the
fusion's beta_1 / beta_2; the single expert ``moe.experts.0`` is the SwiGLU FFN. Its sliding-window mask admits
``q - k <= sliding_window``, i.e. ``sliding_window + 1`` keys: hf-memory's window counts keys including the
query's own, so the window grows by one. NTK RoPE (``rope_type="ntk"``, factor 2) becomes the equivalent base.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from hf_memory.conversion import check_source, refuse_unmapped
from hf_memory.modeling.hymba.configuration_hymba import HymbaConfig
from hf_memory.modeling.hymba.modeling_hymba import HymbaForCausalLM

NTK_FACTOR = 2  # fixed in the published code


def config_from_hymba(source: dict) -> HymbaConfig:
    """hf-memory's config from the published ``config.json`` (a dict); refuses what has no equivalent here."""
    refuse = {
        "kq_norm": (source.get("kq_norm", "none") in ("none", None), "q / k norms are not implemented"),
        "num_experts": (source.get("num_experts", 1) == 1, "mixture-of-experts Hymba is not implemented"),
        "memory_tokens_interspersed_every": (not source.get("memory_tokens_interspersed_every"),
                                             "interspersed meta tokens are not implemented"),
        "mlp_hidden_act": (source.get("mlp_hidden_act", "silu") == "silu", "only the SwiGLU FFN is implemented"),
        "hidden_act": (source.get("hidden_act", "silu") == "silu", "the SSM conv uses SiLU here"),
        "rope": (source.get("rope", False), "Hymba without RoPE is not implemented"),
        "rope_type": (source.get("rope_type") in (None, "ntk"), "only the NTK RoPE of the published model"),
    }
    for field, (ok, why) in refuse.items():
        if not ok:
            raise ValueError(f"Hymba config field {field}={source.get(field)!r}: {why}")
    hidden, heads, layers = source["hidden_size"], source["num_attention_heads"], source["num_hidden_layers"]
    attn_hidden = source.get("attn_hidden_size", -1)
    attn_hidden = hidden if attn_hidden in (-1, None) else attn_hidden
    head_dim = source.get("kq_head_dim", -1)
    head_dim = attn_hidden // heads if head_dim in (-1, None) else head_dim
    d_ssm = source.get("mamba_expand", 2) * hidden
    theta = source.get("rope_theta", 10000.0)
    if source.get("rope_type") == "ntk":
        ratio = NTK_FACTOR * source["max_position_embeddings"] / source["orig_max_position_embeddings"]
        theta = theta * (ratio - (NTK_FACTOR - 1)) ** (head_dim / (head_dim - 2))
    global_layers = set(source.get("global_attn_idx") or range(layers))
    window = source.get("sliding_window")
    return HymbaConfig(
        vocab_size=source["vocab_size"], hidden_size=hidden, intermediate_size=source["intermediate_size"],
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=source["num_key_value_heads"],
        head_dim=head_dim, attention_value_head_dim=d_ssm // heads, fusion="mean",
        num_memory_tokens=source.get("num_memory_tokens", 0), kv_reuse_groups=source.get("kv_reuse_group") or [],
        sliding_window=None if window is None else window + 1,
        layer_types=["parallel_attention" if window is None or i in global_layers else "parallel_sliding_attention"
                     for i in range(layers)],
        rope_parameters={"rope_type": "default", "rope_theta": theta},
        max_position_embeddings=source["max_position_embeddings"], rms_norm_eps=source.get("rms_norm_eps", 1e-6),
        mamba_version="mamba1", mamba_d_state=source["mamba_d_state"], mamba_d_conv=source["mamba_d_conv"],
        mamba_expand=source.get("mamba_expand", 2), mamba_dt_rank=source.get("mamba_dt_rank", "auto"),
        mamba_conv_bias=source.get("mamba_conv_bias", True), mamba_proj_bias=source.get("mamba_proj_bias", False),
        mamba_inner_norms=source.get("mamba_inner_layernorms", True),
        tie_word_embeddings=source.get("tie_word_embeddings", False),
        initializer_range=source.get("initializer_range", 0.02), pad_token_id=source.get("pad_token_id", 0),
        bos_token_id=source.get("bos_token_id", 1), eos_token_id=source.get("eos_token_id", 2),
    )


# published name (after ``model.layers.{i}.``) -> ours
LAYER_NAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "pre_moe_layernorm.weight": "pre_ff_layernorm.weight",
    "moe.experts.0.gate_proj.weight": "feed_forward.gate_proj.weight",
    "moe.experts.0.up_proj.weight": "feed_forward.up_proj.weight",
    "moe.experts.0.down_proj.weight": "feed_forward.down_proj.weight",
    "mamba.conv1d.weight": "mixer.mamba.conv1d.weight",
    "mamba.conv1d.bias": "mixer.mamba.conv1d.bias",
    "mamba.x_proj.0.weight": "mixer.mamba.x_proj.weight",
    "mamba.dt_proj.0.weight": "mixer.mamba.dt_proj.weight",
    "mamba.dt_proj.0.bias": "mixer.mamba.dt_proj.bias",
    "mamba.A_log.0": "mixer.mamba.A_log",
    "mamba.D.0": "mixer.mamba.D",
    "mamba.dt_layernorm.weight": "mixer.mamba.dt_layernorm.weight",
    "mamba.B_layernorm.weight": "mixer.mamba.b_layernorm.weight",
    "mamba.C_layernorm.weight": "mixer.mamba.c_layernorm.weight",
    "mamba.pre_avg_layernorm1.weight": "mixer.attn_norm.weight",
    "mamba.pre_avg_layernorm2.weight": "mixer.ssm_norm.weight",
    "mamba.out_proj.weight": "mixer.out_proj.weight",
}
TOP_NAMES = {"model.embed_tokens.weight": "model.embed_tokens.weight", "model.memory_tokens": "model.memory_tokens",
             "model.final_layernorm.weight": "model.final_layernorm.weight", "lm_head.weight": "lm_head.weight"}


def in_proj_rows(config: HymbaConfig, layer_idx: int) -> dict[str, int]:
    """The row blocks of a published layer's ``mamba.in_proj``, in order."""
    rows = {"q_proj": config.num_attention_heads * config.head_dim}
    if config.kv_source(layer_idx) == layer_idx:
        rows["k_proj"] = config.num_key_value_heads * config.head_dim
        rows["v_proj"] = config.num_key_value_heads * config.attention_value_head_dim
    rows["mamba.in_proj"] = 2 * config.mamba_d_ssm  # [x | z]
    return rows


def rename_from_hymba(state_dict: dict[str, torch.Tensor], config: HymbaConfig) -> dict[str, torch.Tensor]:
    """Published names -> ours; ``in_proj`` split by ``in_proj_rows``; unknown names are kept (and refused)."""
    renamed = {}
    for name, tensor in state_dict.items():
        if name in TOP_NAMES:
            renamed[TOP_NAMES[name]] = tensor
            continue
        prefix, _, rest = name.partition(".layers.")
        index, _, key = rest.partition(".")
        if prefix != "model" or not index.isdigit():
            renamed[name] = tensor
            continue
        ours = f"model.layers.{index}."
        if key == "mamba.in_proj.weight":
            blocks = in_proj_rows(config, int(index))
            if tensor.shape[0] != sum(blocks.values()):
                raise ValueError(f"{name} has {tensor.shape[0]} rows; the config implies {sum(blocks.values())} "
                                 f"({' + '.join(f'{k} {v}' for k, v in blocks.items())})")
            for block, part in zip(blocks, tensor.split(list(blocks.values()))):
                module = f"mixer.{block}" if block.startswith("mamba") else f"mixer.self_attn.{block}"
                renamed[ours + module + ".weight"] = part
        else:
            renamed[ours + LAYER_NAMES.get(key, key)] = tensor
    return renamed


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's ``*.safetensors`` (or ``pytorch_model*.bin``) files."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if files:
        return {name: t for path in files for name, t in load_file(str(path)).items()}
    files = sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise ValueError(f"SRC {str(folder)!r} has no *.safetensors or pytorch_model*.bin weight files")
    return {name: t for path in files for name, t in torch.load(path, map_location="cpu", weights_only=True).items()}


def convert_from_hymba(source: str, destination: str, dtype: torch.dtype | None = None) -> HymbaForCausalLM:
    """Read a published Hymba folder (NVIDIA's remote-code layout), write an hf-memory (Hub-ready) folder."""
    check_source(source, "from", "hymba")
    config = config_from_hymba(json.loads((Path(source) / "config.json").read_text(encoding="utf-8")))
    weights = rename_from_hymba(read_weights(Path(source)), config)
    model = HymbaForCausalLM(config)
    expected = model.state_dict()
    if config.tie_word_embeddings:
        weights.setdefault("lm_head.weight", weights.get("model.embed_tokens.weight"))
    mismatched = [(n, t.shape) for n, t in weights.items() if n in expected and t.shape != expected[n].shape]
    refuse_unmapped("published Hymba -> hf-memory parallel hybrid", set(expected) - set(weights),
                    set(weights) - set(expected), mismatched)
    model.load_state_dict(weights)
    model = model.to(dtype or next(iter(weights.values())).dtype)
    model.save_pretrained(destination)
    return model
