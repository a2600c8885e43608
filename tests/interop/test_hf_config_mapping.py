"""config.json <-> ModelArgs: published configs give our presets, and every preset survives
the round trip; the name table is a bijection for any model we build."""
import math

import pytest

from dsmoe import ModelArgs, Transformer
from dsmoe.config import available_presets
from dsmoe.errors import ConfigError
from dsmoe.interop.hf import args_from_hf_config, from_hf, hf_config_from_args, to_hf

# deepseek-ai/DeepSeek-V3 config.json as published (auto_map left out)
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3,
    "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
    "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "pretraining_tp": 1,
    "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
}
# deepseek-ai/DeepSeek-V2-Lite config.json as published (auto_map left out)
DEEPSEEK_V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001, "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 10944,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v2",
    "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64,
    "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 16, "num_experts_per_tok": 6,
    "num_hidden_layers": 27, "num_key_value_heads": 16, "pretraining_tp": 1, "q_lora_rank": None,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
    "transformers_version": "4.39.3", "use_cache": True, "v_head_dim": 128, "vocab_size": 102400,
}


@pytest.mark.filterwarnings("error")  # every key of a published config is known
@pytest.mark.parametrize("config, preset", [(DEEPSEEK_V3, "deepseek-v3"), (DEEPSEEK_V2_LITE, "deepseek-v2-lite")])
def test_published_configs_give_the_presets(config, preset):
    spec = args_from_hf_config(config)
    assert spec.args == ModelArgs.from_preset(preset)
    assert spec.fp8_block == ((128, 128) if preset == "deepseek-v3" else None)
    assert spec.rope_interleave and not spec.tied


@pytest.mark.parametrize("preset", available_presets())
def test_presets_round_trip(preset):
    args = ModelArgs.from_preset(preset)
    config = hf_config_from_args(args)
    assert config["model_type"] == ("deepseek_v3" if args.score_func == "sigmoid" else "deepseek_v2")
    assert args_from_hf_config(config).args == args


def test_kimi_k2_names_the_v3_architecture():
    config = hf_config_from_args(ModelArgs.from_preset("kimi-k2"))
    assert args_from_hf_config({**config, "model_type": "kimi_k2"}).args == ModelArgs.from_preset("kimi-k2")


def test_v2_normalised_top_k_is_not_scaled():
    """DeepSeek-V2's gate: `if top_k > 1 and norm_topk_prob: normalise, else: scale`."""
    config = {**DEEPSEEK_V2_LITE, "norm_topk_prob": True, "routed_scaling_factor": 16.0}
    args = args_from_hf_config(config).args
    assert args.norm_topk_prob and args.route_scale == 1.0
    args = args_from_hf_config({**config, "num_experts_per_tok": 1}).args
    assert not args.norm_topk_prob and args.route_scale == 16.0
    back = hf_config_from_args(args_from_hf_config(config).args)
    assert back["norm_topk_prob"] and back["routed_scaling_factor"] == 1.0
    with pytest.raises(ConfigError, match="route_scale=1"):
        hf_config_from_args(ModelArgs.from_preset("deepseek-v2-lite").replace(norm_topk_prob=True, route_scale=2.0))


def test_yarn_attention_factor_follows_deepseek_defaults():
    """Absent mscale/mscale_all_dim mean 1 and 0 (DeepSeek's code); we write the factor
    explicitly then, since transformers would otherwise use get_mscale(factor)."""
    rope = dict(DEEPSEEK_V2_LITE["rope_scaling"])
    del rope["mscale_all_dim"]
    args = args_from_hf_config({**DEEPSEEK_V2_LITE, "rope_scaling": rope}).args
    assert (args.mscale, args.mscale_all_dim) == (0.707, 0.0)
    written = hf_config_from_args(args)["rope_scaling"]
    assert written["attention_factor"] == pytest.approx(1 + 0.1 * 0.707 * math.log(40))
    assert args_from_hf_config(hf_config_from_args(args)).args == args
    with pytest.raises(ConfigError, match="attention_factor=2.0 disagrees"):
        args_from_hf_config({**DEEPSEEK_V2_LITE, "rope_scaling": {**rope, "attention_factor": 2.0}})


def test_rope_parameters_of_transformers_5_are_read():
    config = {k: v for k, v in DEEPSEEK_V3.items() if k not in ("rope_scaling", "rope_theta")}
    config["rope_parameters"] = {**DEEPSEEK_V3["rope_scaling"], "rope_type": "yarn", "rope_theta": 10000.0}
    assert args_from_hf_config(config).args == ModelArgs.from_preset("deepseek-v3")


def test_unknown_keys_are_named_in_a_warning():
    with pytest.warns(UserWarning, match=r"ignoring key\(s\) dsmoe does not know: \['new_feature'\]"):
        args_from_hf_config({**DEEPSEEK_V3, "new_feature": 1})


@pytest.mark.parametrize("changes", [dict(n_mtp_layers=2, n_routed_experts=12),
                                     dict(q_lora_rank=0, n_dense_layers=0, n_mtp_layers=0),
                                     dict(score_func="softmax", topk_method="greedy", n_expert_groups=1,
                                          n_limited_groups=1, norm_topk_prob=False)])
def test_name_table_is_a_bijection(changes):
    args = ModelArgs.from_preset("tiny").replace(**changes)
    seen = {}
    for ours in Transformer(args).state_dict():
        names = to_hf(ours, args)
        assert names or (ours.endswith("gate.bias") and args.score_func == "softmax")
        for key, expert in names:
            assert from_hf(key, args) == (ours, expert)
            assert seen.setdefault(key, (ours, expert)) == (ours, expert)
    assert from_hf("model.layers.99.mlp.gate.weight", args) is None
    assert from_hf(f"model.layers.1.mlp.experts.{args.n_routed_experts}.up_proj.weight", args) is None


@pytest.mark.parametrize("key, value, rule", [
    ("hidden_size", "7168", "must be an integer"),
    ("num_hidden_layers", 61.0, "must be an integer"),
    ("n_routed_experts", True, "must be an integer"),
    ("rms_norm_eps", "1e-6", "must be a finite number"),
    ("routed_scaling_factor", float("nan"), "must be a finite number"),
    ("rope_theta", float("inf"), "must be a finite number"),
    ("norm_topk_prob", "true", "must be true or false"),
    ("norm_topk_prob", 1, "must be true or false"),
    ("topk_method", ["noaux_tc"], "must be a string"),
    ("tie_word_embeddings", "false", "must be true or false"),
    ("rope_interleave", 0, "must be true or false"),
    ("quantization_config", "fp8", "must be an object"),
    ("num_nextn_predict_layers", "1", "must be an integer"),
    ("model_type", ["deepseek_v3"], "not supported"),
    ("rope_scaling", [40], "must be an object"),
])
def test_wrong_types_name_the_key(key, value, rule):
    with pytest.raises(ConfigError, match=rf"config.json: {key}=.*: {rule}"):
        args_from_hf_config({**DEEPSEEK_V3, key: value})


@pytest.mark.parametrize("field, value, rule", [
    ("factor", "40", "factor='40' must be a finite number"),
    ("beta_fast", float("nan"), "beta_fast=nan must be a finite number"),
    ("mscale", [1.0], r"mscale=\[1.0\] must be a finite number"),
    ("original_max_position_embeddings", 4096.5, "must be an integer"),
    ("original_max_position_embeddings", 0, "must be a positive integer"),
    ("truncate", "no", "truncate='no' must be true or false"),
    ("type", 3, "type=3 must be a string"),
])
def test_wrong_rope_types_name_the_field(field, value, rule):
    rope = {**DEEPSEEK_V3["rope_scaling"], field: value}
    with pytest.raises(ConfigError, match=rf"config.json: rope_scaling=.*{rule}"):
        args_from_hf_config({**DEEPSEEK_V3, "rope_scaling": rope})
    without_factor = {k: v for k, v in rope.items() if k != "factor"}  # factor derived from the context
    if field == "original_max_position_embeddings":
        with pytest.raises(ConfigError, match="original_max_position_embeddings"):
            args_from_hf_config({**DEEPSEEK_V3, "rope_scaling": without_factor})


@pytest.mark.parametrize("text, problem", [
    ('{"hidden_size": NaN', "is not valid JSON"),
    ("[" * 100_000 + "]" * 100_000, "is not valid JSON"),
    ('["a list"]', "must hold a JSON object"),
    (b"\xff\xfe{}", "is not valid JSON"),
])
def test_unreadable_config_json_is_a_config_error(tmp_path, text, problem):
    from dsmoe.interop.hf import load_hf

    (tmp_path / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError, match=rf"config.json {problem}"):
        load_hf(tmp_path)
