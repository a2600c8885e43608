"""ModelArgs: presets load, and every validation rule names the field and the rule."""
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
