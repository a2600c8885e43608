"""config.json <-> ModelArgs for Hugging Face DeepSeek-V3/V2 checkpoints.

`args_from_hf_config` maps the keys transformers' DeepseekV3Config/DeepseekV2Config write
(with their defaults for absent keys) to ModelArgs; `hf_config_from_args` is its inverse,
and the round trip is tested (tests/interop/test_hf_config_mapping.py).

Notable:
- Anything we do not build is refused with a ConfigError naming the key: another
  architecture, another activation, biases, another scoring function or RoPE type; a
  value of the wrong JSON type (a string for a size, a number for a flag, NaN) too,
  before ModelArgs sees it. Keys with no effect on the weights or the math are ignored;
  unknown keys give a warning.
- DeepSeek's own code is the reference where transformers differs: (1) YaRN's cos/sin
  factor is get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim) with the
  reference defaults mscale=1, mscale_all_dim=0, where transformers falls back to
  get_mscale(factor) unless both keys are set, so we write an explicit `attention_factor`
  when they are not; (2) DeepSeek-V2 with norm_topk_prob=true normalises the top-k weights
  and then does not apply routed_scaling_factor, where transformers' DeepseekV2 ignores
  norm_topk_prob.
- DeepSeek-V2 (softmax scores) is written as `deepseek_v2`; RoPE as the interleaved
  layout (`rope_interleave=true`); a config with rope_interleave=false is read as such and
  the reader permutes the rotary rows (read.py).
Not here: tensor names (names.py), reading the weights (read.py).
"""
from __future__ import annotations

import math
import typing
import warnings
from dataclasses import dataclass

import torch

from dsmoe.config import ModelArgs
from dsmoe.errors import ConfigError
from dsmoe.interop import fp8
from dsmoe.interop.hf.names import CONFIG_FILE
from dsmoe.model.rope import yarn_get_mscale

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
# The JSON type each mapped key must hold: that of its ModelArgs field.
KEY_TYPES = {key: typing.get_type_hints(ModelArgs)[name] for name, key in CONFIG_NAMES.items()}
KEY_TYPES.update(num_mtp_layers=int, qk_head_dim=int, rope_interleave=bool, tie_word_embeddings=bool,
                 scoring_func=str, quantization_config=dict)
_TYPE_WORDS = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string",
               dict: "an object"}


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
    arch = MODEL_TYPE_ALIASES.get(model_type, model_type) if isinstance(model_type, str) else None
    if arch not in ARCHITECTURES:
        fail("model_type", f"not supported; dsmoe reads {sorted(ARCHITECTURES) + sorted(MODEL_TYPE_ALIASES)} "
                           "(the DeepSeek-V3/V2 architecture)")
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if missing:
        raise ConfigError(f"{source}: missing required key(s) {missing}")
    for key, value in FIXED_KEYS.items():
        if key in config and config[key] != value:
            fail(key, f"not supported (dsmoe builds {key}={value!r})")
    for key, kind in KEY_TYPES.items():
        # null is the default for the keys NULL_MEANS lists and for a few optional ones
        if config.get(key) is not None and not is_a(config[key], kind):
            fail(key, f"must be {_TYPE_WORDS[kind]}")
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

    def field(name: str, kind: type, default):
        value = rope.get(name)
        if value is None:
            return default
        if not is_a(value, kind):
            fail(key, f"{name}={value!r} must be {_TYPE_WORDS[kind]}")
        return value

    out = {"rope_theta": field("rope_theta", float, values["rope_theta"])}
    rope_type = field("rope_type", str, None) or field("type", str, "default")
    if rope_type == "default":
        return out
    if rope_type != "yarn":
        fail(key, f"rope type {rope_type!r} is not supported (dsmoe builds plain RoPE and YaRN)")
    if field("truncate", bool, True) is not True:
        fail(key, "truncate=false is not supported (DeepSeek floors/ceils the YaRN correction range)")
    original = field("original_max_position_embeddings", int, values["max_seq_len"])
    if not is_a(original, int) or original <= 0:
        fail(key, "original_max_position_embeddings must be a positive integer")
    factor = field("factor", float, 0) or values["max_seq_len"] / original
    out.update(rope_factor=float(factor), original_seq_len=original,
               beta_fast=float(field("beta_fast", float, 0) or 32),
               beta_slow=float(field("beta_slow", float, 0) or 1),
               # DeepSeek's defaults when a key is absent (its modeling code: mscale=1, mscale_all_dim=0)
               mscale=float(field("mscale", float, 1.0)),
               mscale_all_dim=float(field("mscale_all_dim", float, 0.0)))
    if field("attention_factor", float, None) is not None:
        ours = _attention_factor(out["rope_factor"], out["mscale"], out["mscale_all_dim"])
        if abs(rope["attention_factor"] - ours) > 1e-6:
            fail(key, f"attention_factor={rope['attention_factor']} disagrees with mscale/mscale_all_dim "
                      f"(which give {ours:.6g}); dsmoe follows DeepSeek's rule: drop attention_factor")
    return out


def is_a(value, kind: type) -> bool:
    """Whether a JSON value has the type `kind` (bool is not a number, NaN is none)."""
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _attention_factor(factor: float, mscale: float, mscale_all_dim: float) -> float:
    return yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)


def _fp8_block(quant: dict | None, fail) -> tuple[int, int] | None:
    if not quant:
        return None
    if quant.get("quant_method") != "fp8" or quant.get("fmt", "e4m3") != "e4m3":
        fail("quantization_config", "only DeepSeek's block FP8 (quant_method 'fp8', fmt 'e4m3') is supported")
    block = quant.get("weight_block_size", list(fp8.DEFAULT_BLOCK))
    if (not isinstance(block, (list, tuple)) or len(block) != 2
            or not all(is_a(b, int) and b > 0 for b in block)):
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
