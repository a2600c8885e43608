"""Cost accounting checked against real models: materialised tiny ones (by parameter name),
DeepSeek-V3 built on the meta device, torch's FLOP counter, and the published totals."""
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dsmoe.analysis.flops import (GROUPS, count_params, flops_per_token, kv_cache_bytes,
                                  uses_gate_bias)
from dsmoe.cli import main
from dsmoe.config import ModelArgs
from dsmoe.errors import ConfigError
from dsmoe.model.transformer import Transformer


def group_of(name: str) -> str:
    """The accounting group of a parameter, read from its name alone."""
    if name.endswith("norm.weight"):  # attn_norm, ffn_norm, q_norm, kv_norm, norm, enorm, hnorm
        return "norm"
    for marker, group in ((".experts.", "routed_experts"), (".shared_experts.", "shared_experts"),
                          (".gate.", "gate"), (".ffn.", "dense_ffn"), (".attn.", "attn"),
                          ("eh_proj", "eh_proj"), ("embed.", "embed"), ("head.", "head")):
        if marker in name:
            return group
    raise AssertionError(f"unclassified parameter {name}")


def measure(model: Transformer) -> tuple[dict, dict, int]:
    """(main groups, MTP groups, activated per token) summed over the real tensors."""
    args = model.args
    main_groups, mtp_groups = dict.fromkeys(GROUPS, 0), dict.fromkeys(GROUPS, 0)
    for name, p in model.named_parameters():
        (mtp_groups if name.startswith("mtp.") else main_groups)[group_of(name)] += p.numel()
    if uses_gate_bias(args):
        for name, b in model.named_buffers():
            if name.endswith("gate.bias"):
                (mtp_groups if name.startswith("mtp.") else main_groups)["gate_bias"] += b.numel()
    # Activated: all but the routed experts, plus top-k whole experts of each main MoE layer.
    activated = sum(main_groups.values()) - main_groups["routed_experts"]
    for block in model.layers:
        if block.is_moe:
            ex = block.ffn.experts
            one_expert = ex.w1_EFD[0].numel() + ex.w3_EFD[0].numel() + ex.w2_EDF[0].numel()
            activated += args.n_activated_experts * one_expert
    return main_groups, mtp_groups, activated


VARIANTS = {
    "tiny": {},
    "no_q_lora": {"q_lora_rank": 0},
    "no_shared": {"n_shared_experts": 0},
    "two_shared": {"n_shared_experts": 2},
    "no_dense": {"n_dense_layers": 0},
    "no_mtp": {"n_mtp_layers": 0},
    "two_mtp": {"n_mtp_layers": 2},
    "v2_routing": {"score_func": "softmax", "topk_method": "greedy", "n_expert_groups": 1,
                   "n_limited_groups": 1},
}


@pytest.mark.parametrize("changes", VARIANTS.values(), ids=VARIANTS.keys())
def test_counts_match_a_materialised_model(changes):
    args = ModelArgs.from_preset("tiny").replace(**changes)
    main_groups, mtp_groups, activated = measure(Transformer(args))
    counts = count_params(args)
    assert counts.groups == main_groups
    assert counts.mtp_groups == mtp_groups
    assert counts.total == sum(main_groups.values())
    assert counts.mtp == sum(mtp_groups.values())
    assert counts.activated == activated
    assert counts.activated_without_embed_head == activated - main_groups["embed"] - main_groups["head"]


def test_deepseek_v3_matches_a_meta_device_model():
    args = ModelArgs.from_preset("deepseek-v3")
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = Transformer(args)
    main_groups, mtp_groups, activated = measure(model)
    counts = count_params(args)
    assert counts.groups == main_groups
    assert counts.mtp_groups == mtp_groups
    assert counts.activated == activated


def test_published_totals():
    v3 = count_params(ModelArgs.from_preset("deepseek-v3"))
    assert v3.total == 671_026_419_200  # the V3 report's figure, without MTP
    assert v3.groups["gate_bias"] == 58 * 256  # e_score_correction_bias is part of it
    assert v3.activated == 37_552_297_472  # "37B activated", embedding and head included
    assert v3.mtp == 11_610_068_224  # embedding and head shared, so not counted again
    lite = count_params(ModelArgs.from_preset("deepseek-v2-lite"))
    assert lite.total == 15_706_484_224
    assert lite.mtp == 0 and lite.groups["gate_bias"] == 0


def test_mla_cache_is_71x_smaller_than_mha_for_v3():
    cache = kv_cache_bytes(ModelArgs.from_preset("deepseek-v3"), dtype_bytes=2)
    assert cache.mla_values_per_layer == 512 + 64
    assert cache.mha_values_per_layer == 128 * (192 + 128)
    assert cache.mla_bytes_per_token == 576 * 2 * 61
    assert round(cache.ratio) == 71


def matmul_flops(counter: FlopCounterMode) -> int:
    """What torch counted, less attention's score and value products (SDPA, or the bmm
    of its math path): which kernel SDPA picks, and whether the counter knows it, varies."""
    counts = counter.get_flop_counts()["Global"]
    return sum(n for op, n in counts.items() if "scaled_dot_product" not in str(op) and "bmm" not in str(op))


def test_flops_match_torch_flop_counter():
    """Forward, MTP and training matmul FLOPs of the tiny model, as torch counts them."""
    args = ModelArgs.from_preset("tiny")
    torch.manual_seed(0)
    model = Transformer(args)
    model.set_expert_impl("loop")  # plain matmuls (mm), whatever the grouped path's kernel
    B, T = 2, 16
    tokens = torch.randint(0, args.vocab_size, (B, T))
    with FlopCounterMode(display=False) as main_only:
        model(tokens, attn_impl="naive")
    flops = flops_per_token(args, T)
    assert matmul_flops(main_only) == B * T * flops.matmul
    with FlopCounterMode(display=False) as with_mtp:
        out = model.run(tokens, mtp=True, attn_impl="naive")
    # depth 1 runs over the first T-1 positions
    mtp_matmul = flops_per_token(args, T - 1).mtp - args.n_mtp_layers * 2 * args.n_heads * (
        args.qk_head_dim + args.v_head_dim) * (T - 1)
    assert matmul_flops(with_mtp) - matmul_flops(main_only) == B * (T - 1) * mtp_matmul
    with FlopCounterMode(display=False) as training:
        out = model.run(tokens, mtp=True, attn_impl="naive")
        (out.logits.sum() + out.mtp_logits[0].sum()).backward()
    assert matmul_flops(training) == 3 * matmul_flops(with_mtp)


def test_attention_flops_by_hand():
    args = ModelArgs.from_preset("tiny")  # 3 layers, 4 heads, q.k over 16 + 8, v 16
    flops = flops_per_token(args, 100)
    assert flops.attention == 3 * (2 * 4 * (16 + 8) * 100 + 2 * 4 * 16 * 100)
    assert flops.mtp - flops_per_token(args, 1).mtp == 2 * 4 * (24 + 16) * 99
    assert flops.training == 3 * (flops.forward + flops.mtp)


def test_cli_json_and_errors(capsys, tmp_path):
    assert main(["params", "--preset", "deepseek-v3", "--json", "--seq-len", "1024"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["params"]["total"] == 671_026_419_200
    assert report["flops"]["seq_len"] == 1024
    assert report["kv_cache"]["mla_values_per_layer"] == 576
    path = tmp_path / "args.json"
    ModelArgs.from_preset("tiny").to_json(path)
    assert main(["params", "--config", str(path)]) == 0
    assert "total parameters (without MTP)" in capsys.readouterr().out
    assert main(["params", "--config", str(tmp_path / "missing.json")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["params", "--preset", "tiny", "--seq-len", "0"]) == 1
    assert "seq_len" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="seq_len"):
        flops_per_token(ModelArgs.from_preset("tiny"), 0)
