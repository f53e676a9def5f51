"""Logit parity of ``hf-memory convert --from hymba`` against NVIDIA's published Hymba code, on a tiny random model.

What it measures: NVIDIA's remote code for ``nvidia/Hymba-1.5B-Base`` (``modeling_hymba.py`` +
``configuration_hymba.py``, ``model_type`` "hymba") builds a tiny random ``HymbaForCausalLM`` in the layout of
hf-memory's ``hymba-tiny`` preset (vocab 128, hidden 64, FFN 128, 4 layers, 4 heads / 2 KV heads, SSM state 8,
conv 4, expand 2, global layers 0 and 3, sliding window 7 elsewhere (NVIDIA's window admits q - k <= 7), 4 meta
tokens, KV shared by layers 1 and 2, NTK RoPE, tied embeddings), with every parameter re-drawn with a visible
spread (norm weights, D, A_log, dt bias and meta tokens too), and saves it with ``save_pretrained``. It computes
fp32 logits on a fixed 2 x 40 batch (longer than the window, no padding) and greedy continuations. In this
process the folder is converted with ``hf-memory convert --from hymba``, loaded with ``AutoModelForCausalLM``, run
on the same ids, and compared: max abs logit error, argmax agreement, per-layer hidden-state error, greedy
generation agreement (with and without cache), two negative controls (the converted model with the window not
widened by one, and with RoPE's plain base instead of the NTK base) to show the comparison can see such slips,
and whether the published ``sdpa`` path runs.

The published side runs on CPU in its own virtualenv (the code needs transformers 4.44-4.47) with:
- ``benchmarks/cpu_mamba_stubs.py``: pure-PyTorch stand-ins for ``mamba_ssm`` (``selective_scan_fn``,
  ``selective_state_update``), ``causal_conv1d`` (``causal_conv1d_fn``, ``causal_conv1d_update``) and
  ``flash_attn`` (``flash_attn_func``), written from the kernels' documented math;
- five runtime patches, no edit of the published files: ``create_block_mask`` on "cpu" (the code builds flex
  block masks on "cuda"); ``torch.compile`` as the identity (flex attention runs eagerly); ``_init_rope`` without
  its hard-coded ``device="cuda"``; ``mixer_forward`` without its "weights must be on CUDA" check; and
  ``config._pre_quantization_dtype = float32`` (the fp32 branch of the flex attention reads ``self.q_proj``, which
  the parallel block does not have). The attention is the published ``flex`` path (the one its config.json
  names): its ``sdpa`` path builds the mask for the text length, not text + meta tokens (reported below).
  ``seq_length`` is set to the batch's length so the block mask precompiled at construction fits it exactly
  (recent torch refuses a larger block mask; the published code only rebuilds it for short or longer inputs).

Setup (once; NVIDIA's two files in a folder, from the Hugging Face repo nvidia/Hymba-1.5B-Base or a verbatim
mirror of it; the results file was made with the copy in GitHub BharadwajYR/hackathon_mlops @ 6d3b76f, whose
config.json says transformers 4.44.0: modeling_hymba.py sha256 4ee8e69e92ea..., configuration_hymba.py
22b7283f1f12..., as the header line of the output prints them):

    python -m venv /tmp/nvhymba/venv
    /tmp/nvhymba/venv/bin/pip install torch==2.13.0        # the CPU wheel; install torch first
    /tmp/nvhymba/venv/bin/pip install transformers==4.47.0 safetensors einops
    python benchmarks/hymba_nvidia_parity.py --published /tmp/nvhymba/published \\
        --python /tmp/nvhymba/venv/bin/python --output benchmarks/results/hymba_nvidia_parity.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

# Runs in the published code's virtualenv; its argument is one JSON object (see main()).
DRIVER = r'''
import hashlib, json, shutil, sys, tempfile, traceback
from pathlib import Path
import torch

args = json.loads(sys.argv[1])
torch.set_num_threads(1)
sys.path.insert(0, args["stubs_dir"])
import cpu_mamba_stubs
cpu_mamba_stubs.install()

import torch.nn.attention.flex_attention as fa
_create_block_mask = fa.create_block_mask


def create_block_mask_cpu(*a, **k):  # patch 1: the published code builds block masks on "cuda"
    k["device"] = "cpu"
    k.pop("_compile", None)
    return _create_block_mask(*a, **k)


fa.create_block_mask = create_block_mask_cpu
torch.compile = lambda fn=None, *a, **k: fn  # patch 2: flex_attention runs eagerly

pkg = Path(tempfile.mkdtemp()) / "nv_hymba_published"
pkg.mkdir()
(pkg / "__init__.py").write_text("")
for name in ("modeling_hymba.py", "configuration_hymba.py"):
    shutil.copy(Path(args["published"]) / name, pkg / name)
sys.path.insert(0, str(pkg.parent))
from nv_hymba_published import modeling_hymba as nv
from nv_hymba_published.configuration_hymba import HymbaConfig


def _init_rope_cpu(self):  # patch 3: _init_rope hard-codes device=torch.device("cuda")
    self.rotary_emb = nv.LlamaRotaryEmbedding(config=self.config, dim=self.kq_head_dim, base=self.rope_theta,
                                              device=None)


def _mixer_forward_cpu(self, hidden_states, cache_params=None, attention_mask=None, position_ids=None,
                       kv_last_layer=None, use_cache=False, use_swa=False):
    # patch 4: mixer_forward refuses weights that are not on CUDA; the same call without that check
    return self.cuda_kernels_forward(hidden_states, cache_params, attention_mask=attention_mask,
                                     position_ids=position_ids, kv_last_layer=kv_last_layer, use_cache=use_cache,
                                     use_swa=use_swa)


nv.HymbaAttention._init_rope = _init_rope_cpu
nv.HymbaBlock.mixer_forward = _mixer_forward_cpu
W, L, M = args["window"], args["length"], 4


def make_config(attn):
    return HymbaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, hidden_act="silu", mlp_hidden_act="silu", rms_norm_eps=1e-6, use_cache=False,
        sliding_window=W, max_position_embeddings=512, orig_max_position_embeddings=128, num_experts=1,
        num_experts_per_tok=1, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank="auto",
        mamba_conv_bias=True, mamba_proj_bias=False, mamba_inner_layernorms=True, kv_reuse_every_i_layer=-1,
        kv_reuse_group=[[1, 2]], kv_weight_reuse=False, global_attn_idx=[0, 3], num_mamba=1,
        attn_implementation_new=attn, rope_type="ntk", attn_hidden_size=-1, kq_head_dim=-1, v_head_dim=32,
        kq_norm="none", rope=True, rope_theta=10000.0, num_memory_tokens=M, memory_tokens_interspersed_every=0,
        seq_length=L, tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        initializer_range=0.02,
    )


def reinit(model):
    g = torch.Generator().manual_seed(args["seed"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            parts = name.split(".")
            leaf = parts[-2] if parts[-1].isdigit() else parts[-1]  # A_log.0, D.0 are ParameterLists
            if "layernorm" in name or leaf == "D":
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif leaf == "A_log":
                base = torch.log(torch.arange(1, p.shape[1] + 1).float())[None]
                p.copy_(base + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("dt_proj.0.bias"):
                p.copy_(-2.0 + 0.5 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name or "memory_tokens" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:  # Linear and conv weights: 1 / sqrt(fan_in)
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)


out = {"versions": {"torch": str(torch.__version__), "transformers": str(__import__("transformers").__version__),
                    "sha256": {n: hashlib.sha256((Path(args["published"]) / n).read_bytes()).hexdigest()
                               for n in ("modeling_hymba.py", "configuration_hymba.py")}}}
config = make_config("flex")
model = nv.HymbaForCausalLM(config).eval()
reinit(model)
assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "lm_head is not tied"
config.auto_map = {"AutoConfig": "configuration_hymba.HymbaConfig",
                   "AutoModelForCausalLM": "modeling_hymba.HymbaForCausalLM"}
dst = Path(args["save_to"])
model.save_pretrained(dst, safe_serialization=True)
for name in ("modeling_hymba.py", "configuration_hymba.py"):
    shutil.copy(Path(args["published"]) / name, dst / name)
config._pre_quantization_dtype = torch.float32  # patch 5: the fp32 flex branch reads a q_proj that does not exist
model.generation_config.eos_token_id = None  # generate the full count

ids = torch.randint(3, 128, (args["batch"], L), generator=torch.Generator().manual_seed(args["seed"] + 1))
out["ids"] = ids
with torch.no_grad():
    res = model(ids, use_cache=False, output_hidden_states=True)
out["logits"], out["hidden_states"] = res.logits, list(res.hidden_states)
N = args["new_tokens"]


def greedy_nocache(seq):
    start = seq.shape[1]
    for _ in range(N):
        with torch.no_grad():
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], 1)
    return seq[:, start:]


def cached(tag):
    """generate() with the published cache; its step logits and the full forward's on the same sequence."""
    try:
        with torch.no_grad():
            g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N, do_sample=False,
                               use_cache=True, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
            tokens = g.sequences[:, L:]
            out[tag] = tokens
            out[tag + "_logits"] = torch.stack(g.logits, 1).float()
            out[tag + "_refit"] = model(g.sequences[:, :-1], use_cache=False).logits[:, L - 1:]
    except Exception as e:
        out[tag + "_error"] = "".join(traceback.format_exception_only(type(e), e)).strip()
        traceback.print_exc()


out["gen_nocache"] = greedy_nocache(ids)
cached("gen_cache")


def decode_window(module, a, kw):  # decode steps trim the cache with sliding_window + 1 (prefill unchanged)
    ids_ = kw.get("input_ids", a[0] if a else None)
    config.sliding_window = W + 1 if ids_.shape[1] == 1 else W


hook = model.register_forward_pre_hook(decode_window, with_kwargs=True)
cached("gen_cache_w1")
hook.remove()
config.sliding_window = W

try:  # the sdpa path of the same code and weights
    sd = nv.HymbaForCausalLM(make_config("sdpa")).eval()
    sd.load_state_dict(model.state_dict())
    with torch.no_grad():
        out["sdpa_logits"] = sd(ids, use_cache=False).logits
except Exception as e:
    out["sdpa_error"] = "".join(traceback.format_exception_only(type(e), e)).strip()
torch.save(out, args["out"])
print("published side done")
'''


def stub_self_checks() -> dict[str, float]:
    """The stubs against each other and against torch: scan vs step-by-step update, conv fn vs nn.Conv1d and
    vs step-by-step update, flash stub vs torch SDPA (causal)."""
    sys.path.insert(0, str(HERE))
    import cpu_mamba_stubs as s

    g = torch.Generator().manual_seed(0)
    b, d, n, length, w = 2, 6, 4, 9, 4
    u, delta, z = (torch.randn(b, d, length, generator=g) for _ in range(3))
    A = -torch.rand(d, n, generator=g) - 0.5
    B, C = torch.randn(b, n, length, generator=g), torch.randn(b, n, length, generator=g)
    D, bias = torch.randn(d, generator=g), torch.randn(d, generator=g)
    y, last = s.selective_scan_fn(u, delta, A, B, C, D, z=z, delta_bias=bias, delta_softplus=True,
                                  return_last_state=True)
    state, steps = torch.zeros(b, d, n), []
    for t in range(length):
        steps.append(s.selective_state_update(state, u[..., t], delta[..., t], A, B[..., t], C[..., t], D,
                                              z[..., t], bias, dt_softplus=True))
    scan = max((y - torch.stack(steps, -1)).abs().max().item(), (last - state).abs().max().item())
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(d, d, w, groups=d, padding=w - 1)
    with torch.no_grad():
        ref = torch.nn.functional.silu(conv(u)[..., :length])
        fn = s.causal_conv1d_fn(u, conv.weight[:, 0], conv.bias, activation="silu")
        cstate, csteps = torch.zeros(b, d, w), []
        for t in range(length):
            csteps.append(s.causal_conv1d_update(u[..., t], cstate, conv.weight[:, 0], conv.bias, "silu"))
    conv_err = max((fn - ref).abs().max().item(), (torch.stack(csteps, -1) - ref).abs().max().item())
    q, k, v = (torch.randn(b, 7, 4, 8, generator=g) for _ in range(3))
    sdpa = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                            is_causal=True).transpose(1, 2)
    flash = (s.flash_attn_func(q, k, v, causal=True) - sdpa).abs().max().item()
    return {"selective_scan_fn vs selective_state_update steps": scan,
            "causal_conv1d_fn / _update vs nn.Conv1d + SiLU": conv_err,
            "flash_attn_func (causal) vs torch SDPA": flash}


def agree(a: torch.Tensor, b: torch.Tensor) -> str:
    return f"{int((a == b).sum())}/{a.numel()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--published", required=True,
                        help="folder with NVIDIA's modeling_hymba.py and configuration_hymba.py")
    parser.add_argument("--python", required=True, help="python of a virtualenv with transformers 4.44-4.47")
    parser.add_argument("--workdir", default=None, help="where the tiny published / converted models go (temp)")
    parser.add_argument("--window", type=int, default=7, help="NVIDIA sliding_window (admits q - k <= window)")
    parser.add_argument("--length", type=int, default=40)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="write the markdown table here too")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="hymba_parity_"))
    work.mkdir(parents=True, exist_ok=True)
    published_dir, ours_dir = work / "tiny_published", work / "ours"
    driver = work / "published_driver.py"
    driver.write_text(DRIVER)
    spec = {"seed": args.seed, "stubs_dir": str(HERE), "published": str(Path(args.published).resolve()),
            "window": args.window, "save_to": str(published_dir), "batch": args.batch, "length": args.length,
            "new_tokens": args.new_tokens, "out": str(work / "published_out.pt")}
    subprocess.run([args.python, str(driver), json.dumps(spec)], check=True)
    nv = torch.load(work / "published_out.pt")

    import hf_memory  # noqa: F401 - registers the architectures
    from hf_memory.cli import main as cli
    from transformers import AutoModelForCausalLM

    if cli(["convert", "--from", "hymba", str(published_dir), str(ours_dir), "--force"]) != 0:
        raise SystemExit("hf-memory convert failed")

    def load(**overrides):
        model = AutoModelForCausalLM.from_pretrained(ours_dir, dtype=torch.float32, **overrides).eval()
        model.generation_config.eos_token_id = None
        return model

    ids, L, N = nv["ids"], args.length, args.new_tokens
    model = load()
    with torch.no_grad():
        res = model(ids, output_hidden_states=True)
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N, do_sample=False,
                             use_cache=True, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        ours_gen = gen.sequences[:, L:]
        ours_step = torch.stack(gen.logits, 1).float()
        ours_refit = model(gen.sequences[:, :-1]).logits[:, L - 1:]
        seq = ids
        for _ in range(N):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
        ours_nocache = seq[:, L:]
    err = (res.logits - nv["logits"]).abs().max().item()
    M = 4
    layer_err = [(a - b[:, M:]).abs().max().item() for a, b in zip(res.hidden_states, nv["hidden_states"])]

    controls = {}
    for label, overrides in {
        f"window {args.window} instead of {args.window + 1} (no +1)": {"sliding_window": args.window},
        "RoPE base 10000 instead of the NTK base": {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}},
    }.items():
        with torch.no_grad():
            logits = load(**overrides)(ids).logits
        controls[label] = ((logits - nv["logits"]).abs().max().item(),
                           agree(logits.argmax(-1), nv["logits"].argmax(-1)))

    versions = nv["versions"]
    v = versions["sha256"]
    lines = [
        f"NVIDIA Hymba remote code (modeling_hymba.py sha256 {v['modeling_hymba.py'][:12]}, configuration_hymba.py "
        f"{v['configuration_hymba.py'][:12]}; transformers {versions['transformers']}, torch {versions['torch']}, "
        f"flex attention, CPU kernel stand-ins) vs `hf-memory convert --from hymba` (transformers "
        f"{__import__('transformers').__version__}); tiny random model in the hymba-tiny layout (hidden 64, 4 layers, "
        f"global 0 and 3, NVIDIA window {args.window}, 4 meta tokens, KV shared by layers 1-2, NTK RoPE), fp32, "
        f"CPU 1 thread, batch {args.batch} x {L} tokens, seed {args.seed}",
        "",
        "| measure | value |",
        "|---|---|",
        f"| logits: max abs error (logit std {nv['logits'].std().item():.2f}, max abs "
        f"{nv['logits'].abs().max().item():.2f}) | {err:.2e} |",
        f"| logits: argmax agreement | {agree(res.logits.argmax(-1), nv['logits'].argmax(-1))} |",
        "| hidden states (text positions): max abs error, embeddings / after layers 0, 1, 2 / final norm | "
        + " / ".join(f"{e:.1e}" for e in layer_err) + " |",
        f"| greedy {N} tokens: NVIDIA without cache vs hf-memory with cache | {agree(nv['gen_nocache'], ours_gen)} |",
        f"| greedy {N} tokens: hf-memory with cache vs hf-memory without cache | {agree(ours_gen, ours_nocache)} |",
    ]
    if "gen_cache" in nv:
        lines += [
            f"| greedy {N} tokens: NVIDIA `generate` (its cache) vs hf-memory with cache | "
            f"{agree(nv['gen_cache'], ours_gen)} |",
            f"| greedy {N} tokens: NVIDIA `generate` (its cache) vs NVIDIA without cache | "
            f"{agree(nv['gen_cache'], nv['gen_nocache'])} |",
            f"| decode-step logits vs full forward on the same tokens: NVIDIA cache | "
            f"{(nv['gen_cache_logits'] - nv['gen_cache_refit']).abs().max().item():.2e} |",
        ]
    else:
        lines.append(f"| NVIDIA `generate` with cache | failed: {nv['gen_cache_error']} |")
    if "gen_cache_w1" in nv:
        lines += [
            f"| greedy {N} tokens: NVIDIA `generate`, decode trimming to window + 1, vs hf-memory with cache | "
            f"{agree(nv['gen_cache_w1'], ours_gen)} |",
            f"| decode-step logits vs full forward: NVIDIA cache with decode trimming to window + 1 | "
            f"{(nv['gen_cache_w1_logits'] - nv['gen_cache_w1_refit']).abs().max().item():.2e} |",
        ]
    lines.append(f"| decode-step logits vs full forward on the same tokens: hf-memory cache | "
                 f"{(ours_step - ours_refit).abs().max().item():.2e} |")
    for label, (e, a) in controls.items():
        lines.append(f"| negative control, converted model with {label}: max abs error / argmax | {e:.2e} / {a} |")
    if "sdpa_logits" in nv:
        lines.append(f"| NVIDIA sdpa path vs its flex path: max abs error | "
                     f"{(nv['sdpa_logits'] - nv['logits']).abs().max().item():.2e} |")
    else:
        lines.append(f"| NVIDIA sdpa path (same weights, {L} tokens) | fails: `{nv['sdpa_error']}` |")
    for label, e in stub_self_checks().items():
        lines.append(f"| CPU stand-in self-check: {label} | {e:.1e} |")

    sys.path.insert(0, str(HERE))
    from report import emit

    emit(lines, args.output)


if __name__ == "__main__":
    main()
