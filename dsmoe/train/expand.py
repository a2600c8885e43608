"""`dsmoe expand`: add routed experts to a trained model and train them on a new domain.

    dsmoe expand --model out/demo/run/hf --out out/expand --data new_domain.txt --add 8

Surgery on every MoE layer (the MTP modules' included, since `n_routed_experts` is one
setting for the whole model): the stacked expert weights (w1_EFD, w3_EFD, w2_EDF), the
gate's weight rows and its selection-bias entries grow from E to E + n.

Group rules: group-limited routing splits the experts into `n_expert_groups` contiguous
blocks, so `n` must be a multiple of the group count, and the new experts are inserted at
the end of *each group* (n/G per group), not appended at the end: every old expert keeps
its group and its group-mates, so the old routing structure survives (appending would move
most old experts into other groups). An expansion that breaks a rule (n not a multiple of
G, or a config that fails validation) is refused before anything is built.

New experts start as:
- `copy` (default): a copy of an old expert of the same group, with its gate row and bias,
  plus Gaussian noise of relative size `--noise` on weights and gate row (the noise breaks
  the tie between the copy and its original). Donors are the group's experts the new
  domain's tokens use most (token share, as `esft.py` measures it), so the copies start
  from what the new domain already leans on;
- `fresh`: weights drawn as at initialisation; gate row the mean of the group's old rows
  plus noise, bias the mean of the group's old biases, so a fresh expert is neither
  ignored by the router nor handed every token from the first step.

Training on the new domain then runs with the old experts frozen (default: only the new
experts' weights and gate rows train; the old rows of every stacked tensor, the gate
biases of the old experts and every other weight stay exactly as they were, `freeze.py`)
or, with `--train-old`, everything trains. The aux-loss-free bias keeps balancing during
training, faster than in pretraining by default (`--gamma`), so under-used new experts are
pulled into use within a short run.

Reported (held-out): the new domain's and the old domains' losses before expansion, right
after it (before training) and after training; the share of routing slots the new experts
take on each. With `--compare`, the same training without new experts (everything
trains) is run too, for the forgetting it causes. The expanded model is written as a
checkpoint whose config has the new expert count.
Not here: removing or merging experts, or growing other dimensions.
"""
from __future__ import annotations

import argparse
import copy

import torch

from dsmoe.analysis.routing import main_moe_blocks
from dsmoe.config import ModelArgs
from dsmoe.errors import ConfigError
from dsmoe.model import Transformer
from dsmoe.train.esft import EXPERT_WEIGHTS, expert_affinity
from dsmoe.train.finetune import (add_arguments_common, eval_losses, finetune, format_losses, packed_batches,
                                  save_model_dir)
from dsmoe.train.freeze import RowFreeze, count_trainable, freeze_all_but
from dsmoe.train.task_data import start_task_run

INITS = ("copy", "fresh")


class ExpansionPlan:
    """Where every old expert goes and where the new ones sit, for E -> E + n experts."""

    def __init__(self, args: ModelArgs, n_new: int):
        G, E = args.n_expert_groups, args.n_routed_experts
        if not isinstance(n_new, int) or n_new < 1:
            raise ConfigError(f"--add {n_new!r}: add at least one expert")
        if n_new % G:
            raise ConfigError(f"adding {n_new} experts breaks the group rules: the model routes over "
                              f"n_expert_groups={G} groups of equal size, so add a multiple of {G} "
                              f"(e.g. {G * max(1, round(n_new / G))})")
        try:
            self.new_args = args.replace(n_routed_experts=E + n_new)
        except ConfigError as err:
            raise ConfigError(f"adding {n_new} experts breaks a rule of the config: {err}") from None
        self.old_args, self.n_new = args, n_new
        self.per_group_old, self.per_group_new = E // G, E // G + n_new // G
        p, q = self.per_group_old, self.per_group_new
        self.old_to_new = torch.tensor([(e // p) * q + e % p for e in range(E)])
        self.new_slots = torch.tensor([g * q + p + k for g in range(G) for k in range(n_new // G)])

    def group_of_slot(self, slot: int) -> int:
        return slot // self.per_group_new

    def old_experts_of_group(self, g: int) -> list[int]:
        return list(range(g * self.per_group_old, (g + 1) * self.per_group_old))

    def donors(self, ranking_E: torch.Tensor | None) -> list[int]:
        """The old expert each new slot copies: the group's experts by decreasing
        `ranking_E` (index order without one), cycling when a group adds more than it has."""
        donors = []
        for slot in self.new_slots.tolist():
            g = self.group_of_slot(slot)
            k = slot - g * self.per_group_new - self.per_group_old
            old = self.old_experts_of_group(g)
            if ranking_E is not None:
                old = sorted(old, key=lambda e: -float(ranking_E[e]))
            donors.append(old[k % len(old)])
        return donors


def _grow(old: torch.Tensor, plan: ExpansionPlan, donors: list[int], init: str, noise: float,
          gen: torch.Generator, kind: str, init_std: float) -> torch.Tensor:
    """One per-expert tensor (experts along dim 0) with the new rows inserted."""
    new = old.new_empty((old.shape[0] + plan.n_new, *old.shape[1:]))
    new[plan.old_to_new] = old
    for slot, donor in zip(plan.new_slots.tolist(), donors):
        group = plan.old_experts_of_group(plan.group_of_slot(slot))
        if kind == "bias":
            row = old[donor] if init == "copy" else old[group].mean()
        elif init == "copy":
            source = old[donor]
            row = source + noise * source.float().std() * torch.randn(source.shape, generator=gen).to(source)
        elif kind == "gate":
            source = old[group].mean(0)
            row = source + noise * old[group].float().std() * torch.randn(source.shape, generator=gen).to(source)
        else:  # a fresh expert, drawn as Transformer.init_weights draws them
            row = init_std * torch.randn(old.shape[1:], generator=gen).to(old)
        new[slot] = row
    return new


@torch.no_grad()
def expand_model(model: Transformer, n_new: int, init: str = "copy", noise: float = 0.01,
                 seed: int = 0, ranking_LE: torch.Tensor | None = None) -> tuple[Transformer, ExpansionPlan]:
    """A new model with `n_new` more routed experts in every MoE layer (see the module note).
    `ranking_LE` (main-stack MoE layers x old experts) orders the donors of `copy`."""
    if init not in INITS:
        raise ConfigError(f"--init {init!r}: choose one of {INITS}")
    if not noise >= 0:
        raise ConfigError(f"--noise {noise}: must be a non-negative number")
    plan = ExpansionPlan(model.args, n_new)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    main_ids = {i: layer for layer, (i, _) in enumerate(main_moe_blocks(model))}
    state = {}
    for name, tensor in model.state_dict().items():
        parts = name.split(".")
        if ".ffn.experts." in name or ".ffn.gate." in name:
            layer = main_ids.get(int(parts[1])) if parts[0] == "layers" else None
            ranking = ranking_LE[layer] if ranking_LE is not None and layer is not None else None
            donors = plan.donors(ranking)
            kind = "expert" if ".experts." in name else ("bias" if name.endswith("bias") else "gate")
            tensor = _grow(tensor.cpu(), plan, donors, init, noise, gen, kind, model.args.init_std)
        state[name] = tensor
    new_model = Transformer(plan.new_args).to(device)
    new_model.load_state_dict(state)
    return new_model.train(model.training), plan


def freeze_old(model: Transformer, plan: ExpansionPlan) -> RowFreeze:
    """Only the new experts' weights and gate rows of the main stack train; the old rows,
    the old experts' gate biases and every other tensor keep their values."""
    blocks = main_moe_blocks(model)
    trainable = {f"layers.{i}.ffn.{part}" for i, _ in blocks
                 for part in [f"experts.{w}" for w in EXPERT_WEIGHTS] + ["gate.weight"]}
    freeze_all_but(model, trainable)
    freeze = RowFreeze()
    for _, moe in blocks:
        for tensor in [getattr(moe.experts, w) for w in EXPERT_WEIGHTS] + [moe.gate.weight, moe.gate.bias]:
            freeze.add(tensor, plan.old_to_new)
    return freeze


def new_expert_share(model, batches, plan: ExpansionPlan) -> float:
    """Share of the routing slots the new experts take, averaged over main-stack layers."""
    return float(expert_affinity(model, batches)["token"][:, plan.new_slots].sum(-1).mean())


# ---------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_arguments_common(parser, steps=200, lr=1e-3)
    parser.add_argument("--data", required=True,
                        help="the new domain: text files (.txt/.md/.jsonl/.parquet or a folder), "
                             "a chat JSONL file, or a default-corpus domain name")
    parser.add_argument("--add", type=int, required=True,
                        help="routed experts to add per MoE layer (a multiple of n_expert_groups)")
    parser.add_argument("--init", choices=INITS, default="copy",
                        help="new experts start as noisy copies of old ones (default) or fresh")
    parser.add_argument("--noise", type=float, default=0.01,
                        help="relative noise on copied weights and gate rows (default 0.01)")
    parser.add_argument("--train-old", action="store_true",
                        help="train every weight, old experts included (default: old frozen)")
    parser.add_argument("--gamma", type=float, default=0.01,
                        help="bias update speed of aux-loss-free balancing (default 0.01)")
    parser.add_argument("--eval-domains", default=None,
                        help="comma-separated old domains to check (default: the corpus domains)")
    parser.add_argument("--eval-rows", type=int, default=32, help="held-out rows per domain")
    parser.add_argument("--compare", action="store_true",
                        help="also fine-tune the unexpanded model on the same data and budget")
    parser.add_argument("--corpus-chars", type=int, default=None,
                        help="characters read per default-corpus domain (default: prepare's)")


def run(args: argparse.Namespace) -> int:
    task_run = start_task_run(args, args.data, "new", balance="bias", gamma=args.gamma,
                              # a broken expansion fails before the data is read
                              check_model=lambda model: ExpansionPlan(model.args, args.add))
    model, cfg, evals = task_run.model, task_run.cfg, task_run.evals
    task_sample = packed_batches(task_run.task.train, cfg.seq_len, cfg.batch_size, task_run.pad_id,
                                 args.eval_rows)

    before = eval_losses(model, evals)
    print("before expansion: " + format_losses(before))
    ranking = expert_affinity(model, task_sample)["token"] if args.init == "copy" else None
    compare_model = copy.deepcopy(model) if args.compare else None
    expanded, plan = expand_model(model, args.add, args.init, args.noise, args.seed, ranking)
    del model, task_run.model  # the expanded copy replaces it
    expanded_losses = eval_losses(expanded, evals)
    share_before = {d: new_expert_share(expanded, b, plan) for d, b in evals.items()}
    print(f"expanded to {plan.new_args.n_routed_experts} experts per layer: " + format_losses(expanded_losses))
    freeze = None if args.train_old else freeze_old(expanded, plan)
    trained, total = count_trainable(expanded, freeze)
    print(f"training {trained:,} of {total:,} parameters ({trained / total:.2%})")
    records = finetune(expanded, task_run.stream(), cfg, freeze=freeze)
    after = eval_losses(expanded, evals)
    share_after = {d: new_expert_share(expanded, b, plan) for d, b in evals.items()}
    print("after training: " + format_losses(after))
    report = {"command": "expand", "model": str(args.model), "data": str(args.data),
              "experts": {"before": plan.old_args.n_routed_experts, "after": plan.new_args.n_routed_experts},
              "init": args.init, "noise": args.noise, "old_frozen": not args.train_old,
              "train": cfg.to_dict(), "trainable": trained, "parameters": total,
              "trainable_fraction": trained / total, "new_slots": plan.new_slots.tolist(),
              "losses": {"before": before, "expanded": expanded_losses, "after": after},
              "change": {d: after[d] - before[d] for d in before},
              "new_expert_share": {"expanded": share_before, "after": share_after}}
    if compare_model is not None:
        finetune(compare_model, task_run.stream(), cfg)
        report["without_expansion"] = {"losses": eval_losses(compare_model, evals)}
        report["without_expansion"]["change"] = {d: report["without_expansion"]["losses"][d] - before[d]
                                                 for d in before}
        print("same training without expansion: " + format_losses(report["without_expansion"]["losses"]))
    expanded.requires_grad_(True)
    save_model_dir(expanded, task_run.tokenizer, task_run.out, report, records)
    print(f"wrote {task_run.out}")
    return 0

