"""What things are called in a Hugging Face DeepSeek checkpoint: its files and its tensors.

The tensor names are one table (`BLOCK_NAMES`, `EXPERT_NAMES`, `MTP_NAMES`, `TOP_NAMES`) and
two symmetric functions generated from it, `to_hf` and `from_hf`, pinned by a round-trip
test (tests/interop/test_hf_config_mapping.py); the reader and the writer only call them.

Notable:
- Routed experts are one stacked (E, F, D) weight here and one tensor per expert there
  (`mlp.experts.{e}.gate_proj.weight`), so a name maps to a (name, expert) slot.
- MTP modules are stored as DeepSeek stores them: extra layers `model.layers.{n_layers+i}`
  with enorm, hnorm, eh_proj, shared_head.norm and one full block, plus copies of the
  shared embedding and head (embed_tokens, shared_head.head) that vLLM and SGLang read.
- The balancing bias is `mlp.gate.e_score_correction_bias`; DeepSeek-V2 (softmax scores)
  stores none.
Not here: what the tensors hold (read.py checks shapes and dtypes) or config.json (config.py).
"""
from __future__ import annotations

import re

from dsmoe.config import ModelArgs
from dsmoe.errors import ConfigError

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SHARD_FILE = re.compile(r"model(-\d+-of-\d+)?\.safetensors")  # ours and DeepSeek's 000163
DEFAULT_SHARD_SIZE = "5GB"

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


def stores_bias(args: ModelArgs) -> bool:
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
    if rest == "ffn.gate.bias" and not stores_bias(args):
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
        return None if ours == "ffn.gate.bias" and not stores_bias(args) else (prefix + ours, None)
    if (m := _EXPERT_KEY.fullmatch(rest)) and int(m[1]) < args.n_routed_experts:
        return prefix + _INVERSE["expert"][f"mlp.experts.{{e}}.{m[2]}_proj.weight"], int(m[1])
    return None

