"""What a config costs: parameters, FLOPs per token and KV-cache bytes, from ModelArgs alone.

Everything is counted analytically from the config, so `dsmoe params --preset deepseek-v3`
answers instantly and allocates no weights.
The counts follow the modules in `dsmoe/model/` one to one; `tests/analysis/test_flops.py`
checks them against materialised and meta-device models, and against torch's FLOP counter.

Conventions (stated once, used everywhere):
- Parameters are the weights a checkpoint stores: every trainable weight, plus the gate's
  aux-free selection bias where the routing uses one (`noaux_tc`, stored by Hugging Face
  as `e_score_correction_bias`). In the model that bias is a buffer (the balancing rule
  moves it, not gradients); it is its own group, `gate_bias`, so it can be told apart.
  This is the convention behind DeepSeek-V3's 671,026,419,200 (58 MoE layers x 256 biases
  of it) and V2-Lite's 15,706,484,224 (no bias).
- "Total" is the main model without the MTP modules; MTP is counted separately. MTP
  modules share the embedding and the output head with the main model, so they add
  only their norms, `eh_proj` and one block each.
- "Activated" per token: every parameter except the routed experts, plus the
  n_activated_experts / n_routed_experts share of the routed experts a token uses (the
  DeepSeek-V3 report's 37B counts this way, embedding and head included). Both figures,
  with and without embedding and output head, are given.
- FLOPs: 2 per multiply-add. Matmul FLOPs are 2 x the activated matmul weights (the
  embedding is a lookup, RMSNorm weights are elementwise and the gate bias is added:
  none of them counts; the gate and the head do). Attention adds the score (q.k) and
  value (p.v) products of the naive (expanded K/V) path: 2 x n_heads x (qk_head_dim +
  v_head_dim) per key, a token attending to `seq_len` keys (the PaLM convention: no
  discount for the causal mask).
  Softmax, norms, activations and routing are not counted.
  Training = 3 x forward (forward, then backward at twice the forward cost), over the
  main model plus the MTP modules (which also run the shared head once per depth).
- KV cache per token per layer: MLA stores the normalised latent and the rotated k_pe,
  kv_lora_rank + qk_rope_head_dim values; the multi-head attention it replaces would
  store K and V for every head, n_heads x (qk_head_dim + v_head_dim) values.
Not here: memory for activations or optimizer state, energy, or measured speed
(`bench/` measures speed).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass

from dsmoe.config import ModelArgs, available_presets, load_args
from dsmoe.errors import ConfigError

# Parameter groups, in the order the table prints them. `eh_proj` is the MTP modules' own
# projection; their enorm/hnorm/norm count under `norm`. Embedding and head belong to the
# main model only (MTP shares them).
GROUPS = ("embed", "attn", "dense_ffn", "gate", "gate_bias", "shared_experts", "routed_experts",
          "eh_proj", "norm", "head")
# Weights that are not multiplied into the activations (lookup, elementwise, added).
NOT_MATMUL = ("embed", "norm", "gate_bias")


@dataclass(frozen=True)
class ParamCounts:
    """Parameters by group: `groups` for the main model, `mtp_groups` for all MTP modules."""
    groups: dict[str, int]
    mtp_groups: dict[str, int]
    routed_share: float  # n_activated_experts / n_routed_experts

    @property
    def total(self) -> int:
        """Main model, without MTP."""
        return sum(self.groups.values())

    @property
    def mtp(self) -> int:
        return sum(self.mtp_groups.values())

    @property
    def total_with_mtp(self) -> int:
        return self.total + self.mtp

    @property
    def activated(self) -> int:
        """Per token, counting embedding and output head (the report's convention)."""
        return activated(self.groups, self.routed_share)

    @property
    def activated_without_embed_head(self) -> int:
        return self.activated - self.groups["embed"] - self.groups["head"]

    @property
    def mtp_activated(self) -> int:
        return activated(self.mtp_groups, self.routed_share)

    def to_dict(self) -> dict:
        return _as_dict(self, "total", "mtp", "total_with_mtp", "activated",
                        "activated_without_embed_head", "mtp_activated")


def activated(groups: dict[str, int], routed_share: float) -> int:
    """Everything but the routed experts, plus the share of them one token uses."""
    routed = groups["routed_experts"]
    # Exact in integers whenever every expert has the same size (they do).
    return sum(groups.values()) - routed + round(routed * routed_share)


@dataclass(frozen=True)
class FlopCounts:
    """FLOPs per token (2 per multiply-add) at a context of `seq_len` keys."""
    seq_len: int
    matmul: int  # main model: 2 x activated matmul weights
    attention: int  # main model: score and value products over seq_len keys
    mtp: int  # all MTP modules (matmul + attention + the shared head again), training only

    @property
    def forward(self) -> int:
        """Inference forward of the main model (MTP dropped)."""
        return self.matmul + self.attention

    @property
    def training(self) -> int:
        """Forward + backward (3 x forward) of the main model and the MTP modules."""
        return 3 * (self.forward + self.mtp)

    def to_dict(self) -> dict:
        return _as_dict(self, "forward", "training")


@dataclass(frozen=True)
class CacheCounts:
    """KV cache per token: MLA's latent cache against the multi-head K/V it replaces."""
    dtype_bytes: int
    n_layers: int  # main stack (MTP modules, when drafting, add one layer each)
    mla_values_per_layer: int  # kv_lora_rank + qk_rope_head_dim
    mha_values_per_layer: int  # n_heads x (qk_head_dim + v_head_dim)

    @property
    def mla_bytes_per_layer(self) -> int:
        return self.mla_values_per_layer * self.dtype_bytes

    @property
    def mha_bytes_per_layer(self) -> int:
        return self.mha_values_per_layer * self.dtype_bytes

    @property
    def mla_bytes_per_token(self) -> int:
        return self.mla_bytes_per_layer * self.n_layers

    @property
    def mha_bytes_per_token(self) -> int:
        return self.mha_bytes_per_layer * self.n_layers

    @property
    def ratio(self) -> float:
        """How many times smaller MLA's cache is."""
        return self.mha_values_per_layer / self.mla_values_per_layer

    def to_dict(self) -> dict:
        return _as_dict(self, "mla_bytes_per_layer", "mha_bytes_per_layer", "mla_bytes_per_token",
                        "mha_bytes_per_token", "ratio")


def _as_dict(counts, *derived: str) -> dict:
    """The fields and the named derived properties, for JSON."""
    return {**dataclasses.asdict(counts), **{name: getattr(counts, name) for name in derived}}


# ------------------------------------------------------------------ parameters
def _attention_params(args: ModelArgs) -> tuple[int, int]:
    """(matmul weights, norm weights) of one MLA layer (`dsmoe/model/mla.py`)."""
    H, D = args.n_heads, args.dim
    if args.q_lora_rank == 0:
        q, q_norm = D * H * args.qk_head_dim, 0
    else:
        q, q_norm = D * args.q_lora_rank + args.q_lora_rank * H * args.qk_head_dim, args.q_lora_rank
    kv_a = D * (args.kv_lora_rank + args.qk_rope_head_dim)
    kv_b = args.kv_lora_rank * H * (args.qk_nope_head_dim + args.v_head_dim)
    out = H * args.v_head_dim * D
    return q + kv_a + kv_b + out, q_norm + args.kv_lora_rank


def _block_params(args: ModelArgs, is_moe: bool) -> dict[str, int]:
    """One Transformer block (`dsmoe/model/block.py`) by group."""
    D = args.dim
    attn, attn_norms = _attention_params(args)
    groups = dict.fromkeys(GROUPS, 0)
    groups["attn"] = attn
    groups["norm"] = attn_norms + 2 * D  # + attn_norm, ffn_norm
    if is_moe:
        groups["gate"] = args.n_routed_experts * D
        groups["gate_bias"] = args.n_routed_experts if uses_gate_bias(args) else 0
        groups["routed_experts"] = args.n_routed_experts * 3 * D * args.moe_inter_dim
        groups["shared_experts"] = 3 * D * args.n_shared_experts * args.moe_inter_dim
    else:
        groups["dense_ffn"] = 3 * D * args.inter_dim
    return groups


def uses_gate_bias(args: ModelArgs) -> bool:
    """Whether the selection bias is part of the model's weights (counted as a parameter)."""
    return args.topk_method == "noaux_tc"


def _add(a: dict[str, int], b: dict[str, int], times: int = 1) -> dict[str, int]:
    return {k: a[k] + times * b[k] for k in a}


def count_params(args: ModelArgs) -> ParamCounts:
    """Every parameter of `Transformer(args)`, by group, without allocating any."""
    D, V = args.dim, args.vocab_size
    groups = dict.fromkeys(GROUPS, 0)
    groups = _add(groups, _block_params(args, False), args.n_dense_layers)
    groups = _add(groups, _block_params(args, True), args.n_moe_layers)
    groups["embed"] = V * D
    groups["head"] = V * D
    groups["norm"] += D  # final norm
    # An MTP module's block has layer id n_layers + k >= n_dense_layers: always MoE.
    mtp_one = _block_params(args, True)
    mtp_one["eh_proj"] = 2 * D * D
    mtp_one["norm"] += 3 * D  # enorm, hnorm, norm
    mtp_groups = _add(dict.fromkeys(GROUPS, 0), mtp_one, args.n_mtp_layers)
    return ParamCounts(groups=groups, mtp_groups=mtp_groups,
                       routed_share=args.n_activated_experts / args.n_routed_experts)


# ----------------------------------------------------------------------- FLOPs
def _attention_flops(args: ModelArgs, seq_len: int) -> int:
    """Score and value products of one layer for one query over seq_len keys."""
    return 2 * args.n_heads * (args.qk_head_dim + args.v_head_dim) * seq_len


def _matmul_flops(groups: dict[str, int], routed_share: float) -> int:
    return 2 * (activated(groups, routed_share) - sum(groups[g] for g in NOT_MATMUL))


def flops_per_token(args: ModelArgs, seq_len: int) -> FlopCounts:
    """Forward and training FLOPs per token, each token attending to `seq_len` keys."""
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len <= 0:
        raise ConfigError(f"seq_len={seq_len!r}: must be a positive integer (keys per token)")
    params = count_params(args)
    head = 2 * params.groups["head"]  # each MTP depth runs the shared head once more
    return FlopCounts(
        seq_len=seq_len,
        matmul=_matmul_flops(params.groups, params.routed_share),
        attention=args.n_layers * _attention_flops(args, seq_len),
        mtp=(_matmul_flops(params.mtp_groups, params.routed_share)
             + args.n_mtp_layers * (head + _attention_flops(args, seq_len))))


# -------------------------------------------------------------------- KV cache
def kv_cache_bytes(args: ModelArgs, dtype_bytes: int = 2) -> CacheCounts:
    """Cache per token: MLA latent + k_pe against full per-head K and V."""
    return CacheCounts(
        dtype_bytes=dtype_bytes, n_layers=args.n_layers,
        mla_values_per_layer=args.kv_lora_rank + args.qk_rope_head_dim,
        mha_values_per_layer=args.n_heads * (args.qk_head_dim + args.v_head_dim))


# ------------------------------------------------------------------------- CLI
def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def format_report(name: str, params: ParamCounts, flops: FlopCounts, cache: CacheCounts) -> str:
    rows: list[tuple[str, str, str]] = []

    def row(label: str, value: float, exact: bool = True) -> None:
        rows.append((label, f"{value:,}" if exact else f"{value:,.1f}", _human(value)))

    for group in GROUPS:
        if params.groups[group]:
            row(f"  {group}", params.groups[group])
    row("total parameters (without MTP)", params.total)
    for group in GROUPS:
        if params.mtp_groups[group]:
            row(f"  MTP {group}", params.mtp_groups[group])
    row("MTP parameters", params.mtp)
    row("total with MTP", params.total_with_mtp)
    row("activated per token (with embedding and head)", params.activated)
    row("activated per token (without embedding and head)", params.activated_without_embed_head)
    row("MTP activated per token", params.mtp_activated)
    row(f"forward FLOPs per token (context {flops.seq_len})", flops.forward)
    row("  of which matmul (2 x activated matmul weights)", flops.matmul)
    row("  of which attention scores and values", flops.attention)
    row("training FLOPs per token (3 x forward, with MTP)", flops.training)
    row(f"KV cache bytes per token per layer, MLA ({cache.mla_values_per_layer} values)",
        cache.mla_bytes_per_layer)
    row(f"KV cache bytes per token per layer, MHA ({cache.mha_values_per_layer} values)",
        cache.mha_bytes_per_layer)
    row(f"KV cache bytes per token, all {cache.n_layers} layers, MLA", cache.mla_bytes_per_token)
    row(f"KV cache bytes per token, all {cache.n_layers} layers, MHA", cache.mha_bytes_per_token)
    row("MHA / MLA cache ratio", round(cache.ratio, 1), exact=False)
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    lines = [f"{name}: parameters, FLOPs and KV cache (cache values of {cache.dtype_bytes} bytes)"]
    lines += [f"{a:<{width}}  {b:>{vwidth}}  {c:>8}" for a, b, c in rows]
    lines.append("Conventions: 2 FLOPs per multiply-add; activated = non-routed parameters + "
                 "top-k/E of the routed experts; attention: naive path, every token over the full "
                 "context; training = 3 x forward. See dsmoe/analysis/flops.py.")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help=f"one of {available_presets()}")
    source.add_argument("--config", help="a ModelArgs JSON file")
    parser.add_argument("--seq-len", type=int, default=4096,
                        help="keys each token attends to, for the attention FLOPs (default 4096)")
    parser.add_argument("--dtype-bytes", type=int, default=2,
                        help="bytes per cached value (2: bf16, the default; 4: fp32; 1: fp8)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def run(args: argparse.Namespace) -> int:
    if args.dtype_bytes <= 0:
        raise ConfigError(f"--dtype-bytes={args.dtype_bytes}: must be a positive integer")
    model_args = load_args(args.preset, args.config)
    params = count_params(model_args)
    flops = flops_per_token(model_args, args.seq_len)
    cache = kv_cache_bytes(model_args, args.dtype_bytes)
    name = args.preset or str(args.config)
    if args.json:
        print(json.dumps({"model": name, "params": params.to_dict(), "flops": flops.to_dict(),
                          "kv_cache": cache.to_dict()}, indent=2))
    else:
        print(format_report(name, params, flops, cache))
    return 0
