"""Math problems answered by the model through the inference engine, and checked: the
rollouts of GRPO and the held-out accuracy that SFT and GRPO report.

A problem is asked as one user turn of the chat template (`chat_data.math_prompt`, the
text pretraining saw before a solution); the engine completes it until the end of the
assistant turn (`end_of_turn_ids`) or `max_new_tokens`; the exact-answer verifier
(`rewards.math_reward`) scores the completion. Held-out problems come from mathgen's test
split, which neither SFT nor GRPO trains on.

Accuracy is greedy, or the mean over several sampled completions per problem with fixed
seeds, so two models measured on the same problems draw with the same random numbers and
their difference is a paired comparison (`paired_change`: mean change, standard error and
an exact sign test), with less noise than independent draws.
Not here: the GRPO objective and loop (`grpo.py`), other verifiers (`rewards.py`).
"""
from __future__ import annotations

import itertools
import math

from dsmoe.data import mathgen
from dsmoe.data.tokenizer import end_of_turn_ids
from dsmoe.train.chat_data import math_prompt
from dsmoe.train.rewards import math_reward


def held_out_problems(n: int, seed: int = 0, difficulty: int | None = 1,
                      kinds: tuple[str, ...] | None = None) -> list[mathgen.MathProblem]:
    """The first `n` distinct problems of mathgen's test split: never trained on by SFT or
    GRPO.

    Distinct, because the stream repeats small problems often (at difficulty 1 a quarter of
    the additions are one digit plus one digit, and the test split holds only a few of
    those): the first 100 additions held "What is 4 + 5?" ten times, so one fact moved an
    accuracy by ten points. Raises ValueError when the split has fewer than `n` such
    problems.
    """
    stream = mathgen.problems("test", seed=seed, difficulty=difficulty, kinds=kinds)
    problems = list(itertools.islice(mathgen.distinct(stream, patience=max(20_000, 200 * n)), n))
    if len(problems) < n:
        raise ValueError(
            f"mathgen's test split has only {len(problems)} distinct problems of kinds "
            f"{kinds or 'all'} at difficulty {difficulty or '1-4'}, fewer than the {n} asked; "
            f"ask for at most {len(problems)}, or a higher difficulty")
    return problems


def prompt_ids(tokenizer, problem: mathgen.MathProblem) -> list[int]:
    return tokenizer.encode(tokenizer.apply_chat_template(math_prompt(problem), add_generation_prompt=True))


def make_engine(model, tokenizer, max_batch: int, max_len: int):
    from dsmoe.infer.engine import Engine

    return Engine(model, tokenizer, max_batch=max_batch, max_len=min(max_len, model.args.max_seq_len))


def generate_completions(engine, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                         seeds: list[int] | None, stop: list[int]):
    """The engine's finished requests, one per prompt, in order (temperature 0: greedy)."""
    from dsmoe.infer.sampling import SamplingParams

    params = [SamplingParams(max_tokens=max_new_tokens, temperature=temperature,
                             seed=None if seeds is None else seeds[i], stop_token_ids=stop)
              for i in range(len(prompts))]
    return engine.generate(prompts, params)


def math_accuracy(model, tokenizer, problems: list[mathgen.MathProblem], max_new_tokens: int,
                  batch: int = 32, engine=None, temperature: float = 0.0, samples: int = 1,
                  seed: int = 0) -> dict[str, float]:
    """Exact-answer accuracy and mean completion length on `problems`: greedy, or the mean
    over `samples` completions per problem at `temperature`. Sample j of problem i always
    uses the same seed, so two models compared on the same problems draw with the same
    random numbers (a paired comparison, with less noise than independent draws)."""
    prompts = [prompt_ids(tokenizer, p) for p in problems for _ in range(samples)]
    answers = [p.answer for p in problems for _ in range(samples)]
    seeds = None if temperature == 0 else [seed * 1_000_003 + i for i in range(len(prompts))]
    engine = engine or make_engine(model, tokenizer, batch, max(map(len, prompts)) + max_new_tokens)
    stop, correct, lengths = end_of_turn_ids(tokenizer), [], 0
    for i in range(0, len(prompts), batch):
        reqs = generate_completions(engine, prompts[i:i + batch], max_new_tokens, temperature,
                                    None if seeds is None else seeds[i:i + batch], stop)
        for req, answer in zip(reqs, answers[i:i + batch]):
            correct.append(int(math_reward(req.text, answer) > 0))
            lengths += len(req.output_ids)
    n = max(len(prompts), 1)
    return {"accuracy": sum(correct) / n, "mean_length": lengths / n, "problems": len(problems),
            "samples": samples, "temperature": temperature, "correct": correct}


def held_out_accuracy(model, tokenizer, problems: list[mathgen.MathProblem], engine, max_new_tokens: int,
                      temperature: float, samples: int, seed: int) -> dict[str, dict]:
    """Greedy accuracy, and the policy's own: `samples` draws per problem at `temperature`
    (what GRPO maximises; none when `samples` is 0)."""
    result = {"greedy": math_accuracy(model, tokenizer, problems, max_new_tokens, engine=engine)}
    if samples:
        result["sampled"] = math_accuracy(model, tokenizer, problems, max_new_tokens, engine=engine,
                                          temperature=temperature, samples=samples, seed=seed)
    return result


def describe_accuracy(acc: dict[str, dict]) -> str:
    """One line for a `held_out_accuracy` result."""
    text = f"greedy {acc['greedy']['accuracy']:.3f}"
    if "sampled" in acc:
        s = acc["sampled"]
        text += f", sampled {s['accuracy']:.3f} ({s['samples']} per problem at T={s['temperature']})"
    return text + f"; mean length {acc['greedy']['mean_length']:.1f} tokens"


def paired_change(before: dict, after: dict) -> dict[str, float]:
    """After minus before over the same draws (same problems, same seeds): the mean change,
    its standard error from the per-draw differences, the draws that turned right and
    wrong, and the exact two-sided sign-test (McNemar) p-value on those discordant draws."""
    a, b = before["correct"], after["correct"]
    if len(a) != len(b) or not a:
        raise ValueError("a paired comparison needs the same, non-empty set of draws")
    d = [y - x for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    stderr = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n) if n > 1 else float("nan")
    improved, worsened = d.count(1), d.count(-1)
    k = improved + worsened
    tail = sum(math.comb(k, i) for i in range(min(improved, worsened) + 1)) / 2 ** k if k else 1.0
    return {"change": mean, "stderr": stderr, "draws": n, "improved": improved, "worsened": worsened,
            "p_value": min(1.0, 2 * tail)}
