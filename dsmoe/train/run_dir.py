"""A pretraining run's directory (`dsmoe train --out`): what is checked before the first
step, and what the run writes there and shows on the terminal.

    out/run.json          model, training settings and data identity (`run_record`)
    out/metrics.jsonl     one JSON object per step and per validation (`MetricsLog`)
    out/checkpoints/      `dsmoe/train/checkpoint.py` (or sharded, `dsmoe/parallel/`)
    out/hf/               the final model as a Hugging Face checkpoint (`export_hf`)

Notable:
- Checked before the model is built: the prepared shards exist, are not empty and fit the
  model's vocabulary (`open_training_shards`); a fresh run refuses an `--out` that holds a
  run; `--resume` refuses different settings, showing the difference (`resume_point`).
  Settings that do not change what is computed (`RESUMABLE_CHANGES`) may differ.
- Exact resume of the log: the records a killed run wrote after its last checkpoint are
  dropped (`MetricsLog.truncate_after`), so a resumed run's log reads as one run's.
- One process writes and shows (rank 0 under torchrun); the others get `NullLog` and a
  quiet `Progress`, so the loop calls both the same way on every rank.
Not here: the loop (`pretrain.py`), checkpoint files (`checkpoint.py`).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from dsmoe.atomic import write_file
from dsmoe.config import ModelArgs
from dsmoe.errors import CheckpointError, ConfigError, DataError
from dsmoe.train import checkpoint as ckpt
from dsmoe.train.config import TrainConfig, diff

RUN_FILE, METRICS_FILE = "run.json", "metrics.jsonl"
CHECKPOINTS, HF_DIR = "checkpoints", "hf"
# Settings that do not change what is computed: a resumed run may differ in these.
RESUMABLE_CHANGES = ("max_seconds", "log_interval", "device", "threads")


# ------------------------------------------------------------- before the first step
def open_training_shards(data: str | Path, args: ModelArgs, cfg: TrainConfig):
    """The prepared shards, after checking they exist, are not empty and fit the model."""
    from dsmoe.data.shards import TokenShards, require_validation
    data = Path(data)
    if not data.is_dir():
        raise DataError(f"data directory {data} does not exist; create it with "
                        f"`dsmoe prepare --out {data}`")
    shards = TokenShards(data)
    if shards.num_tokens("train") == 0:
        raise DataError(f"{data} holds no training tokens; prepare it from non-empty text")
    if shards.vocab_size > args.vocab_size:
        raise DataError(f"the tokenizer in {data} has {shards.vocab_size} tokens but the model's "
                        f"vocab_size is {args.vocab_size}: ids would fall outside the embedding. "
                        f"Prepare the data with --vocab-size {args.vocab_size} or use a model "
                        f"with vocab_size >= {shards.vocab_size}")
    unknown = sorted(set(cfg.domains or []) - set(shards.domains))
    if unknown:
        raise DataError(f"TrainConfig.domains names {unknown}, absent from {data}, which has "
                        f"{shards.domains}")
    require_validation(shards, cfg.seq_len + 1, shorter='a shorter "seq_len" in a --config file')
    return shards


def run_record(args: ModelArgs, cfg: TrainConfig, shards) -> dict[str, Any]:
    """What `run.json` holds and `--resume` compares: model, training settings, data identity."""
    manifest = shards.manifest
    return {"model": args.to_dict(), "train": cfg.to_dict(),
            "data": {"tokenizer_sha256": manifest["tokenizer"]["sha256"],
                     "shards_sha256": sorted(r.sha256 for r in shards.records)}}


def resume_point(out: Path, record: dict) -> Path:
    """The checkpoint `--resume` continues from, after checking the settings are the same."""
    if not (out / RUN_FILE).is_file():
        raise CheckpointError(f"nothing to resume in {out}: it has no {RUN_FILE}; "
                              f"start the run without --resume")
    _check_resumable(json.loads((out / RUN_FILE).read_text()), record)
    # A replacement killed between its renames is put right before the latest is chosen.
    ckpt.remove_stale_temporaries(out / CHECKPOINTS)
    latest = ckpt.latest_checkpoint(out / CHECKPOINTS)
    if latest is None:
        raise CheckpointError(f"nothing to resume in {out}: no checkpoint was completed; "
                              f"start again without --resume (delete {out} first)")
    return latest


def check_fresh(out: Path) -> None:
    """A new run (no `--resume`) must not start over one that `out` already holds."""
    if (out / RUN_FILE).exists() or ckpt.list_checkpoints(out / CHECKPOINTS):
        raise ConfigError(f"{out} already holds a run; continue it with --resume or choose "
                          f"another --out")


def _check_resumable(saved: dict, now: dict) -> None:
    def strip(record: dict) -> dict:
        train = {k: v for k, v in record["train"].items() if k not in RESUMABLE_CHANGES}
        return {**record, "train": train}
    changes = diff(strip(saved), strip(now))
    if changes:
        raise ConfigError("--resume with different settings would not continue the same run; "
                          "the differences (saved -> now) are:\n  " + "\n  ".join(changes)
                          + "\nRestore them, or start a new run in another --out directory")


def start_run_dir(out: Path, record: dict, resumed: bool) -> None:
    """A new run writes `run.json`; a resumed one clears what a killed run left half-written."""
    if resumed:
        return
    write_file(out / RUN_FILE, json.dumps(record, indent=2) + "\n")


# ---------------------------------------------------------------------- records
class MetricsLog:
    """metrics.jsonl (one JSON object per line; floats round-trip exactly) + TensorBoard."""

    def __init__(self, out: Path):
        self.path = out / METRICS_FILE
        self.tb = None
        try:  # optional: only when tensorboard is installed
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            pass
        self.f = open(self.path, "a", encoding="utf-8")

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after `step` (a killed run's, past its last checkpoint)."""
        self.f.close()
        kept = [r for r in read_metrics(self.path.parent) if r.get("step", 0) <= step]
        write_file(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.f = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()
        if self.tb is not None:
            for key, value in _scalars(record):
                self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.f.close()
        if self.tb is not None:
            self.tb.close()


def _scalars(record: dict, prefix: str = ""):
    for key, value in record.items():
        if key == "step":
            continue
        if isinstance(value, dict):
            yield from _scalars(value, f"{prefix}{key}/")
        elif isinstance(value, list):
            for i, v in enumerate(value):
                yield f"{prefix}{key}/{i}", v
        elif isinstance(value, (int, float)) and value is not None:
            yield f"{prefix}{key}", value


def read_metrics(out: str | Path) -> list[dict]:
    """The records of metrics.jsonl; a torn last line (a run killed mid-write) is dropped."""
    path = Path(out) / METRICS_FILE
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise DataError(f"{path}: line {number} is not a JSON record; the log was edited or "
                                "damaged: delete that line to continue") from None
    return records


def export_hf(model, path: Path, tokenizer) -> Path:
    """The final model as a Hugging Face checkpoint directory, tokenizer.json included."""
    from dsmoe.interop.hf import save_hf
    return save_hf(model, path, tokenizer=tokenizer)


# ---------------------------------------------------------------------- terminal
class Progress:
    """What a run shows: a progress bar (`show` None: only on a terminal), or else a plain
    line every `log_interval` steps; nothing at all when `quiet` (ranks other than 0)."""

    def __init__(self, cfg: TrainConfig, start: int, show: bool | None, quiet: bool = False):
        self.cfg, self.quiet = cfg, quiet
        show = not quiet and (sys.stderr.isatty() if show is None else show)
        self.bar = None
        if show:
            from tqdm import tqdm
            self.bar = tqdm(total=cfg.steps, initial=start, unit="step", dynamic_ncols=True)

    def step(self, m: dict) -> None:
        if self.quiet:
            return
        vio = max(m["maxvio"]) if m["maxvio"] else 0.0
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {m['loss']:.3f} mtp {m['mtp_loss']:.3f} lr {m['lr']:.2e} "
                                     f"|g| {m['grad_norm']:.2f} {m['tokens_per_s']:.0f} tok/s "
                                     f"MaxVio {vio:.2f}", refresh=False)
            self.bar.update(1)
        elif m["step"] % self.cfg.log_interval == 0 or m["step"] == self.cfg.steps:
            print(f"step {m['step']}/{self.cfg.steps} loss {m['loss']:.4f} mtp {m['mtp_loss']:.4f} "
                  f"lr {m['lr']:.2e} grad_norm {m['grad_norm']:.3f} {m['tokens_per_s']:.0f} tok/s "
                  f"MaxVio(max over layers) {vio:.3f}", flush=True)

    def validation(self, step: int, losses: dict[str, float]) -> None:
        self.say(f"step {step}: validation loss " + ", ".join(f"{d} {v:.3f}" for d, v in losses.items()))

    def say(self, text: str) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
