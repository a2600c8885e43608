"""Reading a user's files for `dsmoe prepare --data`: text, JSONL, Parquet, folders.

Design note
-----------
- `.txt`, `.md`: split into documents at blank lines (one paragraph = one document);
  domain = the file stem. A file of lines with no blank line is one document (holdout.py
  then holds out the tail of its text).
- `.jsonl`: one JSON object per line with a string `text` and an optional `domain`.
- `.parquet`: a `text` column and an optional `domain` column (needs pyarrow).
- a directory: every file above inside it, recursively, in sorted order; files of other
  types and empty files are skipped, and each skip is printed.

Every file is read and checked before anything is written: a file that cannot be used
(missing, empty when named directly, binary, not UTF-8, malformed JSON, a bad domain name)
is named with its fix, and all such files are listed in one DataError, so a folder is
fixed in one pass rather than one error at a time.

Not here: the pipeline (prepare.py), streaming inputs larger than memory.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Iterator

from dsmoe.data.corpus import Document
from dsmoe.errors import DataError

TEXT_SUFFIXES = (".txt", ".md")
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + (".jsonl", ".parquet")
USER_LICENSE = "unknown (user data)"
_DOMAIN_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_BLANK_LINES_RE = re.compile(r"\n\s*\n")

def _check_domain(domain: object, where: str) -> str:
    if not isinstance(domain, str) or not _DOMAIN_RE.fullmatch(domain):
        raise DataError(f"{where}: domain {domain!r} is not a valid name; use letters, digits, "
                        "'_', '-' or '.', starting with a letter or digit")
    return domain


def _stem_domain(path: Path) -> str:
    """A file's default domain: its stem, with characters unfit for file names replaced."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", path.stem).strip("._-") or "data"


def _read_utf8(path: Path) -> str:
    """The text of a UTF-8 file (a byte-order mark is dropped), or a DataError for a binary
    or differently encoded file."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        with open(path, "rb") as f:
            utf16 = f.read(2) in (b"\xff\xfe", b"\xfe\xff")
        found = "UTF-16 text" if utf16 else f"not UTF-8 text ({err})"
        raise DataError(f"{path} is {found}; convert it to UTF-8 (for example `iconv -f "
                        f"{'UTF-16' if utf16 else 'LATIN1'} -t UTF-8 FILE > NEW`) or remove it "
                        "from --data") from err
    except OSError as err:
        raise DataError(f"cannot read {path} ({err.strerror or err}); check that it is a "
                        "readable file") from err
    if "\0" in text:
        raise DataError(f"{path} looks like a binary file (it holds NUL bytes), not text; "
                        "remove it from --data")
    return text


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


def _expand(data_paths: Iterable[str | Path]) -> list[tuple[Path, bool]]:
    """Every input file, each with whether it was found inside a folder."""
    files = []
    for raw in data_paths:
        path = Path(raw)
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file())
            found = [p for p in inside if p.suffix.lower() in SUPPORTED_SUFFIXES]
            if not found:
                raise DataError(f"{path} holds no {'/'.join(SUPPORTED_SUFFIXES)} files; "
                                "point --data at text, JSONL or Parquet files")
            _say_skipped(path, [p for p in inside if p not in found], "not of a supported type")
            files += [(p, True) for p in found]
        elif path.is_file():
            if path.suffix.lower() not in SUPPORTED_SUFFIXES:
                raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of "
                                f"{', '.join(SUPPORTED_SUFFIXES)}")
            files.append((path, False))
        elif path.exists():
            raise DataError(f"{path} is not a regular file or folder; give text files or folders")
        else:
            raise DataError(f"{path} does not exist; check the --data path")
    return files


def _say_skipped(folder: Path, skipped: list[Path], why: str) -> None:
    if skipped:
        names = ", ".join(str(p.relative_to(folder)) for p in skipped[:5])
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        print(f"prepare: skipped {len(skipped)} file(s) in {folder} {why}: {names}{more}")


def load_documents(data_paths: Iterable[str | Path]) -> list[Document]:
    """Every document in user files (see the module note for formats). Every unusable
    file is named in one DataError; an empty file inside a folder is skipped."""
    documents, problems, empty = [], [], []
    for path, in_folder in _expand(data_paths):
        try:
            found = list(_READERS[path.suffix.lower()](path))
        except DataError as err:
            problems.append(str(err))
            continue
        if not found and in_folder:
            empty.append(path)
        elif not found:
            problems.append(f"{path} contains no text; remove it from --data or fill it")
        documents += found
    if len(problems) == 1:
        raise DataError(problems[0])
    if problems:  # all of them, so a folder is fixed in one pass (the first 10 in full)
        more = f" | and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise DataError(f"{len(problems)} input files cannot be used: "
                        + " | ".join(problems[:10]) + more)
    for path in empty:
        print(f"prepare: skipped {path}: it contains no text")
    if not documents:
        raise DataError("the --data files contain no text; fill them, or leave out --data "
                        "for the default corpus")
    return documents
