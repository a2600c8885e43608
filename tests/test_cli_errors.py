"""No bad input on the command line ends in a traceback: every verb answers a missing path,
an unknown preset, NaN, infinity, a negative or non-numeric number with one line on stderr
and a non-zero exit (1: refused while running, 2: malformed command line)."""
import errno
import json
import subprocess
import sys

import pytest
import torch

from dsmoe import ModelArgs, Transformer, cli
from dsmoe.data.tokenizer import train_tokenizer
from dsmoe.errors import ConfigError


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random tiny model with a small tokenizer: enough for the verbs to reach their checks."""
    from dsmoe.interop.hf import save_hf

    torch.manual_seed(0)
    tokenizer = train_tokenizer(["one two three four five six seven eight nine ten"] * 50,
                                vocab_size=300)
    path = tmp_path_factory.mktemp("model") / "hf"
    save_hf(Transformer(ModelArgs.from_preset("tiny")), path, tokenizer=tokenizer)
    return path


@pytest.fixture()
def places(tmp_path, model_dir):
    """Names the cases below refer to: {model}, {missing}, {file}, {folder}, {out}, {bad_yarn}."""
    (tmp_path / "file.txt").write_text("some text\n")
    yarn = {**ModelArgs.from_preset("tiny").to_dict(), "rope_factor": 4.0, "beta_fast": 0}
    (tmp_path / "bad_yarn.json").write_text(json.dumps({"model": yarn, "steps": 1}))
    (tmp_path / "nan_lr.json").write_text('{"model": "tiny", "lr": NaN}')
    return {"model": str(model_dir), "missing": str(tmp_path / "missing"),
            "file": str(tmp_path / "file.txt"), "folder": str(tmp_path),
            "out": str(tmp_path / "out"), "bad_yarn": str(tmp_path / "bad_yarn.json"),
            "nan_lr": str(tmp_path / "nan_lr.json")}


# (argv, exit code, text the one-line message must hold)
CASES = [
    ("params --preset huge", 1, "unknown preset 'huge'; choose one of"),
    ("params --config {missing}", 1, "does not exist"),
    ("params --config {folder}", 1, "Is a directory"),
    ("params --preset tiny --seq-len -5", 1, "seq_len=-5"),
    ("params --preset tiny --seq-len abc", 2, "invalid int value: 'abc'"),
    ("prepare --out {out} --data {missing}", 1, "does not exist; check the --data path"),
    ("prepare --out {out} --data {file} --val-fraction nan", 1, "--val-fraction must be in"),
    ("prepare --out {out} --data {file} --val-fraction inf", 1, "--val-fraction must be in"),
    ("prepare --out {out} --data {file} --val-fraction half", 2, "invalid float value"),
    ("prepare --out {file}/sub --data {file}", 1, "cannot create"),
    ("train --preset tiny --data {missing} --out {out}", 1, "create it with `dsmoe prepare"),
    ("train --preset huge --data {missing} --out {out}", 1, "unknown preset 'huge'"),
    ("train --preset tiny --data {folder} --out {out} --steps -3", 1, "TrainConfig.steps=-3"),
    ("train --preset tiny --data {folder} --out {out} --steps 1e3", 2, "invalid int value"),
    ("train --config {nan_lr} --data {folder} --out {out}", 1, "TrainConfig.lr=nan"),
    ("train --config {bad_yarn} --data {folder} --out {out}", 1, "ModelArgs.beta_fast=0"),
    ("generate --model {missing} --prompt hi", 1, "is not a directory"),
    ("generate --model {model} --prompt hi --temperature nan", 1, "temperature=nan"),
    ("generate --model {model} --prompt hi --top-p inf", 1, "top_p=inf"),
    ("sft --model {model} --out {out} --data demo-math --lr nan", 1, "lr=nan"),
    ("grpo --model {model} --out {out} --lr nan", 1, "lr=nan"),
    ("grpo --model {model} --out {out} --lr -1", 1, "lr=-1"),
    ("convert {missing} {out}", 1, "is not a directory"),
    ("route --model {model} --file {missing}", 1, "no such file"),
    ("nonsense", 2, "unknown verb 'nonsense'"),
]


@pytest.mark.parametrize("command, code, says", CASES, ids=[c[0] for c in CASES])
def test_bad_command_lines_give_one_line(command, code, says, places, capsys):
    argv = [part.format(**places) for part in command.split()]
    assert cli.main(argv) == code
    err = capsys.readouterr().err.strip()
    assert says in err, err
    message = err.splitlines()[-1]  # argparse puts its usage line first
    assert message.startswith("dsmoe") and "Traceback" not in err


def test_operating_system_errors_and_missing_packages_are_one_line(monkeypatch, capsys):
    from dsmoe.analysis import flops

    def disk_full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/out/model.safetensors")

    monkeypatch.setattr(flops, "run", disk_full)
    assert cli.main(["params", "--preset", "tiny"]) == 1
    assert capsys.readouterr().err == ("dsmoe params: error: No space left on device: "
                                       "/out/model.safetensors; free disk space, or choose an "
                                       "output on another disk\n")

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(flops, "run", interrupted)
    assert cli.main(["params", "--preset", "tiny"]) == 130
    assert capsys.readouterr().err == "dsmoe params: interrupted\n"

    monkeypatch.setitem(cli.VERBS, "params", ("dsmoe_optional_extra.module", "help"))
    assert cli.main(["params"]) == 1
    assert "needs the Python package 'dsmoe_optional_extra'" in capsys.readouterr().err


def test_traceback_on_request(monkeypatch, tmp_path):
    monkeypatch.setenv("DSMOE_TRACEBACK", "1")
    with pytest.raises(ConfigError, match="Is a directory"):
        cli.main(["params", "--config", str(tmp_path)])


def test_a_real_process_prints_no_traceback(tmp_path):
    """The same through `python -m dsmoe`, as a user runs it (one process: each costs seconds)."""
    done = subprocess.run([sys.executable, "-m", "dsmoe", "params", "--config", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr == f"dsmoe params: error: cannot read {tmp_path} (Is a directory)\n"
