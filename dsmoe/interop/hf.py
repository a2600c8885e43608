"""Hugging Face DeepSeek-V3/V2 checkpoints, read and written exactly.

A checkpoint directory holds `config.json`, safetensors weights (one `model.safetensors`,
or shards listed by `model.safetensors.index.json`) and usually a tokenizer. It is the
model format of the whole project: `load_model_dir` is what every command calls.

Notable:
- Interop is one name table (`BLOCK_NAMES`, `EXPERT_NAMES`, `MTP_NAMES`, `TOP_NAMES`) and two
  symmetric functions generated from it, `to_hf` and `from_hf`, pinned by a round-trip test;
  config.json maps to ModelArgs the same way (`args_from_hf_config`/`hf_config_from_args`).
- A checkpoint is never held twice: the model is built on the meta device in the target
  dtype and allocated empty, then the shards are opened one at a time (memory-mapped) and
  each tensor is copied into its slot: routed experts straight into their row of the
  stacked (E, F, D) weight, FP8 weights dequantised a row of blocks at a time into the slot.
  Peak: the model plus one shard's mapped pages. Measured on a 985 MiB fp32 checkpoint
  (tests/interop/test_hf_load_memory.py): 0.82x its size on top of the model as one file,
  0.14x in 200 MB shards (the bound is 1.3x).
- Everything is checked from the safetensors headers before any tensor is allocated: the
  config, every shard of the index, each key's name, shape and dtype, FP8 scales. A bad
  checkpoint raises CheckpointError/ConfigError naming the file and the key; no
  half-loaded model is ever returned.
- MTP modules are stored as DeepSeek stores them: extra layers `model.layers.{n_layers+i}`
  with enorm, hnorm, eh_proj, shared_head.norm and one full block, plus copies of the shared
  embedding and head (embed_tokens, shared_head.head) that vLLM and SGLang read. transformers
  ignores these layers. A config that announces MTP layers the files do not hold (what
  transformers' save_pretrained writes) loads without MTP, with a warning.
- The balancing bias is `mlp.gate.e_score_correction_bias`, in fp32. DeepSeek-V2 has none:
  softmax-scored models are written as `deepseek_v2`, and only with a zero bias.
- RoPE is the interleaved pair layout (rope_interleave=True; V2's complex layout is the
  same). A deepseek_v3 config with rope_interleave=false gets its rotary rows of q and k
  permuted into pairs on load (q.k is unchanged); we always write the interleaved layout.
- DeepSeek's own code is the reference where transformers differs: (1) YaRN's cos/sin factor
  is get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim) with the reference
  defaults mscale=1, mscale_all_dim=0, where transformers falls back to get_mscale(factor)
  unless both keys are set, so we write an explicit `attention_factor` when they are not;
  (2) DeepSeek-V2 with norm_topk_prob=true normalises the top-k weights and then does not
  apply routed_scaling_factor, where transformers' DeepseekV2 ignores norm_topk_prob.
  Equal on every config we build: dropped expert groups (-inf in ours and transformers' V3;
  0.0 in its V2, the same since softmax scores are positive), the 1e-20 in the top-k
  normalisation, YaRN's softmax scale get_mscale(factor, mscale_all_dim)**2.
Not here: writing FP8, tensor-parallel shards, other formats (GGUF, .bin).
"""
from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from dsmoe.config import ModelArgs
from dsmoe.device import parse_dtype, resolve_device
from dsmoe.errors import CheckpointError, ConfigError, DataError
from dsmoe.interop import fp8
from dsmoe.model import Transformer
from dsmoe.model.rope import rope_tables, yarn_get_mscale

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SHARD_FILE = re.compile(r"model(-\d+-of-\d+)?\.safetensors")  # ours and DeepSeek's 000163
DEFAULT_SHARD_SIZE = "5GB"

# ----------------------------------------------------------------------------- config.json

ARCHITECTURES = {"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM"}
MODEL_TYPE_ALIASES = {"kimi_k2": "deepseek_v3"}  # Kimi-K2 names the V3 architecture its own way

# ModelArgs field -> config.json key, for the fields that map one to one.
CONFIG_NAMES = {
    "vocab_size": "vocab_size", "dim": "hidden_size", "n_layers": "num_hidden_layers",
    "n_dense_layers": "first_k_dense_replace", "inter_dim": "intermediate_size",
    "n_heads": "num_attention_heads", "max_seq_len": "max_position_embeddings",
    "norm_eps": "rms_norm_eps", "init_std": "initializer_range",
    "moe_inter_dim": "moe_intermediate_size", "n_routed_experts": "n_routed_experts",
    "n_shared_experts": "n_shared_experts", "n_activated_experts": "num_experts_per_tok",
    "n_expert_groups": "n_group", "n_limited_groups": "topk_group", "topk_method": "topk_method",
    "norm_topk_prob": "norm_topk_prob", "route_scale": "routed_scaling_factor",
    "q_lora_rank": "q_lora_rank", "kv_lora_rank": "kv_lora_rank",
    "qk_nope_head_dim": "qk_nope_head_dim", "qk_rope_head_dim": "qk_rope_head_dim",
    "v_head_dim": "v_head_dim", "rope_theta": "rope_theta", "n_mtp_layers": "num_nextn_predict_layers",
}
REQUIRED_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size",
                 "num_attention_heads", "moe_intermediate_size", "n_routed_experts",
                 "num_experts_per_tok", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                 "v_head_dim")
# What transformers' DeepseekV3Config / DeepseekV2Config assume for an absent key, except
# num_nextn_predict_layers: absent means no MTP layers are stored.
_COMMON_DEFAULTS = {"max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "initializer_range": 0.02,
                    "q_lora_rank": 1536, "rope_theta": 10000.0, "num_nextn_predict_layers": 0}
CONFIG_DEFAULTS = {
    "deepseek_v3": {**_COMMON_DEFAULTS, "first_k_dense_replace": 3, "n_shared_experts": 1,
                    "n_group": 8, "topk_group": 4, "topk_method": "noaux_tc", "norm_topk_prob": True,
                    "routed_scaling_factor": 2.5, "scoring_func": "sigmoid"},
    "deepseek_v2": {**_COMMON_DEFAULTS, "max_position_embeddings": 2048, "first_k_dense_replace": 0,
                    "n_shared_experts": 2, "n_group": None, "topk_group": None, "topk_method": "greedy",
                    "norm_topk_prob": False, "routed_scaling_factor": 1.0, "scoring_func": "softmax"},
}
NULL_MEANS = {"q_lora_rank": 0, "n_group": 1, "topk_group": 1, "n_shared_experts": 0}
# Keys that must hold one value: any other changes the architecture in a way we do not build.
FIXED_KEYS = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "moe_layer_freq": 1}
# Keys with no effect on the weights or the math (bookkeeping, training-only, runtime).
IGNORED_KEYS = {
    "architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "dtype",
    "bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "attention_dropout",
    "num_key_value_heads", "head_dim", "qk_head_dim", "ep_size", "aux_loss_alpha", "seq_aux",
    "output_router_logits", "router_aux_loss_coef", "pretraining_tp", "tie_word_embeddings",
    "rope_interleave", "rope_scaling", "rope_parameters", "quantization_config", "scoring_func",
    "num_mtp_layers", "_name_or_path", "name_or_path", "id2label", "label2id", "max_window_layers",
    "use_sliding_window", "sliding_window", "output_attentions", "output_hidden_states",
    "return_dict", "is_encoder_decoder", "problem_type", "chunk_size_feed_forward",
}
TOPK_METHODS = {"deepseek_v3": ("noaux_tc",), "deepseek_v2": ("greedy", "group_limited_greedy")}


@dataclass
class HFSpec:
    """What a config.json says, in our terms, plus the facts that are not ModelArgs."""
    args: ModelArgs
    model_type: str = "deepseek_v3"
    rope_interleave: bool = True
    tied: bool = False  # tie_word_embeddings: lm_head is the embedding
    fp8_block: tuple[int, int] | None = None  # quantization_config.weight_block_size


def args_from_hf_config(config: dict, source: str = CONFIG_FILE) -> HFSpec:
    """Map a Hugging Face config.json (as a dict) to ModelArgs; ConfigError on anything we do
    not build, naming the key."""
    def fail(key: str, rule: str) -> None:
        raise ConfigError(f"{source}: {key}={config.get(key)!r}: {rule}")

    model_type = config.get("model_type")
    arch = MODEL_TYPE_ALIASES.get(model_type, model_type)
    if arch not in ARCHITECTURES:
        fail("model_type", f"not supported; dsmoe reads {sorted(ARCHITECTURES) + sorted(MODEL_TYPE_ALIASES)} "
                           "(the DeepSeek-V3/V2 architecture)")
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if missing:
        raise ConfigError(f"{source}: missing required key(s) {missing}")
    for key, value in FIXED_KEYS.items():
        if key in config and config[key] != value:
            fail(key, f"not supported (dsmoe builds {key}={value!r})")
    unknown = sorted(set(config) - set(CONFIG_NAMES.values()) - set(REQUIRED_KEYS) - set(FIXED_KEYS)
                     - IGNORED_KEYS)
    if unknown:
        warnings.warn(f"{source}: ignoring key(s) dsmoe does not know: {unknown}", stacklevel=3)

    defaults = CONFIG_DEFAULTS[arch]

    def get(key: str):
        value = config.get(key, defaults.get(key))
        return NULL_MEANS.get(key, value) if value is None else value

    values = {name: get(key) for name, key in CONFIG_NAMES.items()}
    score_func = get("scoring_func")
    if score_func != defaults["scoring_func"]:
        fail("scoring_func", f"{arch} scores experts with {defaults['scoring_func']} only")
    values["score_func"] = score_func
    if values["topk_method"] not in TOPK_METHODS[arch]:
        fail("topk_method", f"{arch} supports {TOPK_METHODS[arch]}")
    if values["topk_method"] == "greedy":  # groups play no part: transformers ignores n_group too
        values["n_expert_groups"] = values["n_limited_groups"] = 1
    if arch == "deepseek_v2" and values["norm_topk_prob"]:
        # DeepSeek-V2's code: `if top_k > 1 and norm_topk_prob: normalise, else: scale`.
        if values["n_activated_experts"] > 1:
            values["route_scale"] = 1.0
        else:
            values["norm_topk_prob"] = False
    if "num_mtp_layers" in config and "num_nextn_predict_layers" not in config:
        values["n_mtp_layers"] = config["num_mtp_layers"]
    if "qk_head_dim" in config and config["qk_head_dim"] != values["qk_nope_head_dim"] + values["qk_rope_head_dim"]:
        fail("qk_head_dim", "must be qk_nope_head_dim + qk_rope_head_dim")
    values.update(_rope_from_hf(config, values, fail))
    try:
        args = ModelArgs(**values)
    except (ConfigError, TypeError) as err:
        hint = next((f" (config.json key {key!r})" for name, key in CONFIG_NAMES.items()
                     if f"ModelArgs.{name}=" in str(err)), "")
        raise ConfigError(f"{source}: {err}{hint}") from None
    return HFSpec(args, model_type=arch,
                  rope_interleave=bool(config.get("rope_interleave", True)) if arch == "deepseek_v3" else True,
                  tied=bool(config.get("tie_word_embeddings", False)),
                  fp8_block=_fp8_block(config.get("quantization_config"), fail))


def _rope_from_hf(config: dict, values: dict, fail) -> dict:
    """RoPE/YaRN fields from rope_parameters (transformers 5) or rope_scaling + rope_theta."""
    key = "rope_parameters" if config.get("rope_parameters") else "rope_scaling"
    rope = config.get(key) or {}
    if not isinstance(rope, dict):
        fail(key, "must be an object")
    out = {"rope_theta": rope.get("rope_theta", values["rope_theta"])}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type in (None, "default"):
        return out
    if rope_type != "yarn":
        fail(key, f"rope type {rope_type!r} is not supported (dsmoe builds plain RoPE and YaRN)")
    if rope.get("truncate", True) is not True:
        fail(key, "truncate=false is not supported (DeepSeek floors/ceils the YaRN correction range)")
    original = rope.get("original_max_position_embeddings", values["max_seq_len"])
    factor = rope.get("factor") or values["max_seq_len"] / original
    out.update(rope_factor=float(factor), original_seq_len=original,
               beta_fast=float(rope.get("beta_fast") or 32), beta_slow=float(rope.get("beta_slow") or 1),
               # DeepSeek's defaults when a key is absent (its modeling code: mscale=1, mscale_all_dim=0)
               mscale=_or(rope.get("mscale"), 1.0), mscale_all_dim=_or(rope.get("mscale_all_dim"), 0.0))
    if rope.get("attention_factor") is not None:
        ours = _attention_factor(out["rope_factor"], out["mscale"], out["mscale_all_dim"])
        if abs(rope["attention_factor"] - ours) > 1e-6:
            fail(key, f"attention_factor={rope['attention_factor']} disagrees with mscale/mscale_all_dim "
                      f"(which give {ours:.6g}); dsmoe follows DeepSeek's rule: drop attention_factor")
    return out


def _or(value, default: float) -> float:
    return float(default if value is None else value)


def _attention_factor(factor: float, mscale: float, mscale_all_dim: float) -> float:
    return yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)


def _fp8_block(quant: dict | None, fail) -> tuple[int, int] | None:
    if not quant:
        return None
    if quant.get("quant_method") != "fp8" or quant.get("fmt", "e4m3") != "e4m3":
        fail("quantization_config", "only DeepSeek's block FP8 (quant_method 'fp8', fmt 'e4m3') is supported")
    block = quant.get("weight_block_size", list(fp8.DEFAULT_BLOCK))
    if (not isinstance(block, (list, tuple)) or len(block) != 2
            or not all(isinstance(b, int) and b > 0 for b in block)):
        fail("quantization_config", "weight_block_size must be two positive integers")
    return (block[0], block[1])


def hf_config_from_args(args: ModelArgs, dtype: torch.dtype = torch.float32,
                        bos_token_id: int | None = None, eos_token_id: int | None = None) -> dict:
    """The config.json for `args`; ConfigError if transformers cannot express the model."""
    v3 = args.score_func == "sigmoid"
    grouped = args.n_expert_groups > 1
    if v3 and grouped and args.topk_method != "noaux_tc":
        raise ConfigError(f"topk_method={args.topk_method!r} with sigmoid scores and {args.n_expert_groups} "
                          "groups has no Hugging Face form: DeepSeek-V3 groups experts by noaux_tc only")
    if not v3 and grouped and args.topk_method == "noaux_tc":
        raise ConfigError("softmax scores with noaux_tc groups have no Hugging Face form: "
                          "DeepSeek-V2 groups experts by group_limited_greedy")
    if not v3 and args.norm_topk_prob and (args.route_scale != 1.0 or args.n_activated_experts == 1):
        raise ConfigError("softmax scores with norm_topk_prob have no Hugging Face form unless "
                          "route_scale=1 and n_activated_experts>1 (DeepSeek-V2 does not scale normalised weights)")
    model_type = "deepseek_v3" if v3 else "deepseek_v2"
    config = {name: getattr(args, field_) for field_, name in CONFIG_NAMES.items()}
    config.update(
        architectures=[ARCHITECTURES[model_type]], model_type=model_type,
        num_key_value_heads=args.n_heads, q_lora_rank=args.q_lora_rank or None,
        scoring_func=args.score_func, hidden_act="silu", moe_layer_freq=1, attention_bias=False,
        tie_word_embeddings=False, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
        torch_dtype=str(dtype).removeprefix("torch."), rope_scaling=None)
    if v3:
        config.update(topk_method="noaux_tc", rope_interleave=True)
    else:
        config.update(topk_method="group_limited_greedy" if grouped else "greedy",
                      n_group=args.n_expert_groups if grouped else None,
                      topk_group=args.n_limited_groups if grouped else None)
    if args.uses_yarn:
        rope = {"type": "yarn", "factor": args.rope_factor, "original_max_position_embeddings": args.original_seq_len,
                "beta_fast": args.beta_fast, "beta_slow": args.beta_slow,
                "mscale": args.mscale, "mscale_all_dim": args.mscale_all_dim}
        if not (args.mscale and args.mscale_all_dim):  # else transformers would use get_mscale(factor)
            rope["attention_factor"] = _attention_factor(args.rope_factor, args.mscale, args.mscale_all_dim)
        config["rope_scaling"] = rope
    return dict(sorted(config.items()))


# ------------------------------------------------------------------------------ name table

# ours, inside a Block -> HF, inside model.layers.N
BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wq_a.weight": "self_attn.q_a_proj.weight",
    "attn.q_norm.weight": "self_attn.q_a_layernorm.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "attn.wkv_a.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn.kv_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attn.wkv_b.weight": "self_attn.kv_b_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "ffn.w1.weight": "mlp.gate_proj.weight",
    "ffn.w2.weight": "mlp.down_proj.weight",
    "ffn.w3.weight": "mlp.up_proj.weight",
    "ffn.gate.weight": "mlp.gate.weight",
    "ffn.gate.bias": "mlp.gate.e_score_correction_bias",
    "ffn.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
    "ffn.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
}
# stacked routed experts: one HF tensor per expert e
EXPERT_NAMES = {
    "ffn.experts.w1_EFD": "mlp.experts.{e}.gate_proj.weight",
    "ffn.experts.w3_EFD": "mlp.experts.{e}.up_proj.weight",
    "ffn.experts.w2_EDF": "mlp.experts.{e}.down_proj.weight",
}
# ours, inside mtp.K -> HF, inside model.layers.{n_layers + K}; the block's names as above
MTP_NAMES = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight",
             "eh_proj.weight": "eh_proj.weight", "norm.weight": "shared_head.norm.weight"}
TOP_NAMES = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "head.weight": "lm_head.weight"}
# copies of the shared embedding and head inside each MTP layer (DeepSeek's layout)
MTP_COPIES = {"embed.weight": "embed_tokens.weight", "head.weight": "shared_head.head.weight"}

_INVERSE = {"block": {v: k for k, v in BLOCK_NAMES.items()}, "mtp": {v: k for k, v in MTP_NAMES.items()},
            "top": {v: k for k, v in TOP_NAMES.items()}, "copies": {v: k for k, v in MTP_COPIES.items()},
            "expert": {v: k for k, v in EXPERT_NAMES.items()}}
_EXPERT_KEY = re.compile(r"mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight")

Slot = tuple[str, "int | None"]  # (our state_dict name, expert index in a stacked weight)


def _stores_bias(args: ModelArgs) -> bool:
    return args.score_func == "sigmoid"  # DeepSeek-V2 (softmax) checkpoints have no bias


def to_hf(name: str, args: ModelArgs) -> list[tuple[str, int | None]]:
    """The HF tensors that hold our tensor `name`, as (hf_name, expert) pairs. For each expert
    index the first pair is the stored tensor; later ones are copies written for other tools
    (the embedding and head inside MTP layers). Empty: not stored (V2's zero bias)."""
    if name in TOP_NAMES:
        return [(TOP_NAMES[name], None)] + [
            (f"model.layers.{args.n_layers + k}.{MTP_COPIES[name]}", None)
            for k in range(args.n_mtp_layers) if name in MTP_COPIES]
    if m := re.fullmatch(r"layers\.(\d+)\.(.+)", name):
        layer, rest = int(m[1]), m[2]
    elif m := re.fullmatch(r"mtp\.(\d+)\.(.+)", name):
        layer, rest = args.n_layers + int(m[1]), m[2]
        if rest in MTP_NAMES:
            return [(f"model.layers.{layer}.{MTP_NAMES[rest]}", None)]
        rest = rest.removeprefix("block.")
    else:
        raise ConfigError(f"parameter {name!r} has no Hugging Face name")
    prefix = f"model.layers.{layer}."
    if rest in EXPERT_NAMES:
        return [(prefix + EXPERT_NAMES[rest].format(e=e), e) for e in range(args.n_routed_experts)]
    if rest == "ffn.gate.bias" and not _stores_bias(args):
        return []
    if rest not in BLOCK_NAMES:
        raise ConfigError(f"parameter {name!r} has no Hugging Face name")
    return [(prefix + BLOCK_NAMES[rest], None)]


def from_hf(hf_name: str, args: ModelArgs) -> Slot | None:
    """Our (name, expert) for an HF tensor name; None if the name means nothing for `args`.
    (Whether the name exists in this model, e.g. q_proj vs q_a_proj, is for the caller.)"""
    if hf_name in _INVERSE["top"]:
        return _INVERSE["top"][hf_name], None
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name)
    if not m:
        return None
    layer, rest = int(m[1]), m[2]
    if layer < args.n_layers:
        prefix = f"layers.{layer}."
    elif layer < args.n_layers + args.n_mtp_layers:
        k = layer - args.n_layers
        if rest in _INVERSE["mtp"]:
            return f"mtp.{k}.{_INVERSE['mtp'][rest]}", None
        if rest in _INVERSE["copies"]:
            return _INVERSE["copies"][rest], None
        prefix = f"mtp.{k}.block."
    else:
        return None
    if rest in _INVERSE["block"]:
        ours = _INVERSE["block"][rest]
        return None if ours == "ffn.gate.bias" and not _stores_bias(args) else (prefix + ours, None)
    if (m := _EXPERT_KEY.fullmatch(rest)) and int(m[1]) < args.n_routed_experts:
        return prefix + _INVERSE["expert"][f"mlp.experts.{{e}}.{m[2]}_proj.weight"], int(m[1])
    return None


def _permute_rope_rows(state: dict[str, torch.Tensor], args: ModelArgs) -> None:
    """rotate_half layout (pairs i, i+R/2) -> interleaved pairs (2i, 2i+1), in place, on the
    rows of q and k that carry RoPE."""
    half = args.qk_rope_head_dim // 2
    perm = torch.stack([torch.arange(half), torch.arange(half) + half], dim=-1).flatten()
    for name, w in state.items():
        perm = perm.to(w.device)
        if name.endswith(("attn.wq.weight", "attn.wq_b.weight")):
            rope_rows = w.view(args.n_heads, args.qk_head_dim, -1)[:, args.qk_nope_head_dim:]
            rope_rows.copy_(rope_rows[:, perm])
        elif name.endswith("attn.wkv_a.weight"):
            rope_rows = w[args.kv_lora_rank:]
            rope_rows.copy_(rope_rows[perm])


# ---------------------------------------------------------------------- reading checkpoints

_FLOAT_DTYPES = {"F32", "F16", "BF16", "F64"}
_FP8_DTYPE = "F8_E4M3"


@dataclass
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: F32, BF16, F8_E4M3, ...


@dataclass
class HFCheckpoint:
    """A checked checkpoint: its config, the header of every tensor and where each goes."""
    path: Path
    config: dict
    spec: HFSpec
    tensors: dict[str, TensorInfo]
    sources: dict[str, list[Slot]] = field(default_factory=dict)  # hf name -> slots it fills
    unstored: list[str] = field(default_factory=list)  # our tensors the format omits (zeros)

    @property
    def args(self) -> ModelArgs:
        return self.spec.args

    def scale_key(self, hf_name: str) -> str | None:
        """The `weight_scale_inv` of an FP8 tensor, None for any other."""
        return hf_name + "_scale_inv" if self.tensors[hf_name].dtype == _FP8_DTYPE else None

    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in {t.file for t in self.tensors.values()})


def _read_json(path: Path, error=CheckpointError) -> dict:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise error(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{path} is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise error(f"{path} must hold a JSON object")
    return value


def _read_headers(path: Path) -> dict[str, TensorInfo]:
    """Name, shape and dtype of every tensor, from the safetensors headers only."""
    from safetensors import safe_open

    index_file, single = path / INDEX_FILE, path / SINGLE_FILE
    if index_file.is_file():
        weight_map = _read_json(index_file).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_file} has no weight_map")
        files = sorted(set(weight_map.values()))
    elif single.is_file():
        weight_map, files = None, [SINGLE_FILE]
    else:
        raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}: not a Hugging Face "
                              "safetensors checkpoint (convert .bin checkpoints with transformers first)")
    tensors: dict[str, TensorInfo] = {}
    for name in files:
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{index_file} lists shard {name}, which is missing from {path}")
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    s = f.get_slice(key)
                    if key in tensors:
                        raise CheckpointError(f"{key} is stored twice: in {tensors[key].file.name} and {name}")
                    tensors[key] = TensorInfo(file, tuple(s.get_shape()), s.get_dtype())
        except CheckpointError:
            raise
        except Exception as err:  # safetensors raises its own error types for bad files
            raise CheckpointError(f"{file} is not a readable safetensors file ({err}); "
                                  "it may be truncated: download it again") from None
    if weight_map is not None:
        for key, name in weight_map.items():
            if key not in tensors or tensors[key].file.name != name:
                raise CheckpointError(f"{index_file} says {key} is in {name}, but {name} does not hold it")
        stray = sorted(set(tensors) - set(weight_map))
        if stray:
            raise CheckpointError(f"{tensors[stray[0]].file.name} holds {stray[0]}, which {INDEX_FILE} "
                                  f"does not list ({len(stray)} such tensors)")
    return tensors


def _meta_model(args: ModelArgs, dtype: torch.dtype = torch.float32) -> Transformer:
    """The model with no storage, its parameters in `dtype` (the gate bias and RoPE tables
    stay fp32, as the model builds them)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            return Transformer(args)
    finally:
        torch.set_default_dtype(previous)


def _expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in _meta_model(args).state_dict().items()}


def open_checkpoint(path: str | Path) -> HFCheckpoint:
    """Read and check a checkpoint directory (config and headers; no tensor data)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory; give a Hugging Face checkpoint directory "
                              "(config.json + *.safetensors)")
    if not (path / CONFIG_FILE).is_file():
        raise CheckpointError(f"no {CONFIG_FILE} in {path}: not a Hugging Face checkpoint directory")
    config = _read_json(path / CONFIG_FILE, ConfigError)
    spec = args_from_hf_config(config, str(path / CONFIG_FILE))
    tensors = _read_headers(path)
    args = spec.args
    if args.n_mtp_layers and not any(from_hf(k, args) and from_hf(k, args)[0].startswith("mtp.")
                                     for k in tensors):
        warnings.warn(f"{path / CONFIG_FILE} announces {args.n_mtp_layers} MTP layer(s) "
                      f"(model.layers.{args.n_layers}...) but the checkpoint holds none: loading without MTP",
                      stacklevel=3)
        spec.args = args = args.replace(n_mtp_layers=0)
    ckpt = HFCheckpoint(path, config, spec, tensors)
    _plan(ckpt)
    return ckpt


def _plan(ckpt: HFCheckpoint) -> None:
    """Map every tensor of the model to the checkpoint tensor it is read from, checking
    names, shapes and dtypes; fills ckpt.sources / ckpt.unstored or raises."""
    args, tensors = ckpt.args, ckpt.tensors
    accounted: set[str] = set()
    missing: list[str] = []

    def check(key: str, shape: tuple[int, ...], ours: str) -> None:
        info = tensors[key]
        where = f"{info.file.name}: {key}"
        if info.shape != shape:
            raise CheckpointError(f"{where} has shape {list(info.shape)} but {CONFIG_FILE} gives "
                                  f"{list(shape)} (for {ours}); the weights do not match the config")
        if info.dtype == _FP8_DTYPE and len(shape) == 2:
            scale = key + "_scale_inv"
            block = ckpt.spec.fp8_block or fp8.DEFAULT_BLOCK
            if scale not in tensors:
                raise CheckpointError(f"{where} is FP8 but its scale {scale} is missing")
            want = fp8.scale_shape(shape, block)
            if tensors[scale].shape != want or tensors[scale].dtype not in _FLOAT_DTYPES:
                raise CheckpointError(f"{tensors[scale].file.name}: {scale} has shape "
                                      f"{list(tensors[scale].shape)} {tensors[scale].dtype}; a float "
                                      f"{list(want)} is expected for {block[0]}x{block[1]} blocks")
            accounted.add(scale)
        elif info.dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"{where} has dtype {info.dtype}; a floating-point tensor "
                                  f"(F32, BF16, F16 or FP8 e4m3 with scales) is expected")
        accounted.add(key)

    for ours, shape in _expected_shapes(args).items():
        names = to_hf(ours, args)
        if not names:
            ckpt.unstored.append(ours)
        seen: set[int | None] = set()
        for key, expert in names:
            slot_shape = shape if expert is None else shape[1:]
            if expert in seen:  # a copy for other tools: checked if present, not read
                if key in tensors:
                    check(key, slot_shape, ours)
                continue
            seen.add(expert)
            if key not in tensors and ours == "head.weight" and ckpt.spec.tied:
                key = TOP_NAMES["embed.weight"]
            if key not in tensors:
                missing.append(key)
                continue
            check(key, slot_shape, ours)
            ckpt.sources.setdefault(key, []).append((ours, expert))
    if missing:
        raise CheckpointError(f"{len(missing)} tensor(s) that {CONFIG_FILE} requires are not in {ckpt.path}, "
                              f"e.g. {missing[:4]}; the checkpoint is incomplete or the config does not describe it")
    unexpected = sorted(set(tensors) - accounted)
    if unexpected:
        key = unexpected[0]
        hint = ""
        if (m := re.match(r"model\.layers\.(\d+)\.", key)) and int(m[1]) >= args.n_layers:
            hint = f" (an MTP layer? set num_nextn_predict_layers in {CONFIG_FILE})"
        raise CheckpointError(f"{tensors[key].file.name}: {key} is not part of the model {CONFIG_FILE} "
                              f"describes{hint}; {len(unexpected)} unexpected tensor(s), e.g. {unexpected[:4]}")


class ShardReader:
    """Reads tensors by name, keeping one shard open at a time (so at most one shard's pages
    are mapped); FP8 tensors come back dequantised when asked."""

    def __init__(self, ckpt: HFCheckpoint):
        self.ckpt = ckpt
        self._file: Path | None = None
        self._handle = None

    def raw(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        file = self.ckpt.tensors[key].file
        if file != self._file:
            self.close()
            self._handle = safe_open(file, framework="pt", device="cpu").__enter__()
            self._file = file
        return self._handle.get_tensor(key)

    def read_into(self, key: str, out: torch.Tensor) -> None:
        """Copy tensor `key` into `out` (any dtype/device), dequantising FP8 on the way."""
        scale_key = self.ckpt.scale_key(key)
        if scale_key is None:
            out.copy_(self.raw(key))
            return
        scale = self.raw(scale_key)
        fp8.dequantize(self.raw(key), scale, self.ckpt.spec.fp8_block or fp8.DEFAULT_BLOCK, out=out)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.__exit__(None, None, None)
        self._handle, self._file = None, None


def _progress(iterable=None, **kw):
    from tqdm import tqdm

    return tqdm(iterable, disable=None, leave=False, **kw)  # shown only on a terminal


def load_hf(path: str | Path, dtype: str | torch.dtype | None = None,
            device: str | torch.device | None = None) -> Transformer:
    """A Transformer from a Hugging Face DeepSeek-V3/V2 checkpoint directory, in eval mode.
    dtype/device default to dsmoe.device's choice (fp32 on CPU, bf16 on CUDA)."""
    return _load(open_checkpoint(path), dtype, device)  # everything checked before any allocation


@torch.no_grad()
def _load(ckpt: HFCheckpoint, dtype, device) -> Transformer:
    device = resolve_device(device)
    dtype = parse_dtype(dtype, device)
    model = _meta_model(ckpt.args, dtype).to_empty(device=device)
    state = model.state_dict()
    reader = ShardReader(ckpt)
    try:
        keys = sorted(ckpt.sources, key=lambda k: (ckpt.tensors[k].file.name, k))  # shard by shard
        for key in _progress(keys, desc=f"loading {ckpt.path.name}", unit="tensor"):
            for ours, expert in ckpt.sources[key]:
                reader.read_into(key, state[ours] if expert is None else state[ours][expert])
    finally:
        reader.close()
    for ours in ckpt.unstored:
        state[ours].zero_()
    if not ckpt.spec.rope_interleave:
        _permute_rope_rows(state, ckpt.args)
    cos, sin = rope_tables(ckpt.args)  # buffers are not in checkpoints: rebuild them
    model.rope_cos.copy_(cos)
    model.rope_sin.copy_(sin)
    return model.eval()


# ---------------------------------------------------------------------- writing checkpoints

@dataclass
class ShardEntry:
    name: str
    nbytes: int
    fetch: Callable[[], torch.Tensor]  # produces the CPU tensor to write, when its shard is written


def parse_size(size: int | str) -> int:
    """Bytes from 5_000_000_000, '5GB', '500MB' or '2GiB'."""
    if isinstance(size, int):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(size), re.IGNORECASE)
        if not m:
            raise ConfigError(f"shard size {size!r}: give bytes or a size such as '5GB' or '500MB'")
        unit = (m[2] or "B").upper()
        base = 1024 if "I" in unit else 1000
        value = int(float(m[1]) * base ** "BKMGT".index(unit[0]))
    if value <= 0:
        raise ConfigError(f"shard size {size!r} must be positive")
    return value


def write_shards(entries: Iterable[ShardEntry], path: Path, shard_size: int | str,
                 desc: str = "writing") -> list[str]:
    """Write tensors as HF does: one model.safetensors, or numbered shards of at most
    shard_size bytes (a larger tensor gets a shard alone) plus the index. Each shard is
    fetched, written under a temporary name and renamed; stale weight files of an earlier
    save in the same directory are removed at the end."""
    from safetensors.torch import save_file

    limit = parse_size(shard_size)
    shards: list[list[ShardEntry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    n = len(shards)
    names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    path.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    bar = _progress(total=sum(len(s) for s in shards), desc=desc, unit="tensor")
    for name, shard in zip(names, shards):
        tensors = {}
        for entry in shard:
            tensors[entry.name] = entry.fetch()
            bar.update()
            weight_map[entry.name] = name
        tmp = path / f".{name}.tmp"
        try:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
            os.replace(tmp, path / name)
        finally:
            tmp.unlink(missing_ok=True)
        del tensors
    bar.close()
    if n > 1:
        index = {"metadata": {"total_size": sum(e.nbytes for s in shards for e in s)}, "weight_map": weight_map}
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    elif (path / INDEX_FILE).exists():
        (path / INDEX_FILE).unlink()
    for old in path.iterdir():
        if SHARD_FILE.fullmatch(old.name) and old.name not in names:
            old.unlink()
    return names


def save_hf(model: Transformer, path: str | Path, shard_size: int | str = DEFAULT_SHARD_SIZE,
            tokenizer=None, dtype: str | torch.dtype | None = None) -> Path:
    """Write `model` as a Hugging Face checkpoint that transformers loads (config.json,
    safetensors shards + index, MTP layers as model.layers.{n_layers+i}); with a tokenizer,
    its files too. dtype: the weights' dtype on disk (default: the model's own); the gate
    bias is always written in fp32."""
    path = Path(path)
    args = model.args
    state = model.state_dict()
    dtype = parse_dtype(dtype) if dtype is not None else state["embed.weight"].dtype
    config = hf_config_from_args(args, dtype, getattr(tokenizer, "bos_id", None), getattr(tokenizer, "eos_id", None))
    parse_size(shard_size)
    if not _stores_bias(args):
        biased = [k for k, v in state.items() if k.endswith("gate.bias") and bool(v.any())]
        if biased:
            raise ConfigError(f"{biased[0]} is not zero, but DeepSeek-V2 checkpoints (softmax scores) "
                              "store no balancing bias: it would be lost")
    entries = []
    for ours, tensor in state.items():
        out_dtype = torch.float32 if ours.endswith("gate.bias") else dtype
        for key, expert in to_hf(ours, args):
            src = tensor if expert is None else tensor[expert]
            entries.append(ShardEntry(key, src.numel() * out_dtype.itemsize,
                                      lambda src=src, d=out_dtype: src.detach().to("cpu", d, copy=True).contiguous()))
    write_shards(entries, path, shard_size, desc=f"saving {path.name}")
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(path)
    return path


# ------------------------------------------------------------------------- the one entry point

def load_model_dir(path: str | Path, dtype: str | torch.dtype | None = None,
                   device: str | torch.device | None = None):
    """(model, tokenizer or None) from a checkpoint directory: what every command calls."""
    ckpt = open_checkpoint(path)
    tokenizer = None
    if (ckpt.path / "tokenizer.json").is_file():
        from dsmoe.data.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_dir(path)
        if tokenizer.vocab_size > ckpt.args.vocab_size:
            raise DataError(f"{ckpt.path / 'tokenizer.json'} has {tokenizer.vocab_size} tokens but the model's "
                            f"vocabulary is {ckpt.args.vocab_size}: the tokenizer belongs to another model")
    return _load(ckpt, dtype, device), tokenizer
