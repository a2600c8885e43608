"""Hugging Face DeepSeek-V3/V2 checkpoints, read and written exactly.

A checkpoint directory holds `config.json`, safetensors weights (one `model.safetensors`,
or shards listed by `model.safetensors.index.json`) and usually a tokenizer. It is the
model format of the whole project: `load_model_dir` is what every command calls.

Interop is a table plus two symmetric functions pinned by a round-trip test: the tensor
names (`to_hf`/`from_hf`) and config.json (`args_from_hf_config`/`hf_config_from_args`).
One file per job:
    names.py      file names and the tensor-name table, to_hf / from_hf
    config.py     config.json <-> ModelArgs (types checked, DeepSeek's rules where
                  transformers differs)
    read.py       open_checkpoint (every header checked before any allocation), load_hf
    tensor_file.py  plain-read safetensors access (no memory map: loading holds only the model)
    write.py      save_hf (atomic: the previous export survives any failure), write_shards
    model_dir.py  load_model_dir: (model, tokenizer) from a directory
FP8 block dequantisation is `dsmoe/interop/fp8.py`; `dsmoe convert` is `convert.py`.
Equal on every config we build, where our code and transformers' look different: dropped
expert groups (-inf in ours and transformers' V3; 0.0 in its V2, the same since softmax
scores are positive), the 1e-20 in the top-k normalisation, YaRN's softmax scale
get_mscale(factor, mscale_all_dim)**2.
Not here: writing FP8, tensor-parallel shards, other formats (GGUF, .bin).
"""
from dsmoe.interop.hf.config import HFSpec, args_from_hf_config, hf_config_from_args
from dsmoe.interop.hf.model_dir import load_model_dir
from dsmoe.interop.hf.names import (BLOCK_NAMES, CONFIG_FILE, DEFAULT_SHARD_SIZE, EXPERT_NAMES,
                                    INDEX_FILE, MTP_COPIES, MTP_NAMES, SHARD_FILE, SINGLE_FILE,
                                    TOP_NAMES, from_hf, to_hf)
from dsmoe.interop.hf.read import HFCheckpoint, ShardReader, TensorInfo, load_hf, open_checkpoint
from dsmoe.interop.hf.write import ShardEntry, parse_size, save_hf, write_shards

__all__ = ["BLOCK_NAMES", "CONFIG_FILE", "DEFAULT_SHARD_SIZE", "EXPERT_NAMES", "HFCheckpoint",
           "HFSpec", "INDEX_FILE", "MTP_COPIES", "MTP_NAMES", "SHARD_FILE", "SINGLE_FILE",
           "ShardEntry", "ShardReader", "TOP_NAMES", "TensorInfo", "args_from_hf_config",
           "from_hf", "hf_config_from_args", "load_hf", "load_model_dir", "open_checkpoint",
           "parse_size", "save_hf", "to_hf", "write_shards"]
