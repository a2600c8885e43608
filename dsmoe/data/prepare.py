"""`dsmoe prepare`: text in, tokenizer + packed token shards + manifest out.

Design note
-----------
Inputs are the embedded default corpus (corpus.py) or files given with `--data`:

- `.txt`, `.md`: split into documents at blank lines (one paragraph = one document), so
  a single long file still yields a validation split; domain = the file stem.
- `.jsonl`: one JSON object per line with a string `text` and an optional `domain`.
- `.parquet`: a `text` column and an optional `domain` column (needs pyarrow).
- a directory: every file above inside it, recursively, in sorted order.

Steps: read and check every input (any problem raises `DataError` naming the path and the
fix, before anything is written), hold out a validation share of each domain's
documents (shards.validation_mask), train the tokenizer on the training documents only,
encode, pack, and write the manifest last. Everything is written into a temporary
sibling directory that is renamed into place at the end, so a failed or interrupted
prepare leaves the previous output (or nothing) behind, never half a directory.

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
import os
import re
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Iterator

from dsmoe.atomic import discard_temp_dir, make_temp_dir, remove_leftovers, swap_into_place
from dsmoe.data.corpus import DEFAULT_MAX_CHARS_PER_DOMAIN, Document, iter_default_corpus
from dsmoe.data.shards import (MANIFEST_FILE, MANIFEST_FORMAT, MANIFEST_VERSION, SPLITS,
                               ShardWriter, TokenShards, read_manifest, token_dtype,
                               validation_mask, write_manifest)
from dsmoe.data.tokenizer import (DEFAULT_VOCAB_SIZE, Tokenizer, check_vocab_size,
                                  train_tokenizer)
from dsmoe.errors import DataError

#: Bump when the same inputs and settings would now produce different output files.
PREPARE_VERSION = 1
DEFAULT_VAL_FRACTION = 0.05
TEXT_SUFFIXES = (".txt", ".md")
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + (".jsonl", ".parquet")
USER_LICENSE = "unknown (user data)"
_ENCODE_CHUNK_DOCS = 512
_DOMAIN_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_BLANK_LINES_RE = re.compile(r"\n\s*\n")


# --- reading user data -------------------------------------------------------------------

def _check_domain(domain: object, where: str) -> str:
    if not isinstance(domain, str) or not _DOMAIN_RE.fullmatch(domain):
        raise DataError(f"{where}: domain {domain!r} is not a valid name; use letters, digits, "
                        "'_', '-' or '.', starting with a letter or digit")
    return domain


def _stem_domain(path: Path) -> str:
    """A file's default domain: its stem, with characters unfit for file names replaced."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", path.stem).strip("._-") or "data"


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err}); convert it to UTF-8") from err
    except OSError as err:
        raise DataError(f"cannot read {path} ({err})") from err


def _text_documents(path: Path) -> Iterator[Document]:
    domain = _stem_domain(path)
    for paragraph in _BLANK_LINES_RE.split(_read_utf8(path)):
        paragraph = paragraph.strip("\n")
        if paragraph.strip():
            yield Document(paragraph, domain, str(path), USER_LICENSE)


def _record_document(record: object, path: Path, where: str) -> Document | None:
    """A Document from one JSONL record or Parquet row (None for an empty text)."""
    if not (isinstance(record, dict) and "text" in record
            and isinstance(record["text"], (str, type(None)))):
        raise DataError(f"{where}: expected an object with a string 'text' field")
    domain = record.get("domain")
    domain = _stem_domain(path) if domain is None else _check_domain(domain, where)
    text = record.get("text") or ""
    return Document(text, domain, str(path), USER_LICENSE) if text.strip() else None


def _jsonl_documents(path: Path) -> Iterator[Document]:
    # split("\n"), not splitlines(): JSON strings may hold raw U+2028 line separators
    for number, line in enumerate(_read_utf8(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: not valid JSON ({err})") from err
        doc = _record_document(record, path, f"{path}:{number}")
        if doc is not None:
            yield doc


def _parquet_documents(path: Path) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise DataError(f"reading {path} needs pyarrow: `pip install 'dsmoe[data]'`") from err
    try:
        names = pq.read_schema(path).names
        if "text" not in names:
            raise DataError(f"{path} has no 'text' column (columns: {names})")
        columns = ["text"] + (["domain"] if "domain" in names else [])
        rows = pq.read_table(path, columns=columns).to_pylist()
    except DataError:
        raise
    except Exception as err:  # pyarrow raises its own hierarchy for unreadable files
        raise DataError(f"cannot read {path} as Parquet ({err})") from err
    for number, row in enumerate(rows):
        doc = _record_document(row, path, f"{path} row {number}")
        if doc is not None:
            yield doc


_READERS = {".txt": _text_documents, ".md": _text_documents,
            ".jsonl": _jsonl_documents, ".parquet": _parquet_documents}


def _expand(data_paths: Iterable[str | Path]) -> list[Path]:
    files = []
    for raw in data_paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*")
                           if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES)
            if not found:
                raise DataError(f"{path} holds no {'/'.join(SUPPORTED_SUFFIXES)} files; "
                                "point --data at text, JSONL or Parquet files")
            files += found
        elif path.is_file():
            if path.suffix.lower() not in SUPPORTED_SUFFIXES:
                raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of "
                                f"{', '.join(SUPPORTED_SUFFIXES)}")
            files.append(path)
        else:
            raise DataError(f"{path} does not exist; check the --data path")
    return files


def load_documents(data_paths: Iterable[str | Path]) -> list[Document]:
    """Every document in user files (see the module note for formats)."""
    documents = []
    for path in _expand(data_paths):
        found = list(_READERS[path.suffix.lower()](path))
        if not found:
            raise DataError(f"{path} contains no text; remove it from --data or fill it")
        documents += found
    if not documents:
        raise DataError("no data given; pass files with --data, or none for the default corpus")
    return documents


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
    if not 0 <= val_fraction < 0.5:
        raise DataError(f"val_fraction must be in [0, 0.5), got {val_fraction}")
    check_vocab_size(vocab_size)


def _check_out(out: Path) -> None:
    """Refuse to replace a directory that prepare did not write."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir())
                                              and not (out / MANIFEST_FILE).is_file())):
        raise DataError(f"{out} exists and is not a dsmoe data directory; choose an empty or "
                        "new --out directory")


def _encode_and_pack(tmp: Path, tokenizer: Tokenizer, groups: dict[str, list[Document]],
                     masks: dict[str, list[bool]], show_progress: bool) -> list:
    from tqdm import tqdm

    dtype = token_dtype(tokenizer.vocab_size)
    records = []
    total = sum(len(docs) for docs in groups.values())
    with tqdm(total=total, desc="encode", unit="doc", disable=not show_progress) as bar:
        for domain, docs in groups.items():
            writers = {split: ShardWriter(tmp, split, domain, dtype, tokenizer.bos_id,
                                          tokenizer.eos_id) for split in SPLITS}
            for first in range(0, len(docs), _ENCODE_CHUNK_DOCS):
                chunk = docs[first:first + _ENCODE_CHUNK_DOCS]
                for i, ids in enumerate(tokenizer.encode_batch([d.text for d in chunk])):
                    writers["val" if masks[domain][first + i] else "train"].add_document(ids)
                bar.update(len(chunk))
            for writer in writers.values():
                records += writer.close()
    return records


def _manifest(groups, masks, records, tokenizer: Tokenizer, settings: dict,
              input_hash: str) -> dict:
    domains = {}
    for domain, docs in groups.items():
        entry = {"sources": sorted({d.source for d in docs}),
                 "licenses": sorted({d.license for d in docs})}
        for split in SPLITS:
            chosen = [d for d, is_val in zip(docs, masks[domain]) if is_val == (split == "val")]
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
            show_progress: bool = True) -> dict:
    """Build (or reuse) a data directory and return its manifest.

    `data_paths=None` uses the default corpus, capped at `max_chars_per_domain` characters
    per domain; user files are never capped. `seed` picks the validation documents.
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
    settings = {"data": paths, "max_chars_per_domain": max_chars_per_domain if paths is None
                else None, "vocab_size": vocab_size, "val_fraction": val_fraction,
                "seed": seed, "prepare_version": PREPARE_VERSION}
    input_hash = _input_hash(groups, settings)

    manifest = _reusable(out, input_hash)
    if manifest is not None:
        print(f"prepare: {out} is up to date with these inputs and settings; reused it")
        print_summary(manifest)
        return manifest

    masks = {domain: validation_mask([d.text for d in docs], val_fraction, seed)
             for domain, docs in groups.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out)
    tmp = make_temp_dir(out)
    try:
        train_texts = [d.text for domain, docs in groups.items()
                       for d, is_val in zip(docs, masks[domain]) if not is_val]
        if show_progress:
            print(f"prepare: training a {vocab_size}-token BPE on {len(train_texts)} documents")
        # The tokenizers library's bar only renders on a terminal; elsewhere it prints blanks.
        tokenizer = train_tokenizer(train_texts, vocab_size, length=len(train_texts),
                                    show_progress=show_progress and sys.stderr.isatty())
        tokenizer.save(tmp)
        records = _encode_and_pack(tmp, tokenizer, groups, masks, show_progress)
        manifest = _manifest(groups, masks, records, tokenizer, settings, input_hash)
        write_manifest(tmp, manifest)  # last: its presence marks a complete directory
        swap_into_place(tmp, out)
    except BaseException as err:
        discard_temp_dir(tmp, out, err, DataError)
        raise
    print(f"prepare: wrote {out} in {time.perf_counter() - started:.1f}s")
    print_summary(manifest)
    return manifest


def print_summary(manifest: dict) -> None:
    """A table of domain, documents, train tokens and val tokens."""
    rows = [(name, d["train"]["documents"] + d["val"]["documents"], d["train"]["tokens"],
             d["val"]["tokens"]) for name, d in manifest["domains"].items()]
    rows.append(("total", sum(r[1] for r in rows), sum(r[2] for r in rows),
                 sum(r[3] for r in rows)))
    header = ("domain", "docs", "train tokens", "val tokens")
    width = max(len(header[0]), *(len(r[0]) for r in rows))
    print(f"{header[0]:<{width}}  {header[1]:>8}  {header[2]:>13}  {header[3]:>11}")
    for name, docs, train, val in rows:
        print(f"{name:<{width}}  {docs:>8,}  {train:>13,}  {val:>11,}")


# --- command line -------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output directory (tokenizer, shards, manifest.json)")
    parser.add_argument("--data", nargs="+", metavar="PATH",
                        help="text (.txt/.md, split at blank lines), .jsonl or .parquet files "
                        "or directories; default: the embedded corpus (en, fr, es, code, math)")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE,
                        help=f"BPE vocabulary size (default {DEFAULT_VOCAB_SIZE})")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed choosing the held-out validation documents (default 0)")


def run(args: argparse.Namespace) -> int:
    prepare(args.out, args.data, vocab_size=args.vocab_size, seed=args.seed)
    return 0
