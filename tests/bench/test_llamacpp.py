"""The llama.cpp glue of bench/: the pre-tokenizer rule, the benchmark's rows without a
build, the roofline's bytes per token, and (where llama.cpp is built) conversion of a
dsmoe export whose tokenization matches ours."""
import json
import math

import pytest
import torch

from bench import decode, llamacpp, quant
from dsmoe import ModelArgs, Transformer, save_hf
from dsmoe.data.tokenizer import train_tokenizer
from dsmoe.errors import DsmoeError

TEXTS = ["The year 2024 had 365 days.", "café naïve, x = 3.14; it's fine!", "def f(x):\n    return x + 1\n"] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=400)


def test_our_pre_tokenizer_is_the_one_named(tokenizer):
    spec = json.loads(tokenizer._tok.to_str())
    llamacpp.check_pre_tokenizer(spec)  # ours: digits split, then the GPT-2 regex
    byte_level_only = {**spec, "pre_tokenizer": spec["pre_tokenizer"]["pretokenizers"][1]}
    with pytest.raises(DsmoeError, match="starcoder"):
        llamacpp.check_pre_tokenizer(byte_level_only)
    no_regex = json.loads(json.dumps(spec))
    no_regex["pre_tokenizer"]["pretokenizers"][1]["use_regex"] = False
    with pytest.raises(DsmoeError, match="pre-tokenizer"):
        llamacpp.check_pre_tokenizer(no_regex)


def test_rows_say_how_to_build_when_absent(tmp_path, monkeypatch):
    monkeypatch.setenv("DSMOE_LLAMACPP_DIR", str(tmp_path))
    assert not llamacpp.available()
    rows = decode.llamacpp_rows(True)
    assert rows and all(math.isnan(r["value"]) for r in rows)
    assert all("python -m bench.llamacpp build" in r["note"] and str(tmp_path) in r["note"] for r in rows)
    q8 = quant.llamacpp_q8_rows(str(tmp_path), None, [[1]], 2, 1)  # int8 against Q8_0
    assert q8 and all(math.isnan(r["value"]) and "python -m bench.llamacpp build" in r["note"] for r in q8)
    with pytest.raises(DsmoeError, match="bench.llamacpp build"):
        llamacpp.convert(tmp_path, tmp_path / "x.gguf")


def test_bytes_per_token_counts_what_a_step_reads():
    args = ModelArgs.from_preset("tiny").replace(n_mtp_layers=0)
    model = Transformer(args)
    share = args.n_activated_experts / args.n_routed_experts
    read = 0.0
    for name, p in model.named_parameters():
        if name == "embed.weight":
            read += args.dim  # one row of the table
        elif ".experts.w" in name:
            read += p.numel() * share
        else:
            read += p.numel()
    read += model.layers[args.n_dense_layers].ffn.gate.bias.numel() * (args.n_layers - args.n_dense_layers)
    cache = args.n_layers * (args.kv_lora_rank + args.qk_rope_head_dim) * 100
    assert decode.activated_bytes_per_token(args, 100) == pytest.approx(4 * (read + cache))


@pytest.mark.skipif(not llamacpp.available() or llamacpp.tool("llama-tokenize") is None,
                    reason="llama.cpp is not built (python -m bench.llamacpp build)")
def test_convert_and_tokenize_like_ours(tmp_path, tokenizer, monkeypatch):
    monkeypatch.syspath_prepend(str(llamacpp.source_dir() / "gguf-py"))  # the converter's own gguf
    from gguf import GGUFReader
    args = ModelArgs.from_preset("tiny").replace(n_mtp_layers=0, vocab_size=tokenizer.vocab_size)
    torch.manual_seed(0)
    save_hf(Transformer(args), tmp_path / "hf", tokenizer=tokenizer)
    out = llamacpp.convert(tmp_path / "hf", tmp_path / "m.gguf")
    fields = GGUFReader(out).fields
    pre = fields["tokenizer.ggml.pre"]
    assert bytes(pre.parts[pre.data[0]]).decode() == llamacpp.PRE_TOKENIZER
    llamacpp.check_tokenization(out, tokenizer)
    for text in TEXTS[:3] + ["  leading spaces and 12345 digits\n\n", "ÀÉÎ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ½ ² ٣"]:
        assert llamacpp.llama_tokens(out, text) == tokenizer.encode(text), text
