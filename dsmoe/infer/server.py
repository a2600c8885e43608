"""`dsmoe serve`: an OpenAI-compatible HTTP server over the continuously batched engine.

Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (the checkpoint's chat
template when it has one, the tokenizer's documented default otherwise), streaming by
server-sent events for both, `GET /v1/models`, `GET /v1/models/{id}`, `GET /health`.
Responses carry OpenAI's usage counts (with `stream_options.include_usage` when streaming).

Notable:
- One engine thread runs `Engine.step()` whenever there is work; every HTTP request
  becomes an engine request that joins the running batch at the next step (continuous
  batching), and its tokens come back to the event loop through a queue.
- This module is the HTTP side only: routes, the engine thread, waiting and streaming.
  Parsing, validation and the response bodies are `openai_api.py`'s (no web framework
  there); every error is OpenAI's JSON shape with the right status, 404 for an unknown route.
- A client that disconnects, streaming or not, has its request aborted: its cache row is
  freed at the next step.
- Binds 127.0.0.1 unless told otherwise; `--api-key` requires `Authorization: Bearer KEY`
  on /v1 routes (/health stays open for probes).
"""

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid

from dsmoe.infer.engine import Engine
from dsmoe.infer.expert_store import store_stats
from dsmoe.infer.generate import load_engine
from dsmoe.infer.memory_options import add_memory_arguments
from dsmoe.infer.openai_api import APIError, OpenAIParser, Reply, finish_reason, sse
from dsmoe.infer.requests import Event, Request
from dsmoe.infer.sampling import SamplingParams

log = logging.getLogger("dsmoe.serve")


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


# ------------------------------------------------------------------------------ the app
def create_app(engine: Engine, tokenizer, model_name: str, api_key: str | None = None):
    """The FastAPI application; the engine thread starts and stops with it."""
    from fastapi import FastAPI, Request as HTTPRequest

    parser = OpenAIParser(tokenizer, model_name, engine.max_len, engine.args.vocab_size, api_key)
    worker = EngineWorker(engine)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title="dsmoe", lifespan=lifespan)
    app.state.parser, app.state.worker = parser, worker
    add_error_handlers(app)

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "dsmoe",
                "max_model_len": engine.max_len}

    @app.get("/health")
    async def health():
        return health_body(engine, model_name)

    @app.get("/v1/models")
    async def models(request: HTTPRequest):
        parser.check_key(request.headers.get("authorization"))
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: HTTPRequest):
        parser.check_key(request.headers.get("authorization"))
        parser.check_model({"model": model_id})
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        return await complete(request, parser, worker, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        return await complete(request, parser, worker, chat=True)

    return app


def add_error_handlers(app) -> None:
    """Every error as OpenAI's JSON shape: ours, the framework's (404, 405) and its validation's."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @app.exception_handler(APIError)
    async def api_error(_req, err: APIError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(HTTPException)
    async def http_error(_req, err: HTTPException):
        return JSONResponse(APIError(err.status_code, str(err.detail)).body(), status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_req, err: RequestValidationError):
        return JSONResponse(APIError(400, str(err.errors())[:500]).body(), status_code=400)


def health_body(engine: Engine, model_name: str) -> dict:
    s = engine.stats
    return {"status": "ok", "model": model_name, "running": len(engine.running),
            "waiting": len(engine.waiting), "cache_bytes": engine.cache.nbytes(),
            "decode_tokens_per_s": _finite(s.decode_tokens_per_second),
            "draft_acceptance": _finite(s.acceptance) if engine.speculative else None,
            "expert_store": store_stats(engine.model)}  # None unless --max-expert-memory


async def complete(request, parser: OpenAIParser, worker: "EngineWorker", chat: bool):
    """One completions request: parse, submit a request per choice, stream or wait for them."""
    from fastapi.responses import StreamingResponse

    parser.check_key(request.headers.get("authorization"))
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(400, f"the request body is not valid JSON: {err}") from None
    parsed = parser.parse(body, chat)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Event] = asyncio.Queue()

    def on_event(ev: Event) -> None:  # called on the engine thread
        with contextlib.suppress(RuntimeError):  # the loop may be closing
            loop.call_soon_threadsafe(queue.put_nowait, ev)

    reqs = [worker.submit(p, sp, on_event) for p, sp in zip(parsed.prompts, parsed.params)]
    reply = Reply(chat, parser.model_name, reqs)
    if parsed.stream:
        return StreamingResponse(stream_events(reply, queue, parsed.include_usage, worker),
                                 media_type="text/event-stream")
    await wait_for_all(reqs, queue, request, worker)
    failed = [r for r in reqs if r.finish_reason == "error"]
    if failed:
        raise APIError(500, failed[0].error or "internal error", type_="server_error")
    return reply.full()


async def wait_for_all(reqs: list[Request], queue: asyncio.Queue, request, worker: "EngineWorker") -> None:
    """Until every request has finished, or the client has gone (then abort what still runs)."""
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
                worker.abort(r.id)


async def stream_events(reply: Reply, queue: asyncio.Queue, include_usage: bool, worker: "EngineWorker"):
    """Server-sent events for the reply's requests as their tokens arrive."""
    index = {r.id: i for i, r in enumerate(reply.reqs)}
    try:
        if reply.chat:
            for i in range(len(reply.reqs)):
                yield reply.chunk(i, None, None, first=True)
        remaining = len(reply.reqs)
        while remaining:
            ev = await queue.get()
            i = index[ev.request.id]
            if ev.finished and ev.request.finish_reason == "error":
                yield sse(APIError(500, ev.request.error or "internal error", type_="server_error").body())
                return
            if ev.text:
                yield reply.chunk(i, ev.text, None)
            if ev.finished:
                remaining -= 1
                yield reply.chunk(i, None, finish_reason(ev.request))
        if include_usage:
            yield reply.usage_chunk()
        yield "data: [DONE]\n\n"
    finally:  # the client went away (or we are done): free whatever still runs
        for r in reply.reqs:
            if not r.finished:
                worker.abort(r.id)


def _finite(x: float) -> float | None:
    return x if x == x else None  # JSON has no NaN


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
    add_memory_arguments(parser)


def run(args) -> int:
    from pathlib import Path

    import uvicorn

    engine, tokenizer = load_engine(args.model, device=args.device, dtype=args.dtype, max_batch=args.max_batch,
                                    max_len=args.max_len, speculative=args.speculative,
                                    quantize=args.quantize, max_expert_memory=args.max_expert_memory)
    name = args.served_model_name or Path(args.model).resolve().name
    app = create_app(engine, tokenizer, name, api_key=args.api_key)
    print(f"serving {name!r} on http://{args.host}:{args.port}/v1 (max batch {engine.max_batch}, "
          f"context {engine.max_len}{', speculative' if engine.speculative else ''})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
