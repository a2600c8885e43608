"""`dsmoe esft`: expert-specialised fine-tuning (Wang et al., "Let the Expert Stick to His
Last: Expert-Specialized Fine-Tuning for Sparse Architectural Large Language Models", 2024).

    dsmoe esft --model out/demo/run/hf --out out/esft --task math --share 0.2

A task tends to use few of a fine-grained MoE's experts. ESFT measures, per MoE layer, how
much the task's tokens use each routed expert, keeps the experts that together account for
a chosen share of that use, and trains only them: attention, shared experts, the router,
embeddings, norms and every other expert stay frozen (`freeze.py`), so the model's other
abilities are left mostly where they were and only a small fraction of the weights moves.

Affinity of expert i in one layer, over the N (non-padding) tokens of the task sample:
- `gate`  (ESFT-Gate): the average routing weight it receives, g_i = 1/N Σ_t w_{i,t}
  (w = 0 when not chosen), normalised to shares over the layer's experts;
- `token` (ESFT-Token): the share of routing slots it takes, r_i = load_i / (N·K).
Both are reported; `--score` picks the one that selects. Per layer, experts are taken in
decreasing affinity until their shares sum to at least `--share` (ESFT's threshold p), so
a layer whose task routing is concentrated trains few experts and a diffuse one more.

The command reports, on held-out data: the task loss and the other domains' losses of the
starting model, of the ESFT model and (unless `--no-compare`) of full fine-tuning with the
same data, steps and learning rate; and the fraction of parameters each trains. The ESFT
model is written to `--out`. Only the main stack's MoE layers are selected from: MTP
modules are not trained in fine-tuning (see packing.py).
Not here: the paper's per-layer learning-rate variants or mixing general data into the
task data.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from dsmoe.analysis.routing import main_moe_blocks
from dsmoe.device import autocast
from dsmoe.errors import ConfigError, DataError, DsmoeError
from dsmoe.train.finetune import (add_arguments_common, eval_losses, finetune, format_losses, packed_batches,
                                  save_model_dir)
from dsmoe.train.freeze import RowFreeze, count_trainable, freeze_all_but
from dsmoe.train.packing import PAD_SEGMENT, PackedBatch
from dsmoe.train.task_data import start_task_run

SCORES = ("gate", "token")
EXPERT_WEIGHTS = ("w1_EFD", "w3_EFD", "w2_EDF")


@torch.no_grad()
def expert_affinity(model, batches: list[PackedBatch]) -> dict[str, torch.Tensor]:
    """Per main-stack MoE layer and expert: `gate` and `token` shares and the mean unbiased
    affinity `score`, over the non-padding tokens of `batches`. Each is (L, E)."""
    device = next(model.parameters()).device
    L, E = len(main_moe_blocks(model)), model.args.n_routed_experts
    gate = torch.zeros(L, E, dtype=torch.float64)
    load = torch.zeros(L, E, dtype=torch.float64)
    score = torch.zeros(L, E, dtype=torch.float64)
    n_tokens = 0
    was_training = model.training
    model.eval()
    for batch in batches:
        batch = batch.to(device)
        with autocast(device):
            routing = model.run(batch.inputs_BT, batch.layout(), attn_impl="naive").routing
        real_T = (batch.segments_BT != PAD_SEGMENT).flatten()
        n_tokens += int(real_T.sum())
        for layer, info in enumerate(routing):
            ids = info.ids_TK[real_T]
            weights = info.weights_TK[real_T].double()
            gate[layer].index_add_(0, ids.flatten().cpu(), weights.flatten().cpu())
            load[layer] += torch.bincount(ids.flatten(), minlength=E).double().cpu()
            score[layer] += info.scores_TE[real_T].double().sum(0).cpu()
    model.train(was_training)
    if n_tokens == 0:
        raise DataError("the task sample has no tokens to measure expert affinity on")
    return {"gate": gate / gate.sum(-1, keepdim=True), "token": load / load.sum(-1, keepdim=True),
            "score": score / n_tokens, "tokens": torch.tensor(n_tokens)}


def select_experts(shares_LE: torch.Tensor, share: float) -> list[list[int]]:
    """Per layer, the fewest experts (by decreasing share) whose shares sum to >= `share`."""
    if not 0 < share <= 1:
        raise ConfigError(f"--share {share} selects no expert: give a share of the task's "
                          "routing in (0, 1], e.g. 0.2")
    selection = []
    for row in shares_LE:
        values, order = row.sort(descending=True, stable=True)  # ties: lower index first
        cumulative = values.cumsum(0)
        n = int((cumulative < share - 1e-12).sum()) + 1
        selection.append(sorted(order[:min(n, len(order))].tolist()))
    if not any(selection):
        raise DsmoeError("the selection holds no expert in any layer; raise --share")
    return selection


def esft_freeze(model, selection: list[list[int]]) -> RowFreeze:
    """Freeze everything but the selected experts' rows of each main-stack MoE layer."""
    blocks = main_moe_blocks(model)
    if len(selection) != len(blocks):
        raise ValueError(f"a selection for {len(selection)} layers, the model has {len(blocks)}")
    if not any(selection):
        raise DsmoeError("the ESFT selection is empty: no expert would be trained; raise --share")
    trainable = {f"layers.{i}.ffn.experts.{w}" for (i, _), chosen in zip(blocks, selection)
                 if chosen for w in EXPERT_WEIGHTS}
    freeze_all_but(model, trainable)
    freeze = RowFreeze()
    for (i, moe), chosen in zip(blocks, selection):
        if not chosen:
            continue
        frozen = torch.ones(moe.experts.n_experts, dtype=torch.bool)
        frozen[chosen] = False
        for w in EXPERT_WEIGHTS:
            freeze.add(getattr(moe.experts, w), frozen)
    return freeze


# ---------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_arguments_common(parser, steps=200, lr=1e-3)
    parser.add_argument("--task", required=True,
                        help="the task data: a default-corpus domain (en, fr, es, code, math), "
                             "'demo'/'demo-math' chats, a chat JSONL file or text files")
    parser.add_argument("--share", type=float, default=0.2,
                        help="per layer, train the experts covering this share of the task's "
                             "routing (default 0.2)")
    parser.add_argument("--score", choices=SCORES, default="gate",
                        help="affinity that selects: average gate weight or token share")
    parser.add_argument("--affinity-rows", type=int, default=32,
                        help="packed rows of task data to measure affinity on (default 32)")
    parser.add_argument("--eval-domains", default=None,
                        help="comma-separated domains for the other-domain losses "
                             "(default: the corpus domains except the task)")
    parser.add_argument("--eval-rows", type=int, default=32,
                        help="held-out packed rows per domain (default 32)")
    parser.add_argument("--no-compare", action="store_true",
                        help="skip the full fine-tuning run with the same budget")
    parser.add_argument("--corpus-chars", type=int, default=None,
                        help="characters read per default-corpus domain (default: prepare's)")


def run(args: argparse.Namespace) -> int:
    if not 0 < args.share <= 1:
        raise ConfigError(f"--share {args.share} selects no expert: give a share in (0, 1]")
    task_run = start_task_run(args, args.task, "task", balance="none")  # the router is frozen
    model, cfg, evals = task_run.model, task_run.cfg, task_run.evals
    affinity_sample = packed_batches(task_run.task.train, cfg.seq_len, cfg.batch_size, task_run.pad_id,
                                     args.affinity_rows)

    base = eval_losses(model, evals)
    print("start: " + format_losses(base))
    affinity = expert_affinity(model, affinity_sample)
    selection = select_experts(affinity[args.score], args.share)
    full_model = None if args.no_compare else copy.deepcopy(model)

    freeze = esft_freeze(model, selection)
    trained, total = count_trainable(model, freeze)
    print(f"esft: {sum(map(len, selection))} experts selected over {len(selection)} layers "
          f"({', '.join(str(len(s)) for s in selection)}); {trained:,} of {total:,} parameters "
          f"({trained / total:.2%}) train")
    t0 = time.perf_counter()
    records = finetune(model, task_run.stream(), cfg, freeze=freeze)
    results = {"esft": {"losses": eval_losses(model, evals), "trainable": trained,
                        "trainable_fraction": trained / total, "seconds": time.perf_counter() - t0}}
    print("esft: " + format_losses(results["esft"]["losses"]))
    if full_model is not None:
        t0 = time.perf_counter()
        finetune(full_model, task_run.stream(), cfg)
        full_trained, _ = count_trainable(full_model)
        results["full"] = {"losses": eval_losses(full_model, evals), "trainable": full_trained,
                           "trainable_fraction": full_trained / total,
                           "seconds": time.perf_counter() - t0}
        print("full fine-tuning: " + format_losses(results["full"]["losses"]))
        del full_model
    report = {"command": "esft", "model": str(args.model), "task": args.task,
              "score": args.score, "share": args.share, "train": cfg.to_dict(),
              "selection": selection,
              "affinity": {k: v.tolist() for k, v in affinity.items()},
              "start": {"losses": base}, **results, "parameters": total,
              "gain": {name: {d: base[d] - r["losses"][d] for d in base} for name, r in results.items()}}
    save_model_dir(model, task_run.tokenizer, task_run.out, report, records)
    print(f"wrote {task_run.out}")
    return 0

