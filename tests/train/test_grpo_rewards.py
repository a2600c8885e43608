"""Rewards: the exact-answer verifier, and user reward functions loaded and checked."""
import pytest

from dsmoe.errors import ConfigError, DsmoeError
from dsmoe.train.rewards import RewardFn, load_reward_fn, math_reward


@pytest.mark.parametrize("completion, answer, reward", [
    ("3 + 4 = 7\nAnswer: 7", "7", 1.0),
    ("Answer: 7.", "7", 1.0),
    ("Answer: 1,234", "1234", 1.0),
    ("Answer: 17 remainder 3", "17 remainder 3", 1.0),
    ("Answer: 17", "17 remainder 3", 0.0),
    ("Answer: 8", "7", 0.0),
    ("the answer is 7", "7", 0.0),  # no answer line, no reward
    ("Answer: 7.5", "7", 0.0),
])
def test_math_verifier_is_exact(completion, answer, reward):
    assert math_reward(completion, answer) == reward


def test_default_reward_is_the_verifier():
    fn = RewardFn.from_spec(None)
    assert fn("q", "Answer: 12", answer="12", kind="addition") == 1.0
    assert fn("q", "Answer: 13", answer="12") == 0.0


def write(tmp_path, body: str):
    path = tmp_path / "my_reward.py"
    path.write_text(body)
    return path


def test_user_function_from_a_file_gets_prompt_completion_and_info(tmp_path):
    path = write(tmp_path, "def short(prompt, completion, answer, **info):\n"
                           "    return float(answer in completion) - 0.01 * len(completion)\n")
    fn = RewardFn.from_spec(f"{path}:short")
    assert fn("q", "Answer: 5", answer="5", kind="x") == pytest.approx(1.0 - 0.09)
    assert fn.name == f"{path}:short"


def test_user_function_from_a_module():
    fn = load_reward_fn("dsmoe.train.rewards:math_reward")
    assert fn("Answer: 3", "3") == 1.0


@pytest.mark.parametrize("spec, message", [
    ("no_colon", "write it as"),
    ("file.py:", "write it as"),
    ("/nonexistent/r.py:f", "does not exist"),
    ("dsmoe.no_such_module:f", "cannot be imported"),
    ("dsmoe.train.rewards:nothing_here", "has no function 'nothing_here'"),
    ("dsmoe.train.rewards:ConfigError.__doc__", "write it as"),
])
def test_bad_specs_fail_before_any_work(spec, message):
    with pytest.raises(ConfigError, match=message):
        load_reward_fn(spec)


def test_file_that_fails_to_import(tmp_path):
    path = write(tmp_path, "raise RuntimeError('broken on purpose')\n")
    with pytest.raises(ConfigError, match="failed to import: RuntimeError: broken on purpose"):
        load_reward_fn(f"{path}:f")
    path = write(tmp_path, "f = 3\n")
    with pytest.raises(ConfigError, match="not callable"):
        load_reward_fn(f"{path}:f")


@pytest.mark.parametrize("body, message", [
    ("def f(prompt, completion, **info):\n    raise KeyError('oops')\n", "raised KeyError"),
    ("def f(prompt, completion, **info):\n    return '1'\n", "returned '1'"),
    ("def f(prompt, completion, **info):\n    return None\n", "returned None"),
    ("def f(prompt, completion, **info):\n    return float('nan')\n", "finite number"),
    ("def f(prompt, completion):\n    return 1.0\n", "unexpected keyword argument"),
])
def test_function_that_raises_or_returns_non_numbers(tmp_path, body, message):
    fn = RewardFn.from_spec(f"{write(tmp_path, body)}:f")
    with pytest.raises(DsmoeError, match=message):
        fn("q", "Answer: 1", answer="1")
