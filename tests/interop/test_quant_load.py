"""`--quantize int8` while loading: quantising each tensor a few rows at a time as it is read
gives exactly the int8 model that quantising the loaded full-precision model gives, from
bf16 files, from FP8 block-quantised files (dequantised a row of blocks at a time on the
way) and from a checkpoint whose RoPE rows must be permuted (rope_interleave=false)."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsmoe.interop import fp8
from dsmoe.interop.hf import load_hf
from dsmoe.model.quant import quantize_modules


def write_fp8_checkpoint(src, dst, block):
    """Every projection weight in e4m3 with its weight_scale_inv, one file."""
    tensors = {}
    for file in src.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            for k in f.keys():
                w = f.get_tensor(k)
                if k.endswith("proj.weight") and w.dim() == 2:
                    tensors[k], tensors[k + "_scale_inv"] = fp8.quantize(w, block)
                else:
                    tensors[k] = w
    dst.mkdir()
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "weight_block_size": list(block)}
    (dst / "config.json").write_text(json.dumps(config))


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.filterwarnings("ignore:.*announces")
@pytest.mark.parametrize("fp8_block", [None, (16, 24)])
def test_quantised_on_load_equals_quantised_after_load(hf_checkpoint, prompt, tmp_path, fp8_block):
    path, _ = hf_checkpoint("v3")  # transformers' files: rotate-half RoPE rows, several shards
    if fp8_block is not None:
        write_fp8_checkpoint(path, tmp_path / "fp8", fp8_block)
        path = tmp_path / "fp8"
    on_load = load_hf(path, dtype="fp32", quantize="int8")
    after = quantize_modules(load_hf(path, dtype="fp32"))
    _assert_same_state(on_load, after)
    with torch.no_grad():
        assert torch.equal(on_load(prompt), after(prompt))
    assert on_load.layers[-1].attn.wkv_a.weight_q.dtype == torch.int8
