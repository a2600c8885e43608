"""`dsmoe serve`: an OpenAI-compatible HTTP server over the continuously batched engine.

Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (the checkpoint's chat
template when it has one, the tokenizer's documented default otherwise), streaming by
server-sent events for both, `GET /v1/models`, `GET /v1/models/{id}`, `GET /health`.
Responses carry OpenAI's usage counts (with `stream_options.include_usage` when streaming).

Notable:
- One engine thread runs `Engine.step()` whenever there is work; every HTTP request
  becomes an engine request that joins the running batch at the next step (continuous
  batching), and its tokens come back to the event loop through a queue.
- Bad input never reaches the engine: requests are validated field by field, and every
  error is OpenAI's JSON shape (`{"error": {"message", "type", "param", "code"}}`) with the
  right status: 400 (malformed JSON, wrong types, max_tokens <= 0 or past the context, a
  prompt longer than the context), 401 (wrong API key), 404 (unknown model or route).
- A client that disconnects, streaming or not, has its request aborted: its cache row is
  freed at the next step.
- Binds 127.0.0.1 unless told otherwise; `--api-key` requires `Authorization: Bearer KEY`
  on /v1 routes (/health stays open for probes).
Deliberately not here: n > 1, logprobs, echo, penalties, tools, multiple models.
"""

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid

from dsmoe.errors import DsmoeError
from dsmoe.infer.engine import Engine, Event, Request, encode_prompt
from dsmoe.infer.generate import chat_stop_ids, load_engine
from dsmoe.infer.sampling import SamplingParams, is_int, is_number

log = logging.getLogger("dsmoe.serve")
MAX_STOP_STRINGS = 4  # as OpenAI
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


# ------------------------------------------------------------------------- the engine thread
class EngineWorker:
    """Steps the engine on one background thread whenever it has work."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="dsmoe-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.engine.fail_all("the server is shutting down")

    def submit(self, prompt_ids: list[int], params: SamplingParams, on_event) -> Request:
        req = self.engine.add_request(prompt_ids, params, on_event=on_event,
                                      request_id=f"req-{uuid.uuid4().hex[:16]}")
        self._wake.set()
        return req

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self._wake.set()

    def _loop(self) -> None:
        while not self._stopping:
            if not self.engine.has_work():
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                self.engine.step()
            except Exception as err:  # keep serving: fail the batch, not the server
                log.exception("engine step failed")
                self.engine.fail_all(f"internal error: {type(err).__name__}: {err}")


# ------------------------------------------------------------------------------- errors
class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _field(body: dict, name: str, check, rule: str, default=None):
    """body[name] if present and not null, after `check`; a 400 naming the field otherwise."""
    value = body.get(name)
    if value is None:
        return default
    if not check(value):
        raise APIError(400, f"'{name}': {rule}; got {json.dumps(value)[:80]}", param=name)
    return value


def _unsupported(body: dict, name: str, allowed) -> None:
    value = body.get(name)
    if value is not None and value not in allowed:
        raise APIError(400, f"'{name}'={json.dumps(value)[:80]} is not supported by this server", param=name)


# ---------------------------------------------------------------------- request parsing
class Server:
    """The request handling, independent of the web framework (tested through it)."""

    def __init__(self, engine: Engine, tokenizer, model_name: str, api_key: str | None = None):
        if tokenizer is None:
            raise DsmoeError("serving needs a tokenizer: the model directory has no tokenizer.json "
                             "(save the model with its tokenizer)")
        self.engine, self.tokenizer, self.model_name, self.api_key = engine, tokenizer, model_name, api_key
        self.worker = EngineWorker(engine)
        self.created = int(time.time())
        # A chat turn ends at EOS (always a stop) or at our default template's end-of-turn token.
        self.chat_stop_ids = chat_stop_ids(tokenizer)

    def check_key(self, authorization: str | None) -> None:
        if self.api_key is None:
            return
        given = (authorization or "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise APIError(401, "Incorrect API key provided: give it as 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    def check_model(self, body: dict) -> None:
        model = _field(body, "model", lambda v: isinstance(v, str), "must be a string")
        if model is None:
            raise APIError(400, "'model' is required", param="model")
        if model != self.model_name:
            raise APIError(404, f"The model '{model}' does not exist; this server serves "
                                f"'{self.model_name}'", param="model", code="model_not_found")

    def sampling(self, body: dict, n_prompt: int, chat: bool) -> SamplingParams:
        for name, allowed in (("n", (1,)), ("best_of", (1,)), ("echo", (False,)), ("logprobs", (False, 0)),
                              ("top_logprobs", (0,)), ("suffix", ("",)), ("presence_penalty", (0,)),
                              ("frequency_penalty", (0,)), ("logit_bias", ({},)), ("tools", ([],))):
            _unsupported(body, name, allowed)
        room = self.engine.max_len - n_prompt
        if room < 1:
            raise APIError(400, f"This model's maximum context length is {self.engine.max_len} tokens, "
                                f"and the prompt has {n_prompt}: shorten it", param="messages" if chat else "prompt",
                           code="context_length_exceeded")
        name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _field(body, name, lambda v: is_int(v) and v >= 1, "must be a positive integer",
                            default=room if chat else min(16, room))
        if max_tokens > room:
            raise APIError(400, f"This model's maximum context length is {self.engine.max_len} tokens. "
                                f"However, you requested {n_prompt + max_tokens} tokens ({n_prompt} in the "
                                f"prompt, {max_tokens} for the completion): reduce {name} or the prompt",
                           param=name, code="context_length_exceeded")
        stop = _field(body, "stop", lambda v: isinstance(v, str) or (
            isinstance(v, list) and len(v) <= MAX_STOP_STRINGS and all(isinstance(s, str) for s in v)),
            f"must be a string or a list of at most {MAX_STOP_STRINGS} strings", default=[])
        stop = [stop] if isinstance(stop, str) else stop
        if any(s == "" for s in stop):
            raise APIError(400, "'stop': stop strings must not be empty", param="stop")
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=float(_field(body, "temperature", lambda v: is_number(v) and 0 <= v <= 2,
                                     "must be a number between 0 and 2", default=1.0)),
            top_p=float(_field(body, "top_p", lambda v: is_number(v) and 0 < v <= 1,
                               "must be a number in (0, 1]", default=1.0)),
            top_k=_field(body, "top_k", lambda v: is_int(v) and v >= -1, "must be an integer >= 0 "
                         "(0 or -1: no limit)", default=0),
            seed=_field(body, "seed", is_int, "must be an integer"),
            stop=stop,
            stop_token_ids=self.chat_stop_ids if chat else [],
            ignore_eos=bool(_field(body, "ignore_eos", lambda v: isinstance(v, bool), "must be a boolean",
                                   default=False)))
        params.top_k = max(params.top_k, 0)
        return params

    def completion_prompts(self, body: dict) -> list[list[int]]:
        prompt = body.get("prompt")
        rule = "must be a string, a list of strings, a list of token ids or a list of lists of token ids"
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = prompt
        elif isinstance(prompt, list) and prompt and all(is_int(t) for t in prompt):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(
                isinstance(p, list) and all(is_int(t) for t in p) for p in prompt):
            prompts = prompt
        else:
            raise APIError(400, f"'prompt' is required and {rule}", param="prompt")
        ids = [encode_prompt(self.tokenizer, p) if isinstance(p, str) else list(p) for p in prompts]
        for p in ids:
            if not p:
                raise APIError(400, "'prompt' is empty: give at least one token", param="prompt")
            if not all(0 <= t < self.engine.args.vocab_size for t in p):
                raise APIError(400, f"'prompt': token ids must be in [0, {self.engine.args.vocab_size})",
                               param="prompt")
        return ids

    def chat_prompt(self, body: dict) -> list[int]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "'messages' is required and must be a non-empty list", param="messages")
        rendered = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
                raise APIError(400, f"'messages[{i}]' must be an object with a role in {sorted(CHAT_ROLES)}",
                               param=f"messages[{i}]")
            content = m.get("content")
            if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                                 and isinstance(p.get("text"), str) for p in content):
                content = "".join(p["text"] for p in content)
            if not isinstance(content, str):
                raise APIError(400, f"'messages[{i}].content' must be a string or a list of text parts",
                               param=f"messages[{i}].content")
            rendered.append({"role": CHAT_ROLES[m["role"]], "content": content})
        try:
            text = self.tokenizer.apply_chat_template(rendered, add_generation_prompt=True)
        except DsmoeError as err:
            raise APIError(400, str(err), param="messages") from None
        return self.tokenizer.encode(text, add_bos=False)  # a rendered chat carries its own BOS

    def parse(self, body, chat: bool):
        """(prompt ids per choice, sampling params, stream, include_usage) or an APIError."""
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        self.check_model(body)
        stream = _field(body, "stream", lambda v: isinstance(v, bool), "must be a boolean", default=False)
        options = _field(body, "stream_options", lambda v: isinstance(v, dict), "must be an object", default={})
        include_usage = _field(options, "include_usage", lambda v: isinstance(v, bool), "must be a boolean",
                               default=False)
        prompts = [self.chat_prompt(body)] if chat else self.completion_prompts(body)
        params = [self.sampling(body, len(p), chat) for p in prompts]
        try:
            for p, sp in zip(prompts, params):
                sp.validate()
                self.engine.check_prompt(p, sp.max_tokens)
        except DsmoeError as err:
            raise APIError(400, str(err)) from None
        return prompts, params, stream, include_usage


# ------------------------------------------------------------------------------ the app
def create_app(engine: Engine, tokenizer, model_name: str, api_key: str | None = None):
    """The FastAPI application; the engine thread starts and stops with it."""
    import contextlib

    from fastapi import FastAPI, Request as HTTPRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    server = Server(engine, tokenizer, model_name, api_key)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        server.worker.start()
        try:
            yield
        finally:
            server.worker.stop()

    app = FastAPI(title="dsmoe", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(_req, err: APIError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(HTTPException)
    async def http_error(_req, err: HTTPException):
        return JSONResponse(APIError(err.status_code, str(err.detail)).body(), status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_req, err: RequestValidationError):
        return JSONResponse(APIError(400, str(err.errors())[:500]).body(), status_code=400)

    @app.get("/health")
    async def health():
        s = engine.stats
        return {"status": "ok", "model": model_name, "running": len(engine.running),
                "waiting": len(engine.waiting), "cache_bytes": engine.cache.nbytes(),
                "decode_tokens_per_s": _finite(s.decode_tokens_per_second),
                "draft_acceptance": _finite(s.acceptance) if engine.speculative else None}

    def model_card():
        return {"id": model_name, "object": "model", "created": server.created, "owned_by": "dsmoe",
                "max_model_len": engine.max_len}

    @app.get("/v1/models")
    async def models(request: HTTPRequest):
        server.check_key(request.headers.get("authorization"))
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: HTTPRequest):
        server.check_key(request.headers.get("authorization"))
        server.check_model({"model": model_id})
        return model_card()

    async def handle(request: HTTPRequest, chat: bool):
        server.check_key(request.headers.get("authorization"))
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise APIError(400, f"the request body is not valid JSON: {err}") from None
        prompts, params, stream, include_usage = server.parse(body, chat)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()

        def on_event(ev: Event) -> None:  # called on the engine thread
            with contextlib.suppress(RuntimeError):  # the loop may be closing
                loop.call_soon_threadsafe(queue.put_nowait, ev)

        reqs = [server.worker.submit(p, sp, on_event) for p, sp in zip(prompts, params)]
        index = {r.id: i for i, r in enumerate(reqs)}
        reply = _Reply(chat, model_name, reqs)
        if stream:
            return StreamingResponse(reply.sse(queue, index, include_usage, server.worker),
                                     media_type="text/event-stream")
        try:
            remaining, checked = len(reqs), time.monotonic()
            while remaining:
                with contextlib.suppress(asyncio.TimeoutError):
                    remaining -= (await asyncio.wait_for(queue.get(), timeout=0.5)).finished
                if time.monotonic() - checked > 0.5:  # a client that gave up frees its row
                    if await request.is_disconnected():
                        break
                    checked = time.monotonic()
        finally:
            for r in reqs:
                if not r.finished:
                    server.worker.abort(r.id)
        failed = [r for r in reqs if r.finish_reason == "error"]
        if failed:
            raise APIError(500, failed[0].error or "internal error", type_="server_error")
        return reply.full()

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        return await handle(request, chat=True)

    return app


class _Reply:
    """OpenAI response bodies for a set of engine requests (one per choice)."""

    def __init__(self, chat: bool, model_name: str, reqs: list[Request]):
        self.chat, self.model, self.reqs = chat, model_name, reqs
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def usage(self) -> dict:
        prompt = sum(len(r.prompt_ids) for r in self.reqs)
        completion = sum(len(r.output_ids) for r in self.reqs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _head(self, object_: str) -> dict:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model}

    def full(self) -> dict:
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": r.text},
                        "logprobs": None, "finish_reason": _reason(r)} for i, r in enumerate(self.reqs)]
        else:
            choices = [{"index": i, "text": r.text, "logprobs": None, "finish_reason": _reason(r)}
                       for i, r in enumerate(self.reqs)]
        return {**self._head(self.object), "choices": choices, "usage": self.usage()}

    def chunk(self, index: int, text: str | None, finish_reason: str | None, first: bool = False) -> str:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            body = {**self._head("chat.completion.chunk"), "choices": [choice]}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
            body = {**self._head("text_completion"), "choices": [choice]}
        return _sse(body)

    async def sse(self, queue: asyncio.Queue, index: dict[str, int], include_usage: bool, worker: EngineWorker):
        try:
            if self.chat:
                for i in range(len(self.reqs)):
                    yield self.chunk(i, None, None, first=True)
            remaining = len(self.reqs)
            while remaining:
                ev = await queue.get()
                i = index[ev.request.id]
                if ev.finished and ev.request.finish_reason == "error":
                    yield _sse(APIError(500, ev.request.error or "internal error", type_="server_error").body())
                    return
                if ev.text:
                    yield self.chunk(i, ev.text, None)
                if ev.finished:
                    remaining -= 1
                    yield self.chunk(i, None, _reason(ev.request))
            if include_usage:
                yield _sse({**self._head(self.object + ".chunk" if self.chat else self.object),
                            "choices": [], "usage": self.usage()})
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or we are done): free whatever still runs
            for r in self.reqs:
                if not r.finished:
                    worker.abort(r.id)


def _finite(x: float) -> float | None:
    return x if x == x else None  # JSON has no NaN


def _reason(r: Request) -> str:
    return "length" if r.finish_reason == "length" else "stop"


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


# ------------------------------------------------------------------------------- the verb
def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="model directory (dsmoe-trained or a Hugging Face DeepSeek checkpoint)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    parser.add_argument("--served-model-name", default=None, help="model id clients ask for "
                        "(default: the directory's name)")
    parser.add_argument("--max-batch", type=int, default=16, help="requests decoded together")
    parser.add_argument("--max-len", type=int, default=None, help="context per request (default: "
                        "the model's, at most 8192)")
    parser.add_argument("--speculative", action="store_true", help="MTP self-speculative decoding")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: per device)")


def run(args) -> int:
    from pathlib import Path

    import uvicorn

    engine, tokenizer = load_engine(args.model, device=args.device, dtype=args.dtype, max_batch=args.max_batch,
                                    max_len=args.max_len, speculative=args.speculative)
    name = args.served_model_name or Path(args.model).resolve().name
    app = create_app(engine, tokenizer, name, api_key=args.api_key)
    print(f"serving {name!r} on http://{args.host}:{args.port}/v1 (max batch {engine.max_batch}, "
          f"context {engine.max_len}{', speculative' if engine.speculative else ''})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
