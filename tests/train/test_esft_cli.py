"""`dsmoe esft` end to end on the tiny model: selection, trained fraction, ESFT against full
fine-tuning on the task and on another domain, and a selection of nothing refused."""
import json

import pytest

import torch

from dsmoe.cli import main
from dsmoe.interop.hf import load_model_dir

pytestmark = pytest.mark.slow  # end to end: a model loaded, trained and saved

OTHER = "\n\n".join(f"Paragraph {i}: the river runs past the old mill and the bridge." for i in range(12))


def test_esft_trains_only_the_selected_experts_and_reports_both_runs(tiny_model_dir, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text(OTHER)
    out = tmp_path / "esft"
    assert main(["esft", "--model", str(tiny_model_dir), "--out", str(out), "--task", "math",
                 "--corpus-chars", "20000", "--eval-domains", str(other), "--share", "0.3", "--steps", "2", "--batch-size", "2",
                 "--lr", "3e-3", "--eval-rows", "2", "--affinity-rows", "4"]) == 0
    report = json.loads((out / "training_report.json").read_text())
    selection = report["selection"]
    assert len(selection) == 2 and all(1 <= len(s) < 8 for s in selection)
    per_expert = 3 * 32 * 64
    assert report["esft"]["trainable"] == per_expert * sum(map(len, selection))
    assert report["esft"]["trainable_fraction"] < 0.25 < report["full"]["trainable_fraction"] == 1.0
    assert set(report["start"]["losses"]) == {"task", str(other)}
    for run in ("esft", "full"):
        assert report["gain"][run]["task"] == report["start"]["losses"]["task"] - report[run]["losses"]["task"]
    assert report["gain"]["full"]["task"] > 0
    for shares in (report["affinity"]["gate"], report["affinity"]["token"]):
        assert all(abs(sum(row) - 1) < 1e-9 for row in shares)

    base, _ = load_model_dir(tiny_model_dir)
    tuned, _ = load_model_dir(out)
    base_state, tuned_state = base.state_dict(), tuned.state_dict()
    for name, value in tuned_state.items():
        if ".ffn.experts." in name and name.startswith(("layers.1.", "layers.2.")):
            chosen = selection[int(name.split(".")[1]) - 1]
            for e in range(8):
                assert torch.equal(value[e], base_state[name][e]) == (e not in chosen), (name, e)
        else:
            assert torch.equal(value, base_state[name]), name


def test_a_selection_of_nothing_is_refused(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "esft"
    assert main(["esft", "--model", str(tiny_model_dir), "--out", str(out), "--task", "demo-math",
                 "--share", "0"]) == 1
    assert "selects no expert" in capsys.readouterr().err
    assert not out.exists()
