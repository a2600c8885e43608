"""`dsmoe generate --quantize int8 --max-expert-memory SIZE`: the flags reach the loader
(the text equals the engine's over the same int8, experts-on-disk model), and a budget that
is not a size or is too small fails with a one-line error naming the flag."""
import torch

from dsmoe import ModelArgs, Transformer, save_hf
from dsmoe.cli import main
from dsmoe.data.tokenizer import train_tokenizer
from dsmoe.infer.generate import load_engine
from dsmoe.infer.requests import tokenize_prompt
from dsmoe.infer.sampling import SamplingParams

TEXTS = ["the quick brown fox jumps over the lazy dog", "mixture of experts routes every token"] * 20


def test_flags_reach_the_loader_and_bad_budgets_fail_cleanly(tmp_path, capsys):
    torch.manual_seed(0)
    save_hf(Transformer(ModelArgs.from_preset("tiny")), tmp_path, tokenizer=train_tokenizer(TEXTS, vocab_size=300))
    flags = ["--quantize", "int8", "--max-expert-memory", "40KB"]
    assert main(["generate", "--model", str(tmp_path), "--prompt", "the fox", "--max-tokens", "6",
                 "--ignore-eos", "--device", "cpu", *flags]) == 0
    engine, tokenizer = load_engine(tmp_path, device="cpu", quantize="int8", max_expert_memory="40KB")
    want = engine.generate([tokenize_prompt(tokenizer, "the fox")], SamplingParams(max_tokens=6, ignore_eos=True))
    assert capsys.readouterr().out.strip() == want[0].text.strip()
    for budget, message in (("lots", "give a size"), ("1KB", "give at least")):
        assert main(["generate", "--model", str(tmp_path), "--prompt", "a", "--max-expert-memory", budget]) != 0
        err = capsys.readouterr().err
        assert "--max-expert-memory" in err and message in err
