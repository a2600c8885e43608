"""ModelArgs: one flat config with the DeepSeek reference names.

Fields are grouped by concern (sizes, MoE, MLA, RoPE/YaRN, MTP) and mirror
DeepSeek's `inference/model.py`; sizes for real models live in `presets/*.json`.
Validation runs on construction and names the field and the rule for every bad
value, so a broken config fails before any tensor is allocated. The mapping to
and from Hugging Face `config.json` lives in `dsmoe/interop/hf/config.py`, not here.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from dsmoe.errors import ConfigError, DsmoeError

SCORE_FUNCS = ("sigmoid", "softmax")
# How experts are chosen, with Hugging Face's names:
#   noaux_tc             groups scored by the sum of their top-2 biased scores (DeepSeek-V3)
#   group_limited_greedy groups scored by their best score (DeepSeek-V2)
#   greedy               no groups: plain top-k (DeepSeek-V2-Lite)
TOPK_METHODS = ("noaux_tc", "group_limited_greedy", "greedy")


# --- per-field rules -----------------------------------------------------------------------
# Every numeric field has exactly one rule (tests/model/test_config.py fails when a new
# field has none). NaN, infinities, bools and numbers too large for a float are never
# legal; zero only where it means "none of this" (no dense layers, no shared expert, no
# query compression, no MTP, no YaRN attention factor).

#: No size or count of a real model comes near this; above it, torch fails deep inside
#: an allocation or an index type instead of naming the field.
MAX_INT_FIELD = 2**31 - 1


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value <= MAX_INT_FIELD


def _is_finite(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int with hundreds of digits
        return False


def _shown(value: Any) -> str:
    """repr() cut short: a hostile config may hold an int with thousands of digits."""
    try:
        text = repr(value)
    except ValueError:  # Python refuses to print ints over 4300 digits
        return f"<an int of {value.bit_length()} bits>"
    return text if len(text) <= 60 else text[:40] + f"... ({len(text)} characters)"


_POSITIVE_INT = (lambda v: _is_int(v) and v > 0,
                 f"must be a positive integer (at most {MAX_INT_FIELD})")
_NON_NEGATIVE_INT = (lambda v: _is_int(v) and v >= 0,
                     f"must be a non-negative integer (at most {MAX_INT_FIELD})")
_POSITIVE = (lambda v: _is_finite(v) and v > 0, "must be a positive finite number")
_NON_NEGATIVE = (lambda v: _is_finite(v) and v >= 0,
                 "must be a finite number >= 0 (0 turns the factor off)")

FIELD_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    **dict.fromkeys(("vocab_size", "dim", "n_layers", "inter_dim", "n_heads", "max_seq_len",
                     "moe_inter_dim", "n_routed_experts", "n_activated_experts",
                     "n_expert_groups", "n_limited_groups", "kv_lora_rank", "qk_nope_head_dim",
                     "qk_rope_head_dim", "v_head_dim", "original_seq_len"), _POSITIVE_INT),
    **dict.fromkeys(("n_dense_layers", "n_shared_experts", "q_lora_rank", "n_mtp_layers"),
                    _NON_NEGATIVE_INT),
    **dict.fromkeys(("norm_eps", "init_std", "route_scale", "rope_factor", "beta_fast",
                     "beta_slow"), _POSITIVE),
    # RoPE divides by log(rope_theta): 1 or less would give infinite or reversed frequencies
    "rope_theta": (lambda v: _is_finite(v) and v > 1, "must be a finite number greater than 1"),
    **dict.fromkeys(("mscale", "mscale_all_dim"), _NON_NEGATIVE),
    "norm_topk_prob": (lambda v: isinstance(v, bool), "must be true or false"),
    "score_func": (lambda v: isinstance(v, str) and v in SCORE_FUNCS,
                   f"must be one of {SCORE_FUNCS}"),
    "topk_method": (lambda v: isinstance(v, str) and v in TOPK_METHODS,
                    f"must be one of {TOPK_METHODS}"),
}


@dataclass
class ModelArgs:
    # sizes
    vocab_size: int = 8192
    dim: int = 256
    n_layers: int = 4
    n_dense_layers: int = 1
    inter_dim: int = 768
    n_heads: int = 4
    max_seq_len: int = 512
    norm_eps: float = 1e-6
    init_std: float = 0.02
    # MoE
    moe_inter_dim: int = 128
    n_routed_experts: int = 16
    n_shared_experts: int = 1
    n_activated_experts: int = 4
    n_expert_groups: int = 4
    n_limited_groups: int = 2
    score_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    route_scale: float = 1.0
    # MLA
    q_lora_rank: int = 0  # 0: no query compression (DeepSeek-V2-Lite)
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    # RoPE / YaRN (rope_factor 1.0 means plain RoPE)
    rope_theta: float = 10000.0
    rope_factor: float = 1.0
    original_seq_len: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0  # YaRN attention factor on cos/sin (HF `mscale`)
    mscale_all_dim: float = 1.0  # YaRN factor on the softmax scale (HF `mscale_all_dim`)
    # multi-token prediction
    n_mtp_layers: int = 0

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers

    @property
    def uses_yarn(self) -> bool:
        return self.rope_factor > 1.0

    # --------------------------------------------------------------- validation
    def validate(self) -> None:
        def fail(field: str, rule: str) -> None:
            raise ConfigError(f"ModelArgs.{field}={_shown(getattr(self, field))}: {rule}")

        for name, (is_legal, rule) in FIELD_RULES.items():
            if not is_legal(getattr(self, name)):
                fail(name, rule)
        if self.n_dense_layers > self.n_layers:
            fail("n_dense_layers", f"cannot exceed n_layers={self.n_layers}")
        if self.qk_rope_head_dim % 2:
            fail("qk_rope_head_dim", "must be even (RoPE rotates pairs of values)")
        if self.n_routed_experts % self.n_expert_groups:
            fail("n_routed_experts", f"must be divisible by n_expert_groups={self.n_expert_groups}")
        if self.n_limited_groups > self.n_expert_groups:
            fail("n_limited_groups", f"cannot exceed n_expert_groups={self.n_expert_groups}")
        if self.topk_method == "greedy" and self.n_expert_groups != 1:
            fail("n_expert_groups", "must be 1 with topk_method='greedy' (set topk_method to "
                                    "'noaux_tc' or 'group_limited_greedy' to use groups)")
        per_group = self.n_routed_experts // self.n_expert_groups
        if self.topk_method == "noaux_tc" and self.n_expert_groups > 1 and per_group < 2:
            fail("n_expert_groups", "noaux_tc scores a group by its top-2 experts, so each "
                                    "group needs at least 2 experts")
        kept = per_group * self.n_limited_groups
        if self.n_activated_experts > kept:
            fail("n_activated_experts", f"top-k cannot exceed the {kept} experts held by the "
                                        f"n_limited_groups={self.n_limited_groups} kept groups")
        if self.uses_yarn and self.beta_fast < self.beta_slow:
            fail("beta_fast", f"must be at least beta_slow={self.beta_slow} for YaRN")

    # ------------------------------------------------------------- construction
    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "ModelArgs":
        return from_fields(cls, values, source, "ModelArgs field")

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelArgs":
        return cls.from_dict(read_json_object(path, "ModelArgs fields"), source=str(path))

    @classmethod
    def from_preset(cls, name: str) -> "ModelArgs":
        presets = available_presets()
        if name not in presets:
            raise ConfigError(f"unknown preset {name!r}; choose one of {presets}")
        text = resources.files("dsmoe.presets").joinpath(f"{name}.json").read_text()
        return cls.from_dict(json.loads(text), source=f"preset {name}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def replace(self, **changes: Any) -> "ModelArgs":
        return dataclasses.replace(self, **changes)


def from_fields(cls, values: dict[str, Any], source: str, what: str):
    """`cls(**values)` for a dataclass, or a ConfigError naming the unknown fields."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        noun = what.split()[-1]
        raise ConfigError(f"{source}: unknown {what}(s) {unknown}; known {noun}s are {sorted(known)}")
    return cls(**values)


def read_json_object(path: str | Path, holds: str,
                     error: type[DsmoeError] = ConfigError) -> dict[str, Any]:
    """The JSON object in a file (a config, a checkpoint index), or `error` naming the file
    and the problem: missing, unreadable, not JSON, too deeply nested, not an object."""
    path = Path(path)
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise error(f"{path} is not valid JSON ({err})") from None
    except OSError as err:
        raise error(f"cannot read {path} ({err.strerror or err})") from None
    if not isinstance(values, dict):
        raise error(f"{path} must hold a JSON object of {holds}")
    return values


def available_presets() -> list[str]:
    folder = resources.files("dsmoe.presets")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


def load_args(preset: str | None = None, config: str | Path | None = None) -> ModelArgs:
    """The `--preset NAME | --config PATH` choice shared by every command."""
    if (preset is None) == (config is None):
        raise ConfigError("give exactly one of --preset NAME or --config PATH")
    return ModelArgs.from_preset(preset) if preset else ModelArgs.from_json(config)
