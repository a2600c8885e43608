"""`dsmoe sft`: supervised fine-tuning on chat data (DeepSeek-V3 report §5.1).

    dsmoe sft --model out/demo/run/hf --out out/sft --data demo --steps 300
    dsmoe sft --model DIR --out DIR --data chats.jsonl

Chats (`chat_data.py`) are rendered with the model's chat template, trained with the loss
on assistant tokens only, and packed with attention reset per chat (`packing.py`). The
written model carries its tokenizer and chat template in `tokenizer_config.json`, so
`dsmoe generate`, `dsmoe serve` and transformers render prompts exactly as training did.
Balancing continues as in pretraining (the aux-loss-free bias, `balance.py`), so SFT does
not undo the experts' load balance.

The report (`training_report.json` in the output) gives the held-out chat loss before and
after and, with `--eval-math N`, greedy exact-answer accuracy on N held-out math problems
(mathgen's test split) before and after.
Not here: rejection sampling or preference data (see `grpo.py` for RL).
"""
from __future__ import annotations

import argparse

from dsmoe.data import mathgen
from dsmoe.errors import ConfigError
from dsmoe.train.chat_data import DEMO
from dsmoe.train.finetune import (add_arguments_common, check_out, eval_loss, finetune, load_model,
                                  packed_batches, prepare_run, save_model_dir, train_config)
from dsmoe.train.math_eval import held_out_problems, math_accuracy
from dsmoe.train.packing import PackedStream
from dsmoe.train.task_data import load_task


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_arguments_common(parser, steps=300, lr=1e-3)
    parser.add_argument("--data", default=DEMO,
                        help=f"chat JSONL file (lines of {{\"messages\": [...]}}), or '{DEMO}' "
                             f"(default) / '{DEMO}-math' for the built-in demo set")
    parser.add_argument("--demo-size", type=int, default=2000, help="chats in the demo set")
    parser.add_argument("--eval-math", type=int, default=50, metavar="N",
                        help="held-out math problems for greedy accuracy before/after (0: skip)")
    parser.add_argument("--math-difficulty", type=int, default=1,
                        help="mathgen difficulty of the demo set's math chats and of the "
                             "held-out problems (default 1; 0: mixed 1-4)")
    parser.add_argument("--max-new-tokens", type=int, default=128)


def run(args: argparse.Namespace) -> int:
    if args.eval_math < 0 or args.demo_size < 1:
        raise ConfigError("--eval-math must be >= 0 and --demo-size >= 1")
    if args.math_difficulty not in (0, *mathgen.DIFFICULTIES):
        raise ConfigError(f"--math-difficulty {args.math_difficulty}: choose 0 (mixed) or one of "
                          f"{mathgen.DIFFICULTIES}")
    out = check_out(args.out)
    device = prepare_run(args.device, args.threads, args.seed)
    model, tokenizer = load_model(args.model, device)
    cfg = train_config(args, model.args, balance="bias")
    seq_len = cfg.seq_len
    task = load_task(args.data, tokenizer, seq_len, n_demo=args.demo_size, seed=args.seed,
                     chat_only=True, math_difficulty=args.math_difficulty or None)
    pad_id = tokenizer.pad_id or 0
    stream = PackedStream(task.train, seq_len, cfg.batch_size, cfg.seed, pad_id)
    held_out = packed_batches(task.val, seq_len, cfg.batch_size, pad_id)
    print(f"sft: {len(task.train)} training chats ({task.train_targets} assistant tokens, "
          f"{stream.stats.fill:.0%} of packed positions used), {len(task.val)} held out")

    problems = held_out_problems(args.eval_math, args.seed, args.math_difficulty or None)

    def measure() -> dict:
        result = {"held_out_loss": eval_loss(model, held_out)}
        if problems:
            result["math"] = math_accuracy(model, tokenizer, problems, args.max_new_tokens)
        return result

    before = measure()
    print(f"before: {_describe(before)}")
    records = finetune(model, stream, cfg, evals={"held_out": held_out})
    after = measure()
    print(f"after: {_describe(after)}")
    report = {"command": "sft", "model": str(args.model), "data": str(args.data),
              "train_chats": len(task.train), "held_out_chats": len(task.val),
              "train": cfg.to_dict(), "before": before, "after": after}
    save_model_dir(model, tokenizer, out, report, records)
    print(f"wrote {out}")
    return 0


def _describe(m: dict) -> str:
    text = f"held-out chat loss {m['held_out_loss']:.4f}"
    if "math" in m:
        text += f", greedy math accuracy {m['math']['accuracy']:.3f} on {m['math']['problems']} problems"
    return text
