"""Figures for the MoE report: expert load, domain-by-expert routing, per-layer scores.

Design note
-----------
- matplotlib is imported inside each function with the file-only Agg backend: importing
  dsmoe never needs it, and figures render on a headless machine.
- Load and routing shares are drawn relative to an even spread, on one diverging colour
  scale centred at 1.0 (white): blue is under-used, red over-used, in every figure alike.
  The scale is capped so that one hot expert does not wash out the rest; the cap is printed
  on the colour bar. Cell values are written in the cells when there are few enough to read.
- Deep models (V3: 58 MoE layers) get at most MAX_PANELS domain-by-expert panels, evenly
  spaced from the first MoE layer to the last; every layer's numbers stay in report.json.
- Inputs are plain tensors or lists; the figures know nothing about models or data.
Deliberately not here: interactive plots, or any computation of the statistics (`report.py`).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

MAX_ANNOTATED_CELLS = 160
MAX_ANNOTATED_COLUMNS = 16  # wider rows leave too little room per cell for a number
MAX_PANELS = 12  # domain-by-expert panels per figure; deep models show evenly spaced layers


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _relative_norm(values: torch.Tensor):
    """Diverging normalisation centred at 1.0, from 0 to a cap of at least 2."""
    from matplotlib.colors import TwoSlopeNorm
    top = float(values.max()) if values.numel() else 2.0
    return TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, min(top, 4.0)))


def _heatmap(ax, values: torch.Tensor, norm):
    image = ax.imshow(values.numpy(), cmap="RdBu_r", norm=norm, aspect="auto", interpolation="nearest")
    if values.numel() <= MAX_ANNOTATED_CELLS and values.shape[1] <= MAX_ANNOTATED_COLUMNS:
        for (i, j), v in zip(torch.cartesian_prod(torch.arange(values.shape[0]), torch.arange(values.shape[1])).tolist(),
                             values.flatten().tolist()):
            ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7,
                    color="white" if abs(v - 1.0) > 0.6 * (norm.vmax - 1.0) else "black")
    return image


def _expert_ticks(ax, n_experts: int) -> None:
    step = max(1, math.ceil(n_experts / 16))
    ax.set_xticks(range(0, n_experts, step))
    ax.set_xlabel("routed expert")


def plot_expert_load(load_LE: torch.Tensor, layers: list[int], path: str | Path) -> None:
    """Heatmap, one row per MoE layer: each expert's load over the layer's mean load."""
    plt = _pyplot()
    relative = load_LE.double() / load_LE.double().mean(-1, keepdim=True).clamp_min(1e-12)
    L, E = relative.shape
    fig, ax = plt.subplots(figsize=(min(16, 3.0 + 0.35 * E), min(12, 2.4 + 0.3 * L)))
    norm = _relative_norm(relative)
    image = _heatmap(ax, relative, norm)
    ax.set_yticks(range(L), [f"layer {layer}" for layer in layers])
    _expert_ticks(ax, E)
    ax.set_title("Expert load relative to the layer mean (1.0 = even)")
    fig.colorbar(image, ax=ax, label=f"load / mean (scale ends at {norm.vmax:.2g})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def shown_layers(n_layers: int, most: int) -> list[int]:
    """Indices of at most `most` layers, evenly spaced, first and last included."""
    if n_layers <= most:
        return list(range(n_layers))
    return sorted({round(i * (n_layers - 1) / (most - 1)) for i in range(most)})


def plot_domain_expert(relative_LDE: torch.Tensor, domains: list[str], layers: list[int],
                       path: str | Path, most_panels: int = MAX_PANELS) -> None:
    """One panel per MoE layer (at most `most_panels`, evenly spaced): rows are domains,
    cells each domain's routing share over an even spread."""
    plt = _pyplot()
    L, D, E = relative_LDE.shape
    picked = shown_layers(L, most_panels)
    cols = min(len(picked), 2 if E > 16 else 3)
    rows = math.ceil(len(picked) / cols)
    width = min(7.0, 1.5 + 0.32 * E)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols + 1.2, (1.0 + 0.35 * D) * rows + 0.8),
                             squeeze=False)
    norm = _relative_norm(relative_LDE.double())
    image = None
    for ax, l in zip(axes.flat, picked):
        image = _heatmap(ax, relative_LDE[l].double(), norm)
        ax.set_yticks(range(D), domains)
        _expert_ticks(ax, E)
        ax.set_title(f"layer {layers[l]}", fontsize=10)
    for ax in list(axes.flat)[len(picked):]:
        ax.axis("off")
    shown = "" if len(picked) == L else f" ({len(picked)} of {L} MoE layers shown)"
    fig.suptitle(f"Routing share of each domain relative to an even spread (1.0){shown}")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))  # room for the title
    fig.colorbar(image, ax=axes.ravel().tolist(), label=f"share x experts (scale ends at {norm.vmax:.2g})")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_layer_scores(layers: list[int], maxvio_L: list[float], mi_L: list[float],
                      mi_shuffled_L: list[float], path: str | Path) -> None:
    """Two bar charts per MoE layer: MaxVio, and I(domain; expert) beside shuffled labels."""
    plt = _pyplot()
    L = len(layers)
    x = list(range(L))
    fig, (left, right) = plt.subplots(1, 2, figsize=(min(16, 6 + 0.5 * L), 3.4))
    left.bar(x, maxvio_L, color="tab:blue")
    left.set_title("MaxVio (0 = perfectly even)")
    left.set_ylabel("(max load - mean) / mean")
    right.bar([i - 0.2 for i in x], mi_L, width=0.4, label="domain labels", color="tab:red")
    right.bar([i + 0.2 for i in x], mi_shuffled_L, width=0.4, label="shuffled labels", color="tab:gray")
    right.set_title("Specialisation: I(domain; expert)")
    right.set_ylabel("bits")
    right.legend(fontsize=8)
    step = max(1, math.ceil(L / 24))
    for ax in (left, right):
        ax.set_xticks(x[::step], [str(layer) for layer in layers][::step])
        ax.set_xlabel("MoE layer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to `window` values: per-step losses are noisy at small batch."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_training(records: list[dict], path: str | Path, entropy: dict[str, float] | None = None,
                  layer_names: list[str] | None = None, smooth: int = 20) -> None:
    """Loss and MaxVio over a run, from its metrics.jsonl records (`read_metrics`).

    Left: the training loss (main and MTP, trailing mean over `smooth` steps) and each
    domain's validation loss at every evaluation, with that domain's unigram entropy as a
    dotted line when `entropy` gives it (below it, the model uses context). Right: MaxVio
    of every MoE layer (same smoothing; `layer_names` labels them in routing order), the
    load-balance measure the gate biases drive down.
    """
    plt = _pyplot()
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "val" in r]
    if not steps:
        raise ValueError("no training-step records to plot (metrics.jsonl is empty?)")
    x = [r["step"] for r in steps]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    left.plot(x, _moving_average([r["loss"] for r in steps], smooth), color="black", label="train (main)")
    if any(r.get("mtp_loss") for r in steps):
        left.plot(x, _moving_average([r["mtp_loss"] for r in steps], smooth), color="gray",
                  linestyle="--", label="train (MTP, next-but-one)")
    domains = list(evals[-1]["val"]) if evals else []
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, domain in enumerate(domains):
        colour = colours[i % len(colours)]
        points = [(r["step"], r["val"][domain]) for r in evals if domain in r["val"]]
        left.plot(*zip(*points), marker="o", color=colour, label=f"val {domain}")
        if entropy and domain in entropy:
            left.axhline(entropy[domain], color=colour, linestyle=":", linewidth=1)
    left.set_title("Loss (dotted: each domain's unigram entropy)")
    left.set_xlabel("step")
    left.set_ylabel("nats / token")
    left.legend(fontsize=7, ncol=2)
    n_layers = max(len(r.get("maxvio") or []) for r in steps)
    for layer in range(n_layers):
        values = [r["maxvio"][layer] for r in steps if len(r.get("maxvio") or []) > layer]
        right.plot(x[-len(values):], _moving_average(values, smooth),
                   label=layer_names[layer] if layer_names and layer < len(layer_names)
                   else f"MoE layer #{layer}")
    right.set_title("MaxVio per MoE layer (0 = perfectly even load)")
    right.set_xlabel("step")
    right.set_ylabel("(max load - mean) / mean")
    if n_layers:
        right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
