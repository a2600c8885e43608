"""Rewards for reinforcement learning: the math verifier, and user reward functions.

The verifier is exact: a completion earns 1 when `mathgen.extract_answer` finds an answer
line whose canonical form equals the problem's answer, else 0 (no partial credit for a
close number, none for format alone: a format bonus is easy to farm and says nothing
about correctness).

A user reward function is named as `path/to/file.py:function` or `package.module:function`
and called as `function(prompt=..., completion=..., **info)`, where `info` holds what the
prompt came with (for math: `answer`, `question`, `kind`, `difficulty`). It must return a
finite real number. `load_reward_fn` checks that the file, the module and the callable
exist before any work; `RewardFn` checks each value as it comes and turns an exception or a
non-number into a `DsmoeError` that names the function, the call and the fix. A run that
hits one stops before anything is written.
Not here: learned reward models, or rewards from a remote service.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
from pathlib import Path
from typing import Any, Callable

from dsmoe.data.mathgen import extract_answer
from dsmoe.errors import ConfigError, DsmoeError


def math_reward(completion: str, answer: str) -> float:
    """1.0 when the completion's final answer is exactly `answer`, else 0.0."""
    return 1.0 if extract_answer(completion) == answer else 0.0


def load_reward_fn(spec: str) -> Callable[..., Any]:
    """The callable named by `file.py:function` or `module:function`."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name.isidentifier():
        raise ConfigError(f"reward function {spec!r}: write it as path/to/file.py:function or "
                          "package.module:function")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ConfigError(f"reward function file {path} does not exist")
        module_spec = importlib.util.spec_from_file_location(f"dsmoe_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as err:
            raise ConfigError(f"reward function file {path} failed to import: "
                              f"{type(err).__name__}: {err}") from err
    else:
        try:
            module = importlib.import_module(target)
        except Exception as err:
            raise ConfigError(f"reward function module {target!r} cannot be imported: "
                              f"{type(err).__name__}: {err}") from err
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"{target} has no function {name!r}" if fn is None
                          else f"{target}.{name} is not callable")
    return fn


class RewardFn:
    """A reward function with every value checked: finite real numbers only."""

    def __init__(self, fn: Callable[..., Any], name: str):
        self.fn, self.name = fn, name

    @classmethod
    def from_spec(cls, spec: str | None) -> "RewardFn":
        """The user's function, or the math verifier when `spec` is None."""
        if spec is None:
            return cls(lambda prompt, completion, answer, **info: math_reward(completion, answer),
                       "math verifier")
        return cls(load_reward_fn(spec), spec)

    def __call__(self, prompt: str, completion: str, **info: Any) -> float:
        try:
            value = self.fn(prompt=prompt, completion=completion, **info)
        except Exception as err:
            raise DsmoeError(f"reward function {self.name} raised {type(err).__name__}: {err} "
                             f"(on completion {completion[:60]!r}); fix the function, it must "
                             "return a number for every completion") from err
        if not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
            raise DsmoeError(f"reward function {self.name} returned {value!r} "
                             f"({type(value).__name__}); it must return a finite number")
        return float(value)
