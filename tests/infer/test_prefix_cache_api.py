"""The prefix cache from the outside: usage counts (OpenAI's and DeepSeek's fields) and /health
on the server, and the `--prefix-cache-*` flags of `dsmoe generate` and `dsmoe serve`."""
import json

import pytest
import torch
from fastapi.testclient import TestClient

from dsmoe import ModelArgs, Transformer, save_hf
from dsmoe.cli import main
from dsmoe.data.tokenizer import train_tokenizer
from dsmoe.infer.engine import Engine
from dsmoe.infer.prefix_cache import PrefixCache, model_identity
from dsmoe.infer.requests import tokenize_prompt
from dsmoe.infer.sampling import SamplingParams
from dsmoe.infer.server import create_app

NAME = "tiny-prefix"
PROMPT = "The quick brown fox jumps over the lazy dog while the model caches its latents. " * 2


def test_usage_counts_cached_prompt_tokens_and_health_shows_the_tiers(tokenizer, tmp_path):
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_preset("tiny")).eval()
    cache = PrefixCache(model_identity(model, "bytes"), ram_bytes=10**6, disk_dir=tmp_path, block=16)
    engine = Engine(model, tokenizer, max_len=128, prefix_cache=cache)
    prompt_ids = tokenize_prompt(tokenizer, PROMPT[:100])
    want = Engine(model, tokenizer).generate([prompt_ids], SamplingParams(max_tokens=8))[0].text
    body = {"model": NAME, "prompt": PROMPT[:100], "max_tokens": 8, "temperature": 0}
    with TestClient(create_app(engine, tokenizer, NAME)) as client:
        first = client.post("/v1/completions", json=body).json()
        second = client.post("/v1/completions", json=body).json()
        streamed = client.post("/v1/completions", json={**body, "stream": True,
                                                         "stream_options": {"include_usage": True}})
        health = client.get("/health").json()
    assert first["choices"][0]["text"] == second["choices"][0]["text"] == want
    assert first["usage"]["prompt_tokens"] == len(prompt_ids) == 101
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert first["usage"]["prompt_cache_miss_tokens"] == 101
    # the second request finds the first's 6 full blocks (it must still prefill its last token)
    assert second["usage"]["prompt_tokens_details"] == {"cached_tokens": 96}
    assert second["usage"]["prompt_cache_hit_tokens"] == 96 and second["usage"]["prompt_cache_miss_tokens"] == 5
    events = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == want
    assert events[-1]["usage"]["prompt_cache_hit_tokens"] == 96
    stats = health["prefix_cache"]
    assert stats["hit_tokens"] == 192 and stats["looked_up_tokens"] == 303
    assert stats["hit_rate"] == pytest.approx(192 / 303)
    assert stats["ram_bytes"] == stats["ram_blocks"] * 16 * stats["bytes_per_token"] > 0
    assert stats["disk_dir"] == str(tmp_path) and stats["disk_bytes"] > 0 and stats["disk_blocks"] > 0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-model")
    torch.manual_seed(0)
    texts = ["the quick brown fox jumps over the lazy dog", "mixture of experts routes every token"] * 20
    save_hf(Transformer(ModelArgs.from_preset("tiny")), path, tokenizer=train_tokenizer(texts, vocab_size=300))
    return path


def test_generate_reuses_the_disk_tier_across_runs(model_dir, tmp_path, capsys):
    run = ["generate", "--model", str(model_dir), "--prompt", PROMPT, "--max-tokens", "6", "--ignore-eos",
           "--stats", "--prefix-cache-dir", str(tmp_path / "pc"), "--prefix-cache-ram", "64MB"]
    assert main(run[:-4]) == 0  # no disk tier, a fresh RAM tier: nothing cached
    plain = capsys.readouterr()
    assert "prefix cache 0" in plain.err
    assert main(run) == 0
    first = capsys.readouterr()
    assert main(run + ["--prefix-cache-ram", "0"]) == 0  # a new process would see only the disk
    second = capsys.readouterr()
    assert first.out == second.out == plain.out and "prefix cache 0" in first.err
    cached = int(second.err.split("prefix cache ")[1].split()[0])
    assert cached >= 32 and list((tmp_path / "pc").glob("*/*.blk"))


def test_bad_flags_are_refused_before_anything_loads(model_dir, tmp_path, capsys):
    assert main(["generate", "--model", str(model_dir), "--prompt", "a", "--prefix-cache-ram", "lots"]) == 1
    assert "--prefix-cache-ram 'lots' is not a size" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path / "nowhere"), "--prefix-cache-disk", "1 parsec"]) == 1
    assert "--prefix-cache-disk" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["generate", "--model", str(model_dir), "--prompt", "a",
                 "--prefix-cache-dir", str(blocker / "cache")]) == 1
    assert "cannot be written" in capsys.readouterr().err


def test_concurrent_http_requests_sharing_a_prefix(tokenizer):
    from concurrent.futures import ThreadPoolExecutor

    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_preset("tiny")).eval()
    engine = Engine(model, tokenizer, max_batch=4, max_len=128,
                    prefix_cache=PrefixCache(model_identity(model, "bytes"), ram_bytes=10**6, block=16))
    prompts = [PROMPT[:70] + f" question {i}:" for i in range(8)]
    plain = Engine(model, tokenizer)
    want = [plain.generate([tokenize_prompt(tokenizer, p)], SamplingParams(max_tokens=6))[0].text for p in prompts]
    with TestClient(create_app(engine, tokenizer, NAME)) as client:
        def ask(prompt):
            return client.post("/v1/completions", json={"model": NAME, "prompt": prompt, "max_tokens": 6,
                                                        "temperature": 0}).json()

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, prompts * 2))
    assert [a["choices"][0]["text"] for a in answers] == want * 2
    assert sum(a["usage"]["prompt_cache_hit_tokens"] for a in answers) >= 64 * 8
