"""`dsmoe grpo` end to end on the tiny model with the engine's rollouts: logs and report,
a user reward function, and reward functions that fail stopping the run with nothing written."""
import json

import pytest

from dsmoe.cli import main
from dsmoe.interop.hf import load_model_dir

pytestmark = pytest.mark.slow  # end to end: a model loaded, trained and saved

ARGS = ["--iterations", "2", "--prompts", "2", "--group-size", "3", "--max-new-tokens", "6",
        "--eval-problems", "2", "--eval-samples", "2", "--micro-batch", "4", "--lr", "1e-3"]


def test_grpo_logs_every_iteration_and_reports_held_out_accuracy(tiny_model_dir, tmp_path):
    out = tmp_path / "grpo"
    assert main(["grpo", "--model", str(tiny_model_dir), "--out", str(out), *ARGS]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2]
    for r in records:
        assert 0 <= r["accuracy"] <= 1 and r["kl"] >= 0 and 1 <= r["response_length"] <= 6
        assert r["groups_without_signal"] <= 2
    report = json.loads((out / "training_report.json").read_text())
    assert report["reward"] == "math verifier"
    for when in ("before", "after"):
        greedy, sampled = report["held_out"][when]["greedy"], report["held_out"][when]["sampled"]
        assert greedy["problems"] == 2 == sampled["problems"] and sampled["samples"] == 2
        assert 0 <= sampled["accuracy"] <= 1 and sampled["temperature"] == 1.0
    change = report["held_out"]["change"]["sampled"]
    after, before = report["held_out"]["after"]["sampled"], report["held_out"]["before"]["sampled"]
    assert change["draws"] == 4 and change["change"] == pytest.approx(after["accuracy"] - before["accuracy"])
    assert load_model_dir(out)[0].args == load_model_dir(tiny_model_dir)[0].args


def test_user_reward_function_drives_the_update(tiny_model_dir, tmp_path):
    reward = tmp_path / "reward.py"
    reward.write_text("def longer(prompt, completion, answer, **info):\n"
                      "    return float(len(completion))\n")
    out = tmp_path / "grpo"
    assert main(["grpo", "--model", str(tiny_model_dir), "--out", str(out), *ARGS,
                 "--iterations", "1", "--eval-problems", "0", "--reward-fn", f"{reward}:longer"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["reward"] >= 1  # lengths, not the 0/1 verifier
    assert json.loads((out / "training_report.json").read_text())["reward"] == f"{reward}:longer"


def test_failing_reward_functions_stop_the_run_with_nothing_written(tiny_model_dir, tmp_path, capsys):
    reward = tmp_path / "reward.py"
    reward.write_text("def boom(prompt, completion, **info):\n    raise ValueError('no')\n"
                      "def text(prompt, completion, **info):\n    return 'good'\n")
    for name, message in [("boom", "raised ValueError: no"), ("text", "returned 'good'"),
                          ("missing", "has no function 'missing'")]:
        out = tmp_path / name
        assert main(["grpo", "--model", str(tiny_model_dir), "--out", str(out), *ARGS,
                     "--eval-problems", "0", "--reward-fn", f"{reward}:{name}"]) == 1
        assert message in capsys.readouterr().err
        assert not out.exists()
