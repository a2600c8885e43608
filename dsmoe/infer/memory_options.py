"""The two "run big on little" options of `generate` and `serve`, defined once: int8 weights
(`--quantize int8`, dsmoe/model/quant.py) and routed experts kept on disk with an LRU of hot
ones in a byte budget (`--max-expert-memory SIZE`, expert_store.py). Both act while the
model is loaded (the loader's `quantize` and `prepare` options), so neither ever holds the
full-precision model or every expert. They combine.
Not here: the prefix cache (its own module and flags).
"""
from __future__ import annotations

from dsmoe.model.quant import QUANTIZE_MODES, check_mode


def add_memory_arguments(parser) -> None:
    parser.add_argument("--quantize", default=None, choices=QUANTIZE_MODES,
                        help="weight-only int8 for linear, embedding and expert weights (~0.27x the fp32 bytes)")
    parser.add_argument("--max-expert-memory", default=None, metavar="SIZE",
                        help="keep routed experts in the checkpoint files and at most SIZE (e.g. 512MB) "
                             "of the most recently used in memory")


def load_options(quantize: str | None = None, max_expert_memory: str | int | None = None, device=None) -> dict:
    """The loader's options (build_model's `quantize`, `prepare`) for these flags; checked
    before anything is loaded."""
    options = {"quantize": check_mode(quantize)}
    if max_expert_memory is not None:
        from dsmoe.device import resolve_device
        from dsmoe.infer.expert_store import offload_experts

        options["prepare"] = offload_experts(max_expert_memory, resolve_device(device), options["quantize"])
    return options
