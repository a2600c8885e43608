"""dsmoe: DeepSeek-V3-style Mixture-of-Experts language models in PyTorch.

Import what you need from here; heavy optional parts (server, plots, transformers
interop) are imported lazily by the functions that use them.
"""
from dsmoe.config import ModelArgs
from dsmoe.model import ModelOutput, Transformer

__all__ = ["ModelArgs", "ModelOutput", "Transformer", "load_hf", "save_hf"]
__version__ = "0.1.0"


def __getattr__(name):  # lazy: interop pulls in safetensors only when used
    if name in ("load_hf", "save_hf"):
        from dsmoe.interop import hf
        return getattr(hf, name)
    raise AttributeError(f"module 'dsmoe' has no attribute {name!r}")
