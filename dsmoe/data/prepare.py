"""`dsmoe prepare`: text in, tokenizer + packed token shards + manifest out.

Design note
-----------
Inputs are the embedded default corpus (corpus.py) or files given with `--data`
(userfiles.py: text, JSONL, Parquet, folders).

Steps: read and check every input (every unusable file is named with its fix in one
`DataError`, before anything is written), hold out a validation share of each domain
(holdout.py: whole documents, or the tail of the text when a domain has too few documents,
as a single notes file does) and print what was held out, train the tokenizer on the
training text only, encode, pack, and write the manifest last. Everything is written
into a temporary sibling directory that is renamed into place at the end, so a failed or
interrupted prepare leaves the previous output (or nothing) behind, never half a directory.

Re-running is cheap: the manifest stores a hash of the documents' contents and of every
setting; when they match and the shards verify, the existing output is reused.

Deliberately not here: deduplication, filtering, streaming inputs larger than memory
(the texts of one run are held in memory, which suits corpora up to a few GB), or
mixing the default corpus with user files in one run.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Iterable

from dsmoe.atomic import discard_temp_dir, make_temp_dir, remove_leftovers, swap_into_place
from dsmoe.data.corpus import DEFAULT_MAX_CHARS_PER_DOMAIN, Document, iter_default_corpus
from dsmoe.data.holdout import NOTHING, HeldOut, hold_out
from dsmoe.data.shards import (MANIFEST_FILE, MANIFEST_FORMAT, MANIFEST_VERSION, SPLITS,
                               ShardWriter, TokenShards, read_manifest, token_dtype,
                               write_manifest)
from dsmoe.data.tokenizer import (DEFAULT_VOCAB_SIZE, Tokenizer, check_vocab_size,
                                  train_tokenizer)
from dsmoe.data.userfiles import load_documents
from dsmoe.errors import DataError

#: Bump when the same inputs and settings would now produce different output files.
PREPARE_VERSION = 2  # 2: domains with few documents hold out the tail of their text
DEFAULT_VAL_FRACTION = 0.05
_ENCODE_CHUNK_DOCS = 512


# --- the pipeline --------------------------------------------------------------------------

def _by_domain(documents: Iterable[Document]) -> dict[str, list[Document]]:
    """Documents grouped by domain, domains in order of first appearance."""
    groups: dict[str, list[Document]] = defaultdict(list)
    for doc in documents:
        groups[doc.domain].append(doc)
    return dict(groups)


def _input_hash(groups: dict[str, list[Document]], settings: dict) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for domain, docs in groups.items():
        for doc in docs:
            header = json.dumps([domain, doc.source, doc.license, len(doc.text)])
            digest.update(header.encode())
            digest.update(doc.text.encode())
    return digest.hexdigest()


def _reusable(out: Path, input_hash: str) -> dict | None:
    """The existing manifest when `out` already holds this exact output, else None."""
    if not (out / MANIFEST_FILE).is_file():
        return None
    try:
        manifest = read_manifest(out)
        if manifest.get("input_hash") != input_hash:
            return None
        TokenShards(out, verify=True)
        Tokenizer.from_dir(out)
    except DataError as err:
        print(f"prepare: not reusing {out}: {err}")
        return None
    return manifest


def _check_settings(vocab_size: int, val_fraction: float) -> None:
    if not 0 <= val_fraction < 0.5:  # also refuses NaN
        raise DataError(f"--val-fraction must be in [0, 0.5), got {val_fraction}")
    check_vocab_size(vocab_size)


def _check_tokenizer_shares(shares: dict[str, float], domains: Iterable[str]) -> None:
    domains = list(domains)
    unknown = sorted(set(shares) - set(domains))
    if unknown:
        raise DataError(f"--tokenizer-share names domain(s) {', '.join(unknown)} that the data "
                        f"does not have; its domains are {', '.join(domains)}")
    bad = {d: v for d, v in shares.items() if not 0 < v <= 1}  # also refuses NaN
    if bad:
        raise DataError("--tokenizer-share must be in (0, 1] for each domain, got "
                        + ", ".join(f"{d}={v}" for d, v in bad.items()))


def tokenizer_documents(docs: list[Document], share: float) -> list[Document]:
    """`share` of `docs`, spread evenly over them (every document when share is 1)."""
    count = max(1, round(len(docs) * share)) if docs else 0
    return [docs[i * len(docs) // count] for i in range(count)]


def _check_out(out: Path) -> None:
    """Refuse to replace a directory that prepare did not write."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir())
                                              and not (out / MANIFEST_FILE).is_file())):
        raise DataError(f"{out} exists and is not a dsmoe data directory; choose an empty or "
                        "new --out directory")


def _encode_and_pack(tmp: Path, tokenizer: Tokenizer, held: dict[str, HeldOut],
                     show_progress: bool) -> list:
    from tqdm import tqdm

    dtype = token_dtype(tokenizer.vocab_size)
    records = []
    total = sum(len(h.train) + len(h.val) for h in held.values())
    with tqdm(total=total, desc="encode", unit="doc", disable=not show_progress) as bar:
        for domain, split_docs in held.items():
            for split in SPLITS:
                docs = getattr(split_docs, split)
                writer = ShardWriter(tmp, split, domain, dtype, tokenizer.bos_id,
                                     tokenizer.eos_id)
                for first in range(0, len(docs), _ENCODE_CHUNK_DOCS):
                    chunk = docs[first:first + _ENCODE_CHUNK_DOCS]
                    for ids in tokenizer.encode_batch([d.text for d in chunk]):
                        writer.add_document(ids)
                    bar.update(len(chunk))
                records += writer.close()
    return records


def _manifest(groups, held: dict[str, HeldOut], records, tokenizer: Tokenizer, settings: dict,
              input_hash: str) -> dict:
    domains = {}
    for domain, docs in groups.items():
        entry = {"sources": sorted({d.source for d in docs}),
                 "licenses": sorted({d.license for d in docs}),
                 "documents": len(docs), "held_out": held[domain].method}
        for split in SPLITS:
            chosen = getattr(held[domain], split)  # a document cut in two counts in both
            entry[split] = {"documents": len(chosen), "chars": sum(len(d.text) for d in chosen),
                            "tokens": sum(r.tokens for r in records
                                          if r.domain == domain and r.split == split)}
        domains[domain] = entry
    return {
        "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "input_hash": input_hash,
        "settings": settings,
        "tokenizer": {"sha256": tokenizer.sha256(), "vocab_size": tokenizer.vocab_size,
                      "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id,
                      "pad_id": tokenizer.pad_id},
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "domains": domains,
        "shards": [vars(r) for r in records],
    }


def prepare(out_dir: str | Path, data_paths: Iterable[str | Path] | None = None,
            vocab_size: int = DEFAULT_VOCAB_SIZE, val_fraction: float = DEFAULT_VAL_FRACTION,
            seed: int = 0, max_chars_per_domain: int = DEFAULT_MAX_CHARS_PER_DOMAIN,
            show_progress: bool = True, tokenizer_shares: dict[str, float] | None = None) -> dict:
    """Build (or reuse) a data directory and return its manifest.

    `data_paths=None` uses the default corpus, capped at `max_chars_per_domain` characters
    per domain; user files are never capped. `seed` picks the validation documents.
    `tokenizer_shares` maps a domain to the share of its training documents that the BPE
    learns its merges from (1 for a domain not named): a smaller share leaves that domain
    fewer whole-word tokens and the others more. Every document is still encoded and
    trained on.
    """
    out = Path(out_dir)
    _check_settings(vocab_size, val_fraction)
    _check_out(out)
    started = time.perf_counter()
    paths = None if data_paths is None else [str(p) for p in data_paths]
    if paths is None:
        documents = list(iter_default_corpus(max_chars_per_domain))
    else:
        documents = load_documents(paths)
    groups = _by_domain(documents)
    tokenizer_shares = {d: float(v) for d, v in (tokenizer_shares or {}).items()}
    _check_tokenizer_shares(tokenizer_shares, groups)
    settings = {"data": paths, "max_chars_per_domain": max_chars_per_domain if paths is None
                else None, "vocab_size": vocab_size, "val_fraction": val_fraction,
                "seed": seed, "prepare_version": PREPARE_VERSION}
    if tokenizer_shares:  # only when given, so directories prepared without it stay reusable
        settings["tokenizer_shares"] = tokenizer_shares
    input_hash = _input_hash(groups, settings)

    manifest = _reusable(out, input_hash)
    if manifest is not None:
        print(f"prepare: {out} is up to date with these inputs and settings; reused it")
        print_summary(manifest)
        return manifest

    held = {domain: hold_out(docs, val_fraction, seed) for domain, docs in groups.items()}
    _say_held_out(groups, held)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(out)
        tmp = make_temp_dir(out)
    except OSError as err:
        raise DataError(f"cannot create {out} ({err.strerror or err}); choose a writable "
                        "--out folder") from err
    try:
        train_texts = [d.text for domain, h in held.items()
                       for d in tokenizer_documents(h.train, tokenizer_shares.get(domain, 1.0))]
        if show_progress:
            print(f"prepare: training a {vocab_size}-token BPE on {len(train_texts)} documents")
        # The tokenizers library's bar only renders on a terminal; elsewhere it prints blanks.
        tokenizer = train_tokenizer(train_texts, vocab_size, length=len(train_texts),
                                    show_progress=show_progress and sys.stderr.isatty())
        tokenizer.save(tmp)
        records = _encode_and_pack(tmp, tokenizer, held, show_progress)
        manifest = _manifest(groups, held, records, tokenizer, settings, input_hash)
        write_manifest(tmp, manifest)  # last: its presence marks a complete directory
        swap_into_place(tmp, out)
    except BaseException as err:
        discard_temp_dir(tmp, out, err, DataError)
        raise
    print(f"prepare: wrote {out} in {time.perf_counter() - started:.1f}s")
    print_summary(manifest)
    return manifest


def _say_held_out(groups: dict[str, list[Document]], held: dict[str, HeldOut]) -> None:
    print("prepare: validation text held out, per domain:")
    for domain, h in held.items():
        print(f"  {domain}: {h.describe(len(groups[domain]))}")
    empty = [domain for domain, h in held.items() if h.method == NOTHING]
    if empty:
        print(f"prepare: warning: {', '.join(empty)} hold(s) no validation text, which "
              "`dsmoe train` needs: give more text or a larger --val-fraction")


def print_summary(manifest: dict) -> None:
    """A table of domain, documents, train tokens, val tokens and how val was chosen."""
    rows = [(name, d.get("documents", d["train"]["documents"] + d["val"]["documents"]),
             d["train"]["tokens"], d["val"]["tokens"], d.get("held_out", ""))
            for name, d in manifest["domains"].items()]
    rows.append(("total", sum(r[1] for r in rows), sum(r[2] for r in rows),
                 sum(r[3] for r in rows), ""))
    header = ("domain", "docs", "train tokens", "val tokens", "val from")
    width = max(len(header[0]), *(len(r[0]) for r in rows))
    print(f"{header[0]:<{width}}  {header[1]:>8}  {header[2]:>13}  {header[3]:>11}  {header[4]}")
    for name, docs, train, val, held_out in rows:
        print(f"{name:<{width}}  {docs:>8,}  {train:>13,}  {val:>11,}  {held_out}".rstrip())


# --- command line -------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output directory (tokenizer, shards, manifest.json)")
    parser.add_argument("--data", nargs="+", metavar="PATH",
                        help="text (.txt/.md, split at blank lines), .jsonl or .parquet files "
                        "or directories; default: the embedded corpus (en, fr, es, code, math)")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE,
                        help=f"BPE vocabulary size (default {DEFAULT_VOCAB_SIZE})")
    parser.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION,
                        metavar="F", help="share of each domain held out for validation, in "
                        f"[0, 0.5) (default {DEFAULT_VAL_FRACTION}); a domain with fewer than "
                        "1/F documents holds out the tail of its text")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed choosing the held-out validation documents (default 0)")
    parser.add_argument("--tokenizer-share", nargs="+", default=[], metavar="DOMAIN=SHARE",
                        help="learn the BPE merges from only this share of a domain's training "
                        "documents (e.g. code=0.1: code gets fewer whole-word tokens, the other "
                        "domains more); every document is still encoded (default: all)")


def parse_shares(pairs: list[str]) -> dict[str, float]:
    """{"code": 0.1} from ["code=0.1"], with an error that names a malformed pair."""
    shares = {}
    for pair in pairs:
        domain, sep, value = pair.partition("=")
        try:
            shares[domain] = float(value)
        except ValueError:
            sep = ""
        if not sep or not domain:
            raise DataError(f"--tokenizer-share takes DOMAIN=SHARE pairs such as code=0.1, got {pair!r}")
    return shares


def run(args: argparse.Namespace) -> int:
    prepare(args.out, args.data, vocab_size=args.vocab_size, val_fraction=args.val_fraction,
            seed=args.seed, tokenizer_shares=parse_shares(args.tokenizer_share))
    return 0
