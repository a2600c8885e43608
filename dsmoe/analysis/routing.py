"""Routing traces: which experts each token is sent to, and with what weight (`dsmoe route`).

Design note
-----------
- The trace is read from `model.run(tokens).routing`, the `RoutingInfo` every MoE layer
  returns (DeepSeek-V3 report §2.1.2: top-k over the bias-adjusted affinities, weights from
  the unbiased ones, normalised and times route_scale). No forward hooks: what is shown is
  exactly what the forward pass used, aux-free bias included.
- Layers are named by their block index in the main stack (the first `n_dense_layers`
  blocks are dense and have no routing), so `layer 3` here is `layers.3` in a checkpoint.
- Within a token the chosen experts are listed by weight, heaviest first; the weights are
  the combine weights the layer multiplied the expert outputs by (route_scale included).
- One trace, two renderings: a fixed-width table for reading and a JSON document for tools.
Deliberately not here: the MTP modules' routing (they draft tokens, they do not define the
model), aggregate statistics over a data set (that is `report.py`), and sampling or decoding:
the trace covers the given text only.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dsmoe.device import add_device_arguments
from dsmoe.errors import DataError, DsmoeError

if TYPE_CHECKING:
    from dsmoe.model.moe import MoE


@dataclass
class RouteTrace:
    """The routing of one sequence through every MoE layer of the main stack."""
    token_ids: list[int]
    token_texts: list[str]
    layers: list[int]  # block index of each MoE layer, in order
    experts_LTK: torch.Tensor  # chosen experts, heaviest first (int64)
    weights_LTK: torch.Tensor  # their combine weights (float32)
    scores_LTE: torch.Tensor | None = None  # unbiased affinities of every routed expert (float32)

    @property
    def top_k(self) -> int:
        return self.experts_LTK.shape[-1]


def main_moe_blocks(model) -> list[tuple[int, MoE]]:
    """(block index, MoE layer) of the main stack, in the order of `ModelOutput.routing`.
    `Transformer.moe_layers()` lists the main stack's MoE layers first, then the MTP
    modules'; they are blocks n_dense_layers..n_layers-1 (the dense blocks come first)."""
    args = model.args
    return list(enumerate(model.moe_layers()[:args.n_moe_layers], start=args.n_dense_layers))


def trace_routes(model, token_ids: list[int], token_texts: list[str] | None = None) -> RouteTrace:
    """Run one sequence through `model` and keep what every MoE layer chose for it."""
    layers = [i for i, _ in main_moe_blocks(model)]
    if not layers:
        raise DsmoeError(f"this model has no MoE layer (n_layers={model.args.n_layers}, "
                         f"n_dense_layers={model.args.n_dense_layers}): there is no routing to show")
    device = next(model.parameters()).device
    tokens = torch.tensor([token_ids], dtype=torch.long, device=device)
    with torch.no_grad():
        routing = model.run(tokens).routing
    experts_LTK = torch.stack([r.ids_TK for r in routing]).cpu()
    weights_LTK = torch.stack([r.weights_TK for r in routing]).float().cpu()
    order_LTK = weights_LTK.argsort(dim=-1, descending=True, stable=True)
    texts = token_texts if token_texts is not None else [str(t) for t in token_ids]
    return RouteTrace(list(token_ids), list(texts), layers,
                      experts_LTK.gather(-1, order_LTK), weights_LTK.gather(-1, order_LTK),
                      torch.stack([r.scores_TE for r in routing]).float().cpu())


def encode_trace_text(tokenizer, text: str, max_seq_len: int, add_bos: bool = True) -> list[int]:
    """Token ids of `text`, checked against the model's context before anything runs."""
    if not text.strip():
        raise DataError("the prompt is empty: give some text with --prompt TEXT or --file PATH")
    ids = tokenizer.encode(text, add_bos=add_bos and tokenizer.bos_id is not None)
    if len(ids) > max_seq_len:
        raise DataError(f"the prompt is {len(ids)} tokens long but the model reads at most "
                        f"max_seq_len={max_seq_len}; shorten the text (or trace it in pieces)")
    return ids


def token_texts(tokenizer, token_ids: list[int]) -> list[str]:
    """Each token decoded on its own (special tokens kept), for display."""
    return [tokenizer.decode([t], skip_special=False) for t in token_ids]


def route_text(model, tokenizer, text: str, add_bos: bool = True) -> RouteTrace:
    ids = encode_trace_text(tokenizer, text, model.args.max_seq_len, add_bos)
    return trace_routes(model, ids, token_texts(tokenizer, ids))


# --- rendering ------------------------------------------------------------------------------

def _shown(text: str, width: int) -> str:
    """A token's text on one line: escapes for whitespace and control characters."""
    shown = json.dumps(text, ensure_ascii=False)[1:-1]
    return shown if len(shown) <= width else shown[:width - 1] + "…"


def format_table(trace: RouteTrace, token_width: int = 14) -> str:
    """One row per token, one column per MoE layer; a cell lists `expert:weight`, heaviest first."""
    cells = [[" ".join(f"{e}:{w:.2f}" for e, w in zip(trace.experts_LTK[l, t].tolist(),
                                                       trace.weights_LTK[l, t].tolist()))
              for l in range(len(trace.layers))] for t in range(len(trace.token_ids))]
    widths = [max([len(f"layer {layer}")] + [len(row[l]) for row in cells])
              for l, layer in enumerate(trace.layers)]
    id_width = max(len("id"), *(len(str(t)) for t in trace.token_ids))
    pos_width = max(len("pos"), len(str(len(trace.token_ids) - 1)))
    head = (f"{'pos':>{pos_width}}  {'id':>{id_width}}  {'token':<{token_width}}  "
            + "  ".join(f"{f'layer {layer}':<{w}}" for layer, w in zip(trace.layers, widths)))
    lines = [head, "-" * len(head)]
    for t, (token_id, text) in enumerate(zip(trace.token_ids, trace.token_texts)):
        lines.append(f"{t:>{pos_width}}  {token_id:>{id_width}}  {_shown(text, token_width):<{token_width}}  "
                     + "  ".join(f"{c:<{w}}" for c, w in zip(cells[t], widths)))
    lines.append(f"(expert:weight per MoE layer, heaviest first; top-{trace.top_k} of "
                 f"each layer's routed experts; weights include route_scale)")
    return "\n".join(line.rstrip() for line in lines)


def to_json(trace: RouteTrace) -> dict:
    """The trace as plain JSON data: per token, per layer, experts and weights."""
    return {
        "layers": trace.layers,
        "top_k": trace.top_k,
        "tokens": [
            {"pos": t, "id": token_id, "text": text,
             "routes": [{"layer": layer,
                         "experts": trace.experts_LTK[l, t].tolist(),
                         "weights": [round(w, 6) for w in trace.weights_LTK[l, t].tolist()]}
                        for l, layer in enumerate(trace.layers)]}
            for t, (token_id, text) in enumerate(zip(trace.token_ids, trace.token_texts))],
    }


# --- command line -------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="model directory (config.json, safetensors, tokenizer.json)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", metavar="TEXT", help="text to trace")
    source.add_argument("--file", metavar="PATH", help="file whose text to trace")
    parser.add_argument("--json", metavar="PATH",
                        help="also write the trace as JSON to PATH ('-': print JSON instead of the table)")
    parser.add_argument("--no-bos", action="store_true", help="do not prepend the BOS token")
    add_device_arguments(parser)


def _read_prompt(args) -> str:
    if args.prompt is not None:
        return args.prompt
    path = Path(args.file)
    if not path.is_file():
        raise DataError(f"--file {path}: no such file; give an existing text file or use --prompt")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"--file {path} is not UTF-8 text ({err})") from None


def load_model_and_tokenizer(model_dir: str, device: str = "auto"):
    """A model directory's model (eval mode, on `device`) and its tokenizer, which must exist."""
    from dsmoe.interop.hf import load_model_dir

    model, tokenizer = load_model_dir(model_dir, device=device)
    if tokenizer is None:
        raise DataError(f"{model_dir} has no tokenizer.json: copy the tokenizer the model was "
                        "trained with (tokenizer.json, tokenizer_config.json) into it")
    return model.eval(), tokenizer


def run(args) -> int:
    text = _read_prompt(args)
    model, tokenizer = load_model_and_tokenizer(args.model, args.device)
    ids = encode_trace_text(tokenizer, text, model.args.max_seq_len, add_bos=not args.no_bos)
    trace = trace_routes(model, ids, token_texts(tokenizer, ids))
    if args.json == "-":
        print(json.dumps(to_json(trace), ensure_ascii=False, indent=1))
        return 0
    print(format_table(trace))
    if args.json:
        Path(args.json).write_text(json.dumps(to_json(trace), ensure_ascii=False, indent=1) + "\n",
                                   encoding="utf-8")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
