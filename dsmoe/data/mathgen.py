"""Seeded arithmetic and word problems with worked answers: the `math` domain.

Design note
-----------
One generator feeds three stages, so its text formats are the contract between them:

- pretraining reads `as_document(problem)`: the question, the worked solution and a last
  line `Answer: <answer>`;
- SFT turns a problem into a chat pair (`as_prompt` for the user turn, the rest for the
  assistant turn);
- GRPO's verifier compares `extract_answer(completion)` with `problem.answer`, exactly, as
  strings. Answers are therefore canonical: a plain integer (`-12`, `4096`, never `4,096`
  or `4096.0`), or `Q remainder R` for division with a remainder.

Worked solutions show every carry and borrow, one column per line, and every digit is a
separate token (see tokenizer.py), so a small model can learn the algorithm rather than
memorise sums.

Splits are disjoint by construction, not by luck: each split draws from its own seed
stream, and a problem belongs to the split that the hash of its question text picks
(`split_of`), so the same question can never be both a training and a held-out problem.

Deliberately not here: floating-point answers, fractions, units conversion, or any
natural-language variety beyond a few templates; a model that masters these templates is
the goal, not general maths.
"""
from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from typing import Callable, Iterator

#: Problem kinds, in the order `generate_problem` cycles through when none are given.
KINDS = ("addition", "subtraction", "multiplication", "division", "equation",
         "shopping", "ages", "distance")
#: Difficulty 1 is one- or two-digit numbers; each level adds about one digit.
DIFFICULTIES = (1, 2, 3, 4, 5)
#: Held-out share of each split, in hundredths of the question-hash space.
SPLIT_BUCKETS = {"train": range(0, 90), "val": range(90, 95), "test": range(95, 100)}

ANSWER_PREFIX = "Answer:"


@dataclass(frozen=True)
class MathProblem:
    question: str
    solution: str  # worked steps, one per line, without the final `Answer:` line
    answer: str    # canonical exact answer, compared as a string by verifiers
    kind: str
    difficulty: int


# --- small helpers --------------------------------------------------------------------

def _digits(n: int) -> list[int]:
    """Digits of a non-negative integer, least significant first."""
    return [int(c) for c in reversed(str(n))]


_PLACE_NAMES = ("ones", "tens", "hundreds", "thousands", "ten-thousands",
                "hundred-thousands", "millions", "ten-millions", "hundred-millions")


def _place(i: int) -> str:
    return _PLACE_NAMES[i] if i < len(_PLACE_NAMES) else f"10^{i}"


def _number(rng: random.Random, digits: int, low_digits: int = 1) -> int:
    """A random integer with between `low_digits` and `digits` digits."""
    n_digits = rng.randint(low_digits, max(low_digits, digits))
    return rng.randint(10 ** (n_digits - 1) if n_digits > 1 else 0, 10 ** n_digits - 1)


# --- the worked algorithms (also reused by the word problems) ------------------------

def _addition_steps(a: int, b: int) -> list[str]:
    """Column addition of non-negative integers, one line per column, carries shown."""
    da, db = _digits(a), _digits(b)
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x = da[i] if i < len(da) else 0
        y = db[i] if i < len(db) else 0
        total = x + y + carry
        terms = f"{x} + {y}" + (f" + {carry}" if carry else "")
        carry_out = total // 10
        steps.append(f"{_place(i)}: {terms} = {total}, write {total % 10}"
                     + (f", carry {carry_out}" if carry_out else ""))
        carry = carry_out
    if carry:
        steps.append(f"{_place(len(steps))}: write the carry {carry}")
    steps.append(f"So {a} + {b} = {a + b}.")
    return steps


def _subtraction_steps(a: int, b: int) -> list[str]:
    """Column subtraction; a < b is done as -(b - a) so columns never go negative."""
    if a < b:
        return [f"{b} is larger than {a}, so compute {b} - {a} and make it negative."] + \
            _subtraction_steps(b, a)[:-1] + [f"So {a} - {b} = {a - b}."]
    da, db = _digits(a), _digits(b)
    steps, borrow = [], 0
    for i in range(len(da)):
        x, y = da[i], (db[i] if i < len(db) else 0)
        terms = f"{x} - {y}" + (" - 1" if borrow else "")  # `- 1` repays the last borrow
        diff = x - y - borrow
        borrow = int(diff < 0)
        steps.append(f"{_place(i)}: {terms} < 0, borrow 1: 10 + {terms} = {diff + 10}"
                     if borrow else f"{_place(i)}: {terms} = {diff}")
    steps.append(f"So {a} - {b} = {a - b}.")
    return steps


def _times_digit_steps(a: int, d: int, shift: int) -> tuple[int, str]:
    """Multiply `a` by one digit `d` (at place `shift`), carries shown inline."""
    parts, carry = [], 0
    for x in _digits(a):
        total = x * d + carry
        parts.append(f"{x} × {d}" + (f" + {carry}" if carry else "") + f" = {total}")
        carry = total // 10
    partial = a * d * 10 ** shift
    scale = f" × {10 ** shift}" if shift else ""
    return partial, f"{a} × {d}{scale} = {partial} ({'; '.join(parts)})"


def _multiplication_steps(a: int, b: int) -> list[str]:
    """Long multiplication: one partial product per digit of b, then their sum."""
    steps, partials = [], []
    for shift, d in enumerate(_digits(b)):
        partial, line = _times_digit_steps(a, d, shift)
        partials.append(partial)
        steps.append(line)
    if len(partials) > 1:
        steps.append("Add the partial products: " + " + ".join(map(str, partials))
                     + f" = {a * b}")
    steps.append(f"So {a} × {b} = {a * b}.")
    return steps


def _division_steps(a: int, b: int) -> list[str]:
    """Long division of a by b, one line per digit brought down, then a check."""
    steps, rest, started = [], 0, False
    for d in str(a):
        rest = rest * 10 + int(d)
        if rest < b and not started:
            continue
        started = True
        q = rest // b
        steps.append(f"{rest} ÷ {b} = {q} remainder {rest - q * b}")
        rest -= q * b
    q, r = divmod(a, b)
    if not steps:
        steps.append(f"{a} is smaller than {b}, so the quotient is 0")
    steps.append(f"Check: {q} × {b} + {r} = {q * b + r}.")
    steps.append(f"So {a} ÷ {b} = {q} remainder {r}." if r else f"So {a} ÷ {b} = {q}.")
    return steps


def _division_answer(q: int, r: int) -> str:
    return f"{q} remainder {r}" if r else str(q)


# --- one generator per kind -------------------------------------------------------------

def _gen_addition(rng: random.Random, difficulty: int) -> MathProblem:
    a, b = _number(rng, difficulty + 1, difficulty), _number(rng, difficulty + 1)
    return _problem(f"What is {a} + {b}?", _addition_steps(a, b), a + b, "addition", difficulty)


def _gen_subtraction(rng: random.Random, difficulty: int) -> MathProblem:
    a, b = _number(rng, difficulty + 1, difficulty), _number(rng, difficulty + 1)
    if difficulty < 3 and a < b:  # negative results only once the easy cases are learned
        a, b = b, a
    return _problem(f"What is {a} - {b}?", _subtraction_steps(a, b), a - b,
                    "subtraction", difficulty)


def _gen_multiplication(rng: random.Random, difficulty: int) -> MathProblem:
    a = _number(rng, difficulty + 1, max(1, difficulty - 1))
    b = _number(rng, max(1, (difficulty + 1) // 2))
    return _problem(f"What is {a} × {b}?", _multiplication_steps(a, b), a * b,
                    "multiplication", difficulty)


def _gen_division(rng: random.Random, difficulty: int) -> MathProblem:
    b = rng.randint(2, 9 if difficulty < 3 else 10 ** (difficulty - 1) + 9)
    a = _number(rng, difficulty + 1, difficulty)
    q, r = divmod(a, b)
    question = f"What is {a} ÷ {b}? Give the quotient and the remainder."
    return MathProblem(question, "\n".join(_division_steps(a, b)), _division_answer(q, r),
                       "division", difficulty)


def _gen_equation(rng: random.Random, difficulty: int) -> MathProblem:
    scale = 10 ** difficulty
    x = rng.randint(-scale if difficulty >= 3 else 0, scale)
    a = rng.randint(2, 9 + 3 * difficulty)
    b = rng.randint(1, scale)
    if rng.random() < 0.5:
        c = a * x + b
        question = f"Solve for x: {a}x + {b} = {c}."
        steps = [f"Subtract {b} from both sides: {a}x = {c} - {b} = {c - b}."]
    else:
        c = a * x - b
        question = f"Solve for x: {a}x - {b} = {c}."
        steps = [f"Add {b} to both sides: {a}x = {c} + {b} = {c + b}."]
    steps += [f"Divide both sides by {a}: x = {a * x} ÷ {a} = {x}.",
              f"Check: {a} × {x} = {a * x}."]
    return _problem(question, steps, x, "equation", difficulty)


_NAMES = ("Ana", "Ben", "Chloé", "David", "Elena", "Farid", "Grace", "Hugo", "Inés", "Jonas",
          "Kenji", "Lucía", "Maya", "Noah", "Olga", "Pablo", "Quentin", "Rosa", "Sam", "Tariq")
_ITEMS = (("notebook", "notebooks"), ("pen", "pens"), ("apple", "apples"),
          ("book", "books"), ("ticket", "tickets"), ("mug", "mugs"), ("ball", "balls"),
          ("loaf of bread", "loaves of bread"), ("plant", "plants"), ("shirt", "shirts"))
_VEHICLES = ("car", "train", "bus", "cyclist", "boat", "truck")


def _gen_shopping(rng: random.Random, difficulty: int) -> MathProblem:
    name = rng.choice(_NAMES)
    (item1, items1), (item2, items2) = rng.sample(_ITEMS, 2)
    n1, n2 = rng.randint(2, 3 + 2 * difficulty), rng.randint(2, 3 + 2 * difficulty)
    p1, p2 = rng.randint(1, 4 * 10 ** (difficulty - 1) + 5), rng.randint(1, 4 * 10 ** (difficulty - 1) + 5)
    cost1, cost2 = n1 * p1, n2 * p2
    total = cost1 + cost2
    paid = (total // 10 ** difficulty + 1) * 10 ** difficulty  # the next round note above
    question = (f"{name} buys {n1} {items1} at {p1} dollars each and {n2} {items2} at "
                f"{p2} dollars each, and pays with {paid} dollars. How much change, in "
                f"dollars, does {name} get?")
    steps = [f"The {items1} cost {n1} × {p1} = {cost1} dollars.",
             f"The {items2} cost {n2} × {p2} = {cost2} dollars.",
             f"Together: {cost1} + {cost2} = {total} dollars.",
             f"Change: {paid} - {total} = {paid - total} dollars."]
    return _problem(question, steps, paid - total, "shopping", difficulty)


def _gen_ages(rng: random.Random, difficulty: int) -> MathProblem:
    older, younger = rng.sample(_NAMES, 2)
    y = rng.randint(1, 10 * difficulty + 5)
    gap = rng.randint(1, 5 * difficulty + 5)
    years = rng.randint(1, 5 * difficulty)
    total = (y + years) + (y + gap + years)
    question = (f"{older} is {gap} years older than {younger}. In {years} years, the sum of "
                f"their ages will be {total}. How old is {younger} now?")
    steps = [f"Let {younger}'s age now be y; {older}'s age now is y + {gap}.",
             f"In {years} years: (y + {years}) + (y + {gap} + {years}) = {total}.",
             f"So 2y + {gap + 2 * years} = {total}.",
             f"2y = {total} - {gap + 2 * years} = {total - gap - 2 * years}.",
             f"y = {total - gap - 2 * years} ÷ 2 = {y}."]
    return _problem(question, steps, y, "ages", difficulty)


def _gen_distance(rng: random.Random, difficulty: int) -> MathProblem:
    vehicle = rng.choice(_VEHICLES)
    s1, s2 = rng.randint(5, 20 * difficulty + 10), rng.randint(5, 20 * difficulty + 10)
    t1, t2 = rng.randint(1, 2 + difficulty), rng.randint(1, 2 + difficulty)
    d1, d2 = s1 * t1, s2 * t2
    question = (f"A {vehicle} travels at {s1} km per hour for {t1} hours, then at {s2} km per "
                f"hour for {t2} hours. How many km does it travel in total?")
    steps = [f"First part: {s1} × {t1} = {d1} km.",
             f"Second part: {s2} × {t2} = {d2} km.",
             f"Total: {d1} + {d2} = {d1 + d2} km."]
    return _problem(question, steps, d1 + d2, "distance", difficulty)


def _problem(question: str, steps: list[str], answer: int, kind: str,
             difficulty: int) -> MathProblem:
    return MathProblem(question, "\n".join(steps), str(answer), kind, difficulty)


_GENERATORS: dict[str, Callable[[random.Random, int], MathProblem]] = {
    "addition": _gen_addition, "subtraction": _gen_subtraction,
    "multiplication": _gen_multiplication, "division": _gen_division,
    "equation": _gen_equation, "shopping": _gen_shopping, "ages": _gen_ages,
    "distance": _gen_distance,
}


# --- public API ----------------------------------------------------------------------------

def generate_problem(rng: random.Random, difficulty: int = 2,
                     kinds: tuple[str, ...] | None = None) -> MathProblem:
    """Draw one problem of a random kind (from `kinds`, default all) using only `rng`.

    Takes no split: use `problems(split, ...)` for problems guaranteed to lie in a split.
    """
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {DIFFICULTIES}, got {difficulty!r}")
    kind = rng.choice(kinds or KINDS)
    if kind not in _GENERATORS:
        raise ValueError(f"unknown problem kind {kind!r}; choose from {KINDS}")
    return _GENERATORS[kind](rng, difficulty)


def split_of(problem: MathProblem) -> str:
    """The split a problem belongs to, decided by a hash of its question text."""
    bucket = int.from_bytes(hashlib.sha256(problem.question.encode()).digest()[:8], "big") % 100
    return next(name for name, buckets in SPLIT_BUCKETS.items() if bucket in buckets)


def problems(split: str = "train", seed: int = 0, difficulty: int | None = None,
             kinds: tuple[str, ...] | None = None) -> Iterator[MathProblem]:
    """An endless, deterministic stream of problems that all belong to `split`.

    `difficulty=None` mixes difficulties 1..4 (5 is kept for explicit stress tests).
    The same (split, seed, difficulty, kinds) always yields the same stream.
    """
    if split not in SPLIT_BUCKETS:
        raise ValueError(f"unknown split {split!r}; choose from {tuple(SPLIT_BUCKETS)}")
    rng = random.Random(f"dsmoe.mathgen/{split}/{seed}")  # string seeds hash stably
    while True:
        level = difficulty if difficulty is not None else rng.randint(1, 4)
        problem = generate_problem(rng, level, kinds)
        if split_of(problem) == split:
            yield problem


def distinct(stream: Iterator[MathProblem], patience: int = 20_000) -> Iterator[MathProblem]:
    """The problems of `stream` whose question has not come before, in order; ends once
    `patience` problems in a row were repeats (the stream has no new ones left).

    A stream repeats small problems often: at difficulty 1 a quarter of the additions are
    one digit plus one digit, of which there are only a hundred.
    """
    seen: set[str] = set()
    repeats = 0
    for problem in stream:
        if problem.question in seen:
            repeats += 1
            if repeats >= patience:
                return
            continue
        seen.add(problem.question)
        repeats = 0
        yield problem


def as_prompt(problem: MathProblem) -> str:
    """The text a model is given before it solves: the question and a `Solution:` cue."""
    return f"Question: {problem.question}\nSolution:\n"


def as_completion(problem: MathProblem) -> str:
    """The worked solution and final answer line that follow `as_prompt`."""
    return f"{problem.solution}\n{ANSWER_PREFIX} {problem.answer}"


def as_document(problem: MathProblem) -> str:
    """The pretraining text: question, worked solution and a final `Answer: ...` line."""
    return as_prompt(problem) + as_completion(problem)


_ANSWER_RE = re.compile(
    re.escape(ANSWER_PREFIX)
    + r"\s*(?:[a-z]\s*=\s*)?\$?"  # tolerate `Answer: x = 5` and `Answer: $28`
    + r"\s*(?P<sign>[-−+]?)\s*(?P<int>\d[\d,]*)(?P<frac>\.\d+)?"
    + r"(?:\s*(?:remainder|rem\.?|r)\s*(?P<rem>\d+))?",
    re.IGNORECASE)


def extract_answer(text: str) -> str | None:
    """The canonical answer in a completion, or None when there is none.

    Reads the first `Answer:` line (a model that rambles on into a new question after
    answering keeps its first answer), accepts `1,234`, a Unicode minus, a leading `+`,
    a trailing period or words, and `14 remainder 3`/`14 r 3`; returns the same canonical
    form as `MathProblem.answer` so a verifier can compare strings exactly. A fractional
    part other than zeros is kept (`2.5`), so it can never match an integer answer.
    """
    match = _ANSWER_RE.search(text)
    if match is None:
        return None
    digits = match["int"].replace(",", "").lstrip("0") or "0"
    frac = (match["frac"] or "").rstrip("0").rstrip(".")
    value = digits + frac
    if match["sign"] in ("-", "−") and value.strip("0.") != "":
        value = "-" + value
    if match["rem"] is not None and int(match["rem"]) != 0:
        value += f" remainder {int(match['rem'])}"
    return value
