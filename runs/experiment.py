"""Helpers for the experiments in runs/*.sh (configs, measurements, results tables).

Run configs, the measurements no `dsmoe` verb makes, and the results tables written into
docs/experiments.md.

Design note
-----------
- Training, validation loss and routing statistics come from the library (`dsmoe train`
  writes `metrics.jsonl` with validation loss per domain; `dsmoe report` writes
  `report.json` with MaxVio and I(domain; expert) per layer). This file only adds what is
  specific to one experiment: a dense model matched on activated parameters (b), the
  speculative acceptance of the MTP draft (c), and YaRN extension with loss by position (d).
- Every number in a results table is read from files a run wrote; a missing file is an
  error, never a blank filled in by hand. The table replaces the block between
  `<!-- results: NAME -->` and `<!-- /results: NAME -->` in docs/experiments.md.
Deliberately not here: a second training loop (YaRN fine-tuning calls
`dsmoe.train.finetune.finetune` on plain text windows), or plotting.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from dsmoe.analysis.report import markdown_table



def _write_text(path: str | Path, text: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)


def _write_json(path: str | Path, data) -> None:
    _write_text(path, json.dumps(data, indent=1) + "\n")


def _read_json(path: Path):
    if not path.is_file():
        sys.exit(f"experiment: {path} is missing; run the experiment's script first")
    return json.loads(path.read_text())


# --- run configs ------------------------------------------------------------------------------

def dense_matching_activated(args):
    """A dense model (every layer a SwiGLU FFN) whose parameters match the MoE's activated
    parameters per token: the FFN width is chosen by search over multiples of 8."""
    from dsmoe.analysis.flops import count_params

    target = count_params(args).activated
    widths = range(8, 8 * args.inter_dim, 8)

    def dense(width):
        return args.replace(n_dense_layers=args.n_layers, inter_dim=width)
    best = min(widths, key=lambda w: abs(count_params(dense(w)).total - target))
    return dense(best)


def cmd_config(a) -> None:
    from dsmoe.config import ModelArgs

    args = ModelArgs.from_preset(a.preset).replace(**json.loads(a.model))
    if a.dense:
        args = dense_matching_activated(args)
    _write_json(a.out, {"model": args.to_dict(), **json.loads(a.train)})


# --- (c) speculative acceptance -------------------------------------------------------------

def val_windows(shards, length: int, per_domain: int) -> list[torch.Tensor]:
    """The first `per_domain` validation windows of `length` tokens of every domain."""
    from dsmoe.data.shards import val_batches

    windows = []
    for domain in shards.domains:
        for batch in val_batches(shards, domain, per_domain, length - 1, max_batches=1):
            windows += list(batch)
    return windows


def cmd_acceptance(a) -> None:
    """Greedy self-speculative decoding with the MTP draft from validation-text prompts."""
    from dsmoe.data.shards import TokenShards
    from dsmoe.infer.engine import Engine
    from dsmoe.infer.sampling import SamplingParams
    from dsmoe.interop.hf import load_model_dir

    model, tokenizer = load_model_dir(a.model)
    prompts = [w.tolist() for w in val_windows(TokenShards(a.data), a.prompt_len, a.prompts)]
    engine = Engine(model, tokenizer, max_batch=len(prompts), speculative=True)
    params = SamplingParams(max_tokens=a.new_tokens, temperature=0.0, ignore_eos=True)
    engine.generate(prompts, params)
    s = engine.stats
    _write_json(a.out, {"prompts": len(prompts), "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
                        "drafted": s.drafted, "accepted": s.accepted, "acceptance": s.acceptance})


# --- (d) YaRN ---------------------------------------------------------------------------------

@torch.no_grad()
def loss_by_position(model, windows: list[torch.Tensor], batch_size: int = 8) -> list[float]:
    """Mean next-token cross-entropy (nats) at every position, over the given windows."""
    model.eval()
    device = next(model.parameters()).device
    total = None
    for i in range(0, len(windows), batch_size):
        batch = torch.stack(windows[i:i + batch_size]).to(device)
        logits = model(batch[:, :-1])
        ce_BT = F.cross_entropy(logits.float().transpose(1, 2), batch[:, 1:], reduction="none")
        total = ce_BT.sum(0) if total is None else total + ce_BT.sum(0)
    return (total / len(windows)).tolist()


def cmd_position_loss(a) -> None:
    from dsmoe.data.shards import TokenShards
    from dsmoe.interop.hf import load_model_dir

    model, _ = load_model_dir(a.model)
    if a.seq_len > model.args.max_seq_len:
        sys.exit(f"experiment: --seq-len {a.seq_len} exceeds the model's max_seq_len={model.args.max_seq_len}")
    windows = val_windows(TokenShards(a.data), a.seq_len + 1, a.windows)
    losses = loss_by_position(model, windows)
    size = a.seq_len // a.buckets
    buckets = [[b * size, (b + 1) * size, sum(losses[b * size:(b + 1) * size]) / size] for b in range(a.buckets)]
    _write_json(a.out, {"model": a.model, "windows": len(windows), "seq_len": a.seq_len,
                        "rope_factor": model.args.rope_factor, "original_seq_len": model.args.original_seq_len,
                        "buckets": buckets, "per_position": losses})


def cmd_yarn(a) -> None:
    """The trained model with YaRN RoPE for a `factor`-times longer context, then (steps > 0)
    a short fine-tune on training windows of the new length. `--plain` keeps plain RoPE (the
    control: the same fine-tune without YaRN)."""
    from dsmoe.data.shards import BatchStream, TokenShards
    from dsmoe.interop.hf import load_model_dir
    from dsmoe.model import Transformer
    from dsmoe.train.config import TrainConfig
    from dsmoe.train.finetune import finetune, prepare_run, save_model_dir
    from dsmoe.train.packing import Example, PackedStream

    device = prepare_run(seed=a.seed, threads=a.threads)
    base, tokenizer = load_model_dir(a.model, dtype=torch.float32, device=device)
    trained_len = a.original_seq_len
    args = base.args.replace(max_seq_len=max(base.args.max_seq_len, a.factor * trained_len))
    if not a.plain:
        args = args.replace(rope_factor=float(a.factor), original_seq_len=trained_len)
    model = Transformer(args).to(device)
    model.load_state_dict(base.state_dict())  # same weights; RoPE tables rebuilt for YaRN
    metrics = []
    if a.steps > 0:
        seq_len = a.factor * trained_len
        stream = BatchStream(TokenShards(a.data), "train", a.batch_size, seq_len, seed=a.seed + 1)
        examples = [Example(row.tolist(), [True] * (seq_len + 1))
                    for step in range(a.steps) for row in stream.batch(step)]
        cfg = TrainConfig(steps=a.steps, batch_size=a.batch_size, seq_len=seq_len, lr=a.lr,
                          warmup_steps=max(1, a.steps // 10), eval_interval=0, ckpt_interval=0,
                          log_interval=max(1, a.steps // 5), seed=a.seed)
        metrics = finetune(model, PackedStream(examples, seq_len, a.batch_size, seed=a.seed), cfg)
    save_model_dir(model, tokenizer, a.out, {"from": a.model, "rope_factor": args.rope_factor,
                                             "original_seq_len": trained_len, "steps": a.steps,
                                             "batch_size": a.batch_size, "lr": a.lr}, metrics)


# --- results tables ------------------------------------------------------------------------------

def _val(run: Path) -> dict[str, float]:
    """The last validation losses per domain that `dsmoe train` logged."""
    from dsmoe.train.run_dir import read_metrics

    vals = [m["val"] for m in read_metrics(run) if "val" in m]
    if not vals:
        sys.exit(f"experiment: {run} logged no validation loss")
    return vals[-1]


def _steps(run: Path) -> list[dict]:
    from dsmoe.train.run_dir import read_metrics
    return [m for m in read_metrics(run) if "loss" in m]


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def _run_settings(run: Path) -> str:
    train = _read_json(run / "run.json")["train"]
    steps = _steps(run)
    seconds = sum(train["batch_size"] * train["seq_len"] * train["grad_accum"] / m["tokens_per_s"] for m in steps)
    n = train["threads"]
    threads = f"{n} torch thread{'s' * (n > 1)}" if n else "torch's default threads"
    return (f"{train['steps']} steps x {train['batch_size']} x {train['seq_len']} tokens = "
            f"{steps[-1]['tokens']:,} training tokens per arm ({seconds / 60:.1f} min of training steps "
            f"for this arm, {threads})")


def results_balance(out: Path, arms: list[tuple[str, str]]) -> list[str]:
    rows = []
    for label, run in _runs(out, arms):
        report = _read_json(run / "report" / "report.json")["routing"]
        tail = _steps(run)[-max(1, len(_steps(run)) // 5):]  # the last fifth of training
        rows.append([label, f"{_mean(_val(run).values()):.4f}", f"{_mean(report['maxvio']):.3f}",
                     f"{max(report['maxvio']):.3f}", f"{_mean(_mean(m['maxvio']) for m in tail):.3f}",
                     f"{_mean(report['mutual_information_bits']):.3f}"])
    return markdown_table(["balancing", "val loss (mean over domains, nats)", "MaxVio on val, mean over layers",
                           "MaxVio on val, worst layer", "MaxVio per training batch, last 20% of steps",
                           "I(domain; expert), bits, mean over layers"], rows) + ["", _run_settings(_runs(out, arms)[0][1])]


def results_dense(out: Path, arms: list[tuple[str, str]]) -> list[str]:
    from dsmoe.analysis.flops import count_params, flops_per_token
    from dsmoe.config import ModelArgs

    rows = []
    for label, run in _runs(out, arms):
        record = _read_json(run / "run.json")
        args = ModelArgs.from_dict(record["model"])
        p, val = count_params(args), _val(run)
        rows.append([label, f"{p.total:,}", f"{p.activated:,}", f"{flops_per_token(args, record['train']['seq_len']).training:,}",
                     f"{_mean(val.values()):.4f}", ", ".join(f"{d} {v:.3f}" for d, v in val.items())])
    return markdown_table(["model", "parameters", "activated per token", "training FLOPs per token",
                           "val loss (mean, nats)", "val loss per domain"], rows) + ["", _run_settings(_runs(out, arms)[0][1])]


def results_mtp(out: Path, arms: list[tuple[str, str]]) -> list[str]:
    rows = []
    for label, run in _runs(out, arms):
        acc_path = run / "acceptance.json"
        acc = _read_json(acc_path) if acc_path.is_file() else None
        rows.append([label, f"{_mean(_val(run).values()):.4f}",
                     f"{acc['acceptance']:.3f} ({acc['accepted']:,} of {acc['drafted']:,} drafts)" if acc else "n/a (no MTP module)",
                     f"{1 + acc['acceptance']:.2f}" if acc else "1 (plain decoding)"])
    return markdown_table(["MTP", "main-head val loss (mean over domains, nats)", "greedy draft acceptance",
                           "tokens per main-model pass (1 + acceptance)"], rows) + ["", _run_settings(_runs(out, arms)[0][1])]


def results_yarn(out: Path, arms: list[tuple[str, str]]) -> list[str]:
    loaded = [(label, _read_json(out / "yarn" / f"{name}.json")) for label, name in arms]
    buckets = loaded[0][1]["buckets"]
    header = ["model"] + [f"positions {b[0]}-{b[1] - 1}" for b in buckets]
    rows = [[arm] + [f"{math.exp(b[2]):.1f}" for b in data["buckets"]] for arm, data in loaded]
    return markdown_table(header, rows) + ["", "(perplexity, exp of the mean next-token loss in each range of "
                                   f"positions, over {loaded[0][1]['windows']} validation windows)"]


def _arm(spec: str) -> tuple[str, str]:
    """LABEL=NAME (or NAME alone): a table row's label and the arm's name."""
    label, _, name = spec.rpartition("=")
    return label or name, name


def _runs(out: Path, arms: list[tuple[str, str]]) -> list[tuple[str, Path]]:
    """(label, run directory out/arms/NAME) of trained arms."""
    return [(label, out / "arms" / name) for label, name in arms]


RESULTS = {"balance": results_balance, "dense": results_dense, "mtp": results_mtp, "yarn": results_yarn}


def cmd_results(a) -> None:
    out = Path(a.out_dir)
    lines = RESULTS[a.experiment](out, [_arm(spec) for spec in a.arms])
    lines += ["", f"Measured with `{a.command}` on {platform.machine()} ("
              f"{os.cpu_count()} cores, torch {torch.__version__})."]
    block = "\n".join(lines)
    _write_text(out / "results" / f"{a.experiment}.md", block + "\n")
    docs = Path(a.docs)
    text = docs.read_text()
    pattern = re.compile(rf"(<!-- results: {a.experiment} -->\n).*?(\n<!-- /results: {a.experiment} -->)", re.S)
    if not pattern.search(text):
        sys.exit(f"experiment: no results block for {a.experiment!r} in {docs}")
    docs.write_text(pattern.sub(lambda m: m.group(1) + block + m.group(2), text))
    print(block)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="runs/experiment.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)

    def command(name: str, fn, help_text: str, model_and_data: bool = True):
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(fn=fn)
        if model_and_data:
            p.add_argument("--model", required=True, help="model directory")
            p.add_argument("--data", required=True, help="data directory (dsmoe prepare)")
            p.add_argument("--out", required=True, help="output file or directory")
        return p

    p = command("config", cmd_config, "write a run config: a preset with model overrides, and training settings", False)
    p.add_argument("--preset", required=True)
    p.add_argument("--model", default="{}", help="ModelArgs overrides (JSON object)")
    p.add_argument("--train", default="{}", help="TrainConfig settings (JSON object)")
    p.add_argument("--dense", action="store_true", help="make it dense, matching the MoE's activated parameters")
    p.add_argument("--out", required=True)
    p = command("acceptance", cmd_acceptance, "greedy MTP speculative decoding on validation prompts")
    p.add_argument("--prompts", type=int, default=4, help="prompts per domain")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p = command("position-loss", cmd_position_loss, "validation loss by position")
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--windows", type=int, default=8, help="windows per domain")
    p.add_argument("--buckets", type=int, default=8)
    p = command("yarn", cmd_yarn, "extend the context with YaRN, optionally fine-tune")
    p.add_argument("--factor", type=int, required=True)
    p.add_argument("--original-seq-len", type=int, required=True, help="the length the model was trained at")
    p.add_argument("--steps", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--plain", action="store_true", help="keep plain RoPE (no YaRN): the control")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p = command("results", cmd_results, "write an experiment's results table into docs/experiments.md", False)
    p.add_argument("experiment", choices=sorted(RESULTS))
    p.add_argument("arms", nargs="+", help="LABEL=NAME per row: NAME is a trained arm (runs/out/arms/NAME), "
                   "or for yarn a loss-by-position file (runs/out/yarn/NAME.json)")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--command", required=True, help="the command that ran the experiment")
    p.add_argument("--docs", required=True, help="the Markdown file holding the results blocks")
    a = parser.parse_args(argv)
    a.fn(a)


if __name__ == "__main__":
    main()
