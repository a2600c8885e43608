"""Hostile clients against `dsmoe serve`, driven by the official `openai` client while other
clients stream: every hostile request gets its own answer (a 4xx naming the problem, or a
generic 500 with its request id) and the streaming clients' outputs equal a run without them.
Also: a dead engine thread answers 503 at once, and `serve` refuses a bad port or reads its
API key from the environment."""
import asyncio
import threading
import time

import httpx
import openai
import pytest
import torch

from dsmoe import ModelArgs, Transformer
from dsmoe.cli import main as cli_main
from dsmoe.infer import server as server_module
from dsmoe.infer.engine import Engine
from dsmoe.infer.server import create_app

from .test_server import _byte_tokenizer, running_server

KEY, NAME = "hostile-key", "tiny-hostile"
POISON = "\x07"  # a prompt holding this byte makes the engine's decode step raise (an injected fault)
STREAMS = [  # (prompt, sampling) of the well-behaved streaming clients
    ("alpha", dict(temperature=0)), ("bravo bravo", dict(temperature=0.9, seed=1)),
    ("charlie", dict(temperature=0.7, top_p=0.8, seed=2)), ("delta delta delta", dict(temperature=0)),
    ("echo", dict(temperature=1.0, top_k=20, seed=3)), ("foxtrot", dict(temperature=0)),
]
STREAM_TOKENS = 64


def make_app(max_queue=12):
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_preset("tiny")).eval()
    tokenizer = _byte_tokenizer()
    engine = Engine(model, tokenizer, max_batch=8, max_len=128, prefill_chunk=16)
    poison = tokenizer.encode(POISON)[0]
    real = engine.decoder.decode

    def decode(model, running, cache, sampling):  # the fault: after the real step changed the state
        out = real(model, running, cache, sampling)
        if any(poison in r.prompt_ids and len(r.output_ids) >= 2 for r in running):
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return out

    engine.decoder.decode = decode
    return engine, create_app(engine, tokenizer, NAME, api_key=KEY, max_body_bytes=4096, max_queue=max_queue)


def slow_steps(engine, seconds):
    step = engine.step

    def slow():
        time.sleep(seconds)
        return step()

    engine.step = slow


async def stream_one(client, prompt, sampling):
    openai_fields = {k: v for k, v in sampling.items() if k != "top_k"}
    extra = {"ignore_eos": True, **{k: v for k, v in sampling.items() if k == "top_k"}}
    stream = await client.completions.create(model=NAME, prompt=prompt, max_tokens=STREAM_TOKENS, stream=True,
                                             extra_body=extra, **openai_fields)
    text, reason = "", None
    async for chunk in stream:
        text += chunk.choices[0].text
        reason = chunk.choices[0].finish_reason or reason
    return text, reason


def run_streams(url, during=None):
    """The streaming clients' (text, finish_reason); `during(client)` runs in a thread meanwhile."""
    async def main():
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120) as client:
            streams = [asyncio.create_task(stream_one(client, p, s)) for p, s in STREAMS]
            if during is not None:
                await asyncio.to_thread(during)
            return await asyncio.gather(*streams)

    return asyncio.run(main())


def hostile_requests(url, engine, outcomes):
    """Everything a hostile client tried; `outcomes` gets (what, status, detail) for each."""
    deadline = time.monotonic() + 30
    while engine.load() < len(STREAMS):  # the streams are in
        assert time.monotonic() < deadline
        time.sleep(0.01)
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}

    def api(what, **kw):
        try:
            out = client.completions.create(model=NAME, **{"prompt": "x", "max_tokens": 4, **kw})
            outcomes.append((what, 200, out.choices[0].text))
        except openai.APIStatusError as err:
            outcomes.append((what, err.status_code, err.body.get("param") if isinstance(err.body, dict) else None,
                             err.message, err.response.headers.get("retry-after")))

    def raw(what, content, headers=auth):
        r = httpx.post(url + "/v1/completions", content=content, headers=headers, timeout=60)
        outcomes.append((what, r.status_code, r.json()["error"]["message"]))

    api("too many for the queue", prompt=["q"] * 8)  # 6 streaming + 8 > 12
    api("top_p 1e-50", top_p=1e-50, temperature=1.0, max_tokens=6)
    api("temperature 1e-40", temperature=1e-40, max_tokens=6)
    api("greedy", temperature=0, max_tokens=6)
    api("top_k 2**63", extra_body={"top_k": 2 ** 63})
    api("seed 2**70", seed=2 ** 70, temperature=1.0)
    api("temperature 3", temperature=3)
    api("5 stop strings", stop=["a", "b", "c", "d", "e"])
    api("a 300-character stop string", stop=["s" * 300])
    api("17 prompts", prompt=["p"] * 17)
    api("max_tokens 10**30", max_tokens=10 ** 30)
    api("poisoned", prompt="boom" + POISON, max_tokens=10, extra_body={"ignore_eos": True})
    try:
        client.chat.completions.create(model=NAME, messages=[{"role": ["user"], "content": "x"}])
    except openai.BadRequestError as err:
        outcomes.append(("role as a list", 400, err.body.get("param")))
    raw("temperature NaN", b'{"model": "%s", "prompt": "x", "temperature": NaN}' % NAME.encode())
    raw("a 3000-digit integer", b'{"model": "%s", "prompt": "x", "max_tokens": %s}' % (NAME.encode(), b"9" * 3000))
    raw("nesting 1900 deep", b'{"model": "%s", "prompt": %s}' % (NAME.encode(), b"[" * 1900 + b"]" * 1900))
    raw("a body past the limit", b'{"prompt": "' + b"x" * 5000 + b'"}')
    raw("a form post", b"model=x&prompt=y", {"Authorization": f"Bearer {KEY}",
                                             "Content-Type": "application/x-www-form-urlencoded"})
    raw("text/plain", b'{"model": "%s", "prompt": "x"}' % NAME.encode(), {"Authorization": f"Bearer {KEY}",
                                                                          "Content-Type": "text/plain"})
    raw("no 'Bearer '", b'{"model": "%s", "prompt": "x"}' % NAME.encode(),
        {"Authorization": KEY, "Content-Type": "application/json"})
    with httpx.stream("POST", url + "/v1/completions", headers=auth, timeout=60,
                      json={"model": NAME, "prompt": "boom" + POISON, "max_tokens": 10, "stream": True,
                            "ignore_eos": True}) as r:
        outcomes.append(("poisoned, streaming", r.status_code, [line for line in r.iter_lines() if line]))
    assert engine.load() >= len(STREAMS)  # all of this happened while the streams ran


def test_hostile_clients_cannot_hurt_the_streaming_ones(caplog):
    engine, app = make_app()
    with running_server(app) as url:
        clean = run_streams(url)
        slow_steps(engine, 0.04)  # the streams surely outlast the hostile requests
        outcomes = []
        hurt = run_streams(url, lambda: hostile_requests(url, engine, outcomes))
        health = httpx.get(url + "/health")
    assert hurt == clean and all(reason == "length" for _, reason in clean)
    got = {o[0]: o[1:] for o in outcomes}
    assert got["too many for the queue"][0] == 429 and got["too many for the queue"][3] == "1"
    assert got["top_p 1e-50"] == got["temperature 1e-40"] == got["greedy"]  # read as greedy
    assert got["greedy"][0] == 200
    for what, param in [("top_k 2**63", "top_k"), ("seed 2**70", "seed"), ("temperature 3", "temperature"),
                        ("5 stop strings", "stop"), ("a 300-character stop string", "stop"),
                        ("17 prompts", "prompt"), ("max_tokens 10**30", "max_tokens"), ("role as a list", None)]:
        assert got[what][:2] == (400, param) or (what == "role as a list" and got[what] == (400, "messages[0]"))
    assert got["poisoned"][0] == 500 and "req-" in got["poisoned"][2] and "probability" not in got["poisoned"][2]
    assert got["temperature NaN"][0] == got["a 3000-digit integer"][0] == got["nesting 1900 deep"][0] == 400
    assert got["a body past the limit"][0] == 413
    assert got["a form post"][0] == got["text/plain"][0] == 415
    assert got["no 'Bearer '"][0] == 401
    status, lines = got["poisoned, streaming"]
    assert status == 200 and '"server_error"' in lines[-1] and "req-" in lines[-1] and "probability" not in lines[-1]
    assert "probability tensor" in caplog.text  # the cause is in the server log
    assert health.status_code == 200 and engine.cache.n_used == 0


class EngineCrash(BaseException):
    """Something no `except Exception` catches: the engine thread ends."""


def test_a_dead_engine_answers_503_at_once_and_nothing_hangs():
    engine, app = make_app()
    step, crash = engine.step, threading.Event()

    def step_or_die():
        if crash.is_set():
            raise EngineCrash()
        time.sleep(0.02)
        return step()

    engine.step = step_or_die
    with running_server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=30)
        assert httpx.get(url + "/health").status_code == 200
        stream = client.completions.create(model=NAME, prompt="held", max_tokens=100, stream=True,
                                           extra_body={"ignore_eos": True})
        next(iter(stream))
        crash.set()
        with pytest.raises(openai.APIError) as held:  # the request it held ends with an error, not a hang
            for _ in stream:
                pass
        assert "engine stopped" in str(held.value) and "req-" in str(held.value)
        health = httpx.get(url + "/health")
        assert health.status_code == 503 and "stopped" in health.json()["error"]
        started = time.monotonic()
        with pytest.raises(openai.InternalServerError) as err:
            client.completions.create(model=NAME, prompt="new", max_tokens=2)
        assert err.value.status_code == 503 and time.monotonic() - started < 5


def test_serve_refuses_a_bad_port_before_loading_anything(capsys):
    assert cli_main(["serve", "--model", "/nonexistent", "--port", "99999999"]) == 1
    err = capsys.readouterr().err
    assert "99999999 is not a TCP port" in err and "Traceback" not in err
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert cli_main(["serve", "--model", "/nonexistent", "--port", str(port)]) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_serve_reads_the_api_key_from_the_environment(monkeypatch):
    import uvicorn

    engine, _ = make_app()
    seen = {}
    monkeypatch.setattr(server_module, "load_engine", lambda *a, **kw: (engine, _byte_tokenizer()))
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: seen.update(app=self.config.app))
    monkeypatch.setenv("DSMOE_API_KEY", "from-env")
    assert cli_main(["serve", "--model", "/some/dir", "--port", "0", "--max-queue", "5"]) == 0
    assert seen["app"].state.parser.api_key == "from-env" and seen["app"].state.worker.max_queue == 5


def test_a_chunked_body_past_the_limit_and_a_slow_template_block_nobody():
    _, app = make_app()
    tokenizer = app.state.parser.tokenizer
    render = tokenizer.apply_chat_template

    def slow_render(*args, **kwargs):
        time.sleep(1.5)
        return render(*args, **kwargs)

    tokenizer.apply_chat_template = slow_render
    with running_server(app) as url:
        auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
        # no Content-Length: the body is counted as it arrives
        r = httpx.post(url + "/v1/completions", content=iter([b'{"prompt": "', b"x" * 3000, b"y" * 3000, b'"}']),
                       headers=auth)
        assert r.status_code == 413 and "4096 bytes" in r.json()["error"]["message"]
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=30)
        chat = threading.Thread(target=lambda: client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=2))
        chat.start()
        time.sleep(0.3)  # the template is rendering now
        started = time.monotonic()
        assert httpx.get(url + "/health").status_code == 200
        assert client.completions.create(model=NAME, prompt="x", max_tokens=2).usage.completion_tokens >= 1
        assert time.monotonic() - started < 1.0  # served while the template was still rendering
        chat.join()
