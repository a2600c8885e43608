"""Held-out math problems: distinct, from the test split, in stream order."""
import itertools

import pytest

from dsmoe.data import mathgen
from dsmoe.train.math_eval import held_out_problems


def test_held_out_problems_are_the_first_distinct_test_problems():
    problems = held_out_problems(100, difficulty=1, kinds=("addition",))
    questions = [p.question for p in problems]
    assert len(questions) == len(set(questions)) == 100
    assert all(mathgen.split_of(p) == "test" and p.kind == "addition" for p in problems)
    # the raw stream repeats small problems; the held-out set is its first occurrences, in order
    stream = list(itertools.islice(mathgen.problems("test", seed=0, difficulty=1, kinds=("addition",)), 400))
    assert len({p.question for p in stream[:100]}) < 100
    first_seen = list(dict.fromkeys(p.question for p in stream))
    assert questions == first_seen[:100]


def test_asking_more_problems_than_the_split_holds_is_refused():
    # difficulty 1 division has a few dozen distinct test problems (one-digit operands)
    with pytest.raises(ValueError, match="distinct problems.*ask for at most"):
        held_out_problems(1000, difficulty=1, kinds=("division",))
