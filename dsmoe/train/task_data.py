"""Task and domain data for fine-tuning and evaluation, as `Example`s ready for packing.

One spec names a task everywhere (`--data`, `--task`, `--eval-domains`):
- `demo`: the built-in chat set (math with worked answers + corpus instructions), `demo-math`
  its math part alone (chat_data.py);
- `en`, `fr`, `es`, `code`, `math`: a domain of the embedded default corpus, tokenized with
  the model's tokenizer;
- a path: a JSONL file of chats (lines with `messages`), or text files as `dsmoe prepare`
  reads them (.txt/.md paragraphs, .jsonl `text`, .parquet, or a folder of those).
Chats keep their assistant-only mask; documents are `<bos> text <eos>` (as pretraining
shards store them) cut into windows of seq_len + 1 tokens that overlap by one, so every
token is a target exactly once.

Held-out examples are the documents `shards.validation_mask` holds out with `dsmoe
prepare`'s fraction and seed: for the default corpus with its default size, these are the
very documents pretraining held out, so a model from `make demo` is evaluated on text it
never trained on. A smaller `corpus_chars` (tests) draws from fewer documents and loses
that guarantee.
Not here: streaming data larger than memory; fine-tuning sets are small.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from dsmoe.data.corpus import DEFAULT_MAX_CHARS_PER_DOMAIN, DOMAINS, iter_default_corpus
from dsmoe.data.prepare import DEFAULT_VAL_FRACTION, load_documents
from dsmoe.data.shards import validation_mask
from dsmoe.errors import DataError
from dsmoe.train.chat_data import DEMO, demo_chats, encode_chats, load_chats
from dsmoe.train.finetune import check_out, load_model, packed_batches, prepare_run, train_config
from dsmoe.train.packing import Example, PackedBatch, PackedStream

DEMO_SPECS = {DEMO: 0.7, f"{DEMO}-math": 1.0}  # spec -> share of math chats


@dataclass
class TaskData:
    name: str
    kind: str  # "chat" or "text"
    train: list[Example]
    val: list[Example]

    @property
    def train_targets(self) -> int:
        return sum(e.n_targets for e in self.train)


def document_examples(tokenizer, texts: list[str], seq_len: int) -> list[Example]:
    """Documents as windows of at most seq_len + 1 tokens, overlapping by one token."""
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    examples = []
    for ids in tokenizer.encode_batch(texts):
        ids = bos + ids + eos
        for start in range(0, max(len(ids) - 1, 1), seq_len):
            window = ids[start:start + seq_len + 1]
            if len(window) >= 2:
                examples.append(Example(window, [True] * len(window)))
    return examples


def _is_chat_file(path: Path) -> bool:
    if path.suffix.lower() != ".jsonl" or not path.is_file():
        return False
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    return False  # the reader gives the precise error
                return isinstance(record, dict) and "messages" in record
    return False


def _split(items: list, texts: list[str], seed: int) -> tuple[list, list]:
    held_out = validation_mask(texts, DEFAULT_VAL_FRACTION, seed)
    return ([x for x, v in zip(items, held_out) if not v], [x for x, v in zip(items, held_out) if v])


def load_task(spec: str, tokenizer, seq_len: int, *, n_demo: int = 2000, seed: int = 0,
              corpus_chars: int = DEFAULT_MAX_CHARS_PER_DOMAIN, train: bool = True,
              chat_only: bool = False, math_difficulty: int | None = None) -> TaskData:
    """The examples a spec names (see the module note); `train=False` skips the training
    split (evaluation-only domains), `chat_only` refuses anything but chats (SFT),
    `math_difficulty` sets the demo set's math problems (None: mixed 1-4)."""
    spec = str(spec)
    if spec in DEMO_SPECS:
        share = DEMO_SPECS[spec]
        train_chats = demo_chats(n_demo, "train", seed, share, math_difficulty) if train else []
        val_chats = demo_chats(max(16, n_demo // 20), "val", seed, share, math_difficulty)
        return TaskData(spec, "chat", encode_chats(tokenizer, train_chats),
                        encode_chats(tokenizer, val_chats))
    path = Path(spec)
    if _is_chat_file(path):
        chats = load_chats(path)
        train_chats, val_chats = _split(chats, [json.dumps(c, sort_keys=True) for c in chats], seed)
        return TaskData(spec, "chat", encode_chats(tokenizer, train_chats) if train else [],
                        encode_chats(tokenizer, val_chats))
    if chat_only:
        raise DataError(f"{spec} is not chat data: give a JSONL file whose lines hold "
                        f"{{\"messages\": [...]}}, or '{DEMO}' for the built-in demo set")
    if spec in DOMAINS:
        texts = [d.text for d in iter_default_corpus(corpus_chars, domains=[spec])]
    elif path.exists():
        texts = [d.text for d in load_documents([path])]
    else:
        raise DataError(f"unknown task {spec!r}: give a default-corpus domain {DOMAINS}, "
                        f"{' or '.join(DEMO_SPECS)}, or an existing chat/text file")
    train_texts, val_texts = _split(texts, texts, seed)
    if not val_texts:
        raise DataError(f"{spec} has too few documents to hold one out for evaluation; give "
                        "at least two distinct documents")
    return TaskData(spec, "text", document_examples(tokenizer, train_texts, seq_len) if train else [],
                    document_examples(tokenizer, val_texts, seq_len))


def parse_domains(value: str | None, exclude: str | None = None) -> list[str]:
    """A comma-separated list of task specs; `None` means the default corpus' domains."""
    names = list(DOMAINS) if value is None else [v.strip() for v in value.split(",") if v.strip()]
    return [n for n in names if n != exclude]


@dataclass
class TaskRun:
    """A fine-tuning run on one task, scored on held-out batches of the task and of other
    domains: what `dsmoe esft` and `dsmoe expand` start from."""
    out: Path
    model: Any
    tokenizer: Any
    cfg: Any  # TrainConfig
    task: TaskData
    evals: dict[str, list[PackedBatch]]

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_id or 0

    def stream(self) -> PackedStream:
        """The task's training rows, in the same order for every model the run trains."""
        return PackedStream(self.task.train, self.cfg.seq_len, self.cfg.batch_size, self.cfg.seed, self.pad_id)


def start_task_run(args, spec: str, label: str, check_model: Callable[[Any], None] = lambda model: None,
                   **settings: Any) -> TaskRun:
    """Output folder checked, device and seed set, model loaded (and checked by
    `check_model` before any data is read), training settings from `args` and `settings`,
    then the task's data and held-out batches (`args.eval_rows` rows each) of the task
    (under `label`) and of every other domain `args.eval_domains` names."""
    out = check_out(args.out)
    device = prepare_run(args.device, args.threads, args.seed)
    model, tokenizer = load_model(args.model, device)
    check_model(model)
    cfg = train_config(args, model.args, **settings)
    corpus = {"corpus_chars": args.corpus_chars} if args.corpus_chars else {}
    task = load_task(spec, tokenizer, cfg.seq_len, seed=cfg.seed, **corpus)
    if not task.train:
        raise DataError(f"{spec} has no training examples")
    sets = {label: task.val}
    sets.update({d: load_task(d, tokenizer, cfg.seq_len, seed=cfg.seed, train=False, **corpus).val
                 for d in parse_domains(args.eval_domains, exclude=spec)})
    run = TaskRun(out, model, tokenizer, cfg, task, evals={})
    run.evals = {name: packed_batches(examples, cfg.seq_len, cfg.batch_size, run.pad_id, args.eval_rows)
                 for name, examples in sets.items()}
    return run
