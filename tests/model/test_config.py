"""ModelArgs: presets load, and every validation rule names the field and the rule."""
import dataclasses
import json

import pytest

from dsmoe import ModelArgs
from dsmoe.config import available_presets, load_args
from dsmoe.errors import ConfigError


def test_presets_load():
    assert {"tiny", "small", "deepseek-v3", "deepseek-v2-lite", "kimi-k2"} <= set(available_presets())
    v3 = ModelArgs.from_preset("deepseek-v3")
    assert (v3.dim, v3.n_layers, v3.n_routed_experts, v3.kv_lora_rank) == (7168, 61, 256, 512)


@pytest.mark.parametrize("changes, field, rule", [
    (dict(dim=0), "dim", "positive integer"),
    (dict(n_heads=-2), "n_heads", "positive integer"),
    (dict(vocab_size=3.5), "vocab_size", "positive integer"),
    (dict(n_shared_experts=-1), "n_shared_experts", "non-negative"),
    (dict(n_dense_layers=9), "n_dense_layers", "cannot exceed n_layers"),
    (dict(score_func="relu"), "score_func", "must be one of"),
    (dict(topk_method="best"), "topk_method", "must be one of"),
    (dict(n_routed_experts=10), "n_routed_experts", "divisible by n_expert_groups"),
    (dict(n_limited_groups=5), "n_limited_groups", "cannot exceed n_expert_groups"),
    (dict(n_activated_experts=5), "n_activated_experts", "kept groups"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim", "even"),
    (dict(route_scale=float("nan")), "route_scale", "positive finite"),
    (dict(rope_factor=0.0), "rope_factor", "positive finite"),
    (dict(topk_method="greedy"), "n_expert_groups", "must be 1"),
    (dict(n_routed_experts=4, n_expert_groups=4, n_limited_groups=2, n_activated_experts=2),
     "n_expert_groups", "top-2"),
    (dict(rope_factor=4.0, beta_fast=0.5, beta_slow=1.0), "beta_fast", "at least beta_slow"),
])
def test_validation_rules(changes, field, rule):
    with pytest.raises(ConfigError) as err:
        ModelArgs.from_preset("tiny").replace(**changes)
    assert f"ModelArgs.{field}=" in str(err.value) and rule in str(err.value)


def test_json_round_trip_and_errors(tmp_path):
    args = ModelArgs.from_preset("small")
    path = tmp_path / "model.json"
    args.to_json(path)
    assert ModelArgs.from_json(path) == args
    path.write_text(json.dumps({**args.to_dict(), "n_expert": 3}))
    with pytest.raises(ConfigError, match="unknown ModelArgs field.*n_expert"):
        ModelArgs.from_json(path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelArgs.from_json(path)
    with pytest.raises(ConfigError, match="does not exist"):
        ModelArgs.from_json(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        ModelArgs.from_preset("huge")
    with pytest.raises(ConfigError, match="exactly one"):
        load_args(preset="tiny", config=path)


# --- every numeric field against hostile values ----------------------------------------------
# The field list comes from the dataclass, so a new numeric field is tested without being
# listed here; by default it must be positive. Fields where 0 is legal say why.
ZERO_IS_LEGAL = {
    "n_dense_layers": "every layer is MoE",
    "n_shared_experts": "no shared expert",
    "q_lora_rank": "no query compression (DeepSeek-V2-Lite)",
    "n_mtp_layers": "no multi-token prediction",
    "mscale": "yarn_get_mscale(s, 0) == 1: no YaRN attention factor",
    "mscale_all_dim": "yarn_get_mscale(s, 0) == 1: softmax scale left as is",
}
# Legal values that are still not positive-or-zero in the plain sense.
SPECIAL_LOWER_BOUND = {"rope_theta": 1.0}  # log(rope_theta) is a divisor in YaRN
NUMERIC_FIELDS = [f for f in dataclasses.fields(ModelArgs)
                  if f.type in ("int", "float", int, float)]
HOSTILE = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "zero": 0,
           "negative": -1, "bool": True, "string": "8", "none": None, "huge": 10**400}


def test_the_numeric_field_list_is_complete():
    names = {f.name for f in NUMERIC_FIELDS}
    assert {"beta_fast", "beta_slow", "mscale", "mscale_all_dim", "original_seq_len",
            "rope_theta", "rope_factor", "norm_eps", "vocab_size", "n_mtp_layers"} <= names
    assert set(ZERO_IS_LEGAL) | set(SPECIAL_LOWER_BOUND) <= names


@pytest.mark.parametrize("value_name", list(HOSTILE))
@pytest.mark.parametrize("field", [f.name for f in NUMERIC_FIELDS])
def test_every_numeric_field_rejects_hostile_values(field, value_name):
    value = HOSTILE[value_name]
    kind = {f.name: f.type for f in NUMERIC_FIELDS}[field]
    if value_name == "zero" and field in ZERO_IS_LEGAL:
        ModelArgs.from_preset("tiny").replace(**{field: 0})  # legal: must not raise
        ModelArgs.from_preset("deepseek-v3").replace(**{field: 0})
        return
    if value_name == "zero" and kind in ("float", float):
        value = 0.0
    with pytest.raises(ConfigError) as err:
        ModelArgs.from_preset("tiny").replace(**{field: value})
    message = str(err.value)
    assert message.startswith(f"ModelArgs.{field}=") and "must be" in message
    assert len(message) < 200  # a 400-digit number is cut short, not printed


@pytest.mark.parametrize("field", [f.name for f in NUMERIC_FIELDS if f.type in ("int", int)])
def test_integer_fields_reject_fractions_and_absurd_sizes(field):
    for value in (2.5, 2**31, 10**5000):
        with pytest.raises(ConfigError, match=f"ModelArgs.{field}=.*integer"):
            ModelArgs.from_preset("tiny").replace(**{field: value})


@pytest.mark.parametrize("field, bound", list(SPECIAL_LOWER_BOUND.items()))
def test_special_lower_bounds(field, bound):
    with pytest.raises(ConfigError, match=f"ModelArgs.{field}="):
        ModelArgs.from_preset("tiny").replace(**{field: bound})
    ModelArgs.from_preset("tiny").replace(**{field: bound * 1.5})


def test_yarn_fields_from_a_json_config(tmp_path):
    """The RoPE/YaRN fields, given as a user would (JSON), name the field."""
    path = tmp_path / "model.json"
    base = ModelArgs.from_preset("deepseek-v3").to_dict()
    for field, value in [("beta_fast", 0), ("beta_slow", -1.0), ("mscale", -0.5),
                         ("mscale_all_dim", 1e999), ("original_seq_len", 0),
                         ("rope_factor", float("nan"))]:
        path.write_text(json.dumps({**base, field: value}))
        with pytest.raises(ConfigError, match=f"ModelArgs.{field}="):
            ModelArgs.from_json(path)
