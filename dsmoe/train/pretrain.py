"""Pretraining: the loop behind `dsmoe train` (DeepSeek-V3 report §2.1.2, §2.2, §4.2).

    dsmoe train --preset small --data out/data --out out/run --steps 2000 [--resume]
    dsmoe train --config run.json --data out/data --out out/run --steps 2000

One optimizer step = `grad_accum` micro-batches of `batch_size` windows of `seq_len + 1`
tokens from the prepared shards. The objective per micro-batch is
    L = CE(main) + λ/D · Σ_k CE_k(MTP) + balance loss,
where MTP depth k (1..D) predicts t_{i+k+1} at positions i < T-k: the window's last k
positions have no depth-k target, as in DeepSeek-V3 (no extra tokens are fed, so the
main model never runs past `seq_len`). After the optimizer step, `Balancer.step()` moves
every gate's selection bias by the sign rule from the loads of all that step's
micro-batches (`balance.py`).

Notable:
- Exact resume: the batch stream is a pure function of (seed, step), the schedule a pure
  function of the step, and the checkpoint holds model (with the gate biases), optimizer,
  data position and every RNG state; metrics logged after the checkpoint by a killed
  run are dropped on resume. On CPU a resumed run's losses equal, bit for bit, those of
  a run never interrupted (`tests/train/test_resume_exact.py`).
- Nothing is lost on bad input: data, tokenizer and config are checked before the model
  is built; `--resume` with different settings is refused with the difference shown; a
  NaN/Inf loss or gradient stops the run before the optimizer step, naming the step and
  the last good checkpoint; a failed checkpoint write leaves the previous one intact.
- Per step the JSONL log (`metrics.jsonl`) gets loss, MTP loss, balance loss, lr, grad
  norm, tokens/s and MaxVio per MoE layer; every `eval_interval` steps, validation loss
  per domain. TensorBoard gets the same when it is installed.
- Device and dtype come from `dsmoe/device.py`: fp32 on CPU, bf16 autocast over fp32
  master weights on CUDA.
Not here: data preparation (`dsmoe/data/`), distributed training (`dsmoe/parallel/`), SFT/RL.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from dsmoe.atomic import write_file
from dsmoe.config import ModelArgs
from dsmoe.device import autocast, resolve_device
from dsmoe.errors import CheckpointError, ConfigError, DataError, DsmoeError
from dsmoe.model import Transformer
from dsmoe.train import checkpoint as ckpt
from dsmoe.train.balance import Balancer
from dsmoe.train.config import TrainConfig, diff, load_run_config
from dsmoe.train.optim import build_optimizer, lr_at, set_lr

if TYPE_CHECKING:
    from dsmoe.parallel.training import DistTraining

RUN_FILE, METRICS_FILE = "run.json", "metrics.jsonl"
CHECKPOINTS, HF_DIR = "checkpoints", "hf"
# Settings that do not change what is computed: a resumed run may differ in these.
RESUMABLE_CHANGES = ("max_seconds", "log_interval", "device", "threads")


class TrainingDiverged(DsmoeError):
    """The loss or the gradient became NaN or infinite."""


@dataclass
class TrainResult:
    out: Path
    step: int
    metrics: list[dict] = field(default_factory=list)  # this process's step records
    val: dict[str, float] = field(default_factory=dict)  # last validation loss per domain
    checkpoint: Path | None = None
    hf_dir: Path | None = None
    stopped_early: bool = False


# ------------------------------------------------------------------------ losses
def lm_losses(out, tokens_BW: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Main next-token CE and mean MTP CE over depths for inputs tokens[:, :T]."""
    main = F.cross_entropy(out.logits.flatten(0, 1).float(), tokens_BW[:, 1:T + 1].flatten())
    if not out.mtp_logits:
        return main, None
    mtp = [F.cross_entropy(logits.flatten(0, 1).float(), tokens_BW[:, k + 1:T + 1].flatten())
           for k, logits in enumerate(out.mtp_logits, start=1)]
    return main, torch.stack(mtp).mean()


@torch.no_grad()
def evaluate(model: Transformer, shards, domains: list[str], batch_size: int, seq_len: int,
             max_batches: int, device: torch.device) -> dict[str, float]:
    """Mean next-token CE (nats/token) of the main model on each domain's validation split."""
    from dsmoe.data.shards import val_batches
    was_training = model.training
    model.eval()
    losses = {}
    for domain in domains:
        total, count = 0.0, 0
        for batch in val_batches(shards, domain, batch_size, seq_len, max_batches):
            batch = batch.to(device)
            with autocast(device):
                logits = model(batch[:, :seq_len])
            total += float(F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(),
                                           reduction="sum"))
            count += batch[:, 1:].numel()
        losses[domain] = total / count
    model.train(was_training)
    return losses


# ---------------------------------------------------------------------- logging
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


# ------------------------------------------------------------------ preparation
def open_data(data: str | Path, args: ModelArgs, cfg: TrainConfig):
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


def _check_resumable(saved: dict, now: dict) -> None:
    def strip(record: dict) -> dict:
        train = {k: v for k, v in record["train"].items() if k not in RESUMABLE_CHANGES}
        return {**record, "train": train}
    changes = diff(strip(saved), strip(now))
    if changes:
        raise ConfigError("--resume with different settings would not continue the same run; "
                          "the differences (saved -> now) are:\n  " + "\n  ".join(changes)
                          + "\nRestore them, or start a new run in another --out directory")


@contextlib.contextmanager
def _cpu_threads(threads: int, device: torch.device):
    """torch's CPU threads for the run (0: leave as is), restored afterwards."""
    before = torch.get_num_threads()
    if device.type == "cpu" and threads > 0:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def export_hf(model: Transformer, path: Path, tokenizer) -> Path:
    """The final model as a Hugging Face checkpoint directory, tokenizer.json included."""
    from dsmoe.interop.hf import save_hf
    return save_hf(model, path, tokenizer=tokenizer)


# ------------------------------------------------------------------------- train
def train_step(model: Transformer, optimizer, balancer: Balancer, stream, cfg: TrainConfig,
               step: int, device: torch.device, ckpt_root: Path,
               par: DistTraining | None = None) -> dict[str, Any]:
    """One optimizer step (0-based `step`) over `grad_accum` micro-batches: its metrics.
    With `par` (torchrun), this rank computes its rows of the global batch."""
    t0 = time.perf_counter()
    lr = lr_at(step, cfg)
    set_lr(optimizer, lr)
    T, n = cfg.seq_len, cfg.grad_accum
    use_mtp = model.args.n_mtp_layers > 0 and cfg.mtp_lambda > 0
    sums = {"loss": 0.0, "mtp_loss": 0.0, "balance_loss": 0.0}
    for _ in range(n):
        batch = next(stream).to(device)
        if par is not None:
            batch = par.local(batch)
        with autocast(device):
            output = model.run(batch[:, :T], mtp=use_mtp)
            main, mtp = lm_losses(output, batch, T)
            bal = balancer.loss(output.routing + output.mtp_routing, batch.shape[0])
            total = main
            if mtp is not None:
                total = total + cfg.mtp_lambda * mtp
            if bal is not None:
                total = total + bal
        value = float(total.detach())
        if not math.isfinite(value):
            raise _diverged("loss", value, step + 1, ckpt_root)
        (total / n).backward()
        for key, part in (("loss", main), ("mtp_loss", mtp), ("balance_loss", bal)):
            sums[key] += float(part.detach()) / n if part is not None else 0.0
    clip = cfg.clip if cfg.clip > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip) if par is None
                      else par.clip_grad_norm_(model, clip))
    if not math.isfinite(grad_norm):
        raise _diverged("gradient norm", grad_norm, step + 1, ckpt_root)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    maxvio = balancer.step()  # the bias update, from all micro-batches' loads
    if par is not None:
        sums = par.average(sums)
    done = step + 1
    return {"step": done, **sums, "lr": lr, "grad_norm": grad_norm,
            "tokens_per_s": cfg.tokens_per_step / (time.perf_counter() - t0),
            "tokens": done * cfg.tokens_per_step, "maxvio": maxvio}


def train(args: ModelArgs, cfg: TrainConfig, data: str | Path, out: str | Path, *,
          resume: bool = False, progress: bool | None = None, export: bool = True,
          on_step: Callable[[dict], None] | None = None,
          par: DistTraining | None = None) -> TrainResult:
    """Pretrain `args` on the prepared data in `data`, writing everything under `out`.

    progress: a progress bar (None: only on a terminal); without one, a plain line every
    `log_interval` steps. on_step: called with each step's metrics record.
    par: the torchrun session (`dsmoe/parallel/training.py`): the model is sharded over its
    ranks, each computes its rows of the same global batch, rank 0 logs; None: one process.
    """
    cfg.check_model(args)
    shards = open_data(data, args, cfg)
    out = Path(out)
    record = run_record(args, cfg, shards)
    ckpt_root = out / CHECKPOINTS
    latest = _resume_point(out, record) if resume else _fresh_start(out)
    device = resolve_device(cfg.device)
    if par is None and latest is not None and _dist().is_distributed_checkpoint(latest):
        with _dist().DistTraining.single(device) as one:  # saved by several ranks, continued by one
            return train(args, cfg, data, out, resume=resume, progress=progress, export=export,
                         on_step=on_step, par=one)
    if par is not None:
        par.check(record, cfg.batch_size)
    main_rank = par is None or par.is_main
    with _cpu_threads(cfg.threads, device):
        _seed_everything(cfg.seed)
        model = Transformer(args).to(device).train()
        if par is not None:
            model = par.prepare(model)
        optimizer = build_optimizer(model, cfg)
        balancer = Balancer(model.moe_layers(), cfg.balance, cfg.gamma, cfg.alpha, cfg.aux_alpha,
                            reduce=par.reduce_loads if par is not None else None)
        from dsmoe.data.shards import BatchStream
        stream = BatchStream(shards, "train", cfg.batch_size, cfg.seq_len, cfg.seed, cfg.domains)
        out.mkdir(parents=True, exist_ok=True)
        start = 0
        if latest is not None and par is not None:
            extra = par.load(latest, model, optimizer)
            stream.load_state_dict(extra["data"])
            start = int(extra["step"])
        elif latest is not None:
            state, _ = ckpt.load_checkpoint(latest, map_location=device)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            stream.load_state_dict(state["data"])
            ckpt.set_rng_state(state["rng"])
            start = int(state["step"])
        if latest is not None and main_rank:
            ckpt.remove_stale_temporaries(ckpt_root)
        elif main_rank:
            write_file(out / RUN_FILE, json.dumps(record, indent=2) + "\n")
        log = MetricsLog(out) if main_rank else _dist().NullLog()
        if latest is not None:
            log.truncate_after(start)  # what a killed run logged after its last checkpoint

        result = TrainResult(out=out, step=start, checkpoint=latest)
        bar = _progress_bar(cfg.steps, start, progress if main_rank else False)
        began = time.perf_counter()
        try:
            for step in range(start, cfg.steps):
                metrics = train_step(model, optimizer, balancer, stream, cfg, step, device, ckpt_root, par)
                done = result.step = metrics["step"]
                log.write(metrics)
                result.metrics.append(metrics)
                if on_step is not None:
                    on_step(metrics)
                if main_rank:
                    _report(bar, metrics, cfg)
                out_of_time = 0 < cfg.max_seconds <= time.perf_counter() - began
                last = done == cfg.steps or out_of_time
                if (cfg.eval_interval and done % cfg.eval_interval == 0) or last:
                    result.val = evaluate(model, shards, shards.domains, cfg.batch_size,
                                          cfg.seq_len, cfg.eval_batches, device)
                    log.write({"step": done, "val": result.val})
                    if main_rank:
                        _say(bar, f"step {done}: validation loss " + ", ".join(
                            f"{d} {v:.3f}" for d, v in result.val.items()))
                save = (cfg.ckpt_interval and done % cfg.ckpt_interval == 0) or last
                if save and par is not None:  # sharded: every rank writes its own part
                    result.checkpoint = par.save(ckpt_root, done, model, optimizer,
                                                 {"data": stream.state_dict()}, {"run": record},
                                                 cfg.keep_last)
                elif save:
                    result.checkpoint = ckpt.save_checkpoint(
                        ckpt_root, done, _state(model, optimizer, stream, done, cfg),
                        {"run": record}, cfg.keep_last)
                if out_of_time and done < cfg.steps:
                    result.stopped_early = True
                    if main_rank:
                        _say(bar, f"stopping at step {done}: max_seconds={cfg.max_seconds} reached")
                    break
        finally:
            if bar is not None:
                bar.close()
            log.close()
        if export:  # under torchrun, rank 0 exports the last (sharded) checkpoint
            full = model if par is None else par.full_model(result.checkpoint)
            if full is not None:
                result.hf_dir = export_hf(full, out / HF_DIR, shards.tokenizer())
        return result


def _dist():
    """dsmoe.parallel.training, imported only by runs that need it."""
    import dsmoe.parallel.training
    return dsmoe.parallel.training


def _resume_point(out: Path, record: dict) -> Path:
    """The checkpoint `--resume` continues from, after checking the settings are the same."""
    if not (out / RUN_FILE).is_file():
        raise CheckpointError(f"nothing to resume in {out}: it has no {RUN_FILE}; "
                              f"start the run without --resume")
    _check_resumable(json.loads((out / RUN_FILE).read_text()), record)
    latest = ckpt.latest_checkpoint(out / CHECKPOINTS)
    if latest is None:
        raise CheckpointError(f"nothing to resume in {out}: no checkpoint was completed; "
                              f"start again without --resume (delete {out} first)")
    return latest


def _fresh_start(out: Path) -> None:
    if (out / RUN_FILE).exists() or ckpt.list_checkpoints(out / CHECKPOINTS):
        raise ConfigError(f"{out} already holds a run; continue it with --resume or choose "
                          f"another --out")
    return None


def _state(model, optimizer, stream, step: int, cfg: TrainConfig) -> dict[str, Any]:
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "data": stream.state_dict(), "rng": ckpt.rng_state(), "step": step,
            "schedule": {"name": cfg.schedule, "lr": lr_at(step, cfg)}}


def _diverged(what: str, value: float, step: int, ckpt_root: Path) -> TrainingDiverged:
    last = ckpt.latest_checkpoint(ckpt_root)
    kept = (f"the last good checkpoint is {last} (step {ckpt.read_meta(last)['step']}), "
            f"resume from it with --resume after lowering lr or clip in the config"
            if last else "no checkpoint was written before it; lower lr or clip and start again")
    return TrainingDiverged(f"the {what} is {value} at step {step}; training stopped before "
                            f"updating the weights and {kept}")


# ------------------------------------------------------------------ progress
def _progress_bar(total: int, initial: int, progress: bool | None):
    from tqdm import tqdm
    show = sys.stderr.isatty() if progress is None else progress
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True) if show else None


def _report(bar, m: dict, cfg: TrainConfig) -> None:
    vio = max(m["maxvio"]) if m["maxvio"] else 0.0
    if bar is not None:
        bar.set_postfix_str(f"loss {m['loss']:.3f} mtp {m['mtp_loss']:.3f} lr {m['lr']:.2e} "
                            f"|g| {m['grad_norm']:.2f} {m['tokens_per_s']:.0f} tok/s "
                            f"MaxVio {vio:.2f}", refresh=False)
        bar.update(1)
    elif m["step"] % cfg.log_interval == 0 or m["step"] == cfg.steps:
        print(f"step {m['step']}/{cfg.steps} loss {m['loss']:.4f} mtp {m['mtp_loss']:.4f} "
              f"lr {m['lr']:.2e} grad_norm {m['grad_norm']:.3f} {m['tokens_per_s']:.0f} tok/s "
              f"MaxVio(max over layers) {vio:.3f}", flush=True)


def _say(bar, text: str) -> None:
    if bar is not None:
        bar.write(text)
    else:
        print(text, flush=True)


# ---------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", help="model preset (tiny, small, ...)")
    parser.add_argument("--config", help="run config JSON: training settings, and optionally "
                                         "\"model\" (a preset name or ModelArgs fields)")
    parser.add_argument("--data", required=True, help="prepared data directory (dsmoe prepare)")
    parser.add_argument("--out", required=True, help="run directory: checkpoints, metrics, hf/")
    parser.add_argument("--steps", type=int, help="optimizer steps (overrides the config)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its last checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="plain log lines, no bar")
    _dist().add_arguments(parser)  # --ep, --dist-timeout: read only under torchrun


def run(args: argparse.Namespace) -> int:
    model_args, cfg = load_run_config(args.preset, args.config, steps=args.steps)
    par = _dist().DistTraining.from_env(cfg.device, args.ep, args.dist_timeout)  # None: no torchrun
    with par if par is not None else contextlib.nullcontext():
        result = train(model_args, cfg, args.data, args.out, resume=args.resume,
                       progress=False if args.no_progress else None, par=par)
    if par is None or par.is_main:
        print(f"trained {result.step} steps; checkpoint {result.checkpoint}; "
              f"Hugging Face model {result.hf_dir}")
    return 0
