"""`dsmoe expand` end to end on the tiny model: the written checkpoint has the new expert
count and its old experts unchanged; an expansion that breaks the group rules writes nothing."""
import json

import pytest

import torch

from dsmoe.cli import main
from dsmoe.interop.hf import load_model_dir

pytestmark = pytest.mark.slow  # end to end: a model loaded, trained and saved

NEW_DOMAIN = "\n\n".join(f"int f{i}(int x) {{ return x * {i} + 1; }} /* C function {i} */" for i in range(16))


def test_expand_writes_a_model_with_more_experts_and_old_ones_intact(tiny_model_dir, tmp_path):
    data = tmp_path / "c_code.txt"
    data.write_text(NEW_DOMAIN)
    out = tmp_path / "expanded"
    assert main(["expand", "--model", str(tiny_model_dir), "--out", str(out), "--data", str(data),
                 "--add", "4", "--eval-domains", "demo-math", "--steps", "2", "--batch-size", "2",
                 "--lr", "3e-3", "--eval-rows", "2"]) == 0
    report = json.loads((out / "training_report.json").read_text())
    assert report["experts"] == {"before": 8, "after": 12} and report["old_frozen"]
    assert set(report["losses"]["after"]) == {"new", "demo-math"}
    assert report["change"]["new"] == report["losses"]["after"]["new"] - report["losses"]["before"]["new"]
    assert 0 <= report["new_expert_share"]["after"]["new"] <= 1
    assert json.loads((out / "config.json").read_text())["n_routed_experts"] == 12

    base, _ = load_model_dir(tiny_model_dir)
    grown, _ = load_model_dir(out)
    old_rows = torch.tensor([0, 1, 3, 4, 6, 7, 9, 10])
    for i in (1, 2):
        for w in ("w1_EFD", "w3_EFD", "w2_EDF"):
            assert torch.equal(getattr(grown.layers[i].ffn.experts, w)[old_rows],
                               getattr(base.layers[i].ffn.experts, w))
        assert torch.equal(grown.layers[i].ffn.gate.weight[old_rows], base.layers[i].ffn.gate.weight)
        assert torch.equal(grown.layers[i].ffn.gate.bias[old_rows], base.layers[i].ffn.gate.bias)
    assert torch.equal(grown.layers[0].attn.wkv_a.weight, base.layers[0].attn.wkv_a.weight)


def test_an_expansion_breaking_the_group_rules_writes_nothing(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "expanded"
    assert main(["expand", "--model", str(tiny_model_dir), "--out", str(out), "--data", "math",
                 "--add", "6"]) == 1
    assert "breaks the group rules" in capsys.readouterr().err
    assert not out.exists()
