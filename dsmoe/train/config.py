"""TrainConfig: the settings of a pretraining run, with defaults, validation and JSON.

One flat dataclass, like `ModelArgs`, so `dsmoe train` keeps a short command line
(`--preset/--config`, `--data`, `--out`, `--steps`, `--resume`) and everything else lives
in a config file. A run config file is one JSON object: the `TrainConfig` fields, plus an
optional `"model"` key holding a preset name or a dict of `ModelArgs` fields:

    {"model": "tiny", "batch_size": 8, "seq_len": 128, "lr": 0.003, "balance": "bias"}

Defaults follow the DeepSeek-V3 report where it gives a value (MTP weight λ = 0.3,
bias speed γ = 0.001, sequence-wise balance weight α = 0.0001, AdamW β = (0.9, 0.95),
weight decay 0.1, gradient clipping at 1.0); sizes are laptop-scale.
`diff()` is what `--resume` shows when a run is restarted with different settings.
Not here: model sizes (`ModelArgs`), data preparation settings (`dsmoe prepare`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsmoe.config import ModelArgs, from_fields, load_args, read_json_object
from dsmoe.errors import ConfigError
from dsmoe.train.curriculum import check_curriculum

BALANCE_MODES = ("bias", "aux", "none")
SCHEDULES = ("cosine", "wsd", "constant")


@dataclass
class TrainConfig:
    # length and batch (tokens per optimizer step = batch_size * seq_len * grad_accum)
    steps: int = 1000
    batch_size: int = 8  # sequences per micro-batch
    seq_len: int = 256
    grad_accum: int = 1  # micro-batches per optimizer step
    # optimizer and schedule
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # the schedule ends at lr * min_lr_ratio
    warmup_steps: int = 50
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant
    decay_fraction: float = 0.2  # wsd: the share of steps spent decaying
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip: float = 1.0  # max global grad norm; 0 disables clipping
    # objectives
    mtp_lambda: float = 0.3  # weight of the multi-token-prediction loss
    # The share of each micro-batch's rows (its first ones, at least one) the MTP modules
    # train on. 1 (DeepSeek-V3): every row. Less buys a cheaper step where the MTP module and
    # its pass through the output head cost a large part of it (a small model, a large
    # vocabulary); the main model still trains on every row.
    mtp_fraction: float = 1.0
    balance: str = "bias"  # bias (aux-loss-free) | aux (classic auxiliary loss) | none
    gamma: float = 0.001  # bias update speed (balance=bias)
    alpha: float = 0.0001  # sequence-wise balance loss weight (balance=bias; 0 disables)
    aux_alpha: float = 0.01  # classic auxiliary loss weight (balance=aux)
    # data
    domains: list[str] | None = None  # training domains; None: all, by token share
    # [{"until": step, "domains": [...]}, ...]: earlier steps draw only from those domains
    # (curriculum.py); None: every step draws from `domains`
    curriculum: list[dict] | None = None
    seed: int = 0
    # evaluation, logging, checkpoints (intervals in optimizer steps; 0 disables)
    eval_interval: int = 100
    eval_batches: int = 4  # validation batches per domain
    ckpt_interval: int = 100
    keep_last: int = 3
    log_interval: int = 10  # plain log lines when no progress bar is shown
    # machine
    device: str = "auto"
    threads: int = 0  # torch CPU threads; 0: torch's default (one per physical core)
    max_seconds: float = 0.0  # stop early (with a checkpoint) after this much training; 0: never

    def __post_init__(self) -> None:
        self.validate()

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum

    def validate(self) -> None:
        def fail(field: str, rule: str) -> None:
            raise ConfigError(f"TrainConfig.{field}={getattr(self, field)!r}: {rule}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "keep_last",
                     "log_interval"):
            if not is_int(getattr(self, name)) or getattr(self, name) <= 0:
                fail(name, "must be a positive integer")
        for name in ("warmup_steps", "eval_interval", "ckpt_interval", "threads", "seed"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 0:
                fail(name, "must be a non-negative integer")
        if not is_num(self.lr) or self.lr <= 0:
            fail("lr", "must be a positive number")
        for name in ("weight_decay", "clip", "mtp_lambda", "gamma", "alpha", "aux_alpha",
                     "max_seconds", "eps"):
            if not is_num(getattr(self, name)) or getattr(self, name) < 0:
                fail(name, "must be a non-negative number")
        for name in ("min_lr_ratio", "decay_fraction"):
            if not is_num(getattr(self, name)) or not 0 <= getattr(self, name) <= 1:
                fail(name, "must be between 0 and 1")
        if not is_num(self.mtp_fraction) or not 0 < self.mtp_fraction <= 1:
            fail("mtp_fraction", "must be in (0, 1] (the share of rows the MTP modules train on)")
        for name in ("beta1", "beta2"):
            if not is_num(getattr(self, name)) or not 0 <= getattr(self, name) < 1:
                fail(name, "must be in [0, 1)")
        if self.schedule not in SCHEDULES:
            fail("schedule", f"must be one of {SCHEDULES}")
        if self.balance not in BALANCE_MODES:
            fail("balance", f"must be one of {BALANCE_MODES}")
        if self.domains is not None and (not isinstance(self.domains, list) or not self.domains
                                         or not all(isinstance(d, str) for d in self.domains)):
            fail("domains", "must be null (all domains) or a non-empty list of domain names")
        check_curriculum(self.curriculum, self.steps)

    def check_model(self, args: ModelArgs) -> None:
        if self.seq_len > args.max_seq_len:
            raise ConfigError(f"TrainConfig.seq_len={self.seq_len} exceeds the model's "
                              f"max_seq_len={args.max_seq_len}; lower seq_len")

    # ------------------------------------------------------------------ JSON
    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "train config") -> "TrainConfig":
        return from_fields(cls, values, source, "training setting")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def load_run_config(preset: str | None = None, config: str | Path | None = None,
                    **overrides: Any) -> tuple[ModelArgs, TrainConfig]:
    """The model and training settings of `dsmoe train --preset NAME | --config PATH`.

    The config file may name the model itself (`"model"`: preset name or ModelArgs dict);
    `--preset` with a config file that names no model gives the model from the preset and
    the training settings from the file. `overrides` (e.g. steps from `--steps`) win.
    """
    values: dict[str, Any] = {}
    model: Any = None
    if config is not None:
        values = read_json_object(config, "training settings")
        model = values.pop("model", None)
        if model is not None and preset is not None:
            raise ConfigError(f"config file {config} names a model and --preset {preset} names "
                              f"another; give only one")
    if model is None and preset is None:
        raise ConfigError("name the model: --preset NAME, or a config file with a \"model\" key "
                          "(a preset name or a dict of ModelArgs fields)")
    if preset is not None:
        args = load_args(preset=preset)
    elif isinstance(model, str):
        args = load_args(preset=model)
    elif isinstance(model, dict):
        args = ModelArgs.from_dict(model, source=f"{config}: model")
    else:
        raise ConfigError(f"{config}: \"model\" must be a preset name or a dict of ModelArgs fields")
    values.update({k: v for k, v in overrides.items() if v is not None})
    # the default window, shortened for models with a shorter context (the tiny preset)
    values.setdefault("seq_len", min(TrainConfig.seq_len, args.max_seq_len))
    cfg = TrainConfig.from_dict(values, source=str(config or "train config"))
    cfg.check_model(args)
    return args, cfg


def diff(saved: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    """Lines `key: saved -> now` for every setting that differs (nested dicts flattened)."""
    lines = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            lines += diff(a, b, f"{prefix}{key}.")
        elif a != b:
            lines.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return lines
