"""holdout: whole documents when a domain has enough, else the tail of its text, cut at a
line break, a space or anywhere; the two splits together give back the text."""
import pytest

from dsmoe.data.corpus import Document
from dsmoe.data.holdout import NOTHING, TEXT_TAIL, WHOLE_DOCUMENTS, hold_out, split_text
from dsmoe.data.shards import validation_mask


def docs(*texts):
    return [Document(t, "d", "src", "lic") for t in texts]


def lines(n, width=40):
    return "\n".join(f"line {i:04d} " + "x" * (width - 10) for i in range(n))


def joined(held, separator):
    return separator.join(d.text for d in held.train + held.val)


def test_one_document_of_lines_holds_out_whole_trailing_lines():
    text = lines(200)
    held = hold_out(docs(text), 0.05, seed=0)
    assert held.method == TEXT_TAIL and len(held.train) == len(held.val) == 1
    assert joined(held, "\n") == text  # the cut drops only the line break it was made at
    share = held.val_chars / len(text)
    assert 0.025 <= share <= 0.075
    assert held.val[0].text.startswith("line ") and held.train[0].text.endswith("x")
    assert "the last" in held.describe(1) and "(1 document)" in held.describe(1)


def test_one_enormous_line_is_cut_at_a_space_or_anywhere():
    words = " ".join(f"w{i}" for i in range(20_000))
    held = hold_out(docs(words), 0.1, seed=0)
    assert held.method == TEXT_TAIL and joined(held, " ") == words
    assert held.val[0].text.startswith("w") and not held.train[0].text.endswith(" ")
    solid = "z" * 100_000
    held = hold_out(docs(solid), 0.1, seed=0)
    assert [len(held.train[0].text), len(held.val[0].text)] == [90_000, 10_000]


def test_few_documents_give_whole_trailing_documents_first():
    texts = ["a" * 1000, "b" * 1000, "c" * 30, "d" * 30]
    held = hold_out(docs(*texts), 0.05, seed=0)  # target 103 characters
    assert held.method == TEXT_TAIL
    assert [d.text for d in held.val][-2:] == ["c" * 30, "d" * 30]
    assert held.val[0].text == "b" * 43 and held.train[-1].text == "b" * 957
    assert held.val_chars == 103


def test_enough_documents_hold_out_whole_documents():
    texts = [f"document number {i} " * (i % 7 + 1) for i in range(60)]
    held = hold_out(docs(*texts), 0.05, seed=3)
    mask = validation_mask(texts, 0.05, seed=3)
    assert held.method == WHOLE_DOCUMENTS
    assert [d.text for d in held.val] == [t for t, v in zip(texts, mask) if v]
    assert [d.text for d in held.train] == [t for t, v in zip(texts, mask) if not v]


def test_identical_documents_fall_back_to_the_tail():
    held = hold_out(docs(*["the same paragraph, again and again"] * 40), 0.05, seed=0)
    assert held.method == TEXT_TAIL and held.val and held.train


@pytest.mark.parametrize("texts, fraction", [(("hi",), 0.05), ((lines(50),), 0.0), ((), 0.1)])
def test_nothing_to_hold_out(texts, fraction):
    held = hold_out(docs(*texts), fraction, seed=0)
    assert held.method == NOTHING and held.val == [] and held.train == docs(*texts)
    assert "nothing" in held.describe(len(texts))


def test_split_text_prefers_the_nearest_line_break_within_reach():
    text = "aaaa\nbbbb bbbb\ncccc"
    assert split_text(text, 12) == ("aaaa\nbbbb bbbb", "cccc")   # newline 2 after the cut
    assert split_text("0123456789 123456789", 12) == ("0123456789", "123456789")
    assert split_text("0123456789 123456789", 15) == ("0123456789 1234", "56789")  # too far
    # a line break further than half the tail's length away is not taken
    far = "x" * 10 + "\n" + "y" * 89
    assert split_text(far, 80) == ("x" * 10 + "\n" + "y" * 69, "y" * 20)
