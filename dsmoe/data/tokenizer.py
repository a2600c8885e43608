"""Byte-level BPE tokenizer: training ours, loading ours or a Hugging Face checkpoint's.

Design note
-----------
- One wrapper, `Tokenizer`, over a `tokenizers.Tokenizer`, whether it was trained here
  (`train_tokenizer`) or ships with a DeepSeek-V3 checkpoint (`Tokenizer.from_dir`). Files
  are the Hugging Face ones (`tokenizer.json`, `tokenizer_config.json`), so our tokenizer
  directories also load in `transformers.AutoTokenizer`.
- Byte-level (GPT-2 style) so every string round-trips exactly, accents and code included;
  no normaliser for the same reason. Digits are split one per token before BPE sees them,
  so `1234` is always `1 2 3 4` and column arithmetic (mathgen.py) is learnable.
- `encode` never lets a checkpoint's post-processor add tokens behind our back:
  `add_bos` is the only way a BOS appears, the same for every tokenizer we load.
- Chat templates are rendered with Jinja in a sandbox, as transformers does, with the same
  variables (`messages`, `add_generation_prompt`, `bos_token`, `eos_token`) and helpers
  (`raise_exception`, `tojson`), so a checkpoint's own template renders as it does there.
  A rendered chat already contains its BOS: encode it with `add_bos=False`.

Deliberately not here: padding/truncation policies, offsets, tool-call formatting, or a
slow pure-Python fallback. Batching and padding belong to the caller.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Iterator

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from dsmoe.errors import DataError

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
USER, ASSISTANT, SYSTEM, END = "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"
#: Ids 0..6 in every tokenizer we train, in this order.
SPECIAL_TOKENS = (BOS, EOS, PAD, USER, ASSISTANT, SYSTEM, END)
DEFAULT_VOCAB_SIZE = 8192

#: Used when a tokenizer directory has no chat template. It starts with the BOS, gives each
#: turn as `<|role|>content<|end|>` and, for generation, ends with `<|assistant|>` so the
#: model writes the answer and closes it with `<|end|>`.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"  # newer transformers versions save the template here


def _token_content(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string, or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _config_template(config: dict) -> str | None:
    """The chat template stored in a config: a string, or a list of named templates."""
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        return named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


class Tokenizer:
    """Encode/decode text and render chats; see the module note."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, config: dict | None = None):
        self._tok = tokenizer
        self.config = dict(config or {})
        self.bos_token = _token_content(self.config.get("bos_token"))
        self.eos_token = _token_content(self.config.get("eos_token"))
        self.pad_token = _token_content(self.config.get("pad_token"))
        self.chat_template = _config_template(self.config) or DEFAULT_CHAT_TEMPLATE

    # --- loading and saving --------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Load `tokenizer.json` (+ `tokenizer_config.json`, `chat_template.jinja` if present)."""
        path = Path(path)
        tokenizer_file = path / TOKENIZER_FILE
        if not tokenizer_file.is_file():
            raise DataError(
                f"no {TOKENIZER_FILE} in {path}: point at a directory made by "
                f"`dsmoe prepare --out {path}` or at a Hugging Face checkpoint directory")
        try:
            tok = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as err:  # the Rust side raises a bare Exception
            raise DataError(f"{tokenizer_file} is not a valid tokenizer file ({err}); "
                            "re-create it with `dsmoe prepare`") from err
        config = {}
        if (path / CONFIG_FILE).is_file():
            try:
                config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise DataError(f"{path / CONFIG_FILE} is not valid JSON ({err})") from err
        if (path / TEMPLATE_FILE).is_file() and not _config_template(config):
            config["chat_template"] = (path / TEMPLATE_FILE).read_text(encoding="utf-8")
        return cls(tok, config)

    def save(self, path: str | Path) -> None:
        """Write `tokenizer.json` and a Hugging Face style `tokenizer_config.json`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(path / TOKENIZER_FILE))
        config = {**self.config, "bos_token": self.bos_token, "eos_token": self.eos_token,
                  "pad_token": self.pad_token, "chat_template": self.chat_template}
        (path / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                        encoding="utf-8")

    def sha256(self) -> str:
        """A content hash of the vocabulary, merges, pipeline and special tokens."""
        digest = hashlib.sha256(self._tok.to_str().encode())
        digest.update(json.dumps([self.bos_token, self.eos_token, self.pad_token,
                                  self.chat_template]).encode())
        return digest.hexdigest()

    # --- ids ---------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special and added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    @property
    def bos_id(self) -> int | None:
        return self.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        return self.token_to_id(self.pad_token)

    # --- text <-> ids ------------------------------------------------------------------------

    def _bos_prefix(self, add_bos: bool) -> list[int]:
        if not add_bos:
            return []
        if self.bos_id is None:
            raise DataError(f"this tokenizer has no BOS token (bos_token={self.bos_token!r} "
                            "is not in its vocabulary); encode with add_bos=False")
        return [self.bos_id]

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        return self._bos_prefix(add_bos) + self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], add_bos: bool = False) -> list[list[int]]:
        """Like `encode` on each text, run in parallel by the Rust library."""
        prefix = self._bos_prefix(add_bos)
        return [prefix + e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    # --- chat ----------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **variables: Any) -> str:
        """Render `messages` ([{"role": ..., "content": ...}]) with the chat template."""
        from jinja2.exceptions import TemplateError

        try:
            return _compile_template(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "", **variables)
        except TemplateError as err:
            raise DataError(f"the chat template failed to render: {err}") from err


_TEMPLATE_CACHE: dict[str, Any] = {}


def _compile_template(source: str):
    """Compile a chat template in a sandbox with transformers' environment settings."""
    if source not in _TEMPLATE_CACHE:
        import jinja2.ext
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str):
            raise TemplateError(message)

        def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            # Jinja's own tojson escapes HTML characters, which would change the prompt.
            return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                              separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        _TEMPLATE_CACHE[source] = env.from_string(source)
    return _TEMPLATE_CACHE[source]


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn besides EOS: the default chat template's `<|end|>`,
    when the vocabulary has it (a checkpoint's own template may end turns with EOS alone).
    Generation stops on these when it answers a chat turn."""
    end = getattr(tokenizer, "token_to_id", lambda _: None)(END)
    return [end] if end is not None else []


def check_vocab_size(vocab_size: int) -> None:
    """Raise DataError unless a byte-level BPE of this size can be trained."""
    minimum = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
    if not minimum <= vocab_size <= 1 << 32:
        raise DataError(f"vocab_size {vocab_size} is out of range: a byte-level tokenizer "
                        f"needs at least {minimum} ids (256 bytes + {len(SPECIAL_TOKENS)} "
                        "special tokens) and ids must fit in 32 bits")


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE,
                    length: int | None = None, show_progress: bool = False) -> Tokenizer:
    """Train a byte-level BPE on `texts` (pass `length` for an accurate progress bar).

    The result may have fewer than `vocab_size` ids when the text has too few distinct
    pairs to merge; it never has more.
    """
    check_vocab_size(vocab_size)
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
    tok.train_from_iterator(_nonempty(texts), trainer=trainer, length=length)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False,
              "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "model_max_length": 1 << 30, "bos_token": BOS, "eos_token": EOS,
              "pad_token": PAD, "additional_special_tokens": [USER, ASSISTANT, SYSTEM, END]}
    return Tokenizer(tok, config)


def _nonempty(texts: Iterable[str]) -> Iterator[str]:
    return (t for t in texts if t)
