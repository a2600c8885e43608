"""The known-word share: which sampled words occur in a reference text."""
from dsmoe.analysis.known_words import known_share, known_words, words


def test_words_are_lowercased_letter_runs_in_any_script():
    assert words("L'année 1850, the río_Grande x2 ÉTÉ!") == ["l", "année", "the", "río", "grande", "x", "été"]


def test_a_word_is_known_from_min_count_occurrences():
    reference = ["The river flows. the river", "A city on the río", "typo: teh"]
    known = known_words(reference)
    assert known == {"the", "river"}
    assert known_words(reference, min_count=1) >= {"city", "río", "teh", "a"}


def test_share_counts_every_occurrence_of_every_sample():
    known = frozenset({"the", "river", "of"})
    assert known_share(["The brak of the river", "river scher"], known) == (5, 7)
    assert known_share([], known) == (0, 0)


def test_held_out_share_counts_each_held_text_against_the_others():
    from dsmoe.analysis.known_words import held_out_share
    texts = ["the river", "the river flows", "a city", "the river", "the city flows"]
    # held out: texts 0, 2 and 4 (7 words); the rest, texts 1 and 3, hold "the" and "river"
    # twice and "flows" once
    assert held_out_share(texts, every=2) == (3, 7)
    assert held_out_share(texts, every=2, min_count=1) == (4, 7)
