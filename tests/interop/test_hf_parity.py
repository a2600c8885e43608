"""dsmoe against transformers on the same weights, both ways: logits within 1e-4 (fp32) and
32 greedy tokens identical, for every config in conftest.HF_CONFIGS."""
import json

import pytest
import torch
from safetensors import safe_open

from dsmoe import ModelArgs, Transformer, load_hf, save_hf
from dsmoe.infer.cache import LatentCache
from dsmoe.interop.hf import INDEX_FILE, from_hf, to_hf

ATOL = 1e-4
# transformers' save_pretrained announces an MTP layer it does not write (tested in test_hf_checkpoint_errors)
pytestmark = pytest.mark.filterwarnings("ignore:.*announces 1 MTP layer")


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def disk_keys(path):
    """Every tensor name in a checkpoint's files (not in transformers' in-memory state)."""
    keys = set()
    for file in path.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            keys |= set(f.keys())
    return keys


def greedy(model, prompt, n):
    """Our greedy decode through the latent cache (absorbed attention for the new tokens)."""
    cache = LatentCache(model.args, prompt.shape[0], prompt.shape[1] + n)
    with torch.no_grad():
        logits = model(prompt, cache)
        out = []
        for _ in range(n):
            out.append(logits[:, -1].argmax(-1, keepdim=True))
            logits = model(out[-1], cache)
    return torch.cat(out, dim=1)


def test_transformers_checkpoint_gives_equal_logits(hf_name, hf_checkpoint, prompt):
    path, hf = hf_checkpoint(hf_name)
    assert (path / INDEX_FILE).is_file()
    ours = load_hf(path)
    torch.testing.assert_close(ours(prompt), hf_logits(hf, prompt), atol=ATOL, rtol=0)


def test_greedy_tokens_match_transformers_generate(hf_name, hf_checkpoint, prompt):
    path, hf = hf_checkpoint(hf_name)
    ours = load_hf(path)
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=32, do_sample=False)[:, prompt.shape[1]:]
    assert theirs.shape == (2, 32)
    assert torch.equal(greedy(ours, prompt, 32), theirs)


def test_our_checkpoint_loads_in_transformers(hf_name, hf_checkpoint, prompt, tmp_path):
    import transformers

    path, _ = hf_checkpoint(hf_name)
    args = load_hf(path).args.replace(n_mtp_layers=1)  # MTP written where DeepSeek keeps it
    torch.manual_seed(2)
    ours = Transformer(args).eval()
    if args.score_func == "sigmoid":
        for moe in ours.moe_layers():
            moe.gate.bias.normal_(0.0, 0.1)
    save_hf(ours, tmp_path, shard_size="150KB")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(hf_logits(theirs, prompt), ours(prompt), atol=ATOL, rtol=0)
    # our files hold exactly transformers' names for the main stack, plus the MTP layer
    mtp_layer = f"model.layers.{args.n_layers}."
    assert {k for k in disk_keys(tmp_path) if not k.startswith(mtp_layer)} == disk_keys(path)
    assert f"{mtp_layer}eh_proj.weight" in disk_keys(tmp_path)
    # and reading them back is exact, MTP included
    back = load_hf(tmp_path)
    assert back.args == args
    for (k, a), (_, b) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k
    out, out_back = ours.run(prompt, mtp=True), back.run(prompt, mtp=True)
    assert torch.equal(out.mtp_logits[0], out_back.mtp_logits[0])


def test_transformers_checkpoint_names_round_trip(hf_checkpoint):
    """Every name in transformers' files maps to one of our tensors and back (the table)."""
    path, _ = hf_checkpoint("v3")
    args = load_hf(path).args
    expected = set()
    for ours, tensor in Transformer(args).state_dict().items():
        for key, expert in to_hf(ours, args):
            assert from_hf(key, args) == (ours, expert)
            expected.add(key)
    assert expected == disk_keys(path)


def test_rope_layout_is_recorded_as_interleaved(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint("v3-rotate-half")
    assert json.loads((path / "config.json").read_text())["rope_interleave"] is False
    save_hf(load_hf(path), tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["rope_interleave"] is True


@pytest.mark.parametrize("changes", [
    dict(n_routed_experts=12, n_mtp_layers=2),  # grown experts, deeper MTP
    dict(rope_factor=4.0, original_seq_len=32, mscale=0.707, mscale_all_dim=0.0),  # explicit attention_factor
    dict(score_func="softmax", topk_method="greedy", n_expert_groups=1, n_limited_groups=1,
         norm_topk_prob=False, route_scale=3.0, q_lora_rank=0),
], ids=["experts12-mtp2", "yarn-attention-factor", "softmax-greedy"])
def test_models_beyond_the_configs_load_in_transformers(changes, tmp_path):
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(3)
    ours = Transformer(ModelArgs.from_preset("tiny").replace(**changes)).eval()
    if ours.args.score_func == "sigmoid":
        for moe in ours.moe_layers():
            moe.gate.bias.normal_(0.0, 0.1)
    save_hf(ours, tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tokens = torch.randint(0, ours.args.vocab_size, (2, 48))  # past original_seq_len=32
    torch.testing.assert_close(hf_logits(theirs, tokens), ours(tokens), atol=ATOL, rtol=0)
    back = load_hf(tmp_path)
    assert back.args == ours.args
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), back.state_dict().values()))


def test_load_in_bf16_keeps_the_gate_bias_and_rope_in_fp32(hf_checkpoint, prompt):
    path, hf = hf_checkpoint("v3")
    model = load_hf(path, dtype="bf16")
    assert model.embed.weight.dtype == model.layers[1].ffn.experts.w1_EFD.dtype == torch.bfloat16
    assert model.layers[1].ffn.gate.bias.dtype == model.rope_cos.dtype == torch.float32
    reference = load_hf(path)
    for (k, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b.to(a.dtype)), k


def test_tied_embeddings_are_read_as_the_head(hf_checkpoint, prompt, tmp_path):
    """tie_word_embeddings: no lm_head.weight stored; transformers uses the embedding."""
    import transformers
    from safetensors.torch import load_file, save_file

    path, _ = hf_checkpoint("v2-lite")
    tensors = {}
    for file in path.glob("*.safetensors"):
        tensors |= load_file(file)
    del tensors["lm_head.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    ours = load_hf(tmp_path)
    assert torch.equal(ours.head.weight, tensors["model.embed_tokens.weight"])
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(ours(prompt), hf_logits(theirs, prompt), atol=ATOL, rtol=0)
