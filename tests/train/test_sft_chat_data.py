"""Chat data: the assistant-only mask from the template, JSONL reading and its errors, and
the built-in demo set (deterministic, disjoint splits, verifiable math answers)."""
import json

import pytest

from dsmoe.data import mathgen
from dsmoe.data.tokenizer import Tokenizer
from dsmoe.errors import DataError
from dsmoe.train.chat_data import (check_messages, demo_chats, encode_chat, instruction_chat,
                                   load_chats, write_chats)

CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "Answer: 5"},
        {"role": "user", "content": "And 4 + 4?"},
        {"role": "assistant", "content": "Answer: 8"},
        {"role": "user", "content": "Thanks."}]

# A DeepSeek-V3-like template: plain-text markers around the turns, an end-of-sentence after replies.
DEEPSEEK_LIKE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
                 "{% elif m['role'] == 'user' %}{{ '<|user|>' + m['content'] }}"
                 "{% else %}{{ '<|assistant|>' + m['content'] + eos_token }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


def masked_text(tok, example, value=True) -> list[str]:
    """The runs of tokens whose mask equals `value`, decoded with special tokens shown."""
    runs, current = [], []
    for i, m in zip(example.ids, example.mask):
        if m == value:
            current.append(i)
        elif current:
            runs.append(tok.decode(current, skip_special=False))
            current = []
    if current:
        runs.append(tok.decode(current, skip_special=False))
    return runs


def test_mask_covers_exactly_the_replies_and_their_end_marker(chat_tokenizer):
    ex = encode_chat(chat_tokenizer, CHAT)
    assert masked_text(chat_tokenizer, ex) == ["Answer: 5<|end|>", "Answer: 8<|end|>"]
    whole = chat_tokenizer.apply_chat_template(CHAT, add_generation_prompt=False)
    assert ex.ids == chat_tokenizer.encode(whole)  # the pieces tokenize as the whole chat does
    assert ex.ids[0] == chat_tokenizer.bos_id and not ex.mask[0]


def test_mask_follows_a_checkpoint_template(chat_tokenizer):
    tok = Tokenizer(chat_tokenizer._tok, {**chat_tokenizer.config, "chat_template": DEEPSEEK_LIKE})
    ex = encode_chat(tok, CHAT)
    assert masked_text(tok, ex) == ["Answer: 5<|eos|>", "Answer: 8<|eos|>"]
    assert ex.ids == tok.encode(tok.apply_chat_template(CHAT, add_generation_prompt=False))


def test_template_that_rewrites_history_is_refused(chat_tokenizer):
    # renders only the last user turn: earlier turns vanish, so prefixes do not grow
    template = ("{% for m in messages %}{% if loop.last or m['role'] == 'assistant' %}"
                "{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
    tok = Tokenizer(chat_tokenizer._tok, {**chat_tokenizer.config, "chat_template": template})
    with pytest.raises(DataError, match="prefix"):
        encode_chat(tok, CHAT)


@pytest.mark.parametrize("line, message", [
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}',
     "no assistant turn"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "role"),
    ('{"messages": [{"role": "user", "content": 3}]}', "string 'content'"),
    ('{"messages": []}', "non-empty list"),
    ('{"text": "hello"}', "'messages' list"),
    ('{"messages": [', "not valid JSON"),
])
def test_bad_chat_lines_name_the_line_and_the_problem(tmp_path, line, message):
    good = json.dumps({"messages": CHAT})
    path = tmp_path / "chats.jsonl"
    path.write_text(good + "\n\n" + line + "\n")
    with pytest.raises(DataError, match=message) as err:
        load_chats(path)
    assert f"{path}:3" in str(err.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_chats(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="holds no chats"):
        load_chats(tmp_path / "empty.jsonl")


def test_write_then_load_round_trips(tmp_path):
    chats = demo_chats(12, math_share=1.0)
    write_chats(chats, tmp_path / "c.jsonl")
    assert load_chats(tmp_path / "c.jsonl") == chats


def test_demo_math_chats_are_deterministic_disjoint_and_verifiable():
    train, again = demo_chats(40, "train", math_share=1.0), demo_chats(40, "train", math_share=1.0)
    val = demo_chats(40, "val", math_share=1.0)
    assert train == again
    assert not {c[0]["content"] for c in train} & {c[0]["content"] for c in val}
    for chat in train:
        check_messages(chat, "demo")
        question = chat[0]["content"]
        assert question.startswith("Question: ") and question.endswith("Solution:\n")
        # the verifier reads the reply's final answer line
        assert mathgen.extract_answer(chat[1]["content"]) == chat[1]["content"].rsplit("Answer: ", 1)[1]


def test_instruction_pairs_from_corpus_documents():
    import random
    rng = random.Random(0)
    code = "import os\n\ndef walk(path):\n    return os.walk(path)\n\nclass Tree:\n    pass\n"
    seen = {}
    for _ in range(40):
        chat = instruction_chat(code, "code", rng)
        seen[chat[0]["content"].split("\n")[0]] = chat[1]["content"]
    assert seen["List the functions and classes this Python code defines."] == "walk, Tree."
    assert seen["Which language is this text written in?"] == "Python."
    text = "Paris is the capital of France. It is on the Seine. Many people live there."
    for _ in range(40):
        user, reply = (t["content"] for t in instruction_chat(text, "en", rng))
        if user.startswith("Quote"):
            assert reply == "Paris is the capital of France."
        elif user.startswith("Continue"):
            assert user.endswith("Paris is the capital of France.")
            assert reply == "It is on the Seine. Many people live there."
