"""A checkpoint directory is all a command needs: weights, config and tokenizer together."""
import json

import pytest
import torch

from dsmoe import ModelArgs, Transformer, save_hf
from dsmoe.data.tokenizer import EOS, train_tokenizer
from dsmoe.errors import DataError
from dsmoe.interop.hf import load_model_dir

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "1234 + 5678 = 6912"] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=300)


def test_save_and_load_a_model_with_its_tokenizer(tokenizer, tmp_path):
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_preset("tiny")).eval()
    save_hf(model, tmp_path, tokenizer=tokenizer)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["eos_token_id"] == tokenizer.token_to_id(EOS) == tokenizer.eos_id
    assert config["bos_token_id"] == tokenizer.bos_id
    loaded, tok = load_model_dir(tmp_path)
    text = "the cat ran 42"
    assert tok.encode(text) == tokenizer.encode(text) and tok.decode(tok.encode(text)) == text
    chat = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(chat) == tokenizer.apply_chat_template(chat)
    ids = torch.tensor([tok.encode(text, add_bos=True)])
    assert torch.equal(loaded(ids), model(ids))


def test_tokenizer_larger_than_the_vocabulary_is_refused(tokenizer, tmp_path):
    save_hf(Transformer(ModelArgs.from_preset("tiny").replace(vocab_size=256)), tmp_path, tokenizer=tokenizer)
    with pytest.raises(DataError, match=f"{tokenizer.vocab_size} tokens but the model's vocabulary is 256"):
        load_model_dir(tmp_path)
