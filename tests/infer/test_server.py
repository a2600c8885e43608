"""The OpenAI-compatible server, driven by the official `openai` client against a real
server on a free local port: answers equal the engine's, bad input gets OpenAI errors and
the server keeps serving, disconnects free their rows, 32 concurrent streams complete."""
import asyncio
import contextlib
import json
import socket
import threading
import time

import httpx
import openai
import pytest
import torch

from dsmoe import ModelArgs, Transformer
from dsmoe.infer.engine import Engine
from dsmoe.infer.requests import tokenize_prompt
from dsmoe.infer.sampling import SamplingParams
from dsmoe.infer.server import create_app

KEY = "test-key"
NAME = "tiny-test"


@contextlib.contextmanager
def running_server(app):
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # a free port, held from now on: no race with other processes
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_preset("tiny")).eval()
    tokenizer = _byte_tokenizer()
    engine = Engine(model, tokenizer, max_batch=8, max_len=96)
    app = create_app(engine, tokenizer, NAME, api_key=KEY)
    with running_server(app) as url:
        yield {"url": url, "model": model, "tokenizer": tokenizer, "engine": engine}


def _byte_tokenizer():
    # the stand-in tokenizer of tests/infer/conftest.py, without importing conftest
    from importlib.util import module_from_spec, spec_from_file_location
    from pathlib import Path

    spec = spec_from_file_location("_infer_conftest", Path(__file__).with_name("conftest.py"))
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ByteTokenizer()


@pytest.fixture
def client(setup):
    return openai.OpenAI(base_url=setup["url"] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def direct(setup, prompt_ids, max_tokens, **kw):
    """What the engine itself answers (a separate engine over the same model)."""
    engine = Engine(setup["model"], setup["tokenizer"])
    return engine.generate([prompt_ids], SamplingParams(max_tokens=max_tokens, **kw))[0]


def test_completion_equals_the_engine_and_counts_usage(setup, client):
    out = client.completions.create(model=NAME, prompt="Hello there", max_tokens=8, temperature=0)
    ref = direct(setup, tokenize_prompt(setup["tokenizer"], "Hello there"), 8)
    assert out.choices[0].text == ref.text
    assert out.choices[0].finish_reason == ("length" if ref.finish_reason == "length" else "stop")
    assert out.usage.prompt_tokens == len(ref.prompt_ids) == 12  # BOS + 11 bytes
    assert out.usage.completion_tokens == len(ref.output_ids)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert out.model == NAME and out.object == "text_completion"


def test_chat_uses_the_template_and_streams_the_same_text(setup, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    out = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0)
    tok = setup["tokenizer"]
    ref = direct(setup, tok.encode(tok.apply_chat_template(messages), add_bos=False), 10)
    assert out.choices[0].message.content == ref.text and out.choices[0].message.role == "assistant"
    assert out.usage.prompt_tokens == len(ref.prompt_ids)
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == len(ref.output_ids)


def test_streamed_completion_with_stop_and_seed(setup, client):
    kw = dict(model=NAME, prompt="abc", max_tokens=12, temperature=0.9, seed=3)
    whole = client.completions.create(**kw)
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True))
    assert streamed == whole.choices[0].text  # same seed, same text
    assert len(whole.choices[0].text) > 4
    stop = whole.choices[0].text[2:4]
    cut = client.completions.create(**kw, stop=[stop])
    assert cut.choices[0].text == whole.choices[0].text[:whole.choices[0].text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_models_and_health(setup, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    health = httpx.get(setup["url"] + "/health").json()
    assert health["status"] == "ok" and health["model"] == NAME


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_bad_input_gets_openai_errors_and_the_server_keeps_serving(setup, client):
    url, auth = setup["url"], {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(url + "/v1/completions", content=b'{"model": "tiny-test", "prompt": ',
                   headers={**auth, "Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in error_of(r)["message"]
    r = httpx.post(url + "/v1/completions", json=["not", "an", "object"], headers=auth)
    assert r.status_code == 400
    r = httpx.post(url + "/v1/nowhere", json={}, headers=auth)
    assert r.status_code == 404 and error_of(r)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=NAME, prompt="x", max_tokens="5")
    assert err.value.status_code == 400 and err.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=NAME, prompt="x", max_tokens=2, temperature="hot")
    with pytest.raises(openai.BadRequestError, match="prompt"):
        client.completions.create(model=NAME, prompt=[{"a": 1}], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=NAME, messages=[{"role": "wizard", "content": "x"}])
    for bad in (0, -3):
        with pytest.raises(openai.BadRequestError, match="max_tokens"):
            client.completions.create(model=NAME, prompt="x", max_tokens=bad)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=NAME, prompt="x", max_tokens=95)  # 2 + 95 > 96
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=NAME, prompt="y" * 200, max_tokens=1)
    assert err.value.code == "context_length_exceeded" and "maximum context length is 96" in err.value.message
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    assert err.value.code == "model_not_found"
    wrong = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model=NAME, prompt="x", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    # and everyone else is still served
    assert client.completions.create(model=NAME, prompt="ok", max_tokens=3).usage.completion_tokens >= 1
    assert setup["engine"].cache.n_used == 0


@contextlib.contextmanager
def slow_engine(engine, seconds=0.02):
    """Make every engine step slow (so a request is surely still running); record the requests
    and, in `seen.batch_sizes`, how many requests each step decoded together."""
    step, add = engine.step, engine.add_request
    seen = _Seen()

    def slow_step():
        time.sleep(seconds)
        events = step()
        seen.batch_sizes.append(len({ev.request.id for ev in events}))
        return events

    def recording_add(*a, **kw):
        seen.append(add(*a, **kw))
        return seen[-1]

    engine.step, engine.add_request = slow_step, recording_add
    try:
        yield seen
    finally:
        engine.step, engine.add_request = step, add


class _Seen(list):
    def __init__(self):
        super().__init__()
        self.batch_sizes = []


def wait_until(condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_client_disconnecting_mid_stream_frees_its_row(setup):
    engine = setup["engine"]
    body = {"model": NAME, "prompt": "stream me", "max_tokens": 80, "stream": True, "ignore_eos": True}
    with slow_engine(engine) as seen:
        with httpx.stream("POST", setup["url"] + "/v1/completions", json=body,
                          headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(4)]
        assert any(line.startswith("data: {") for line in got)
        wait_until(lambda: seen and seen[0].finished)
        assert seen[0].finish_reason == "abort" and len(seen[0].output_ids) < 80
        wait_until(lambda: engine.cache.n_used == 0)
        # a non-streaming client that gives up is aborted too
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(setup["url"] + "/v1/completions", json={**body, "stream": False},
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=0.3)
        wait_until(lambda: len(seen) == 2 and seen[1].finished)
        assert seen[1].finish_reason == "abort"
        wait_until(lambda: engine.cache.n_used == 0)


def test_32_concurrent_streaming_clients_all_complete(setup):
    tok = setup["tokenizer"]
    prompts = [f"client {i}: " + "x" * (i % 7) for i in range(32)]
    lengths = [4 + i % 5 for i in range(32)]

    async def one(client, prompt, n):
        stream = await client.completions.create(model=NAME, prompt=prompt, max_tokens=n, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True})
        text, usage, reason = "", None, None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
                reason = chunk.choices[0].finish_reason or reason
            usage = chunk.usage or usage
        return text, usage, reason

    async def main():
        async with openai.AsyncOpenAI(base_url=setup["url"] + "/v1", api_key=KEY, max_retries=0,
                                      timeout=120) as client:
            return await asyncio.gather(*(one(client, p, n) for p, n in zip(prompts, lengths)))

    with slow_engine(setup["engine"], 0.0) as seen:
        results = asyncio.run(main())
    assert len(seen) == 32 and max(seen.batch_sizes) == 8  # the engine's max_batch: the rest waited
    engine = Engine(setup["model"], tok, max_batch=32)
    refs = engine.generate([tokenize_prompt(tok, p) for p in prompts],
                           [SamplingParams(max_tokens=n, ignore_eos=True) for n in lengths])
    for (text, usage, reason), ref, n in zip(results, refs, lengths):
        assert reason == "length" and usage.completion_tokens == n
        assert text == ref.text  # batched with strangers, decoded as if alone
    assert setup["engine"].cache.n_used == 0
    assert json.loads(httpx.get(setup["url"] + "/health").text)["running"] == 0
