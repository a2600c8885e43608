"""The DeepSeek-V3 architecture: MLA, DeepSeekMoE, MTP, YaRN RoPE."""
from dsmoe.model.transformer import ModelOutput, Transformer

__all__ = ["ModelOutput", "Transformer"]
