"""The MoE report: balance, specialisation and cost of one model on labelled data (`dsmoe report`).

Design note
-----------
Each claim made for a DeepSeek-style MoE gets one measured or counted figure:
- Balance without an auxiliary loss: the load of every expert in every MoE layer over the
  evaluation tokens, and MaxVio = (max load - mean load) / mean load (the Auxiliary-Loss-Free
  Load Balancing paper's measure, as in `dsmoe/train/balance.py`), over all domains together
  and within each domain.
- Experts that specialise: the domain-by-expert routing matrix, and per layer the mutual
  information I(domain; expert) in bits between a token's domain and one of its chosen
  experts (each token counts K times, once per chosen expert). A plug-in estimate is biased
  upwards on finite data, so the same estimate on domain labels shuffled across tokens is
  reported beside it: specialisation is the gap between the two.
- A fraction of the parameters, fewer FLOPs, a smaller cache, less energy: `cost.py`'s
  figures (the counts of `flops.py`, set against a dense model of the same total size,
  and an energy estimate from a named accelerator's peak throughput and power).
Routing comes from `model.run(tokens).routing`, exactly what the forward pass used.
The report is Markdown with PNG figures (`plots.py`) and a `report.json` with every number.

Deliberately not here: measured speed or measured energy (`bench/` measures speed; energy
is an estimate from stated figures), validation loss (training reports it), and the MTP
modules' routing.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import torch

from dsmoe.analysis.cost import DEFAULT_UTILISATION, CostReport, cost_report
from dsmoe.analysis.routing import main_moe_blocks
from dsmoe.device import add_device_arguments
from dsmoe.errors import DataError
from dsmoe.train.balance import max_violation

FIGURES = {"load": "expert_load.png", "domains": "domain_expert.png",
           "layers": "balance_specialisation.png"}


# --- routing statistics -------------------------------------------------------------------------

def mutual_information(joint_DE: torch.Tensor) -> float:
    """I(domain; expert) in bits of the empirical joint distribution given by counts."""
    p_DE = joint_DE.double() / joint_DE.sum()
    p_D1 = p_DE.sum(1, keepdim=True)
    p_1E = p_DE.sum(0, keepdim=True)
    nz = p_DE > 0
    return float((p_DE[nz] * (p_DE[nz] / (p_D1 * p_1E).expand_as(p_DE)[nz]).log2()).sum())


def entropy_bits(counts: torch.Tensor) -> float:
    p = counts.double()[counts > 0] / counts.sum()
    return float(-(p * p.log2()).sum())


def _joint_counts(labels_N: torch.Tensor, ids_NK: torch.Tensor, n_domains: int, n_experts: int) -> torch.Tensor:
    """(domain, expert) counts of token-expert pairs: each token counts once per chosen expert."""
    cells = labels_N[:, None] * n_experts + ids_NK
    return torch.bincount(cells.flatten(), minlength=n_domains * n_experts).view(n_domains, n_experts)


@dataclass
class RoutingStats:
    """How a model routed labelled tokens, per MoE layer (L), domain (D) and expert (E)."""
    layers: list[int]  # block index of each MoE layer
    domains: list[str]
    top_k: int
    counts_LDE: torch.Tensor  # token-expert pairs (int64)
    tokens_D: torch.Tensor  # tokens of each domain (int64)
    mi_L: list[float]  # I(domain; expert) in bits
    mi_shuffled_L: list[float]  # the same with domain labels shuffled across tokens

    @property
    def load_LE(self) -> torch.Tensor:
        return self.counts_LDE.sum(1)

    @property
    def maxvio_L(self) -> list[float]:
        """MaxVio of each layer over all evaluated tokens."""
        return [max_violation(load) for load in self.load_LE]

    @property
    def maxvio_LD(self) -> list[list[float]]:
        """MaxVio of each layer within each domain's tokens."""
        return [[max_violation(load) for load in layer] for layer in self.counts_LDE]

    @property
    def domain_entropy(self) -> float:
        """H(domain) in bits: the most mutual information there can be."""
        return entropy_bits(self.tokens_D)

    def share_LDE(self) -> torch.Tensor:
        """Share of each domain's token-expert pairs that went to each expert (rows sum to 1)."""
        return self.counts_LDE.double() / (self.tokens_D[None, :, None].double() * self.top_k)

    def to_dict(self) -> dict:
        return {"layers": self.layers, "domains": self.domains, "top_k": self.top_k,
                "tokens": dict(zip(self.domains, self.tokens_D.tolist())),
                "load": self.load_LE.tolist(), "counts": self.counts_LDE.tolist(),
                "maxvio": self.maxvio_L, "maxvio_by_domain": self.maxvio_LD,
                "mutual_information_bits": self.mi_L,
                "mutual_information_shuffled_bits": self.mi_shuffled_L,
                "domain_entropy_bits": self.domain_entropy}


@torch.no_grad()
def collect_routing(model, batches: Mapping[str, Iterable[torch.Tensor]], seed: int = 0) -> RoutingStats:
    """Route every batch (B, T) of every domain through `model`; gather the statistics.

    `batches` maps a domain name to its token batches; every token of a batch is routed
    and labelled with that domain.
    """
    layers = [i for i, _ in main_moe_blocks(model)]
    if not layers:
        raise DataError(f"this model has no MoE layer (n_dense_layers={model.args.n_dense_layers} "
                        f"of n_layers={model.args.n_layers}): there is no routing to report")
    domains = list(batches)
    if not domains:
        raise DataError("no domain to evaluate: give at least one domain with validation data")
    device = next(model.parameters()).device
    n_experts, top_k = model.args.n_routed_experts, model.args.n_activated_experts
    ids_per_layer: list[list[torch.Tensor]] = [[] for _ in layers]
    labels: list[torch.Tensor] = []
    for d, domain in enumerate(domains):
        n_before = len(labels)
        for batch in batches[domain]:
            routing = model.run(batch.to(device)).routing
            for chosen, info in zip(ids_per_layer, routing):
                chosen.append(info.ids_TK.cpu())
            labels.append(torch.full((batch.numel(),), d, dtype=torch.long))
        if len(labels) == n_before:
            raise DataError(f"domain {domain!r} gave no tokens to evaluate; give it validation "
                            "data or leave it out")
    labels_N = torch.cat(labels)
    shuffled_N = labels_N[torch.randperm(len(labels_N), generator=torch.Generator().manual_seed(seed))]
    counts, mi, mi_shuffled = [], [], []
    for chosen in ids_per_layer:
        ids_NK = torch.cat(chosen)
        joint_DE = _joint_counts(labels_N, ids_NK, len(domains), n_experts)
        counts.append(joint_DE)
        mi.append(mutual_information(joint_DE))
        mi_shuffled.append(mutual_information(_joint_counts(shuffled_N, ids_NK, len(domains), n_experts)))
    tokens_D = torch.bincount(labels_N, minlength=len(domains))
    return RoutingStats(layers, domains, top_k, torch.stack(counts), tokens_D, mi, mi_shuffled)


# --- Markdown -------------------------------------------------------------------------------------

def markdown_table(header: list[str], rows: list[list]) -> list[str]:
    """A Markdown table as lines: header, rule, one line per row."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _n(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _cost_section(cost: CostReport) -> list[str]:
    p, moe, dense, kv = cost.params, cost.flops["moe"], cost.flops["dense"], cost.kv_cache
    e = cost.energy_wh_per_million
    acc = cost.accelerator
    lines = ["## Cost", "",
             "Counted from the config by `dsmoe/analysis/flops.py` (2 FLOPs per multiply-add; "
             f"attention over a context of {cost.context} keys; training = 3 x forward, MTP "
             "included). The dense model has the same total parameters: the same config with "
             "every routed expert active on every token.", ""]
    lines += markdown_table(["", "this MoE", "dense, same total size", "MoE / dense"], [
        ["parameters (without MTP)", _n(p["total"]), _n(p["total"]), "1"],
        ["activated parameters per token", _n(p["activated"]), _n(p["total"]),
         f"{p['activated'] / p['total']:.3f}"],
        ["forward FLOPs per token", _n(moe["forward"]), _n(dense["forward"]),
         f"{moe['forward'] / dense['forward']:.3f}"],
        ["training FLOPs per token", _n(moe["training"]), _n(dense["training"]),
         f"{moe['training'] / dense['training']:.3f}"],
        ["energy per million tokens, inference (Wh)", f"{e['moe_forward']:.3g}",
         f"{e['dense_forward']:.3g}", f"{e['moe_forward'] / e['dense_forward']:.3f}"],
        ["energy per million tokens, training (Wh)", f"{e['moe_training']:.3g}",
         f"{e['dense_training']:.3g}", f"{e['moe_training'] / e['dense_training']:.3f}"],
    ])
    lines += ["", f"Activated parameters without embedding and output head: "
              f"{_n(p['activated_without_embed_head'])}; MTP modules: {_n(p['mtp'])} parameters "
              f"({_n(p['mtp_activated'])} activated).", ""]
    lines += markdown_table(["KV cache per token", "MLA (latent + rotary key)", "multi-head attention", "MHA / MLA"], [
        ["values per layer", kv["mla_values_per_layer"], kv["mha_values_per_layer"], f"{kv['ratio']:.1f}"],
        [f"bytes, all {kv['n_layers']} layers ({kv['dtype_bytes']}-byte values)",
         _n(kv["mla_bytes_per_token"]), _n(kv["mha_bytes_per_token"]), f"{kv['ratio']:.1f}"],
    ])
    lines += ["", f"Energy is an estimate, not a measurement. Assumptions: {acc.name}, "
              f"{acc.peak_flops / 1e12:,.1f} TFLOP/s peak and {acc.watts:.0f} W ({acc.source}); "
              f"the chip reaches {cost.utilisation:.0%} of peak (model FLOP utilisation) while "
              f"drawing its full {acc.watts:.0f} W, so one FLOP costs "
              f"{acc.watts:.0f} / ({acc.peak_flops:.4g} x {cost.utilisation}) = "
              f"{acc.joules_per_flop(cost.utilisation):.3g} J; host, network, cooling (PUE) and "
              "idle time are not counted; energy = FLOPs per token x 10^6 x J/FLOP.", ""]
    return lines


def _balance_section(stats: RoutingStats) -> list[str]:
    lines = ["## Balance", "",
             f"![expert load per layer]({FIGURES['load']})", "",
             "Load = token-expert pairs per expert over all evaluated tokens, shown relative to "
             "the mean (1.0 = perfectly even). MaxVio = (max load - mean load) / mean load: 0 is "
             "perfect balance. Within a domain, uneven load is expected when experts specialise; "
             "balance is about the whole mix.", ""]
    rows = [[layer, f"{stats.maxvio_L[l]:.3f}"] + [f"{v:.3f}" for v in stats.maxvio_LD[l]]
            for l, layer in enumerate(stats.layers)]
    lines += markdown_table(["layer", "MaxVio, all domains"] + [f"MaxVio, {d}" for d in stats.domains], rows)
    return lines + [""]


def _specialisation_section(stats: RoutingStats) -> list[str]:
    h = stats.domain_entropy
    lines = ["## Specialisation", "",
             f"![domain-by-expert routing]({FIGURES['domains']})", "",
             "Each row: the share of a domain's token-expert pairs sent to each expert, relative "
             "to an even spread (1.0). Score: the mutual information between a token's domain "
             "and a chosen expert, in bits (each token counts once per chosen expert); beside it "
             "the same estimate with the domain labels shuffled across tokens, which is what "
             f"chance alone gives on this much data. H(domain) = {h:.3f} bits is the ceiling.", "",
             f"![MaxVio and specialisation per layer]({FIGURES['layers']})", ""]
    share = stats.share_LDE()
    rows = []
    for l, layer in enumerate(stats.layers):
        favourites = ", ".join(f"{d}: {int(share[l, i].argmax())}" for i, d in enumerate(stats.domains))
        rows.append([layer, f"{stats.mi_L[l]:.4f}", f"{stats.mi_shuffled_L[l]:.4f}",
                     f"{stats.mi_L[l] / h:.3f}" if h > 0 else "n/a", favourites])
    lines += markdown_table(["layer", "I(domain; expert), bits", "shuffled labels, bits",
                     "I / H(domain)", "most used expert per domain"], rows)
    return lines + [""]


def render_markdown(title: str, stats: RoutingStats, cost: CostReport, notes: list[str]) -> str:
    tokens = ", ".join(f"{d}: {n:,}" for d, n in zip(stats.domains, stats.tokens_D.tolist()))
    lines = [f"# {title}", ""] + [f"- {note}" for note in notes]
    lines += [f"- evaluated tokens per domain: {tokens}",
              f"- MoE layers (block index): {stats.layers}; top-{stats.top_k} routing", ""]
    lines += _balance_section(stats) + _specialisation_section(stats) + _cost_section(cost)
    return "\n".join(lines)


def write_report(out_dir: str | Path, stats: RoutingStats, cost: CostReport, title: str = "MoE report",
                 notes: list[str] | None = None) -> Path:
    """Write report.md, report.json and the figures into `out_dir`; return report.md's path."""
    from dsmoe.analysis import plots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots.plot_expert_load(stats.load_LE, stats.layers, out / FIGURES["load"])
    plots.plot_domain_expert(stats.share_LDE() * stats.counts_LDE.shape[-1], stats.domains,
                             stats.layers, out / FIGURES["domains"])
    plots.plot_layer_scores(stats.layers, stats.maxvio_L, stats.mi_L, stats.mi_shuffled_L,
                            out / FIGURES["layers"])
    (out / "report.json").write_text(json.dumps({"routing": stats.to_dict(), "cost": cost.to_dict(),
                                                 "notes": notes or []}, indent=1) + "\n")
    path = out / "report.md"
    path.write_text(render_markdown(title, stats, cost, notes or []) + "\n", encoding="utf-8")
    return path


# --- command line -------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR", help="model directory (with tokenizer.json)")
    parser.add_argument("--data", required=True, metavar="DIR", help="data directory made by `dsmoe prepare`")
    parser.add_argument("--out", required=True, metavar="DIR", help="where to write report.md and figures")
    parser.add_argument("--domains", nargs="+", metavar="NAME", help="domains to evaluate (default: all)")
    parser.add_argument("--tokens-per-domain", type=int, default=16384,
                        help="validation tokens routed per domain (default 16384)")
    parser.add_argument("--seq-len", type=int,
                        help="tokens per evaluated sequence (default: 256 or max_seq_len if smaller)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--context", type=int, help="context for the attention FLOPs (default: max_seq_len)")
    parser.add_argument("--utilisation", type=float, default=DEFAULT_UTILISATION,
                        help=f"share of the accelerator's peak reached, for energy (default {DEFAULT_UTILISATION})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the label shuffle")
    add_device_arguments(parser)


def open_validation_shards(data_dir: str | Path, tokenizer, domains: list[str] | None, seq_len: int):
    """(shards, domains to evaluate) of a data directory, checked against the model's
    tokenizer and the sequence length: every chosen domain holds a validation sequence."""
    from dsmoe.data.shards import TokenShards

    shards = TokenShards(data_dir)
    data_hash = shards.manifest["tokenizer"]["sha256"]
    if tokenizer.sha256() != data_hash:
        raise DataError(f"{data_dir} was tokenized with a different tokenizer than the model's "
                        f"(sha256 {data_hash[:12]}... against {tokenizer.sha256()[:12]}...): re-run "
                        f"`dsmoe prepare` with the model's tokenizer, or use the data the model was trained on")
    chosen = domains or shards.domains
    for domain in chosen:
        if domain not in shards.domains:
            raise DataError(f"no domain {domain!r} in {data_dir}; it has {shards.domains}")
        have = shards.num_tokens("val", domain)
        if have < seq_len + 1:
            raise DataError(f"domain {domain!r} has {have} validation tokens in {data_dir}, fewer "
                            f"than one sequence of {seq_len + 1}: give it more text (or a larger "
                            "--val-fraction) in `dsmoe prepare`, use a smaller --seq-len, or leave "
                            "it out with --domains")
    return shards, chosen


def validation_inputs(shards, domain: str, batch_size: int, seq_len: int, n_tokens: int) -> Iterable[torch.Tensor]:
    """The first ceil(n_tokens / seq_len) validation sequences of a domain, in batches.
    Validation windows hold seq_len + 1 tokens (inputs and targets); the inputs are routed."""
    from dsmoe.data.shards import val_batches

    rows = math.ceil(n_tokens / seq_len)
    for batch in val_batches(shards, domain, batch_size, seq_len, math.ceil(rows / batch_size)):
        batch = batch[:rows, :-1]
        rows -= len(batch)
        if len(batch):
            yield batch


def run(args) -> int:
    from dsmoe.analysis.routing import load_model_and_tokenizer

    for name in ("tokens_per_domain", "seq_len", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise DataError(f"--{name.replace('_', '-')}={getattr(args, name)}: must be positive")
    model, tokenizer = load_model_and_tokenizer(args.model, args.device)
    args.seq_len = args.seq_len or min(256, model.args.max_seq_len)
    if args.seq_len > model.args.max_seq_len:
        raise DataError(f"--seq-len {args.seq_len} exceeds the model's max_seq_len="
                        f"{model.args.max_seq_len}; give --seq-len {model.args.max_seq_len} or less")
    shards, domains = open_validation_shards(args.data, tokenizer, args.domains, args.seq_len)
    cost = cost_report(model.args, args.context or model.args.max_seq_len, utilisation=args.utilisation)
    batches = {d: validation_inputs(shards, d, args.batch_size, args.seq_len, args.tokens_per_domain)
               for d in domains}
    stats = collect_routing(model, batches, seed=args.seed)
    notes = [f"model: `{args.model}`", f"data: `{args.data}` (validation split, tokenizer sha256 "
             f"{tokenizer.sha256()[:12]}...)", f"{args.seq_len}-token sequences from the start of each domain's validation split, "
             f"up to {args.tokens_per_domain:,} tokens per domain, rounded up to whole sequences"]
    path = write_report(args.out, stats, cost, title=f"MoE report: {args.model}", notes=notes)
    print(f"wrote {path}")
    return 0
