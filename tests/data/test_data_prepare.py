"""prepare: user files of every format, the size-capped default corpus, reuse on rerun,
the CLI verb, and a clear DataError (with nothing written) for each bad input."""
import json
import os

import pytest

from dsmoe import cli
from dsmoe.data import prepare as prepare_module
from dsmoe.data.corpus import DOMAINS
from dsmoe.data.prepare import prepare
from dsmoe.data.shards import BatchStream, TokenShards
from dsmoe.errors import DataError

SMALL = dict(vocab_size=512, show_progress=False)
PARAGRAPHS = ["The sun rose over the quiet harbour.", "Gulls argued over a fish.",
              "A bell rang twice, then once more.", "Nobody came down to the boats.",
              "By noon the tide had turned.", "Les bateaux rentrèrent au port avant midi."]


@pytest.fixture()
def user_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "harbour notes.txt").write_text("\n\n".join(PARAGRAPHS) + "\n", encoding="utf-8")
    (src / "readme.md").write_text("# Title\n\nSome *markdown* text.\n\n\n\n```\ncode\n```\n")
    with open(src / "mixed.jsonl", "w", encoding="utf-8") as f:
        for i in range(12):
            f.write(json.dumps({"text": f"record {i}: {'ab' * i}", "domain": "records"}) + "\n")
            f.write(json.dumps({"text": f"untagged line {i}"}) + "\n")
        f.write("\n")  # blank lines are allowed
    return src


def _nothing_written(out):
    """Neither the output nor any temporary sibling exists."""
    return not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_prepare_user_files(user_files, tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["parquet row one", "parquet row two", None, "three"]}),
                   user_files / "table.parquet")
    out = tmp_path / "out"
    manifest = prepare(out, [user_files], **SMALL)
    domains = manifest["domains"]
    assert set(domains) == {"harbour_notes", "readme", "records", "mixed", "table"}
    count = {d: e["documents"] for d, e in domains.items()}
    assert count == {"harbour_notes": 6, "readme": 3, "records": 12, "mixed": 12, "table": 3}
    assert domains["harbour_notes"]["sources"] == [str(user_files / "harbour notes.txt")]
    # fewer than 1/0.05 documents each: every domain holds out the tail of its text
    assert all(e["val"]["documents"] >= 1 and e["held_out"] == "tail" for e in domains.values())
    summary = capsys.readouterr().out
    assert "records" in summary and "train tokens" in summary and "total" in summary
    assert "harbour_notes: the last " in summary
    shards = TokenShards(out, verify=True)
    tok = shards.tokenizer()
    first = shards.array(shards.shards("train", "harbour_notes")[0]).tolist()
    assert tok.decode(first[:first.index(tok.eos_id)]) in PARAGRAPHS
    val = shards.array(shards.shards("val", "harbour_notes")[0]).tolist()
    assert PARAGRAPHS[-1].endswith(tok.decode(val[1:-1]))  # <bos> tail <eos>


def test_rerun_reuses_and_a_changed_setting_rebuilds(user_files, tmp_path, capsys):
    out = tmp_path / "out"
    first = prepare(out, [user_files / "mixed.jsonl"], **SMALL)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    capsys.readouterr()
    assert prepare(out, [user_files / "mixed.jsonl"], **SMALL) == first
    assert "reused" in capsys.readouterr().out
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    rebuilt = prepare(out, [user_files / "mixed.jsonl"], seed=1, **SMALL)
    assert rebuilt["input_hash"] != first["input_hash"]
    assert "reused" not in capsys.readouterr().out
    # a damaged output is rebuilt, not reused
    shard = out / rebuilt["shards"][0]["path"]
    shard.write_bytes(shard.read_bytes()[:-2])
    prepare(out, [user_files / "mixed.jsonl"], seed=1, **SMALL)
    assert "not reusing" in capsys.readouterr().out
    TokenShards(out, verify=True)


def test_default_corpus_size_capped(tmp_path):
    out = tmp_path / "default"
    manifest = prepare(out, max_chars_per_domain=40_000, **SMALL)
    assert list(manifest["domains"]) == list(DOMAINS)
    for domain, entry in manifest["domains"].items():
        assert entry["train"]["tokens"] > 0 and entry["val"]["documents"] >= 1, domain
    assert manifest["domains"]["code"]["licenses"] == ["PSF-2.0"]
    assert manifest["settings"]["data"] is None
    assert manifest["settings"]["max_chars_per_domain"] == 40_000
    batch = next(BatchStream(TokenShards(out), batch_size=2, seq_len=64, extra=1))
    assert batch.shape == (2, 66)


def test_cli_verb(user_files, tmp_path, capsys):
    out = tmp_path / "cli-out"
    argv = ["prepare", "--out", str(out), "--data", str(user_files / "mixed.jsonl"),
            "--vocab-size", "512", "--seed", "3"]
    assert cli.main(argv) == 0
    assert json.loads((out / "manifest.json").read_text())["settings"]["seed"] == 3
    assert cli.main(["prepare", "--out", str(tmp_path / "x"), "--data", "nope.txt"]) == 1
    assert "nope.txt does not exist" in capsys.readouterr().err


def _write(path, content: str | bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


BAD_INPUTS = {
    "missing.txt": (None, r"missing\.txt does not exist"),
    "empty.txt": ("", r"empty\.txt contains no text"),
    "blank.md": ("\n   \n\t\n", r"blank\.md contains no text"),
    "latin1.txt": (b"caf\xe9 au lait", r"latin1\.txt is not UTF-8"),
    "notes.csv": ("a,b\n", r"unsupported file type '\.csv'"),
    "broken.jsonl": ('{"text": "ok"}\n{"text": oops}\n', r"broken\.jsonl:2: not valid JSON"),
    "notext.jsonl": ('{"body": 1}\n', r"notext\.jsonl:1: expected an object with a string 'text'"),
    "baddomain.jsonl": ('{"text": "x", "domain": "../etc"}\n',
                        r"baddomain\.jsonl:1: domain '\.\./etc' is not a valid name"),
    "emptydir/": (None, r"emptydir holds no \.txt/\.md/\.jsonl/\.parquet files"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_raises_before_writing(tmp_path, name):
    content, message = BAD_INPUTS[name]
    path = tmp_path / "in" / name.rstrip("/")
    if name.endswith("/"):
        path.mkdir(parents=True)
    elif content is not None:
        _write(path, content)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=message):
        prepare(out, [path], **SMALL)
    assert _nothing_written(out)


def test_parquet_without_text_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"body": ["x"]}), path)
    with pytest.raises(DataError, match=r"t\.parquet has no 'text' column"):
        prepare(tmp_path / "out", [path], **SMALL)
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"cannot read .*t\.parquet as Parquet"):
        prepare(tmp_path / "out", [path], **SMALL)


def test_bad_settings_and_foreign_out_dir(user_files, tmp_path):
    data = [user_files / "mixed.jsonl"]
    with pytest.raises(DataError, match=r"--val-fraction must be in \[0, 0.5\), got 0.7"):
        prepare(tmp_path / "out", data, val_fraction=0.7, **{**SMALL})
    with pytest.raises(DataError, match="vocab_size 50 is out of range"):
        prepare(tmp_path / "out", data, vocab_size=50, show_progress=False)
    assert _nothing_written(tmp_path / "out")
    foreign = tmp_path / "mine"
    _write(foreign / "precious.txt", "keep me")
    with pytest.raises(DataError, match="not a dsmoe data directory"):
        prepare(foreign, data, **SMALL)
    assert (foreign / "precious.txt").read_text() == "keep me"


def test_failure_midway_leaves_the_previous_output(user_files, tmp_path, monkeypatch):
    out = tmp_path / "out"
    data = [user_files / "mixed.jsonl"]
    before = prepare(out, data, **SMALL)

    def explode(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(prepare_module, "write_manifest", explode)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare(out, data, seed=5, **SMALL)
    assert json.loads((out / "manifest.json").read_text()) == before
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]
    TokenShards(out, verify=True)


def _two_domains(folder):
    """A prose domain and a code domain whose identifiers occur nowhere else."""
    folder.mkdir()
    with open(folder / "docs.jsonl", "w", encoding="utf-8") as f:
        for i in range(40):
            f.write(json.dumps({"text": f"{PARAGRAPHS[i % 5]} {PARAGRAPHS[(i + 2) % 5]}", "domain": "prose"}) + "\n")
            f.write(json.dumps({"text": f"def quxzzy_handler_{i % 4}(frobnicate_value):\n    return "
                                        f"frobnicate_value.quxzzy_{i % 3}()\n", "domain": "code"}) + "\n")
    return folder


def test_tokenizer_share_learns_merges_from_a_share_of_a_domain(tmp_path):
    from dsmoe.data.tokenizer import Tokenizer
    src = _two_domains(tmp_path / "src")
    full = prepare(tmp_path / "full", [src], vocab_size=320, val_fraction=0.1, show_progress=False)
    shared = prepare(tmp_path / "shared", [src], vocab_size=320, val_fraction=0.1, show_progress=False,
                     tokenizer_shares={"code": 0.1})
    assert shared["settings"]["tokenizer_shares"] == {"code": 0.1}
    assert "tokenizer_shares" not in full["settings"]
    # every document is still encoded: the same documents, in both splits
    for split in ("train", "val"):
        assert shared["domains"]["code"][split]["documents"] == full["domains"]["code"][split]["documents"]
    # fewer of the code domain's strings became tokens
    code_doc = "def quxzzy_handler_0(frobnicate_value):\n    return frobnicate_value.quxzzy_0()\n"
    assert (len(Tokenizer.from_dir(tmp_path / "shared").encode(code_doc))
            > len(Tokenizer.from_dir(tmp_path / "full").encode(code_doc)))
    picked = prepare_module.tokenizer_documents(list(range(36)), 0.1)
    assert picked == [0, 9, 18, 27]  # 4 of 36, evenly spread
    assert prepare_module.tokenizer_documents(list(range(5)), 1.0) == list(range(5))
    assert prepare_module.tokenizer_documents(list(range(5)), 0.01) == [0]


def test_tokenizer_share_equals_training_on_the_chosen_documents(tmp_path):
    from dsmoe.data.holdout import hold_out
    from dsmoe.data.tokenizer import Tokenizer, train_tokenizer
    from dsmoe.data.userfiles import load_documents
    src = _two_domains(tmp_path / "src")
    prepare(tmp_path / "out", [src], vocab_size=320, val_fraction=0.1, show_progress=False,
            tokenizer_shares={"code": 0.25, "prose": 0.5})
    docs = load_documents([str(src)])
    texts = []
    for domain, share in (("prose", 0.5), ("code", 0.25)):
        train = hold_out([d for d in docs if d.domain == domain], 0.1, 0).train
        texts += [d.text for d in prepare_module.tokenizer_documents(train, share)]
    expected = train_tokenizer(texts, 320)
    assert Tokenizer.from_dir(tmp_path / "out").sha256() == expected.sha256()


@pytest.mark.parametrize("shares, message", [({"cod": 0.5}, "does not have; its domains are prose, code"),
                                             ({"code": 0.0}, r"must be in \(0, 1\].*code=0.0"),
                                             ({"code": 1.5}, r"must be in \(0, 1\]"),
                                             ({"code": float("nan")}, r"must be in \(0, 1\]")])
def test_bad_tokenizer_share_is_refused_before_writing(tmp_path, shares, message):
    src = _two_domains(tmp_path / "src")
    with pytest.raises(DataError, match=message):
        prepare(tmp_path / "out", [src], vocab_size=320, show_progress=False, tokenizer_shares=shares)
    assert _nothing_written(tmp_path / "out")


def test_tokenizer_share_on_the_command_line(tmp_path, capsys):
    src = _two_domains(tmp_path / "src")
    assert cli.main(["prepare", "--out", str(tmp_path / "out"), "--data", str(src), "--vocab-size", "320",
                     "--tokenizer-share", "code=0.5"]) == 0
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["settings"]["tokenizer_shares"] == {"code": 0.5}
    for bad in ("code", "code=", "=0.5", "code=half"):
        with pytest.raises(DataError, match="DOMAIN=SHARE pairs"):
            prepare_module.parse_shares([bad])
