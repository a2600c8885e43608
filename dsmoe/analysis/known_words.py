"""Are a model's samples made of real words? The share of their words found in a reference text.

A small model trained on subword tokens writes plausible-looking words that do not exist
(" the brak, and the scher"): each token is a real piece, their concatenation is not. A
loss figure does not show this; counting does. A word here is a maximal run of letters
(any script, accents included; digits and underscores excluded), compared lower-cased. It
is "known" when the reference text (the training text of the same language) holds it at
least `min_count` times, so a typo seen once in the reference does not count as a word.

What real text scores: `held_out_share` counts the words of every `every`-th document
against the words of the others, so a model's share has a ceiling to be read against
(Wikipedia paragraphs of one language score about 92-93% against the rest of the demo's
corpus: names and rare words seen fewer than twice).

Not here: spelling or grammar; a sample of real words in a senseless order scores 100%.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Iterable

WORD = re.compile(r"[^\W\d_]+")


def words(text: str) -> list[str]:
    """The lower-cased words of `text`, in order."""
    return [w.lower() for w in WORD.findall(text)]


def known_words(texts: Iterable[str], min_count: int = 2) -> frozenset[str]:
    """The words that occur at least `min_count` times over `texts`."""
    counts = Counter(w for text in texts for w in words(text))
    return frozenset(w for w, n in counts.items() if n >= min_count)


def known_share(samples: Iterable[str], known: frozenset[str]) -> tuple[int, int]:
    """(known, total): how many of the samples' words are in `known`, of how many words."""
    all_words = [w for text in samples for w in words(text)]
    return sum(w in known for w in all_words), len(all_words)


def held_out_share(texts: list[str], every: int = 10, min_count: int = 2) -> tuple[int, int]:
    """(known, total) over the words of every `every`-th text, known meaning seen at least
    `min_count` times in the other texts: the share that real text of the same kind scores."""
    held = texts[::every]
    rest = [text for i, text in enumerate(texts) if i % every]
    return known_share(held, known_words(rest, min_count))
