"""Fixtures for the training tests: two prepared domains (worked arithmetic, word salad);
for the fine-tuning tests, a small tokenizer with the chat tokens and a random tiny model
saved as a Hugging Face checkpoint directory with that tokenizer."""
import itertools

import pytest
import torch

from dsmoe import ModelArgs, Transformer
from dsmoe.data import mathgen
from dsmoe.data.prepare import prepare
from dsmoe.data.tokenizer import train_tokenizer

SAMPLE_TEXTS = [
    "The quick brown fox jumps over the lazy dog. It was a sunny day in the park.",
    "Le château de Versailles a été construit à l'époque de Louis XIV.",
    "El niño comió piñas en Cádiz, ¿verdad? ¡Sí!",
    "def add(a, b):\n    return a + b\n\nclass Point:\n    pass\n",
    "Which language is this text written in? Quote the first sentence. Continue this text.",
]


@pytest.fixture(scope="session")
def two_domains(tmp_path_factory):
    """Two domains (worked arithmetic, word salad), 200 documents each, tokenised with a
    512-token BPE into a prepared data directory."""
    src = tmp_path_factory.mktemp("text")
    problems = [mathgen.as_document(p) for p, _ in zip(mathgen.problems("train", seed=0), range(200))]
    (src / "math.txt").write_text("\n\n".join(problems))
    words = "the a cat dog sat on mat ran red blue house tree river under over and then".split()
    prose = [" ".join(words[(i * 7 + j * j) % len(words)] for j in range(30)) + "." for i in range(200)]
    (src / "prose.txt").write_text("\n\n".join(prose))
    out = tmp_path_factory.mktemp("data") / "prepared"
    prepare(out, [src], vocab_size=512, show_progress=False)
    return out


@pytest.fixture(scope="session")
def chat_tokenizer():
    """A 512-token byte-level BPE (the tiny preset's vocabulary) trained in well under a second."""
    docs = [mathgen.as_document(p) for p in itertools.islice(mathgen.problems("train", seed=1), 300)]
    return train_tokenizer(docs + SAMPLE_TEXTS * 20, vocab_size=512)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, chat_tokenizer):
    """A random tiny model (seed 0) as a checkpoint directory with its tokenizer."""
    from dsmoe.interop.hf import save_hf

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "model"
    save_hf(Transformer(ModelArgs.from_preset("tiny")), path, tokenizer=chat_tokenizer)
    return path
