"""mathgen: answers checked by independent arithmetic, every worked step checked, the
answer parser, and split disjointness."""
import itertools
import random
import re

import pytest

from dsmoe.data import mathgen
from dsmoe.data.mathgen import KINDS, as_completion, as_document, extract_answer

# --- independent answers: parse the question, compute, format ---------------------------

def _independent_answer(problem: mathgen.MathProblem) -> str:
    q = problem.question
    if m := re.fullmatch(r"What is (\d+) ([+\-×]) (\d+)\?", q):
        a, op, b = int(m[1]), m[2], int(m[3])
        return str({"+": a + b, "-": a - b, "×": a * b}[op])
    if m := re.fullmatch(r"What is (\d+) ÷ (\d+)\? Give the quotient and the remainder\.", q):
        quotient, rest = divmod(int(m[1]), int(m[2]))
        return f"{quotient} remainder {rest}" if rest else str(quotient)
    if m := re.fullmatch(r"Solve for x: (\d+)x ([+-]) (\d+) = (-?\d+)\.", q):
        a, sign, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
        x, exact = divmod(c - b if sign == "+" else c + b, a)
        assert exact == 0
        return str(x)
    if m := re.search(r"buys (\d+) .+ at (\d+) dollars each and (\d+) .+ at (\d+) dollars "
                      r"each, and pays with (\d+) dollars", q):
        n1, p1, n2, p2, paid = map(int, m.groups())
        assert paid >= n1 * p1 + n2 * p2
        return str(paid - n1 * p1 - n2 * p2)
    if m := re.search(r"is (\d+) years older than .+\. In (\d+) years, the sum of their ages "
                      r"will be (\d+)\.", q):
        gap, years, total = map(int, m.groups())
        younger, odd = divmod(total - gap - 2 * years, 2)
        assert odd == 0 and younger > 0
        return str(younger)
    if m := re.search(r"at (\d+) km per hour for (\d+) hours, then at (\d+) km per hour for "
                      r"(\d+) hours", q):
        s1, t1, s2, t2 = map(int, m.groups())
        return str(s1 * t1 + s2 * t2)
    raise AssertionError(f"no independent check for {q!r}")


_EXPR = r"-?\d+(?:\s*[+\-×÷]\s*-?\d+)*"


def _checked_steps(solution: str) -> int:
    """Check every `arithmetic = number` in the worked steps; return how many were checked."""
    checked = 0
    for line in solution.splitlines():
        for segment in re.split(r"[:;()]", line):
            parts = segment.split("=")
            for left, right in zip(parts, parts[1:]):
                expr = re.search(f"({_EXPR})\\s*$", left)
                value = re.match(r"\s*(-?\d+)( remainder (\d+))?", right)
                if not expr or not value or not re.search(r"\d\s*[+\-×÷]", expr[1]):
                    continue
                if "÷" in expr[1]:
                    a, b = map(int, expr[1].split("÷"))
                    rest = int(value[3] or 0)
                    assert int(value[1]) * b + rest == a and 0 <= rest < abs(b), segment
                else:
                    assert eval(expr[1].replace("×", "*")) == int(value[1]), segment
                checked += 1
    return checked


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("difficulty", mathgen.DIFFICULTIES)
def test_answers_and_every_step_are_correct(kind, difficulty):
    rng = random.Random(f"test/{kind}/{difficulty}")
    for _ in range(60):
        problem = mathgen.generate_problem(rng, difficulty, kinds=(kind,))
        assert problem.kind == kind and problem.difficulty == difficulty
        assert problem.answer == _independent_answer(problem), problem
        assert _checked_steps(problem.solution) >= 1, problem.solution


def test_step_checker_catches_a_wrong_step():
    with pytest.raises(AssertionError):
        _checked_steps("ones: 7 + 5 = 13, write 3, carry 1")
    with pytest.raises(AssertionError):
        _checked_steps("249 ÷ 104 = 2 remainder 40")


def test_carries_and_borrows_are_shown():
    steps = mathgen._addition_steps(958, 67)
    assert steps[0] == "ones: 8 + 7 = 15, write 5, carry 1"
    assert steps[1] == "tens: 5 + 6 + 1 = 12, write 2, carry 1"
    assert steps[-1] == "So 958 + 67 = 1025."
    borrow = mathgen._subtraction_steps(503, 78)
    assert borrow[0] == "ones: 3 - 8 < 0, borrow 1: 10 + 3 - 8 = 5"
    assert borrow[1] == "tens: 0 - 7 - 1 < 0, borrow 1: 10 + 0 - 7 - 1 = 2"


def test_document_format_and_answer_round_trip():
    for problem in itertools.islice(mathgen.problems("train", seed=3), 300):
        document = as_document(problem)
        assert document.startswith(f"Question: {problem.question}\nSolution:\n")
        assert document.endswith(f"\nAnswer: {problem.answer}")
        assert document == mathgen.as_prompt(problem) + as_completion(problem)
        assert extract_answer(document) == problem.answer
        # a model that goes on after answering keeps its first answer
        rambling = as_completion(problem) + "\n\nQuestion: What is 1 + 1?\nAnswer: 2 and more"
        assert extract_answer(rambling) == problem.answer


@pytest.mark.parametrize("text, expected", [
    ("Answer: 42", "42"),
    ("answer:42.", "42"),
    ("Answer: 1,234 dollars", "1234"),
    ("Answer: −5", "-5"),
    ("Answer: +7", "7"),
    ("Answer: -0", "0"),
    ("Answer: 007", "7"),
    ("Answer: x = -12", "-12"),
    ("Answer: $28", "28"),
    ("Answer: 14 remainder 3\nQuestion: next", "14 remainder 3"),
    ("Answer: 14 r 3", "14 remainder 3"),
    ("Answer: 12 remainder 0", "12"),
    ("Answer: 2.50", "2.5"),
    ("Answer: 3.0", "3"),
    ("Answer: 14 rabbits", "14"),
    ("the result is 42", None),
    ("Answer: none", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_splits_are_disjoint_and_deterministic():
    train = list(itertools.islice(mathgen.problems("train"), 3000))
    test = list(itertools.islice(mathgen.problems("test"), 300))
    assert {p.question for p in train}.isdisjoint(p.question for p in test)
    assert all(mathgen.split_of(p) == "train" for p in train)
    assert all(mathgen.split_of(p) == "test" for p in test)
    assert train[:50] == list(itertools.islice(mathgen.problems("train"), 50))
    assert train[:50] != list(itertools.islice(mathgen.problems("train", seed=1), 50))
    assert {p.kind for p in train} == set(KINDS)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="difficulty"):
        mathgen.generate_problem(random.Random(0), difficulty=9)
    with pytest.raises(ValueError, match="kind"):
        mathgen.generate_problem(random.Random(0), kinds=("calculus",))
    with pytest.raises(ValueError, match="split"):
        next(mathgen.problems("dev"))


def test_distinct_keeps_first_occurrences_in_order_and_ends_when_only_repeats_come():
    import itertools
    stream = list(itertools.islice(mathgen.problems("train", seed=0, difficulty=1, kinds=("addition",)), 300))
    first = list(dict.fromkeys(p.question for p in stream))
    assert len(first) < len(stream)  # the raw stream repeats small problems
    assert [p.question for p in mathgen.distinct(iter(stream))] == first
    # a stream that has nothing new left ends the distinct one after `patience` repeats
    repeating = itertools.chain(stream[:3], itertools.repeat(stream[0]))
    assert [p.question for p in mathgen.distinct(repeating, patience=50)] == list(dict.fromkeys(
        p.question for p in stream[:3]))
