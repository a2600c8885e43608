"""dsmoe: DeepSeek-V3-style Mixture-of-Experts language models in PyTorch.

Import what you need from here; heavy optional parts (server, plots, transformers
interop) are imported lazily by the functions that use them.
"""
import os

# Before torch loads its OpenMP runtime: worker threads that spin while they wait collapse
# when the CPU is shared (a browser, another job): a training step on 2 busy cores ran
# 5-10x slower than with waits that sleep, which cost a few per cent on an idle machine.
# An explicit OMP_WAIT_POLICY wins; importing torch before dsmoe leaves torch's default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from dsmoe.config import ModelArgs  # noqa: E402
from dsmoe.model import ModelOutput, Transformer  # noqa: E402

__all__ = ["ModelArgs", "ModelOutput", "Transformer", "load_hf", "save_hf"]
__version__ = "0.1.0"


def __getattr__(name):  # lazy: interop pulls in safetensors only when used
    if name in ("load_hf", "save_hf"):
        from dsmoe.interop import hf
        return getattr(hf, name)
    raise AttributeError(f"module 'dsmoe' has no attribute {name!r}")
