"""Chat data for supervised fine-tuning: JSONL `messages`, the assistant-only loss mask,
and the built-in demo set.

Format: one JSON object per line with a `messages` list of `{"role", "content"}` turns
(roles system, user, assistant), the format of most open chat data sets. Every chat must
hold at least one assistant turn with text, since only assistant tokens are trained; a
chat that breaks a rule raises `DataError` naming the file, the line and the fix, before
any training starts.

The loss mask comes from the chat template itself, whatever it is (ours or a checkpoint's):
for each assistant turn, the chat up to it is rendered with the generation prompt, then
with the turn; the difference (its text and the end-of-turn marker the template writes
after it) is what the model learns to produce. Everything else (system and user turns, the
template's role markers) is context only. The pieces are encoded one after the other; a
template that does not render chats as growing prefixes of each other cannot be split
this way and is refused. With templates whose role markers are special tokens (ours,
DeepSeek's) the pieces tokenize exactly as the whole chat does, which a test checks.

The demo set is made from the project's own generators: math questions with worked answers
(`dsmoe.data.mathgen`, in the prompt/completion format of pretraining, so GRPO's verifier
reads the same `Answer:` line) and instruction pairs made from the default corpus
(language identification, first sentence, continuation, names defined by a code snippet).
Train and held-out chats come from disjoint sources: mathgen's splits, and the documents
`shards.validation_mask` holds out.

Not here: tool calls, multi-modal content, or a template of our own for checkpoints
(a checkpoint's template is used as it is).
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any, Iterator

from dsmoe.data import mathgen
from dsmoe.data.corpus import iter_default_corpus
from dsmoe.data.prepare import DEFAULT_VAL_FRACTION
from dsmoe.data.shards import validation_mask
from dsmoe.errors import DataError
from dsmoe.train.packing import Example

ROLES = ("system", "user", "assistant")
DEMO = "demo"  # the `--data` value that selects the built-in demo set
DEMO_MATH_SHARE = 0.7
LANGUAGE_NAMES = {"en": "English", "fr": "French", "es": "Spanish", "code": "Python"}
_SNIPPET_CHARS = 400  # corpus snippets are cut to this, so a chat fits a 512-token row
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_CODE_NAME = re.compile(r"^(?:async\s+def|def|class)\s+([A-Za-z_]\w*)", re.MULTILINE)


# --- reading and checking ----------------------------------------------------------------------

def check_messages(messages: Any, where: str) -> list[dict]:
    """The chat as a list of {"role", "content"} dicts, or DataError naming the problem."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of "
                        "{'role': ..., 'content': ...} turns")
    for i, turn in enumerate(messages):
        if not isinstance(turn, dict) or turn.get("role") not in ROLES \
                or not isinstance(turn.get("content"), str):
            raise DataError(f"{where}: turn {i} must be an object with a 'role' in {ROLES} and "
                            f"a string 'content', got {json.dumps(turn)[:120]}")
    if not any(t["role"] == "assistant" and t["content"].strip() for t in messages):
        raise DataError(f"{where}: the chat has no assistant turn with text, so it has nothing "
                        "to train on; add the assistant's reply or remove the chat")
    return [{"role": t["role"], "content": t["content"]} for t in messages]


def load_chats(path: str | Path) -> list[list[dict]]:
    """Every chat of a JSONL file (one `{"messages": [...]}` object per line)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist; give a JSONL file of chats or '{DEMO}' for the "
                        "built-in demo set")
    chats = []
    text = path.read_text(encoding="utf-8")
    # split("\n"), not splitlines(): JSON strings may hold raw U+2028 line separators
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: not valid JSON ({err})") from err
        if not isinstance(record, dict) or "messages" not in record:
            raise DataError(f"{where}: expected an object with a 'messages' list")
        chats.append(check_messages(record["messages"], where))
    if not chats:
        raise DataError(f"{path} holds no chats; add lines of {{\"messages\": [...]}}")
    return chats


def write_chats(chats: list[list[dict]], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for messages in chats:
            f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")


# --- encoding ---------------------------------------------------------------------------------

def encode_chat(tokenizer, messages: list[dict]) -> Example:
    """Token ids of the rendered chat and its mask: True on assistant replies only."""
    ids: list[int] = []
    mask: list[bool] = []
    done = ""

    def add(text: str, target: bool) -> None:
        piece = tokenizer.encode(text)  # a rendered chat holds its own BOS
        ids.extend(piece)
        mask.extend([target] * len(piece))

    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise DataError("the chat template does not render a chat as a prefix of its "
                            "continuation, so assistant turns cannot be told apart; use a "
                            "template without history-dependent rewriting")
        add(prompt[len(done):], False)
        add(full[len(prompt):], True)
        done = full
    whole = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    if whole.startswith(done) and len(whole) > len(done):
        add(whole[len(done):], False)  # turns after the last reply: context for nothing
    return Example(ids, mask)


def encode_chats(tokenizer, chats: list[list[dict]]) -> list[Example]:
    return [encode_chat(tokenizer, messages) for messages in chats]


# --- the demo set ------------------------------------------------------------------------------

def math_prompt(problem: mathgen.MathProblem) -> list[dict]:
    """The user turn asking a math problem: the same text pretraining saw before a solution."""
    return [{"role": "user", "content": mathgen.as_prompt(problem)}]


def math_chat(problem: mathgen.MathProblem) -> list[dict]:
    return math_prompt(problem) + [{"role": "assistant", "content": mathgen.as_completion(problem)}]


def _snippet(text: str) -> str:
    """The text cut at a line or word boundary to about _SNIPPET_CHARS characters."""
    if len(text) <= _SNIPPET_CHARS:
        return text
    cut = text[:_SNIPPET_CHARS]
    return cut[:max(cut.rfind("\n"), cut.rfind(" "), _SNIPPET_CHARS // 2)]


def instruction_chat(text: str, domain: str, rng: random.Random) -> list[dict] | None:
    """One instruction pair made from a corpus document (None when it offers none)."""
    text = _snippet(text.strip())
    kinds = ["language"]
    if domain == "code":
        names = _CODE_NAME.findall(text)
        if names:
            kinds.append("names")
        lines = text.split("\n")
        if len(lines) >= 4:
            kinds.append("continue")
    else:
        sentences = _SENTENCE_END.split(text)
        if len(sentences) >= 2:
            kinds += ["first_sentence", "continue"]
    kind = rng.choice(kinds)
    if kind == "language":
        user = f"Which language is this text written in?\n\n{text}"
        answer = f"{LANGUAGE_NAMES[domain]}."
    elif kind == "names":
        user = f"List the functions and classes this Python code defines.\n\n{text}"
        answer = ", ".join(dict.fromkeys(names)) + "."
    elif kind == "first_sentence":
        user = f"Quote the first sentence of this paragraph.\n\n{text}"
        answer = sentences[0]
    elif domain == "code":
        half = len(lines) // 2
        user = "Continue this Python code.\n\n" + "\n".join(lines[:half])
        answer = "\n".join(lines[half:])
    else:
        user = f"Continue this text.\n\n{sentences[0]}"
        answer = " ".join(sentences[1:])
    if not answer.strip():
        return None
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def _corpus_documents(split: str, max_chars: int) -> Iterator[tuple[str, str]]:
    """(text, domain) of the default corpus' en/fr/es/code documents in `split`, held out
    as `dsmoe prepare` holds them out (same fraction and seed), domain by domain."""
    for domain in LANGUAGE_NAMES:
        texts = [d.text for d in iter_default_corpus(max_chars, domains=[domain])]
        held_out = validation_mask(texts, DEFAULT_VAL_FRACTION, seed=0)
        yield from ((t, domain) for t, val in zip(texts, held_out) if val == (split == "val"))


def demo_chats(n: int, split: str = "train", seed: int = 0, math_share: float = DEMO_MATH_SHARE,
               difficulty: int | None = None, corpus_chars: int = 400_000) -> list[list[dict]]:
    """`n` demo chats: about `math_share` math problems with worked answers, the rest
    instruction pairs from the corpus; `split` is "train" or "val" (held out)."""
    if split not in ("train", "val"):
        raise DataError(f"demo split must be 'train' or 'val', got {split!r}")
    rng = random.Random(f"dsmoe.chat_data/{split}/{seed}")
    n_math = round(n * math_share)
    stream = mathgen.problems(split, seed=seed, difficulty=difficulty)
    chats = [math_chat(next(stream)) for _ in range(n_math)]
    if n > n_math:
        documents = list(_corpus_documents(split, corpus_chars))
        rng.shuffle(documents)
        for text, domain in documents:
            if len(chats) >= n:
                break
            chat = instruction_chat(text, domain, rng)
            if chat is not None:
                chats.append(chat)
    rng.shuffle(chats)
    return chats
