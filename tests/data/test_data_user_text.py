"""A user's own text, through the command line: `dsmoe prepare --data X` then `dsmoe train`.

Each input either trains (a couple of steps of the tiny preset, which proves `train`
accepts the prepared folder, validation included) or stops with a one-line message that
names the file and a fix that exists; a failing prepare into an already prepared folder
leaves that folder exactly as it was.
"""
import errno
import json
import random
import re

import pytest

from dsmoe import cli
from dsmoe.data import prepare as prepare_module
from dsmoe.data.shards import TokenShards

WORDS = ("the harbour gulls argued over a fish while the tide turned and nobody came down to "
         "the boats until noon when a bell rang twice").split()


def sentence(rng, n=12):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def notes_text(n_lines=400, seed=0):
    rng = random.Random(seed)
    return "".join(sentence(rng) + "\n" for _ in range(n_lines))


def prepare_argv(out, *data, extra=()):
    return ["prepare", "--out", str(out), "--data", *map(str, data), "--vocab-size", "512", *extra]


def train(data, out, capsys):
    code = cli.main(["train", "--preset", "tiny", "--data", str(data), "--out", str(out),
                     "--steps", "2", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "validation loss" in captured.out
    return captured


def fails(argv, capsys):
    """Run a verb that must fail; the one line it ends with on stderr."""
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    return err.splitlines()[-1]  # progress bars, if any, come before it


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """An already prepared folder that every failing prepare below must leave intact."""
    root = tmp_path_factory.mktemp("prepared")
    (root / "keep.txt").write_text(notes_text(seed=7), encoding="utf-8")
    assert cli.main(prepare_argv(root / "data", root / "keep.txt")) == 0
    return root / "data"


def test_a_file_of_lines_trains(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text(notes_text(), encoding="utf-8")
    assert cli.main(prepare_argv(tmp_path / "data", notes, extra=["--val-fraction", "0.1"])) == 0
    out = capsys.readouterr().out
    assert "notes: the last " in out and "(1 document)" in out
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["settings"]["val_fraction"] == 0.1
    entry = manifest["domains"]["notes"]
    assert entry["documents"] == 1 and entry["held_out"] == "tail" and entry["val"]["tokens"] > 129
    assert 0.05 < entry["val"]["chars"] / (entry["val"]["chars"] + entry["train"]["chars"]) < 0.15
    train(tmp_path / "data", tmp_path / "run", capsys)
    assert (tmp_path / "run" / "hf" / "config.json").is_file()


def test_one_enormous_line_trains(tmp_path, capsys):
    line = tmp_path / "line.txt"
    rng = random.Random(1)
    line.write_text(" ".join(sentence(rng) for _ in range(500)), encoding="utf-8")  # no newline
    assert cli.main(prepare_argv(tmp_path / "data", line)) == 0
    assert "line: the last " in capsys.readouterr().out
    train(tmp_path / "data", tmp_path / "run", capsys)


def test_a_folder_of_text_with_empty_and_foreign_files_trains(tmp_path, capsys):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(notes_text(seed=2), encoding="utf-8")
    (folder / "sub" / "b.md").write_bytes(b"\xef\xbb\xbf" + notes_text(seed=3).encode())  # BOM
    (folder / "empty.txt").write_text("")
    (folder / "photo.jpg").write_bytes(bytes(range(256)) * 4)
    assert cli.main(prepare_argv(tmp_path / "data", folder)) == 0
    out = capsys.readouterr().out
    assert "skipped 1 file(s)" in out and "photo.jpg" in out
    assert f"skipped {folder / 'empty.txt'}: it contains no text" in out
    shards = TokenShards(tmp_path / "data")
    assert shards.domains == ["a", "b"]
    first = shards.array(shards.shards("train", "b")[0]).tolist()
    assert not shards.tokenizer().decode(first[1:20]).startswith("\ufeff")  # BOM dropped
    train(tmp_path / "data", tmp_path / "run", capsys)


BAD = {  # file name: (content, what the message must say)
    "empty.txt": (b"", r"empty\.txt contains no text; remove it from --data or fill it"),
    "blank.txt": (b"\n \n\t\n", r"blank\.txt contains no text"),
    "zeros.txt": (b"\0" * 4096, r"zeros\.txt looks like a binary file \(it holds NUL bytes\)"),
    "random.txt": (random.Random(0).randbytes(4096), r"random\.txt is not UTF-8 text .*iconv"),
    "latin1.txt": ("café crème\n".encode("latin-1"), r"latin1\.txt is not UTF-8 text .*iconv"),
    "utf16.txt": ("notes\n".encode("utf-16"), r"utf16\.txt is UTF-16 text; .*iconv -f UTF-16"),
    "image.png": (b"\x89PNG\r\n\x1a\n" + b"\0" * 64, r"unsupported file type '\.png'"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_a_bad_file_stops_with_a_clear_message_and_keeps_what_was_prepared(
        name, prepared, tmp_path, capsys):
    content, message = BAD[name]
    path = tmp_path / name
    path.write_bytes(content)
    before = snapshot(prepared.parent)
    err = fails(prepare_argv(prepared, path), capsys)
    assert re.search(message, err), err
    assert snapshot(prepared.parent) == before
    TokenShards(prepared, verify=True)


def test_a_folder_mixing_bad_files_names_every_one(prepared, tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "good.txt").write_text(notes_text(seed=4), encoding="utf-8")
    for name in ("zeros.txt", "latin1.txt", "utf16.txt"):
        (folder / name).write_bytes(BAD[name][0])
    (folder / "empty.txt").write_text("")
    before = snapshot(prepared.parent)
    err = fails(prepare_argv(prepared, folder), capsys)
    assert "3 input files cannot be used" in err
    assert all(name in err for name in ("zeros.txt", "latin1.txt", "utf16.txt"))
    assert "good.txt" not in err and "empty.txt" not in err
    assert snapshot(prepared.parent) == before


@pytest.mark.parametrize("argv, message", [
    (["--val-fraction", "nan"], r"--val-fraction must be in \[0, 0.5\), got nan"),
    (["--val-fraction", "0.5"], r"--val-fraction must be in \[0, 0.5\)"),
    (["--vocab-size", "3"], r"vocab_size 3 is out of range"),
])
def test_bad_settings_keep_what_was_prepared(argv, message, prepared, tmp_path, capsys):
    good = tmp_path / "good.txt"
    good.write_text(notes_text(seed=5), encoding="utf-8")
    before = snapshot(prepared.parent)
    assert re.search(message, fails(prepare_argv(prepared, good, extra=argv), capsys))
    assert snapshot(prepared.parent) == before


@pytest.mark.parametrize("lines, extra, fix", [
    (400, ["--val-fraction", "0"], "larger --val-fraction (it used 0.0)"),
    (60, [], "larger --val-fraction (it used 0.05)"),  # a tail too short for one window
])
def test_train_without_enough_validation_text_refuses_before_training(
        lines, extra, fix, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text(notes_text(lines), encoding="utf-8")
    assert cli.main(prepare_argv(tmp_path / "data", notes, extra=extra)) == 0
    capsys.readouterr()
    err = fails(["train", "--preset", "tiny", "--data", str(tmp_path / "data"),
                 "--out", str(tmp_path / "run"), "--steps", "2", "--no-progress"], capsys)
    assert "one window of 129 validation tokens" in err and fix in err
    assert 'a shorter "seq_len" in a --config file' in err
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any step


def test_a_full_disk_midway_is_a_data_error_and_keeps_what_was_prepared(
        prepared, tmp_path, capsys, monkeypatch):
    good = tmp_path / "good.txt"
    good.write_text(notes_text(seed=6), encoding="utf-8")
    before = snapshot(prepared.parent)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(prepare_module, "write_manifest", disk_full)
    err = fails(prepare_argv(prepared, good), capsys)
    assert err == (f"dsmoe prepare: error: could not write {prepared} (No space left on device); "
                   f"{prepared} was not replaced. Free disk space (or fix the folder's "
                   "permissions) and run the command again")
    assert snapshot(prepared.parent) == before  # no temporary folder left behind either


def test_many_bad_files_are_counted_and_the_first_ten_named(tmp_path, capsys):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(12):
        (folder / f"blob{i:02d}.txt").write_bytes(b"\0\1\2")
    err = fails(prepare_argv(tmp_path / "data", folder), capsys)
    assert err.startswith("dsmoe prepare: error: 12 input files cannot be used: ")
    assert "blob09.txt" in err and "blob10.txt" not in err and err.endswith("and 2 more")
    assert not (tmp_path / "data").exists()


def test_a_device_is_not_a_text_file(tmp_path, capsys):
    err = fails(prepare_argv(tmp_path / "data", "/dev/null"), capsys)
    assert err.endswith("/dev/null is not a regular file or folder; give text files or folders")
