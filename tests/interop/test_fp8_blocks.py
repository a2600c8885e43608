"""FP8 e4m3 block scales: dequantisation against a by-hand reference (partial edge blocks
included), and FP8 checkpoints loaded and converted against their dequantised reference."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsmoe.cli import main as cli_main
from dsmoe.errors import CheckpointError
from dsmoe.interop import fp8
from dsmoe.interop.hf import INDEX_FILE, load_hf

# transformers' save_pretrained announces an MTP layer it does not write (tested in test_hf_checkpoint_errors)
pytestmark = pytest.mark.filterwarnings("ignore:.*announces 1 MTP layer")


def reference_dequantize(q, scale_inv, block):
    """Block by block, the definition: W[i, j] = q[i, j] * scale_inv[i // bo, j // bi]."""
    out = torch.empty(q.shape)
    bo, bi = block
    for r in range(scale_inv.shape[0]):
        for c in range(scale_inv.shape[1]):
            out[r * bo:(r + 1) * bo, c * bi:(c + 1) * bi] = (
                q[r * bo:(r + 1) * bo, c * bi:(c + 1) * bi].float() * scale_inv[r, c])
    return out


@pytest.mark.parametrize("shape, block", [((300, 200), (128, 128)), ((576, 256), (128, 128)),
                                          ((96, 64), (16, 24)), ((5, 7), (128, 128))])
def test_dequantize_matches_blockwise_definition(shape, block):
    torch.manual_seed(0)
    w = torch.randn(shape) * torch.logspace(-3, 1, shape[1])  # blocks of very different ranges
    q, scale_inv = fp8.quantize(w, block)
    assert q.dtype == torch.float8_e4m3fn and q.shape == shape
    assert tuple(scale_inv.shape) == fp8.scale_shape(shape, block)
    deq = fp8.dequantize(q, scale_inv, block)
    assert torch.equal(deq, reference_dequantize(q, scale_inv, block))
    # e4m3 keeps 3 mantissa bits: relative error 2^-4, plus subnormal spacing near zero
    bound = w.abs() * 2 ** -4 + reference_dequantize(torch.ones(shape), scale_inv, block) * 2 ** -9
    assert bool(((deq - w).abs() <= bound).all())
    # quantising what dequantisation gives back changes nothing
    q2, s2 = fp8.quantize(deq, block)
    assert torch.equal(q2.float(), q.float()) and torch.equal(s2, scale_inv)


def test_dequantize_writes_into_a_bf16_slot():
    q, s = fp8.quantize(torch.randn(130, 140))
    out = torch.empty(130, 140, dtype=torch.bfloat16)
    fp8.dequantize(q, s, out=out)
    assert torch.equal(out, fp8.dequantize(q, s).bfloat16())


def test_dequantize_rejects_scales_of_the_wrong_shape():
    q, s = fp8.quantize(torch.randn(130, 140))
    with pytest.raises(ValueError, match="does not fit"):
        fp8.dequantize(q, s[:1])


QUANTISED = ("self_attn.", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "mlp.experts.", "mlp.shared_experts.")


def write_fp8_checkpoint(src, dst, block):
    """DeepSeek's layout: linear weights in e4m3 with weight_scale_inv, the rest as they were.
    Two shards, and scales stored in the other shard than their weight (allowed by the index).
    Returns the dequantised reference state (HF names)."""
    tensors = {}
    for file in src.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            tensors |= {k: f.get_tensor(k) for k in f.keys()}
    shards, reference = ({}, {}), {}
    for i, (key, w) in enumerate(sorted(tensors.items())):
        if w.dim() == 2 and any(p in key for p in QUANTISED) and not key.endswith("layernorm.weight"):
            q, scale = fp8.quantize(w, block)
            shards[i % 2][key], shards[1 - i % 2][key + "_scale_inv"] = q, scale
            reference[key] = reference_dequantize(q, scale, block)
        else:
            shards[i % 2][key] = reference[key] = w
    dst.mkdir()
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    for name, shard in zip(names, shards):
        save_file(shard, str(dst / name), metadata={"format": "pt"})
    weight_map = {k: name for name, shard in zip(names, shards) for k in shard}
    (dst / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "weight_block_size": list(block)}
    (dst / "config.json").write_text(json.dumps(config))
    (dst / "generation_config.json").write_text("{}")
    return reference


def write_reference(reference, src, dst):
    dst.mkdir()
    save_file(reference, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text((src / "config.json").read_text())


@pytest.mark.parametrize("block", [(128, 128), (16, 24)])
def test_fp8_checkpoint_loads_as_its_dequantised_reference(block, hf_checkpoint, prompt, tmp_path):
    src, _ = hf_checkpoint("v3")
    reference = write_fp8_checkpoint(src, tmp_path / "fp8", block)
    write_reference(reference, src, tmp_path / "ref")
    model, expected = load_hf(tmp_path / "fp8"), load_hf(tmp_path / "ref")
    for (k, a), (_, b) in zip(model.state_dict().items(), expected.state_dict().items()):
        assert torch.equal(a, b), k
    assert torch.equal(model(prompt), expected(prompt))


def test_convert_fp8_to_fp32_and_bf16(hf_checkpoint, tmp_path, capsys):
    src, _ = hf_checkpoint("v3")
    reference = write_fp8_checkpoint(src, tmp_path / "fp8", (16, 24))
    write_reference(reference, src, tmp_path / "ref")
    expected = load_hf(tmp_path / "ref").state_dict()
    assert cli_main(["convert", str(tmp_path / "fp8"), str(tmp_path / "fp32"), "--dtype", "fp32",
                     "--shard-size", "100KB"]) == 0
    assert "wrote" in capsys.readouterr().out
    config = json.loads((tmp_path / "fp32" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert (tmp_path / "fp32" / INDEX_FILE).is_file() and (tmp_path / "fp32" / "generation_config.json").is_file()
    for k, v in load_hf(tmp_path / "fp32").state_dict().items():
        assert torch.equal(v, expected[k]), k
    assert cli_main(["convert", str(tmp_path / "fp8"), str(tmp_path / "bf16")]) == 0
    with safe_open(tmp_path / "bf16" / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias").dtype == torch.float32
        assert f.get_tensor("model.layers.1.mlp.experts.3.up_proj.weight").dtype == torch.bfloat16
    for k, v in load_hf(tmp_path / "bf16", dtype="bf16").state_dict().items():
        assert torch.equal(v, expected[k].to(v.dtype)), k
    # a non-empty destination is refused before any work
    assert cli_main(["convert", str(tmp_path / "fp8"), str(tmp_path / "bf16")]) == 1
    assert "not an empty directory" in capsys.readouterr().err


def test_fp8_weight_without_its_scale_is_refused(hf_checkpoint, tmp_path):
    src, _ = hf_checkpoint("v3")
    write_fp8_checkpoint(src, tmp_path / "fp8", (128, 128))
    index = json.loads((tmp_path / "fp8" / INDEX_FILE).read_text())
    key = "model.layers.0.self_attn.o_proj.weight_scale_inv"
    file = tmp_path / "fp8" / index["weight_map"].pop(key)
    with safe_open(file, "pt") as f:
        kept = {k: f.get_tensor(k) for k in f.keys() if k != key}
    save_file(kept, str(file), metadata={"format": "pt"})
    (tmp_path / "fp8" / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="o_proj.weight is FP8 but its scale .* is missing"):
        load_hf(tmp_path / "fp8")
