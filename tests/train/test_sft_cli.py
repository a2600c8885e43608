"""`dsmoe sft` end to end on the tiny model: the written checkpoint (tokenizer and chat
template included) loads, the held-out loss falls, and bad input leaves nothing behind."""
import json

import pytest

from dsmoe.cli import main
from dsmoe.errors import CheckpointError
from dsmoe.interop.hf import load_model_dir

pytestmark = pytest.mark.slow  # end to end: a model loaded, trained and saved


def test_sft_writes_a_loadable_model_with_its_chat_template(tiny_model_dir, tmp_path):
    out = tmp_path / "sft"
    code = main(["sft", "--model", str(tiny_model_dir), "--out", str(out), "--data", "demo-math",
                 "--demo-size", "40", "--steps", "4", "--batch-size", "2", "--lr", "3e-3",
                 "--eval-math", "1", "--max-new-tokens", "4"])
    assert code == 0
    report = json.loads((out / "training_report.json").read_text())
    assert report["after"]["held_out_loss"] < report["before"]["held_out_loss"]
    assert report["after"]["math"]["problems"] == 1 and report["after"]["math"]["temperature"] == 0.0
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert "<|assistant|>" in config["chat_template"]
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "loss" in s] == [1, 2, 3, 4]
    model, tokenizer = load_model_dir(out)
    assert tokenizer.chat_template == config["chat_template"]
    assert model.args == load_model_dir(tiny_model_dir)[0].args


def test_chats_without_replies_are_refused_before_any_work(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    out = tmp_path / "sft"
    assert main(["sft", "--model", str(tiny_model_dir), "--out", str(out), "--data", str(data)]) == 1
    assert "no assistant turn" in capsys.readouterr().err
    assert not out.exists()


def test_text_is_not_chat_data(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "notes.txt"
    data.write_text("Just some text.\n\nAnother paragraph.\n")
    assert main(["sft", "--model", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--data", str(data)]) == 1
    assert "is not chat data" in capsys.readouterr().err


def test_a_failed_save_leaves_no_half_written_model(tiny_model_dir, tmp_path, monkeypatch):
    from dsmoe.interop import hf
    from dsmoe.train.finetune import save_model_dir

    model, tokenizer = load_model_dir(tiny_model_dir)
    out = tmp_path / "out"
    save_model_dir(model, tokenizer, out, {"run": 1})
    before = sorted(p.name for p in out.iterdir())

    def broken_save(model, path, **kw):
        (path / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(hf, "save_hf", broken_save)
    with pytest.raises(CheckpointError, match="disk full"):  # an I/O failure, translated
        save_model_dir(model, tokenizer, out, {"run": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left
    assert sorted(p.name for p in out.iterdir()) == before  # the previous model is intact
    assert json.loads((out / "training_report.json").read_text()) == {"run": 1}
    assert load_model_dir(out)[0].args == model.args
