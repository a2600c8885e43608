"""`dsmoe generate` and `dsmoe serve` on a saved model directory (model + tokenizer)."""
import os
import socket
import subprocess
import sys
import time

import openai
import pytest
import torch

from dsmoe import ModelArgs, Transformer, save_hf
from dsmoe.cli import main
from dsmoe.data.tokenizer import train_tokenizer
from dsmoe.infer.engine import Engine
from dsmoe.infer.requests import tokenize_prompt
from dsmoe.data.tokenizer import end_of_turn_ids
from dsmoe.infer.generate import chat_ids
from dsmoe.infer.sampling import SamplingParams
from dsmoe.interop.hf import load_model_dir

TEXTS = ["the quick brown fox jumps over the lazy dog", "hello world, hello model",
         "mixture of experts routes every token to a few experts"] * 20


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-model")
    torch.manual_seed(0)
    save_hf(Transformer(ModelArgs.from_preset("tiny")), path, tokenizer=train_tokenizer(TEXTS, vocab_size=300))
    return path


def expected(model_dir, prompt_ids, **kw):
    model, tokenizer = load_model_dir(model_dir)
    return Engine(model, tokenizer).generate([prompt_ids], SamplingParams(**kw))[0]


def test_generate_streams_what_the_engine_produces(model_dir, capsys):
    assert main(["generate", "--model", str(model_dir), "--prompt", "hello", "--max-tokens", "7",
                 "--ignore-eos"]) == 0
    _, tokenizer = load_model_dir(model_dir)
    ref = expected(model_dir, tokenize_prompt(tokenizer, "hello"), max_tokens=7, ignore_eos=True)
    assert ref.text and capsys.readouterr().out == ref.text + "\n"


def test_generate_chat_and_speculative_with_stats(model_dir, capsys):
    args = ["generate", "--model", str(model_dir), "--prompt", "hi there", "--max-tokens", "9", "--chat"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    for depth in ([], ["3"], ["auto"]):  # drafts per step: 1 by default, a chain, chosen
        assert main(args + ["--speculative", *depth, "--stats"]) == 0
        out = capsys.readouterr()
        assert out.out == plain  # greedy speculative decoding changes nothing but the speed
        assert "decode" in out.err and "drafts accepted" in out.err
    _, tokenizer = load_model_dir(model_dir)
    ref = expected(model_dir, chat_ids(tokenizer, "hi there"), max_tokens=9,
                   stop_token_ids=end_of_turn_ids(tokenizer))
    assert len(ref.output_ids) == 9 and plain == ref.text + "\n"


def test_generate_a_batch_and_bad_input(model_dir, capsys, tmp_path):
    assert main(["generate", "--model", str(model_dir), "--prompt", "a", "--prompt", "the fox",
                 "--max-tokens", "3"]) == 0
    assert capsys.readouterr().out.count("--- [") == 2
    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "a"]) == 1
    assert "error" in capsys.readouterr().err
    assert main(["generate", "--model", str(model_dir), "--prompt", "a", "--max-tokens", "0"]) == 1
    assert "max_tokens=0" in capsys.readouterr().err


@pytest.mark.slow
def test_serve_verb_binds_loopback_and_answers(model_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dsmoe", "serve", "--model", str(model_dir), "--port", str(port),
                             "--api-key", "k", "--served-model-name", "tiny"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0, timeout=30)
        deadline = time.monotonic() + 120
        while True:
            try:
                models = client.models.list()
                break
            except openai.APIConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
                time.sleep(0.2)
        assert [m.id for m in models.data] == ["tiny"]
        out = client.completions.create(model="tiny", prompt="hello", max_tokens=4, temperature=0)
        assert out.usage.completion_tokens >= 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("depth", ["0", "-2", "deep"])
def test_a_bad_speculative_depth_is_named(model_dir, capsys, depth):
    assert main(["generate", "--model", str(model_dir), "--prompt", "x", "--speculative", depth]) == 2
    assert "give a positive number of drafts per step, or 'auto'" in capsys.readouterr().err
