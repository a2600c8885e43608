"""Routing traces: what `dsmoe route` shows is what the gate chose, with its weights."""
import json
import re

import pytest
import torch

from dsmoe import ModelArgs, Transformer
from dsmoe.analysis.routing import (encode_trace_text, format_table, main_moe_blocks, to_json,
                                    trace_routes)
from dsmoe.data.tokenizer import train_tokenizer
from dsmoe.errors import DataError

TEXTS = ["The quick brown fox jumps over the lazy dog.\n\nLe renard saute par-dessus le chien.",
         "def add(a, b):\n    return a + b\n", "12 + 30 = 42; 7 * 6 = 42"] * 4


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelArgs.from_preset("tiny")).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=300)


def test_trace_is_what_the_forward_pass_chose(model):
    ids = [0, 17, 200, 511, 42, 3]
    trace = trace_routes(model, ids)
    routing = model.run(torch.tensor([ids])).routing
    assert trace.layers == [i for i, _ in main_moe_blocks(model)] == [1, 2]  # block 0 is dense in tiny
    assert trace.experts_LTK.shape == (2, len(ids), model.args.n_activated_experts)
    for l, info in enumerate(routing):
        for t in range(len(ids)):
            chosen = dict(zip(info.ids_TK[t].tolist(), info.weights_TK[t].tolist()))
            shown = dict(zip(trace.experts_LTK[l, t].tolist(), trace.weights_LTK[l, t].tolist()))
            assert shown.keys() == chosen.keys()
            assert shown == pytest.approx(chosen)
    # heaviest first
    assert (trace.weights_LTK[..., :-1] >= trace.weights_LTK[..., 1:]).all()


def test_trace_shows_the_bias_steering_and_unbiased_weights(model):
    # Layer 1's gate: equal affinities (zero weight), so only the aux-free bias decides.
    gate = model.layers[1].ffn.gate
    saved_weight, saved_bias = gate.weight.detach().clone(), gate.bias.clone()
    try:
        with torch.no_grad():
            gate.weight.zero_()
            gate.bias.copy_(torch.tensor([0, 0, 0, 0, 0.1, 0.2, 0.3, 0.4]))
        trace = trace_routes(model, [5, 6, 7])
    finally:
        with torch.no_grad():
            gate.weight.copy_(saved_weight)
            gate.bias.copy_(saved_bias)
    # Groups of 2: {6,7} and {4,5} score highest; top-3 of the biased
    # scores is {5, 6, 7} for every token.
    assert all(sorted(trace.experts_LTK[0, t].tolist()) == [5, 6, 7] for t in range(3))
    # Weights come from the unbiased affinities, all sigmoid(0): 1/3 each x route_scale 2.5.
    torch.testing.assert_close(trace.weights_LTK[0], torch.full((3, 3), 2.5 / 3))


def test_table_and_json_hold_the_same_routes(model, tokenizer):
    ids = encode_trace_text(tokenizer, "def add(a, b):\n\treturn a + b", model.args.max_seq_len)
    texts = [tokenizer.decode([t], skip_special=False) for t in ids]
    trace = trace_routes(model, ids, texts)
    table = format_table(trace).splitlines()
    data = json.loads(json.dumps(to_json(trace)))
    assert "layer 1" in table[0] and "layer 2" in table[0]
    rows = table[2:2 + len(ids)]
    assert len(data["tokens"]) == len(rows) == len(ids)
    assert ids[0] == tokenizer.bos_id and data["tokens"][0]["text"] == "<|bos|>"
    for row, token in zip(rows, data["tokens"]):
        assert "\n" not in row and "\t" not in row  # whitespace tokens are escaped
        cells = re.findall(r"(\d+):(\d\.\d\d)", row)
        from_json = [(str(e), f"{w:.2f}") for route in token["routes"]
                     for e, w in zip(route["experts"], route["weights"])]
        assert cells == from_json
        assert row.split()[1] == str(token["id"])
    assert "".join(t["text"] for t in data["tokens"][1:]) == "def add(a, b):\n\treturn a + b"


def test_main_moe_blocks_are_the_blocks_that_route():
    """The block index beside each MoE layer is the block holding it, dense blocks skipped,
    MTP modules left out, whatever the number of dense blocks."""
    for n_dense in (0, 1, 3):
        torch.manual_seed(0)
        m = Transformer(ModelArgs.from_preset("tiny").replace(n_layers=4, n_dense_layers=n_dense,
                                                              n_mtp_layers=1))
        blocks = main_moe_blocks(m)
        assert [i for i, _ in blocks] == [i for i, block in enumerate(m.layers) if block.is_moe]
        assert all(m.layers[i].ffn is moe for i, moe in blocks)
        assert len(m.run(torch.tensor([[1, 2, 3]])).routing) == len(blocks)


def test_prompt_errors_are_clear(tokenizer):
    with pytest.raises(DataError, match="max_seq_len=8"):
        encode_trace_text(tokenizer, "The quick brown fox jumps over the lazy dog.", max_seq_len=8)
    with pytest.raises(DataError, match="prompt is empty"):
        encode_trace_text(tokenizer, "  \n", max_seq_len=128)


# --- the command ----------------------------------------------------------------------------------

def test_route_command_prints_the_trace_of_the_saved_model(model, tokenizer, tmp_path, capsys):
    from dsmoe.cli import main
    from dsmoe.interop.hf import load_model_dir, save_hf

    save_hf(model, tmp_path / "m", tokenizer=tokenizer)
    (tmp_path / "prompt.txt").write_text("12 + 30 = 42\n")
    assert main(["route", "--model", str(tmp_path / "m"), "--file", str(tmp_path / "prompt.txt"),
                 "--json", str(tmp_path / "trace.json")]) == 0
    printed = capsys.readouterr().out
    loaded, loaded_tokenizer = load_model_dir(tmp_path / "m")
    ids = encode_trace_text(loaded_tokenizer, "12 + 30 = 42\n", loaded.args.max_seq_len)
    expected = to_json(trace_routes(loaded, ids, [loaded_tokenizer.decode([t], skip_special=False) for t in ids]))
    assert json.loads((tmp_path / "trace.json").read_text()) == expected
    assert printed.splitlines()[0].startswith("pos") and len(printed.splitlines()) == len(ids) + 3
    assert main(["route", "--model", str(tmp_path / "m"), "--prompt", "x " * 200]) == 1
    assert "max_seq_len=128" in capsys.readouterr().err
    assert main(["route", "--model", str(tmp_path / "m"), "--file", str(tmp_path / "nope.txt")]) == 1
    assert "no such file" in capsys.readouterr().err
