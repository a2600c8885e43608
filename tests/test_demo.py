"""`dsmoe demo`: the whole program runs (small), its arithmetic score is the verifier's, its
settings fit its preset, and the training figure is drawn from a run's metrics."""
import itertools
import re

import pytest
import torch

from dsmoe import demo
from dsmoe.config import ModelArgs
from dsmoe.data import mathgen
from dsmoe.model import Transformer


def test_demo_settings_fit_the_preset_and_are_the_same_everywhere():
    args = ModelArgs.from_preset(demo.PRESET)
    cfg = demo.demo_config()
    cfg.check_model(args)
    assert cfg.steps == demo.STEPS and cfg.max_seconds == 0  # a fixed length, never a clock
    assert cfg.threads == demo.THREADS == 2  # fixed, never the machine's count (0 would be)
    assert 0 < cfg.curriculum[0]["from"] < cfg.steps * (1 - cfg.decay_fraction)  # math-heavy decay
    assert cfg == demo.demo_config()
    names = demo.moe_layer_names(args)
    assert len(names) == len(Transformer(args).moe_layers())
    assert names[-1] == "MTP 1" and args.n_mtp_layers == 1  # speculative decoding needs it


class _Request:
    def __init__(self, text: str):
        self.text = text


class _AnsweringEngine:
    """Answers the questions it can parse: right when the first operand is even, else off by one."""

    def __init__(self, tokenizer):
        self.tokenizer, self.prompts = tokenizer, []

    def generate(self, prompts, params):
        out = []
        for ids in prompts:
            text = self.tokenizer.decode(ids)
            self.prompts.append(text)
            a, op, b = re.search(r"What is (\d+) ([-+*/x×÷]) (\d+)\?", text).groups()
            a, b = int(a), int(b)
            value = {"+": a + b, "-": a - b}.get(op)
            if value is None:
                out.append(_Request("ones: 1 x 2 = 2\n"))  # no answer line: wrong
                continue
            out.append(_Request(f"So it is {value}.\nAnswer: {value + (a % 2)}"))
        return out


@pytest.fixture(scope="module")
def math_tokenizer():
    from dsmoe.data.tokenizer import train_tokenizer
    docs = [mathgen.as_document(p) for p in itertools.islice(mathgen.problems("train", seed=1), 200)]
    return train_tokenizer(docs, vocab_size=300)


def test_arithmetic_accuracy_reads_answers_like_the_verifier(math_tokenizer):
    from dsmoe.train.math_eval import held_out_problems
    engine = _AnsweringEngine(math_tokenizer)
    accuracy = demo.arithmetic_accuracy(engine, math_tokenizer, {"addition": 12, "subtraction": 9,
                                                                 "multiplication": 5, "division": 5})
    for kind, n in (("addition", 12), ("subtraction", 9)):
        problems = held_out_problems(n, difficulty=1, kinds=(kind,))
        even = sum(int(re.search(r"\d+", p.question).group()) % 2 == 0 for p in problems)
        assert accuracy[kind] == (even, n) and 0 < even < n
    assert accuracy["multiplication"] == accuracy["division"] == (0, 5)
    # the prompts are the pretraining format of held-out (test-split) problems
    assert all(p.startswith("Question: What is ") and p.endswith("\nSolution:\n") for p in engine.prompts)
    first = held_out_problems(1, difficulty=1, kinds=("addition",))[0]
    assert mathgen.split_of(first) == "test" and engine.prompts[0].endswith(mathgen.as_prompt(first))


def _records(steps: int = 30, layers: int = 3):
    records = []
    for s in range(1, steps + 1):
        records.append({"step": s, "loss": 6.0 - s / 10, "mtp_loss": 6.2 - s / 10,
                        "maxvio": [1.0 / s + 0.1 * i for i in range(layers)]})
        if s % 10 == 0:
            records.append({"step": s, "val": {"en": 6.0 - s / 12, "math": 4.0 - s / 15}})
    return records


def test_plot_training_writes_a_png(tmp_path):
    from dsmoe.analysis.plots import plot_training
    path = tmp_path / "training.png"
    plot_training(_records(), path, entropy={"en": 5.5, "math": 3.0},
                  layer_names=["layer 1", "layer 2", "MTP 1"])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no training-step records"):
        plot_training([r for r in _records() if "val" in r], tmp_path / "empty.png")


def test_moving_average_is_a_trailing_mean():
    from dsmoe.analysis.plots import _moving_average
    assert _moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def test_demo_runs_end_to_end_small(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(demo, "MATH_MAX_TOKENS", 8)
    torch.manual_seed(0)
    assert demo.demo(steps=4, out=tmp_path, preset="tiny", max_chars_per_domain=20_000,
                     math_chars=20_000, math_problems=2) == 0
    printed = capsys.readouterr().out
    run_dir, data_dir = tmp_path / demo.RUN_NAME, tmp_path / demo.DATA_NAME
    assert (run_dir / demo.PLOT_NAME).read_bytes()[:4] == b"\x89PNG"
    assert printed.rstrip().endswith(demo.explore_command(run_dir / "hf", data_dir, run_dir))
    for domain in ("en", "fr", "es", "code", "math"):
        assert re.search(rf"^{domain}\s+\d+\.\d+\s+\d+\.\d+", printed, re.MULTILINE)
    assert re.search(r"addition \d+% \(\d+/2\), subtraction \d+% \(\d+/2\), "
                     r"multiplication \d+% \(\d+/2\), division \d+% \(\d+/2\)", printed)
    accepted, drafted = map(int, re.search(r"drafts accepted \d+% \((\d+)/(\d+)\)", printed).groups())
    assert 0 <= accepted <= drafted and drafted > 0
    assert "4 steps, 4,096 training tokens" in printed
    shares = re.search(r"found in its corpus .*: en \d+% \((\d+)/(\d+)\), fr \d+% \(\d+/\d+\), "
                       r"es \d+% \(\d+/\d+\); real text scores en (\d+)%, fr \d+%, es \d+%", printed)
    assert shares and int(shares[1]) <= int(shares[2]) and 50 < int(shares[3]) <= 100
    assert list(itertools.islice((l for l in printed.splitlines() if l.startswith("  [")), 5))


def test_demo_math_documents_cycle_through_the_kinds_from_the_train_split(tmp_path):
    import json
    folder = demo.write_corpus(tmp_path, max_chars_per_domain=2_000, math_chars=4_000)
    texts = [json.loads(line)["text"] for line in (folder / "math.jsonl").read_text().splitlines()]
    ops = {"+": "addition", "-": "subtraction", "×": "multiplication", "÷": "division"}
    kinds = [ops[re.search(r"What is \d+ (\S) \d+", t).group(1)] for t in texts]
    assert len(kinds) > len(demo.MATH_CYCLE)
    assert kinds == [demo.MATH_CYCLE[i % len(demo.MATH_CYCLE)] for i in range(len(kinds))]
    for text in texts:
        question = re.search(r"Question: (.*)\n", text).group(1)
        assert mathgen.split_of(mathgen.MathProblem(question, "", "", "", 1)) == "train"
