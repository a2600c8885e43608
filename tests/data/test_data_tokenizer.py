"""Tokenizer: exact round trips, digits one per token, special ids, chat templates (ours,
a DeepSeek-style checkpoint's, and transformers rendering ours), save/load, errors."""
import json

import pytest
import tokenizers

from dsmoe.data.corpus import iter_default_corpus
from dsmoe.data.tokenizer import (BOS, DEFAULT_CHAT_TEMPLATE, EOS, SPECIAL_TOKENS, Tokenizer,
                                  train_tokenizer)
from dsmoe.errors import DataError

SAMPLES = [
    "Le château de Versailles a été construit à l'époque de Louis XIV ; c'est très connu.",
    "El niño comió piñas en Cádiz, ¿verdad? ¡Sí!",
    "def f(x):\n\tif x > 0:\n        return x ** 2  # square\n    return {'a': [1, 2]}\n",
    "Total: 12345 + 67890 = 80235, and 3.14159 × 10^6 ≈ π million 🙂",
    "  leading spaces, trailing spaces  \n\n\r\nodd\u00a0whitespace\u2028 ",
]


@pytest.fixture(scope="module")
def tok():
    texts = [d.text for d in iter_default_corpus(max_chars_per_domain=15_000)]
    return train_tokenizer(texts, vocab_size=512)


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_is_exact(tok, text):
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, add_bos=True)) == text


def test_digits_are_one_token_each(tok):
    ids = tok.encode("In 2024, 1234567890 people paid 99.")
    digit_tokens = [t for t in map(tok.id_to_token, ids) if any(c.isdigit() for c in t)]
    assert digit_tokens == list("2024") + list("1234567890") + list("99")


def test_special_tokens_have_fixed_ids(tok):
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.vocab_size == 512
    ids = tok.encode("hi", add_bos=True)
    assert ids[0] == tok.bos_id and ids[1:] == tok.encode("hi")
    assert tok.encode_batch(["a b", "ç"], add_bos=True) == [tok.encode("a b", True),
                                                           tok.encode("ç", True)]
    # special tokens written in text are single ids; decode drops them unless asked
    ids = tok.encode("<|user|>hi<|end|>")
    assert ids[0] == tok.token_to_id("<|user|>") and ids[-1] == tok.token_to_id("<|end|>")
    assert tok.decode(ids) == "hi"
    assert tok.decode(ids, skip_special=False) == "<|user|>hi<|end|>"


def test_default_chat_template(tok):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is 2 + 3?"}]
    assert tok.apply_chat_template(messages) == (
        "<|bos|><|system|>Be brief.<|end|><|user|>What is 2 + 3?<|end|><|assistant|>")
    done = messages + [{"role": "assistant", "content": "5"}]
    assert tok.apply_chat_template(done, add_generation_prompt=False).endswith(
        "<|assistant|>5<|end|>")
    with pytest.raises(DataError, match="unknown chat role: robot"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}])


def test_save_and_load_round_trip(tok, tmp_path):
    tok.save(tmp_path)
    loaded = Tokenizer.from_dir(tmp_path)
    assert loaded.sha256() == tok.sha256()
    assert [loaded.encode(s) for s in SAMPLES] == [tok.encode(s) for s in SAMPLES]
    assert loaded.chat_template == DEFAULT_CHAT_TEMPLATE
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"]) == (BOS, EOS)


def test_transformers_reads_our_files_identically(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in SAMPLES:
        assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    messages = [{"role": "user", "content": "Bonjour !"}]
    assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template(messages)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)


# A checkpoint directory laid out like DeepSeek-V3's: its own special tokens, a BOS given as
# an AddedToken dict, no pad token, and a template using `namespace` and `bos_token`.
DEEPSEEK_BOS, DEEPSEEK_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
DEEPSEEK_STYLE_TEMPLATE = (
    "{% set ns = namespace(system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}"
    "{{ bos_token }}{{ ns.system_prompt }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}{%- endif %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{ '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' }}{%- endif %}"
    "{%- endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)


@pytest.fixture()
def deepseek_style_dir(tmp_path):
    base = tokenizers.Tokenizer(tokenizers.models.BPE())
    base.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    base.decoder = tokenizers.decoders.ByteLevel()
    base.add_special_tokens([DEEPSEEK_BOS, DEEPSEEK_EOS, "<｜User｜>", "<｜Assistant｜>"])
    base.add_tokens([chr(c) for c in range(256)])  # a stand-in vocabulary of single bytes
    # a post-processor adding BOS, as some checkpoints ship: encode must not apply it
    base.post_processor = tokenizers.processors.TemplateProcessing(
        single=f"{DEEPSEEK_BOS} $A", special_tokens=[(DEEPSEEK_BOS, 0)])
    base.save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": {"__type": "AddedToken", "content": DEEPSEEK_BOS, "lstrip": False},
              "eos_token": DEEPSEEK_EOS, "chat_template": DEEPSEEK_STYLE_TEMPLATE,
              "tokenizer_class": "LlamaTokenizerFast"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


def test_loads_a_deepseek_style_checkpoint_dir(deepseek_style_dir):
    tok = Tokenizer.from_dir(deepseek_style_dir)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, None)
    assert tok.encode("ab", add_bos=True)[0] == 0 and 0 not in tok.encode("ab")
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(messages) == f"{DEEPSEEK_BOS}S<｜User｜>Hi<｜Assistant｜>"


def test_template_file_and_named_template_list(deepseek_style_dir):
    config_path = deepseek_style_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "TOOLS"},
                               {"name": "default", "template": "{{ bos_token }}X"}]
    config_path.write_text(json.dumps(config))
    assert Tokenizer.from_dir(deepseek_style_dir).apply_chat_template([]) == f"{DEEPSEEK_BOS}X"
    del config["chat_template"]
    config_path.write_text(json.dumps(config))
    (deepseek_style_dir / "chat_template.jinja").write_text("{{ eos_token }}")
    assert Tokenizer.from_dir(deepseek_style_dir).apply_chat_template([]) == DEEPSEEK_EOS


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match=r"no tokenizer\.json in .*dsmoe prepare"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="not a valid tokenizer file"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(DataError, match="vocab_size 100 is out of range"):
        train_tokenizer(["abc"], vocab_size=100)
    bare = Tokenizer(tokenizers.Tokenizer(tokenizers.models.BPE()))
    with pytest.raises(DataError, match="no BOS token"):
        bare.encode("x", add_bos=True)
