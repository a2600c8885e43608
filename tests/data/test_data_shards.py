"""Shards: what is written is what is read, manifest counts, corruption detection, exact
resumption of the batch stream, validation batches, unigram entropy."""
import itertools
import json
import math
import shutil

import numpy as np
import pytest
import torch

from dsmoe.data import mathgen
from dsmoe.data.corpus import iter_default_corpus
from dsmoe.data.prepare import prepare
from dsmoe.data.shards import (BatchStream, ShardWriter, TokenShards, file_sha256,
                               token_dtype, unigram_entropy, val_batches, validation_mask)
from dsmoe.errors import DataError


@pytest.fixture(scope="module")
def texts():
    math_docs = [mathgen.as_document(p) for p in itertools.islice(mathgen.problems(), 150)]
    prose = [d.text for d in iter_default_corpus(max_chars_per_domain=20_000, domains=("fr",))]
    return {"math": math_docs, "prose": prose}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, texts):
    src = tmp_path_factory.mktemp("src") / "mixed.jsonl"
    with open(src, "w", encoding="utf-8") as f:
        for domain, docs in texts.items():
            for doc in docs:
                f.write(json.dumps({"text": doc, "domain": domain}) + "\n")
    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare(out, [src], vocab_size=512, val_fraction=0.1, show_progress=False)
    return out


@pytest.fixture(scope="module")
def shards(data_dir):
    return TokenShards(data_dir)


def test_tokens_written_are_tokens_read(shards, texts):
    tok = shards.tokenizer()
    for domain, docs in texts.items():
        mask = validation_mask(docs, 0.1, seed=0)
        for split in ("train", "val"):
            expected = [t for doc, is_val in zip(docs, mask) if is_val == (split == "val")
                        for t in [tok.bos_id, *tok.encode(doc), tok.eos_id]]
            read = np.concatenate([shards.array(r) for r in shards.shards(split, domain)])
            assert read.tolist() == expected, (domain, split)
            text = tok.decode(read.tolist())
            assert text == "".join(d for d, v in zip(docs, mask) if v == (split == "val"))


def test_manifest_counts_and_hashes(shards, texts, data_dir):
    manifest = shards.manifest
    assert manifest["dtype"] == "uint16" and shards.vocab_size == 512
    for domain, docs in texts.items():
        entry = manifest["domains"][domain]
        n_val = sum(validation_mask(docs, 0.1, seed=0))
        assert (entry["train"]["documents"], entry["val"]["documents"]) == (len(docs) - n_val, n_val)
        for split in ("train", "val"):
            assert entry[split]["tokens"] == shards.num_tokens(split, domain) > 0
            assert entry[split]["documents"] == sum(r.documents for r in shards.shards(split, domain))
    for record in shards.records:
        assert file_sha256(data_dir / record.path) == record.sha256
        assert (data_dir / record.path).stat().st_size == 2 * record.tokens
    assert manifest["tokenizer"]["sha256"] == shards.tokenizer().sha256()
    assert manifest["settings"]["vocab_size"] == 512


def test_dtype_choice():
    assert token_dtype(8192) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(129280) == np.uint32


def test_writer_rolls_over_at_document_boundaries(tmp_path):
    writer = ShardWriter(tmp_path, "train", "x", np.dtype(np.uint32), bos_id=0, eos_id=1,
                         max_tokens=10)
    for n in range(5):
        writer.add_document(list(range(100_000, 100_000 + 4 + n)))
    records = writer.close()
    assert [r.path for r in records] == ["train/x-000.bin", "train/x-001.bin", "train/x-002.bin"]
    assert sum(r.documents for r in records) == 5
    first = np.fromfile(tmp_path / records[0].path, dtype="<u4")
    assert first.tolist()[:6] == [0, 100_000, 100_001, 100_002, 100_003, 1]


def test_corrupt_or_truncated_shard_is_detected(data_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(data_dir, copy)
    TokenShards(copy, verify=True)
    victim = copy / "train" / "math-000.bin"
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF
    victim.write_bytes(data)
    TokenShards(copy)  # same size: only the hash can tell
    with pytest.raises(DataError, match=r"math-000\.bin does not match its sha256"):
        TokenShards(copy, verify=True)
    victim.write_bytes(data[:-2])
    with pytest.raises(DataError, match=r"math-000\.bin is .* truncated"):
        TokenShards(copy)
    victim.unlink()
    with pytest.raises(DataError, match=r"math-000\.bin is missing"):
        TokenShards(copy)
    with pytest.raises(DataError, match="no manifest.json.*dsmoe prepare"):
        TokenShards(tmp_path)


def test_batch_shape_and_determinism(shards):
    stream = BatchStream(shards, batch_size=4, seq_len=32, seed=7, extra=2)
    batch = next(stream)
    assert batch.shape == (4, 32 + 1 + 2) and batch.dtype == torch.int64
    again = BatchStream(shards, batch_size=4, seq_len=32, seed=7, extra=2)
    assert torch.equal(next(again), batch)
    assert not torch.equal(BatchStream(shards, batch_size=4, seq_len=32, seed=8, extra=2).batch(0),
                           batch)
    other_rank = BatchStream(shards, batch_size=4, seq_len=32, seed=7, extra=2, rank=1,
                             world_size=2)
    assert not torch.equal(other_rank.batch(0), batch)


def test_resume_continues_with_exactly_the_same_batches(shards):
    def make():
        return BatchStream(shards, batch_size=3, seq_len=16, seed=1, extra=1)

    uninterrupted = make()
    reference = [next(uninterrupted) for _ in range(8)]
    first = make()
    for _ in range(3):
        next(first)
    saved = json.loads(json.dumps(first.state_dict()))  # as it would sit in a checkpoint
    resumed = make()
    resumed.load_state_dict(saved)
    for expected in reference[3:]:
        assert torch.equal(next(resumed), expected)
    with pytest.raises(DataError, match="seq_len: saved 16, now 32"):
        BatchStream(shards, batch_size=3, seq_len=32, seed=1, extra=1).load_state_dict(saved)


def test_rows_are_windows_of_the_chosen_domains(shards):
    train = {d: np.concatenate([shards.array(r) for r in shards.shards("train", d)]).tobytes()
             for d in shards.domains}
    stream = BatchStream(shards, batch_size=16, seq_len=24, seed=0, domains=["math"])
    for row in next(stream):
        assert row.numpy().astype("<u2").tobytes() in train["math"]
    mixed = BatchStream(shards, batch_size=4, seq_len=24, seed=0)
    tokens = {d: shards.num_tokens("train", d) for d in shards.domains}
    for domain, weight in mixed.domain_weights.items():
        assert weight == pytest.approx(tokens[domain] / sum(tokens.values()))
    with pytest.raises(DataError, match="no domain 'poetry'"):
        BatchStream(shards, domains=["poetry"])
    with pytest.raises(DataError, match="shorter seq_len"):
        BatchStream(shards, domains=["math"], seq_len=10**7)


def test_validation_split_is_disjoint_and_by_document(texts):
    for docs in texts.values():
        mask = validation_mask(docs, 0.1, seed=0)
        val = {d for d, v in zip(docs, mask) if v}
        train = {d for d, v in zip(docs, mask) if not v}
        assert val and train and val.isdisjoint(train)
        assert round(len(docs) * 0.1) <= sum(mask) <= round(len(docs) * 0.1) + 2
        # the choice follows the documents, not their order
        reordered = validation_mask(docs[::-1], 0.1, seed=0)[::-1]
        assert reordered == mask
        assert validation_mask(docs, 0.1, seed=1) != mask
    assert validation_mask(["a", "b"], 0.01, seed=0).count(True) == 1
    assert validation_mask(["only"], 0.5, seed=0) == [False]
    assert validation_mask(["same"] * 5, 0.5, seed=0) == [False] * 5
    dup = validation_mask(["x", "y", "x", "z", "x", "w"] * 3, 0.2, seed=0)
    assert len({v for t, v in zip(["x", "y", "x", "z", "x", "w"] * 3, dup) if t == "x"}) == 1


def test_val_batches_are_deterministic_and_held_out(shards):
    batches = list(val_batches(shards, "prose", batch_size=2, seq_len=20, max_batches=3))
    assert len(batches) == 3 and all(b.shape == (2, 21) for b in batches)
    again = list(val_batches(shards, "prose", batch_size=2, seq_len=20, max_batches=3))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    val = np.concatenate([shards.array(r) for r in shards.shards("val", "prose")])
    assert torch.equal(batches[0][0], torch.from_numpy(val[:21].astype(np.int64)))
    assert torch.equal(batches[0][1], torch.from_numpy(val[21:42].astype(np.int64)))
    everything = list(val_batches(shards, "prose", batch_size=5, seq_len=20))
    assert sum(len(b) for b in everything) == len(val) // 21
    with pytest.raises(DataError, match=r"one window of 10000001 validation tokens.*'prose' has \d+.*"
                                        r"--val-fraction \(it used 0.1\)"):
        next(val_batches(shards, "prose", batch_size=2, seq_len=10**7))


def test_unigram_entropy_in_nats(shards):
    tokens = np.concatenate([shards.array(r) for r in shards.shards("train")])
    _, counts = np.unique(tokens, return_counts=True)
    p = counts / counts.sum()
    expected = float(-(p * np.log(p)).sum())
    assert unigram_entropy(shards, "train") == pytest.approx(expected, rel=1e-9)
    assert 0 < expected < math.log(shards.vocab_size)
    assert unigram_entropy(shards, "train", ["math"]) < expected
