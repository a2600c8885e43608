"""What a model costs to run and train, set against a dense model of the same total size:
parameters, FLOPs per token, KV cache per token and an energy estimate (`dsmoe report`).

The counts are `flops.py`'s (not re-derived here). The dense model is the same config with
every routed expert active on every token (its FFN is the concatenation of all experts),
so the two have the same total parameters and differ only in what a token activates.
Energy is an estimate from a named accelerator's datasheet peak throughput and board
power at a stated utilisation: a FLOP costs watts / (peak FLOP/s x utilisation) joules.
Not here: measured speed (`bench/`) or measured energy; host, network and cooling power.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from dsmoe.analysis.flops import count_params, flops_per_token, kv_cache_bytes
from dsmoe.config import ModelArgs
from dsmoe.errors import DataError


@dataclass(frozen=True)
class Accelerator:
    """Peak throughput and board power of one accelerator, from its vendor's datasheet."""
    name: str
    peak_flops: float  # dense (no sparsity) FLOP/s at the stated precision
    watts: float
    source: str

    def joules_per_flop(self, utilisation: float) -> float:
        """Energy per FLOP when the chip draws its full power at `utilisation` of peak."""
        return self.watts / (self.peak_flops * utilisation)


H100_SXM = Accelerator(
    name="NVIDIA H100 SXM", peak_flops=989.4e12, watts=700.0,
    source="NVIDIA H100 Tensor Core GPU datasheet: 989.4 TFLOP/s dense BF16 (1,979 with "
           "2:4 sparsity), up to 700 W max thermal design power")
DEFAULT_UTILISATION = 0.4


def dense_equivalent(args: ModelArgs) -> ModelArgs:
    """The same config with every routed expert active on every token: a dense model of the
    same total size (its FFN is the concatenation of all experts)."""
    return args.replace(n_activated_experts=args.n_routed_experts,
                        n_limited_groups=args.n_expert_groups)


@dataclass
class CostReport:
    context: int  # keys each token attends to, for the attention FLOPs
    accelerator: Accelerator
    utilisation: float
    params: dict = field(default_factory=dict)
    flops: dict = field(default_factory=dict)  # "moe" / "dense" -> FlopCounts.to_dict()
    kv_cache: dict = field(default_factory=dict)
    energy_wh_per_million: dict = field(default_factory=dict)  # (model, phase) -> Wh

    def to_dict(self) -> dict:
        return {"context": self.context, "accelerator": vars(self.accelerator),
                "utilisation": self.utilisation, "joules_per_flop":
                self.accelerator.joules_per_flop(self.utilisation), "params": self.params,
                "flops": self.flops, "kv_cache": self.kv_cache,
                "energy_wh_per_million_tokens": self.energy_wh_per_million}


def cost_report(args: ModelArgs, context: int, accelerator: Accelerator = H100_SXM,
                utilisation: float = DEFAULT_UTILISATION, dtype_bytes: int = 2) -> CostReport:
    """Parameters, FLOPs per token, cache per token and energy per million tokens."""
    if not 0 < utilisation <= 1:
        raise DataError(f"utilisation={utilisation}: must be in (0, 1] (a share of peak FLOP/s)")
    flops = {"moe": flops_per_token(args, context), "dense": flops_per_token(dense_equivalent(args), context)}
    joules = accelerator.joules_per_flop(utilisation)
    energy = {f"{name}_{phase}": getattr(f, phase) * 1e6 * joules / 3600.0
              for name, f in flops.items() for phase in ("forward", "training")}
    return CostReport(context, accelerator, utilisation, params=count_params(args).to_dict(),
                      flops={k: f.to_dict() for k, f in flops.items()},
                      kv_cache=kv_cache_bytes(args, dtype_bytes).to_dict(),
                      energy_wh_per_million=energy)
