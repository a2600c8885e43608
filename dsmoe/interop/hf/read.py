"""Reading Hugging Face DeepSeek checkpoints: check everything, then load without copies.

Notable:
- Everything is checked from the safetensors headers before any tensor is allocated
  (`open_checkpoint`): the config, every shard of the index, each key's name, shape and
  dtype, FP8 scales. A bad checkpoint raises CheckpointError/ConfigError naming the file
  and the key; no half-loaded model is ever returned.
- A checkpoint is never held twice: the model is built on the meta device in the target
  dtype and allocated empty, then the shards are read one at a time with plain file reads
  (tensor_file.py; no memory map, whose pages would stay resident beside the model) and
  each tensor goes into its slot: routed experts straight into their row of the stacked
  (E, F, D) weight, FP8 weights dequantised a row of blocks at a time into the slot.
  Peak: the model plus one 4 MiB conversion buffer. Measured on a 985 MiB fp32 checkpoint
  in one file (tests/interop/test_hf_load_memory.py run as a program): 19 MiB over the
  model (0.02x), against 740 MiB (0.75x) memory-mapped.
- A config that announces MTP layers the files do not hold (what transformers'
  save_pretrained writes) loads without MTP, with a warning.
- A deepseek_v3 config with rope_interleave=false gets its rotary rows of q and k permuted
  into interleaved pairs on load (q.k is unchanged).
Not here: the name table (names.py), config.json (config.py), tokenizers (model_dir.py).
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dsmoe.config import ModelArgs, read_json_object
from dsmoe.device import parse_dtype, resolve_device
from dsmoe.errors import CheckpointError, ConfigError
from dsmoe.interop import fp8
from dsmoe.interop.hf.config import HFSpec, args_from_hf_config
from dsmoe.interop.hf.names import (CONFIG_FILE, INDEX_FILE, SINGLE_FILE, TOP_NAMES, Slot, from_hf,
                                    to_hf)
from dsmoe.interop.hf.tensor_file import TensorFile, row_chunks
from dsmoe.model import Transformer
from dsmoe.model.rope import rope_tables

_FLOAT_DTYPES = {"F32", "F16", "BF16", "F64"}
_FP8_DTYPE = "F8_E4M3"


@dataclass
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: F32, BF16, F8_E4M3, ...


@dataclass
class HFCheckpoint:
    """A checked checkpoint: its config, the header of every tensor and where each goes."""
    path: Path
    config: dict
    spec: HFSpec
    tensors: dict[str, TensorInfo]
    sources: dict[str, list[Slot]] = field(default_factory=dict)  # hf name -> slots it fills
    unstored: list[str] = field(default_factory=list)  # our tensors the format omits (zeros)

    @property
    def args(self) -> ModelArgs:
        return self.spec.args

    def scale_key(self, hf_name: str) -> str | None:
        """The `weight_scale_inv` of an FP8 tensor, None for any other."""
        return hf_name + "_scale_inv" if self.tensors[hf_name].dtype == _FP8_DTYPE else None

    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in {t.file for t in self.tensors.values()})


def _read_headers(path: Path) -> dict[str, TensorInfo]:
    """Name, shape and dtype of every tensor, from the safetensors headers only."""
    from safetensors import safe_open

    index_file, single = path / INDEX_FILE, path / SINGLE_FILE
    if index_file.is_file():
        weight_map = read_json_object(index_file, "tensor names", CheckpointError).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_file} has no weight_map")
        files = sorted(set(weight_map.values()))
    elif single.is_file():
        weight_map, files = None, [SINGLE_FILE]
    else:
        raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}: not a Hugging Face "
                              "safetensors checkpoint (convert .bin checkpoints with transformers first)")
    tensors: dict[str, TensorInfo] = {}
    for name in files:
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{index_file} lists shard {name}, which is missing from {path}")
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    s = f.get_slice(key)
                    if key in tensors:
                        raise CheckpointError(f"{key} is stored twice: in {tensors[key].file.name} and {name}")
                    tensors[key] = TensorInfo(file, tuple(s.get_shape()), s.get_dtype())
        except CheckpointError:
            raise
        except Exception as err:  # safetensors raises its own error types for bad files
            raise CheckpointError(f"{file} is not a readable safetensors file ({err}); "
                                  "it may be truncated: download it again") from None
    if weight_map is not None:
        for key, name in weight_map.items():
            if key not in tensors or tensors[key].file.name != name:
                raise CheckpointError(f"{index_file} says {key} is in {name}, but {name} does not hold it")
        stray = sorted(set(tensors) - set(weight_map))
        if stray:
            raise CheckpointError(f"{tensors[stray[0]].file.name} holds {stray[0]}, which {INDEX_FILE} "
                                  f"does not list ({len(stray)} such tensors)")
    return tensors


def _meta_model(args: ModelArgs, dtype: torch.dtype = torch.float32) -> Transformer:
    """The model with no storage, its parameters in `dtype` (the gate bias and RoPE tables
    stay fp32, as the model builds them)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            return Transformer(args)
    finally:
        torch.set_default_dtype(previous)


def _expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in _meta_model(args).state_dict().items()}


def open_checkpoint(path: str | Path) -> HFCheckpoint:
    """Read and check a checkpoint directory (config and headers; no tensor data)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory; give a Hugging Face checkpoint directory "
                              "(config.json + *.safetensors)")
    if not (path / CONFIG_FILE).is_file():
        raise CheckpointError(f"no {CONFIG_FILE} in {path}: not a Hugging Face checkpoint directory")
    config = read_json_object(path / CONFIG_FILE, "model settings", ConfigError)
    spec = args_from_hf_config(config, str(path / CONFIG_FILE))
    tensors = _read_headers(path)
    args = spec.args
    if args.n_mtp_layers and not any(from_hf(k, args) and from_hf(k, args)[0].startswith("mtp.")
                                     for k in tensors):
        warnings.warn(f"{path / CONFIG_FILE} announces {args.n_mtp_layers} MTP layer(s) "
                      f"(model.layers.{args.n_layers}...) but the checkpoint holds none: loading without MTP",
                      stacklevel=3)
        spec.args = args = args.replace(n_mtp_layers=0)
    ckpt = HFCheckpoint(path, config, spec, tensors)
    _plan(ckpt)
    return ckpt


def _plan(ckpt: HFCheckpoint) -> None:
    """Map every tensor of the model to the checkpoint tensor it is read from, checking
    names, shapes and dtypes; fills ckpt.sources / ckpt.unstored or raises."""
    args, tensors = ckpt.args, ckpt.tensors
    accounted: set[str] = set()
    missing: list[str] = []

    def check(key: str, shape: tuple[int, ...], ours: str) -> None:
        info = tensors[key]
        where = f"{info.file.name}: {key}"
        if info.shape != shape:
            raise CheckpointError(f"{where} has shape {list(info.shape)} but {CONFIG_FILE} gives "
                                  f"{list(shape)} (for {ours}); the weights do not match the config")
        if info.dtype == _FP8_DTYPE and len(shape) == 2:
            scale = key + "_scale_inv"
            block = ckpt.spec.fp8_block or fp8.DEFAULT_BLOCK
            if scale not in tensors:
                raise CheckpointError(f"{where} is FP8 but its scale {scale} is missing")
            want = fp8.scale_shape(shape, block)
            if tensors[scale].shape != want or tensors[scale].dtype not in _FLOAT_DTYPES:
                raise CheckpointError(f"{tensors[scale].file.name}: {scale} has shape "
                                      f"{list(tensors[scale].shape)} {tensors[scale].dtype}; a float "
                                      f"{list(want)} is expected for {block[0]}x{block[1]} blocks")
            accounted.add(scale)
        elif info.dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"{where} has dtype {info.dtype}; a floating-point tensor "
                                  f"(F32, BF16, F16 or FP8 e4m3 with scales) is expected")
        accounted.add(key)

    for ours, shape in _expected_shapes(args).items():
        names = to_hf(ours, args)
        if not names:
            ckpt.unstored.append(ours)
        seen: set[int | None] = set()
        for key, expert in names:
            slot_shape = shape if expert is None else shape[1:]
            if expert in seen:  # a copy for other tools: checked if present, not read
                if key in tensors:
                    check(key, slot_shape, ours)
                continue
            seen.add(expert)
            if key not in tensors and ours == "head.weight" and ckpt.spec.tied:
                key = TOP_NAMES["embed.weight"]
            if key not in tensors:
                missing.append(key)
                continue
            check(key, slot_shape, ours)
            ckpt.sources.setdefault(key, []).append((ours, expert))
    if missing:
        raise CheckpointError(f"{len(missing)} tensor(s) that {CONFIG_FILE} requires are not in {ckpt.path}, "
                              f"e.g. {missing[:4]}; the checkpoint is incomplete or the config does not describe it")
    unexpected = sorted(set(tensors) - accounted)
    if unexpected:
        key = unexpected[0]
        hint = ""
        if (m := re.match(r"model\.layers\.(\d+)\.", key)) and int(m[1]) >= args.n_layers:
            hint = f" (an MTP layer? set num_nextn_predict_layers in {CONFIG_FILE})"
        raise CheckpointError(f"{tensors[key].file.name}: {key} is not part of the model {CONFIG_FILE} "
                              f"describes{hint}; {len(unexpected)} unexpected tensor(s), e.g. {unexpected[:4]}")


class ShardReader:
    """Reads tensors by name with plain file reads (tensor_file.py), never memory-mapped, so
    nothing of a shard stays resident beside the model. The loader reads shard by shard and
    keeps one file open, dropping its page cache when done (`keep_open=False`); a reader of
    experts on demand keeps every shard open. FP8 tensors come back dequantised when asked."""

    def __init__(self, ckpt: HFCheckpoint, keep_open: bool = False):
        self.ckpt = ckpt
        self.keep_open = keep_open
        self._files: dict[Path, TensorFile] = {}

    def _file(self, key: str) -> TensorFile:
        path = self.ckpt.tensors[key].file
        if path not in self._files:
            if not self.keep_open:
                self.close()
            self._files[path] = TensorFile(path)
        return self._files[path]

    def raw(self, key: str) -> torch.Tensor:
        return self._file(key).read(key)

    def read_into(self, key: str, out: torch.Tensor) -> None:
        """Copy tensor `key` into `out` (any dtype/device), dequantising FP8 on the way."""
        scale_key = self.ckpt.scale_key(key)
        if scale_key is None:
            self._file(key).read_into(key, out)
            return
        for start, stop, rows in self.float_rows(key):
            out[start:stop].copy_(rows)

    def float_rows(self, key: str):
        """(start, stop, fp32 rows) chunks of tensor `key` (at most CHUNK_BYTES of fp32 each),
        FP8 dequantised a row of blocks at a time: what quantising on load reads."""
        shape = self.ckpt.tensors[key].shape
        scale_key = self.ckpt.scale_key(key)
        block = self.ckpt.spec.fp8_block or fp8.DEFAULT_BLOCK
        multiple = block[0] if scale_key is not None else 1
        scale = self.raw(scale_key).float() if scale_key is not None else None
        for start, stop in row_chunks(shape, 4, multiple=multiple):
            rows = self._file(key).read_rows(key, start, stop)
            if scale is None:
                yield start, stop, rows.float()
            else:
                yield start, stop, fp8.dequantize(rows, scale[start // block[0]:-(-stop // block[0])], block)

    def close(self) -> None:
        for f in self._files.values():
            f.drop_cache()
            f.close()
        self._files.clear()


def progress(iterable=None, **kw):
    from tqdm import tqdm

    return tqdm(iterable, disable=None, leave=False, **kw)  # shown only on a terminal


def load_hf(path: str | Path, dtype: str | torch.dtype | None = None,
            device: str | torch.device | None = None, **options) -> Transformer:
    """A Transformer from a Hugging Face DeepSeek-V3/V2 checkpoint directory, in eval mode.
    dtype/device default to dsmoe.device's choice (fp32 on CPU, bf16 on CUDA); `options`
    are build_model's (quantize, prepare)."""
    return build_model(open_checkpoint(path), dtype, device, **options)  # everything checked first


@torch.no_grad()
def build_model(ckpt: HFCheckpoint, dtype, device, quantize: str | None = None, prepare=None) -> Transformer:
    """`quantize`: 'int8' swaps in int8 modules (dsmoe/model/quant.py) and quantises each
    tensor a few rows at a time as it is read. `prepare(meta_model, ckpt)`: called before any
    storage exists, e.g. to replace routed experts by ones kept on disk; the loader reads
    only the tensors the prepared model still holds."""
    device = resolve_device(device)
    dtype = parse_dtype(dtype, device)
    model = _meta_model(ckpt.args, dtype)
    if prepare is not None:  # ---- hook: experts from disk (dsmoe/infer/expert_store.py)
        prepare(model, ckpt)
    if quantize:  # ---- hook: int8 weights (dsmoe/model/quant.py)
        from dsmoe.model.quant import quantize_modules
        quantize_modules(model, quantize)
    model = model.to_empty(device=device)
    state = model.state_dict()
    reader = ShardReader(ckpt)
    try:
        keys = sorted(ckpt.sources, key=lambda k: (ckpt.tensors[k].file.name, k))  # shard by shard
        for key in progress(keys, desc=f"loading {ckpt.path.name}", unit="tensor"):
            for ours, expert in ckpt.sources[key]:
                if ours in state:
                    reader.read_into(key, state[ours] if expert is None else state[ours][expert])
                elif ours + "_q" in state:
                    _read_quantized(reader, key, state, ours, expert)
                elif ".experts." not in ours:  # only routed experts may be kept elsewhere
                    raise CheckpointError(f"the model has no slot for {ours} ({key})")
    finally:
        reader.close()
    for ours in ckpt.unstored:
        if ours in state:
            state[ours].zero_()
    if not ckpt.spec.rope_interleave:
        _permute_rope_rows(state, ckpt.args)
    cos, sin = rope_tables(ckpt.args)  # buffers are not in checkpoints: rebuild them
    model.rope_cos.copy_(cos)
    model.rope_sin.copy_(sin)
    return model.eval()


def _read_quantized(reader: ShardReader, key: str, state: dict, ours: str, expert: int | None) -> None:
    """Quantise `key` into `<ours>_q` / `<ours>_scale` (one expert's rows of them), a chunk
    of rows at a time: no full-precision copy of the tensor exists at once."""
    from dsmoe.model.quant import quantize_rows

    q, scale = state[ours + "_q"], state[ours + "_scale"]
    if expert is not None:
        q, scale = q[expert], scale[expert]
    for start, stop, rows in reader.float_rows(key):
        q_rows, scale_rows = quantize_rows(rows)
        q[start:stop].copy_(q_rows)
        scale[start:stop].copy_(scale_rows)


def _permute_rope_rows(state: dict[str, torch.Tensor], args: ModelArgs) -> None:
    """rotate_half layout (pairs i, i+R/2) -> interleaved pairs (2i, 2i+1), in place, on the
    rows of q and k that carry RoPE."""
    half = args.qk_rope_head_dim // 2
    perm = torch.stack([torch.arange(half), torch.arange(half) + half], dim=-1).flatten()
    for name, w in state.items():
        perm = perm.to(w.device)
        if name.endswith(tuple(f"attn.{m}.weight{s}" for m in ("wq", "wq_b") for s in ("", "_q", "_scale"))):
            rope_rows = w.view(args.n_heads, args.qk_head_dim, -1)[:, args.qk_nope_head_dim:]
            rope_rows.copy_(rope_rows[:, perm])
        elif name.endswith(("attn.wkv_a.weight", "attn.wkv_a.weight_q", "attn.wkv_a.weight_scale")):
            rope_rows = w[args.kv_lora_rank:]
            rope_rows.copy_(rope_rows[perm])

