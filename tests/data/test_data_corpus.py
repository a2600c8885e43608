"""The default corpus: every domain present and labelled, deterministic, within budget."""
import sysconfig
from collections import defaultdict
from pathlib import Path

import pytest

from dsmoe.data import corpus
from dsmoe.data.corpus import DOMAINS, Document, iter_default_corpus
from dsmoe.errors import DataError

BUDGET = 30_000


@pytest.fixture(scope="module")
def documents() -> list[Document]:
    return list(iter_default_corpus(max_chars_per_domain=BUDGET))


def test_every_domain_labelled_with_source_and_license(documents):
    by_domain = defaultdict(list)
    for doc in documents:
        by_domain[doc.domain].append(doc)
    assert list(by_domain) == list(DOMAINS)
    licenses = {domain: {d.license for d in docs} for domain, docs in by_domain.items()}
    assert licenses == {"en": {"CC-BY-SA-4.0"}, "fr": {"CC-BY-SA-4.0"}, "es": {"CC-BY-SA-4.0"},
                        "code": {"PSF-2.0"}, "math": {"MIT"}}
    assert "summaries_fr-fr.json" in by_domain["fr"][0].source
    for domain, docs in by_domain.items():
        chars = sum(len(d.text) for d in docs)
        # the budget is "about": it may be overshot by the last whole document only
        assert BUDGET <= chars < BUDGET + max(len(d.text) for d in docs), domain
        assert all(d.text.strip() for d in docs)


def test_deterministic(documents):
    assert list(iter_default_corpus(max_chars_per_domain=BUDGET)) == documents


def test_languages_and_kinds_look_right(documents):
    text = {domain: " ".join(d.text for d in documents if d.domain == domain)
            for domain in DOMAINS}
    assert text["en"].count(" the ") > text["fr"].count(" the ")
    assert text["fr"].count(" les ") > text["es"].count(" les ")
    assert text["es"].count(" los ") > text["fr"].count(" los ")
    assert "def " in text["code"] and "Answer: " in text["math"]


def test_stdlib_selection_skips_tests_and_third_party():
    root = Path(sysconfig.get_paths()["stdlib"])
    files = corpus._stdlib_files()
    assert len(files) > 100
    parts = {part for f in files for part in f.relative_to(root).parts[:-1]}
    assert parts.isdisjoint({"test", "tests", "site-packages", "idlelib", "lib2to3"})
    assert files == sorted(files)


def test_bad_arguments():
    with pytest.raises(DataError, match="unknown default-corpus domains"):
        iter_default_corpus(domains=("klingon",))
    with pytest.raises(DataError, match="must be positive"):
        iter_default_corpus(max_chars_per_domain=0)
