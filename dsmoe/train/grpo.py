"""`dsmoe grpo`: Group Relative Policy Optimisation with verifiable rewards
(DeepSeekMath §4.1, used for DeepSeek-V3's RL stage, V3 report §5.2.2).

    dsmoe grpo --model out/sft --out out/grpo --iterations 40

Each iteration: draw P math problems (mathgen's train split), sample G completions for each
with the inference engine (`dsmoe/infer/engine.py`: batched, temperature, stop at the end
of the assistant turn or max tokens), score every completion (the exact-answer verifier,
or a user function, `rewards.py`), and turn scores into advantages *relative to the group*:
A_i = (r_i − mean(r)) / (std(r) + ε), the same for every token of completion i. There is no
value model: the group is the baseline. The policy then takes `updates` optimizer steps
on the clipped surrogate with a KL penalty to the frozen starting model:

    J = 1/G Σ_i 1/|o_i| Σ_t [ min(ρ_t A_i, clip(ρ_t, 1−ε, 1+ε) A_i) − β·KL_t ],
    ρ_t = π(o_t | q, o_<t) / π_old(o_t | q, o_<t),
    KL_t = π_ref/π − log(π_ref/π) − 1   (the k3 estimator: unbiased, always ≥ 0).

With one update per batch (the default) π_old is the policy itself, so ρ = 1 in value but
not in gradient, and the clip never binds; with more, later updates are clipped. Groups
whose completions all score the same carry no signal (A = 0) and are counted in the log.
Std is the unbiased sample std over the group, as TRL and DeepSeekMath's code compute it.

Rollouts and the held-out accuracy are `math_eval.py`'s.
Logged per iteration: mean reward, verifier accuracy, KL to the reference, mean response
length, clipped share, groups without signal. Before and after training, accuracy on
held-out problems (mathgen's test split) is measured greedily and as the policy samples
(several draws per problem at the rollout temperature, with the same seeds before and
after) and written to the report.
Not here: a value model (PPO), process rewards, or asynchronous rollouts; rollouts and
updates alternate on one device.
"""
from __future__ import annotations

import argparse
import copy
import functools
import math
import random
import time
from dataclasses import asdict, dataclass

import torch

from dsmoe.data import mathgen
from dsmoe.data.tokenizer import end_of_turn_ids
from dsmoe.device import add_device_arguments, autocast
from dsmoe.errors import ConfigError, DataError
from dsmoe.train.config import TrainConfig
from dsmoe.train.finetune import check_out, load_model, prepare_run, save_model_dir
from dsmoe.train.math_eval import (describe_accuracy, generate_completions, held_out_accuracy,
                                   held_out_problems, make_engine, paired_change, prompt_ids)
from dsmoe.train.optim import TrainingDiverged, build_optimizer, check_finite, finish_step, lr_at, set_lr
from dsmoe.train.rewards import RewardFn, math_reward


# ------------------------------------------------------------------ pure functions
def group_advantages(rewards_PG: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """(r − group mean) / (group std + eps) for P groups of G rewards (unbiased std)."""
    if rewards_PG.shape[-1] < 2:
        raise ValueError("a group needs at least 2 completions to have a baseline")
    mean = rewards_PG.mean(-1, keepdim=True)
    std = rewards_PG.std(-1, keepdim=True)
    return (rewards_PG - mean) / (std + eps)


def token_logprobs(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """log π(target_t) at each position, without materialising the full log-softmax."""
    logits = logits_BTV.float()
    return logits.gather(-1, targets_BT.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def kl_k3(logp_BT: torch.Tensor, ref_logp_BT: torch.Tensor) -> torch.Tensor:
    """Per-token KL(π ‖ π_ref) estimate r − log r − 1 with r = π_ref/π (Schulman's k3)."""
    log_ratio = ref_logp_BT - logp_BT
    return log_ratio.exp() - log_ratio - 1


def clipped_surrogate(logp_BT: torch.Tensor, old_logp_BT: torch.Tensor, adv_B: torch.Tensor,
                      clip_eps: float) -> torch.Tensor:
    """min(ρ A, clip(ρ, 1−ε, 1+ε) A) per token, ρ = exp(logp − old_logp)."""
    ratio = (logp_BT - old_logp_BT).exp()
    adv = adv_B.unsqueeze(-1)
    return torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)


def grpo_loss(logp_BT, old_logp_BT, ref_logp_BT, adv_B, mask_BT, clip_eps: float, beta: float,
              n_sequences: int | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """−J over B completions: each completion's per-token terms averaged over its own
    tokens, then summed and divided by `n_sequences` (the whole rollout batch when the
    batch is split into micro-batches; B by default)."""
    mask = mask_BT.to(logp_BT.dtype)
    length_B = mask.sum(-1).clamp(min=1)
    objective = clipped_surrogate(logp_BT, old_logp_BT, adv_B, clip_eps)
    kl = kl_k3(logp_BT, ref_logp_BT) if ref_logp_BT is not None else torch.zeros_like(logp_BT)
    if beta:
        objective = objective - beta * kl
    per_seq_B = (objective * mask).sum(-1) / length_B
    loss = -per_seq_B.sum() / (n_sequences or logp_BT.shape[0])
    with torch.no_grad():
        ratio = (logp_BT - old_logp_BT).exp()
        clipped = ((ratio - 1).abs() > clip_eps).to(mask.dtype)
        n = mask.sum().clamp(min=1)
        stats = {"kl": float((kl * mask).sum() / n), "clipped": float((clipped * mask).sum() / n)}
    return loss, stats


# ---------------------------------------------------------------------- settings
@dataclass
class GRPOConfig:
    iterations: int = 40  # rollout batches
    prompts: int = 8  # P: problems per iteration
    group_size: int = 8  # G: completions per problem
    updates: int = 1  # optimizer steps per rollout batch (μ)
    micro_batch: int = 16  # completions per forward/backward
    max_new_tokens: int = 128
    temperature: float = 1.0
    clip_eps: float = 0.2
    beta: float = 0.04  # KL weight
    lr: float = 1e-5
    weight_decay: float = 0.0
    clip: float = 1.0  # max gradient norm
    difficulty: int | None = 1  # mathgen difficulty (None: mixed 1-4)
    kinds: tuple[str, ...] | None = None  # mathgen problem kinds (None: all)
    eval_problems: int = 100  # held-out problems, before and after
    eval_samples: int = 4  # sampled completions per held-out problem (0: greedy only)
    seed: int = 0

    def validate(self) -> "GRPOConfig":
        def fail(name: str, rule: str) -> None:
            raise ConfigError(f"GRPO {name}={getattr(self, name)!r}: {rule}")

        for name in ("iterations", "prompts", "updates", "micro_batch", "max_new_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                fail(name, "must be a positive integer")
        if not isinstance(self.group_size, int) or self.group_size < 2:
            fail("group_size", "must be at least 2: the group's mean is the baseline")
        if not 0 < self.temperature <= 10:
            fail("temperature", "must be in (0, 10]: sampling, not greedy, gives a group variety")
        if not 0 < self.clip_eps < 1:
            fail("clip_eps", "must be in (0, 1)")
        if not (self.beta >= 0 and math.isfinite(self.beta)):
            fail("beta", "must be a non-negative number")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            fail("lr", "must be a positive number")
        if self.difficulty is not None and self.difficulty not in mathgen.DIFFICULTIES:
            fail("difficulty", f"must be one of {mathgen.DIFFICULTIES}")
        if self.kinds is not None and (not self.kinds or set(self.kinds) - set(mathgen.KINDS)):
            fail("kinds", f"must name problem kinds among {mathgen.KINDS}")
        if self.eval_problems < 0:
            fail("eval_problems", "must be non-negative")
        if self.eval_samples < 0:
            fail("eval_samples", "must be non-negative")
        return self

    def train_config(self, device: str = "auto", threads: int = 0) -> TrainConfig:
        """The optimizer/schedule settings in the pretraining loop's terms."""
        steps = self.iterations * self.updates
        return TrainConfig(steps=steps, lr=self.lr, weight_decay=self.weight_decay, clip=self.clip,
                           warmup_steps=min(5, steps), schedule="constant", seed=self.seed,
                           device=device, threads=threads, balance="none")


# --------------------------------------------------------------------- the update
def completion_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int):
    """Prompt+completion rows right-padded, and the mask of completion targets (B, T-1)."""
    rows = [p + c for p, c in zip(prompts, completions)]
    T = max(map(len, rows))
    tokens = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T - 1), dtype=torch.bool)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        tokens[b, :len(p) + len(c)] = torch.tensor(p + c)
        mask[b, len(p) - 1:len(p) + len(c) - 1] = True  # position t predicts token t+1
    return tokens, mask


def sequence_logprobs(model, tokens_BT: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log π(t_{i+1} | t_≤i) at every position, π being the distribution rollouts sample
    from: the model's softmax at `temperature`."""
    with autocast(tokens_BT.device):
        logits = model(tokens_BT[:, :-1])
    return token_logprobs(logits.float() / temperature, tokens_BT[:, 1:])


def policy_update(model, ref_model, optimizer, tokens_BT, mask_BT, adv_B, cfg: GRPOConfig,
                  old_logp_BT: torch.Tensor | None) -> dict[str, float]:
    """One optimizer step over the rollout batch, in micro-batches (gradients accumulate)."""
    B = tokens_BT.shape[0]
    stats = {"loss": 0.0, "kl": 0.0, "clipped": 0.0}
    for i in range(0, B, cfg.micro_batch):
        sl = slice(i, i + cfg.micro_batch)
        last = int(mask_BT[sl].any(0).nonzero().max())  # the last position with a target
        tokens, mask = tokens_BT[sl, :last + 2], mask_BT[sl, :last + 1]  # trailing padding cut
        logp = sequence_logprobs(model, tokens, cfg.temperature)
        ref = None
        if cfg.beta:
            with torch.no_grad():
                ref = sequence_logprobs(ref_model, tokens, cfg.temperature)
        old = logp.detach() if old_logp_BT is None else old_logp_BT[sl][:, :logp.shape[1]]
        loss, s = grpo_loss(logp, old, ref, adv_B[sl], mask, cfg.clip_eps, cfg.beta, n_sequences=B)
        check_finite("loss", float(loss.detach()), _diverged)
        loss.backward()
        share = tokens.shape[0] / B
        stats["loss"] += float(loss.detach())
        stats["kl"] += s["kl"] * share
        stats["clipped"] += s["clipped"] * share
    params = [p for p in model.parameters() if p.requires_grad]
    stats["grad_norm"] = finish_step(optimizer, params, cfg.clip, _diverged)
    return stats


@torch.no_grad()
def _sampler_logprobs(model, tokens_BT: torch.Tensor, cfg: GRPOConfig) -> torch.Tensor:
    """log π_old over the rollout batch: the policy that sampled it, fixed while the batch's
    `updates` steps move the policy (micro-batch by micro-batch, as the update runs)."""
    return torch.cat([sequence_logprobs(model, tokens_BT[i:i + cfg.micro_batch], cfg.temperature)
                      for i in range(0, tokens_BT.shape[0], cfg.micro_batch)])


def _diverged(what: str, value: float) -> TrainingDiverged:
    return TrainingDiverged(f"the GRPO {what} is {value}; nothing was written: lower --lr or raise "
                            "--beta and run again")


# ---------------------------------------------------------------------- rollouts
@dataclass
class Rollout:
    """One iteration's `group_size` completions of each of its problems, scored."""
    tokens_BT: torch.Tensor  # prompt + completion rows, right-padded
    mask_BT: torch.Tensor  # completion targets (B, T-1)
    adv_B: torch.Tensor  # advantage of each completion, relative to its group
    rewards_PG: torch.Tensor
    correct: list[float]  # the verifier's score of each completion
    lengths: list[int]  # completion tokens


def rollout(model, engine, tokenizer, problems: list[mathgen.MathProblem], cfg: GRPOConfig,
            reward: RewardFn, rng: random.Random) -> Rollout:
    """Sample `group_size` completions of each problem (seeds drawn from `rng`), score them
    with `reward` and the verifier, and turn rewards into group-relative advantages."""
    device, max_len = next(model.parameters()).device, model.args.max_seq_len
    prompts = [prompt_ids(tokenizer, p) for p in problems]
    too_long = max(map(len, prompts)) + cfg.max_new_tokens - max_len
    if too_long > 0:
        raise DataError(f"a prompt plus max_new_tokens={cfg.max_new_tokens} exceeds the model's "
                        f"context of {max_len}; lower --max-new-tokens by {too_long}")
    expanded = [p for p in prompts for _ in range(cfg.group_size)]
    seeds = [rng.getrandbits(62) for _ in expanded]
    model.eval()
    reqs = generate_completions(engine, expanded, cfg.max_new_tokens, cfg.temperature, seeds,
                                end_of_turn_ids(tokenizer))
    rewards, correct = [], []
    for k, req in enumerate(reqs):
        problem = problems[k // cfg.group_size]
        info = {"answer": problem.answer, "question": problem.question, "kind": problem.kind,
                "difficulty": problem.difficulty}
        rewards.append(reward(mathgen.as_prompt(problem), req.text, **info))
        correct.append(math_reward(req.text, problem.answer))
    rewards_PG = torch.tensor(rewards).view(len(problems), cfg.group_size)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    tokens, mask = completion_batch(expanded, [r.output_ids for r in reqs], pad_id)
    return Rollout(tokens.to(device), mask.to(device), group_advantages(rewards_PG).flatten().to(device),
                   rewards_PG, correct, [len(r.output_ids) for r in reqs])


# -------------------------------------------------------------------------- loop
def grpo(model, tokenizer, cfg: GRPOConfig, reward: RewardFn, device_cfg: TrainConfig,
         log=print) -> tuple[list[dict], dict]:
    """Train `model` in place; returns (per-iteration records, held-out before/after)."""
    cfg.validate()
    stream = mathgen.problems("train", seed=cfg.seed, difficulty=cfg.difficulty, kinds=cfg.kinds)
    held_out = held_out_problems(cfg.eval_problems, cfg.seed, cfg.difficulty, cfg.kinds)
    engine = make_engine(model, tokenizer, max(cfg.prompts * cfg.group_size, 32), model.args.max_seq_len)
    measure = functools.partial(held_out_accuracy, model, tokenizer, held_out, engine, cfg.max_new_tokens,
                                cfg.temperature, cfg.eval_samples, cfg.seed)
    before = measure() if held_out else {}
    if held_out:
        log(f"held-out accuracy before, {len(held_out)} problems: {describe_accuracy(before)}")
    ref_model = copy.deepcopy(model).eval().requires_grad_(False) if cfg.beta else None
    optimizer = build_optimizer(model, device_cfg)
    rng = random.Random(f"dsmoe.grpo/{cfg.seed}")
    records = []
    for it in range(cfg.iterations):
        t0 = time.perf_counter()
        batch = rollout(model, engine, tokenizer, [next(stream) for _ in range(cfg.prompts)], cfg, reward, rng)
        model.train()
        old = _sampler_logprobs(model, batch.tokens_BT, cfg) if cfg.updates > 1 else None
        for update in range(cfg.updates):
            set_lr(optimizer, lr_at(it * cfg.updates + update, device_cfg))
            stats = policy_update(model, ref_model, optimizer, batch.tokens_BT, batch.mask_BT, batch.adv_B,
                                  cfg, old)
        records.append(_iteration_record(it + 1, batch, stats, time.perf_counter() - t0))
        log(_describe_iteration(records[-1], cfg))
    model.eval()
    after = measure() if held_out else {}
    change = {how: paired_change(before[how], after[how]) for how in before}
    if held_out:
        log(f"held-out accuracy after: {describe_accuracy(after)}")
        for how, c in change.items():
            log(f"{how}: {c['change']:+.3f} ± {c['stderr']:.3f} over {c['draws']} paired draws "
                f"({c['improved']} turned right, {c['worsened']} wrong; sign test p = {c['p_value']:.3g})")
    return records, {"before": before, "after": after, "change": change}


def _iteration_record(iteration: int, batch: Rollout, stats: dict[str, float], seconds: float) -> dict:
    return {"iteration": iteration, "reward": float(batch.rewards_PG.mean()),
            "accuracy": sum(batch.correct) / len(batch.correct), "kl": stats["kl"],
            "response_length": sum(batch.lengths) / len(batch.lengths),
            "clipped": stats["clipped"], "loss": stats["loss"], "grad_norm": stats["grad_norm"],
            "groups_without_signal": int((batch.rewards_PG.std(-1) == 0).sum()), "seconds": seconds}


def _describe_iteration(r: dict, cfg: GRPOConfig) -> str:
    return (f"iteration {r['iteration']}/{cfg.iterations} reward {r['reward']:.3f} accuracy "
            f"{r['accuracy']:.3f} kl {r['kl']:.4f} length {r['response_length']:.1f} "
            f"no-signal groups {r['groups_without_signal']}/{cfg.prompts} ({r['seconds']:.1f}s)")


# -------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = GRPOConfig()
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="the policy to start from (a checkpoint directory; usually after SFT)")
    parser.add_argument("--out", required=True, metavar="DIR", help="where to write the trained model")
    parser.add_argument("--iterations", type=int, default=defaults.iterations,
                        help=f"rollout batches (default {defaults.iterations})")
    parser.add_argument("--prompts", type=int, default=defaults.prompts,
                        help=f"problems per iteration (default {defaults.prompts})")
    parser.add_argument("--group-size", type=int, default=defaults.group_size,
                        help=f"completions per problem (default {defaults.group_size})")
    parser.add_argument("--updates", type=int, default=defaults.updates,
                        help=f"optimizer steps per rollout batch (default {defaults.updates})")
    parser.add_argument("--micro-batch", type=int, default=defaults.micro_batch)
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument("--clip-eps", type=float, default=defaults.clip_eps)
    parser.add_argument("--beta", type=float, default=defaults.beta, help=f"KL weight (default {defaults.beta})")
    parser.add_argument("--lr", type=float, default=defaults.lr, help=f"learning rate (default {defaults.lr})")
    parser.add_argument("--difficulty", type=int, default=defaults.difficulty,
                        help="mathgen difficulty 1-5 (default 1); 0 mixes 1-4")
    parser.add_argument("--kinds", default=None,
                        help=f"comma-separated problem kinds (default: all of {', '.join(mathgen.KINDS)})")
    parser.add_argument("--eval-problems", type=int, default=defaults.eval_problems,
                        help=f"held-out problems for accuracy before/after (default {defaults.eval_problems})")
    parser.add_argument("--eval-samples", type=int, default=defaults.eval_samples,
                        help="sampled completions per held-out problem at --temperature, besides "
                             f"greedy (default {defaults.eval_samples}; 0: greedy only)")
    parser.add_argument("--reward-fn", metavar="FILE.py:NAME",
                        help="a Python reward function instead of the exact-answer verifier; "
                             "called as fn(prompt=..., completion=..., answer=..., question=..., "
                             "kind=..., difficulty=...) and must return a number")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    add_device_arguments(parser, threads=True)


def run(args: argparse.Namespace) -> int:
    cfg = GRPOConfig(iterations=args.iterations, prompts=args.prompts, group_size=args.group_size,
                     updates=args.updates, micro_batch=args.micro_batch,
                     max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                     clip_eps=args.clip_eps, beta=args.beta, lr=args.lr,
                     difficulty=args.difficulty or None, eval_problems=args.eval_problems,
                     eval_samples=args.eval_samples,
                     kinds=tuple(args.kinds.split(",")) if args.kinds else None,
                     seed=args.seed).validate()
    reward = RewardFn.from_spec(args.reward_fn)  # a broken function fails here, before any work
    out = check_out(args.out)
    device_cfg = cfg.train_config(args.device, args.threads)
    model, tokenizer = load_model(args.model, prepare_run(args.device, args.threads, args.seed))
    records, accuracy = grpo(model, tokenizer, cfg, reward, device_cfg)
    report = {"command": "grpo", "model": str(args.model), "config": asdict(cfg),
              "reward": reward.name, "held_out": accuracy,
              "first_iteration": records[0] if records else None,
              "last_iteration": records[-1] if records else None}
    save_model_dir(model, tokenizer, out, report, records)
    print(f"wrote {out}")
    return 0
