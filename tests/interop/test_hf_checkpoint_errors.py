"""Bad checkpoints fail before any tensor is allocated, with an error naming the file and the
key; save_hf refuses what Hugging Face cannot express before writing anything."""
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsmoe import ModelArgs, Transformer, load_hf, save_hf
from dsmoe.errors import CheckpointError, ConfigError
from dsmoe.interop.hf import INDEX_FILE, load_model_dir


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A valid sharded checkpoint of the tiny preset (one MTP layer)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("good")
    save_hf(Transformer(ModelArgs.from_preset("tiny")), path, shard_size="60KB")
    return path


@pytest.fixture
def ckpt(good, tmp_path):
    """A copy to break."""
    return shutil.copytree(good, tmp_path / "ckpt")


def shard_of(path, key):
    return path / json.loads((path / INDEX_FILE).read_text())["weight_map"][key]


def rewrite(path, key, tensor=None, new_key=None):
    """Replace (tensor), drop (None) or add (new_key) one tensor, keeping the index consistent."""
    file = shard_of(path, key)
    with safe_open(file, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    index = json.loads((path / INDEX_FILE).read_text())
    if new_key:
        tensors[new_key] = tensor
        index["weight_map"][new_key] = file.name
    elif tensor is None:
        del tensors[key], index["weight_map"][key]
    else:
        tensors[key] = tensor
    save_file(tensors, str(file), metadata={"format": "pt"})
    (path / INDEX_FILE).write_text(json.dumps(index))
    return file.name


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_good_checkpoint_loads(good):
    assert load_hf(good).args == ModelArgs.from_preset("tiny")
    model, tokenizer = load_model_dir(good)
    assert tokenizer is None and model.args.n_mtp_layers == 1


def test_missing_shard(ckpt):
    name = shard_of(ckpt, "model.norm.weight").name
    (ckpt / name).unlink()
    with pytest.raises(CheckpointError, match=f"lists shard {name}, which is missing"):
        load_hf(ckpt)


def test_truncated_shard(ckpt):
    file = shard_of(ckpt, "lm_head.weight")
    file.write_bytes(file.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=f"{file.name} is not a readable safetensors file"):
        load_hf(ckpt)


def test_wrong_shape(ckpt):
    key = "model.layers.2.mlp.experts.5.down_proj.weight"
    name = rewrite(ckpt, key, torch.zeros(64, 31))
    with pytest.raises(CheckpointError, match=rf"{name}: {key} has shape \[64, 31\] but config.json gives \[64, 32\]"):
        load_hf(ckpt)


def test_wrong_dtype(ckpt):
    key = "model.layers.0.self_attn.kv_b_proj.weight"
    name = rewrite(ckpt, key, torch.zeros(128, 32, dtype=torch.int32))
    with pytest.raises(CheckpointError, match=f"{name}: {key} has dtype I32"):
        load_hf(ckpt)


def test_missing_key(ckpt):
    key = "model.layers.1.mlp.gate.e_score_correction_bias"
    rewrite(ckpt, key)
    with pytest.raises(CheckpointError, match=f"not in .*{key}"):
        load_hf(ckpt)


def test_unexpected_key(ckpt):
    key = "model.layers.1.mlp.experts.8.up_proj.weight"  # the tiny preset has 8 experts: 0..7
    name = rewrite(ckpt, "model.norm.weight", torch.zeros(32, 64), new_key=key)
    with pytest.raises(CheckpointError, match=f"{name}: {key} is not part of the model"):
        load_hf(ckpt)


def test_index_pointing_at_the_wrong_shard(ckpt):
    index = json.loads((ckpt / INDEX_FILE).read_text())
    other = next(n for n in sorted(set(index["weight_map"].values())) if n != index["weight_map"]["lm_head.weight"])
    index["weight_map"]["lm_head.weight"] = other
    (ckpt / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"says lm_head.weight is in {other}"):
        load_hf(ckpt)


def test_mtp_layer_the_config_does_not_announce(ckpt):
    edit_config(ckpt, num_nextn_predict_layers=0)
    with pytest.raises(CheckpointError, match=r"model\.layers\.3\..* set num_nextn_predict_layers"):
        load_hf(ckpt)


def test_announced_mtp_layer_that_is_not_stored_loads_without_mtp(ckpt):
    edit_config(ckpt, num_nextn_predict_layers=2)
    with pytest.raises(CheckpointError, match=r"model\.layers\.4\."):  # one of two stored: incomplete
        load_hf(ckpt)
    edit_config(ckpt, num_nextn_predict_layers=1)
    for key in json.loads((ckpt / INDEX_FILE).read_text())["weight_map"]:
        if key.startswith("model.layers.3."):
            rewrite(ckpt, key)
    with pytest.warns(UserWarning, match="announces 1 MTP layer.* holds none"):
        assert load_hf(ckpt).args.n_mtp_layers == 0


@pytest.mark.parametrize("change, match", [
    ({"model_type": "llama"}, "model_type='llama': not supported"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu': not supported"),
    ({"scoring_func": "softmax"}, "deepseek_v3 scores experts with sigmoid only"),
    ({"topk_method": "group_limited_greedy"}, "topk_method='group_limited_greedy'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope type 'linear' is not supported"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
    ({"n_routed_experts": 6}, "n_routed_experts"),
    ({"num_hidden_layers": None}, r"\(config.json key 'num_hidden_layers'\)"),
])
def test_unsupported_config(ckpt, change, match):
    edit_config(ckpt, **change)
    with pytest.raises(ConfigError, match=match) as err:
        load_hf(ckpt)
    assert "config.json" in str(err.value)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_v3"}))
    with pytest.raises(ConfigError, match="missing required key"):
        load_hf(tmp_path)


def test_save_refuses_what_hf_cannot_hold_before_writing(tmp_path):
    args = ModelArgs.from_preset("tiny").replace(score_func="softmax", topk_method="group_limited_greedy",
                                                   norm_topk_prob=False)
    model = Transformer(args)
    model.moe_layers()[0].gate.bias.fill_(0.5)  # DeepSeek-V2 checkpoints have no bias
    with pytest.raises(ConfigError, match="store no balancing bias"):
        save_hf(model, tmp_path / "out")
    with pytest.raises(ConfigError, match="no Hugging Face form"):
        save_hf(Transformer(args.replace(topk_method="noaux_tc")), tmp_path / "out")
    with pytest.raises(ConfigError, match="shard size"):
        save_hf(Transformer(ModelArgs.from_preset("tiny")), tmp_path / "out", shard_size="lots")
    assert not (tmp_path / "out").exists()
