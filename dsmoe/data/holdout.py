"""Which text of each domain `dsmoe prepare` holds out for validation.

Design note
-----------
A domain with enough documents holds out whole documents, chosen by
`shards.validation_mask` (seeded, independent of input order, duplicates kept on one
side). That fails for the commonest user input: a notes file with no blank lines is ONE
document, which holds out nothing, and a file of three paragraphs would lose a random
third of its text to validation. So a domain with fewer than 1 / val_fraction documents
(not one whole document's worth of the share asked for), or whose documents are all
identical, holds out the *tail of its text* instead: the last val_fraction of its
characters, whole trailing documents first, and the document where the cut falls split at
the line break nearest the cut (else the nearest space, else at the cut itself).

The cut is made on text, before the tokenizer exists, so the tokenizer is trained on the
training text only; the share is therefore exact in characters and only about right in
tokens. The tail of a single document is the text most like what a user will ask the model
to continue, and it keeps train and validation text apart without a random choice.

Not here: reading files (prepare.py), deciding what a document is (the readers), or
deduplication across the cut (two identical lines on either side stay there).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from dsmoe.data.corpus import Document
from dsmoe.data.shards import validation_mask

#: How a domain's validation text was chosen (recorded in the manifest).
WHOLE_DOCUMENTS = "documents"
TEXT_TAIL = "tail"
NOTHING = "none"


@dataclass
class HeldOut:
    """One domain's documents, divided between the splits (a cut document in both)."""
    train: list[Document]
    val: list[Document]
    method: str  # WHOLE_DOCUMENTS, TEXT_TAIL or NOTHING

    @property
    def val_chars(self) -> int:
        return sum(len(d.text) for d in self.val)

    def describe(self, n_documents: int) -> str:
        """One line for `dsmoe prepare` to print: what was held out, and why."""
        if self.method == WHOLE_DOCUMENTS:
            return f"{len(self.val)} of {n_documents} documents ({self.val_chars:,} characters)"
        if self.method == TEXT_TAIL:
            why = "1 document" if n_documents == 1 else f"only {n_documents} documents"
            return f"the last {self.val_chars:,} characters of its text ({why})"
        return "nothing (too little text, or --val-fraction 0)"


def hold_out(docs: list[Document], val_fraction: float, seed: int) -> HeldOut:
    """Divide one domain's documents into training and validation text (see the module note)."""
    if val_fraction <= 0 or not docs:
        return HeldOut(list(docs), [], NOTHING)
    if len(docs) * val_fraction >= 1:
        mask = validation_mask([d.text for d in docs], val_fraction, seed)
        if any(mask):
            return HeldOut([d for d, v in zip(docs, mask) if not v],
                           [d for d, v in zip(docs, mask) if v], WHOLE_DOCUMENTS)
    return _tail(docs, val_fraction)


def _tail(docs: list[Document], val_fraction: float) -> HeldOut:
    need = round(sum(len(d.text) for d in docs) * val_fraction)
    train, val = list(docs), []
    # whole documents from the end while they fit; val_fraction < 0.5 keeps some training
    while train and need > 0 and len(train[-1].text) <= need:
        need -= len(train[-1].text)
        val.insert(0, train.pop())
    if need > 0 and train:
        last = train.pop()
        head, tail = split_text(last.text, len(last.text) - need)
        if head.strip():
            train.append(replace(last, text=head))
        if tail.strip():
            val.insert(0, replace(last, text=tail))
    if not train or not val:  # too little text to divide: a val-less domain beats no training
        return HeldOut(list(docs), [], NOTHING)
    return HeldOut(train, val, TEXT_TAIL)


def split_text(text: str, at: int) -> tuple[str, str]:
    """`text` cut in two near position `at`: at the nearest line break, else the nearest
    space, within half the tail's length of `at` (so the tail keeps 50-150% of its
    share); else exactly at `at`."""
    reach = max(1, (len(text) - at) // 2)
    for separator in ("\n", " "):
        after = text.find(separator, at, at + reach)
        before = text.rfind(separator, max(1, at - reach), at)
        candidates = [p for p in (after, before) if p > 0]
        if candidates:
            cut = min(candidates, key=lambda p: abs(p - at))
            return text[:cut], text[cut + 1:]  # the separator itself goes to neither
    return text[:at], text[at:]
