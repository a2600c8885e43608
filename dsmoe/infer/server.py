"""`dsmoe serve`: an OpenAI-compatible HTTP server over the continuously batched engine.

Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (the checkpoint's chat
template when it has one, the tokenizer's documented default otherwise), streaming by
server-sent events for both, `GET /v1/models`, `GET /v1/models/{id}`, `GET /health`.
Responses carry OpenAI's usage counts (with `stream_options.include_usage` when streaming),
prompt tokens served from the prefix cache included (`--prefix-cache-*`; /health shows its
hit rate and bytes per tier).

Notable:
- One engine thread runs `Engine.step()` whenever there is work; every HTTP request
  becomes an engine request that joins the running batch at the next step (continuous
  batching), and its tokens come back to the event loop through a queue.
- This module is the HTTP side only: routes, the engine thread, waiting and streaming.
  Parsing, validation and the response bodies are `openai_api.py`'s (no web framework
  there); every error is OpenAI's JSON shape with the right status, 404 for an unknown route.
- A client that disconnects, streaming or not, has its request aborted: its cache row is
  freed at the next step.
- Binds 127.0.0.1 unless told otherwise; an API key (`$DSMOE_API_KEY`, or `--api-key`, which
  `ps` shows) requires `Authorization: Bearer KEY` on /v1 routes (/health stays open).
- One client cannot hurt the others: POST bodies must be `application/json` (415: a web page
  the operator visits cannot post a plain form to 127.0.0.1), at most `max_body_bytes` (413),
  and at most `max_queue` engine requests wait or run at once (429 with Retry-After).
  Decoding, validation, tokenisation and chat templates run on worker threads, off the
  event loop. A request that fails inside the engine gets a generic message with its id;
  the cause goes to the server log. If the engine thread dies, /health answers 503 and so
  does every new request, at once; the requests it held finish with an error.
"""

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
import uuid

from dsmoe.device import add_device_arguments
from dsmoe.errors import DsmoeError
from dsmoe.infer import prefix_cache, speculative
from dsmoe.infer.engine import Engine
from dsmoe.infer.expert_store import store_stats
from dsmoe.infer.generate import load_engine
from dsmoe.infer.memory_options import add_memory_arguments
from dsmoe.infer.openai_api import APIError, OpenAIParser, Reply, decode_body, finish_reason, sse
from dsmoe.infer.requests import Event, Request
from dsmoe.infer.sampling import SamplingParams

log = logging.getLogger("dsmoe.serve")

MAX_BODY_BYTES = 2 * 1024 * 1024  # a request body past this is refused with 413
MAX_QUEUE = 256  # engine requests waiting or running; past this, 429 with Retry-After
API_KEY_ENV = "DSMOE_API_KEY"


# ------------------------------------------------------------------------- the engine thread
class EngineWorker:
    """Steps the engine on one background thread whenever it has work.

    The engine isolates a failing request itself; an error that still escapes a step fails
    the requests held then and the loop goes on. Anything that ends the thread (`dead` says
    what) fails every request it held, and `submit` refuses new ones with 503 from then on.
    """

    def __init__(self, engine: Engine, max_queue: int = MAX_QUEUE):
        self.engine = engine
        self.max_queue = max_queue
        self.dead: str | None = None
        self._wake = threading.Event()
        self._submit = threading.Lock()  # no request slips in after the thread has died
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stopping, self.dead = False, None
        self._thread = threading.Thread(target=self._run, name="dsmoe-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.engine.fail_all("the server is shutting down")

    def submit_all(self, prompts: list[list[int]], params: list[SamplingParams], on_event) -> list[Request]:
        """One engine request per prompt, all or none: 503 when the engine is gone, 429 when full."""
        with self._submit:
            if self.dead is not None:
                raise APIError(503, "the inference engine has stopped; the server must be restarted",
                               type_="server_error", code="engine_dead")
            if self.engine.load() + len(prompts) > self.max_queue:
                raise APIError(429, f"the server is busy ({self.max_queue} requests queued or running): "
                                    f"retry shortly", type_="rate_limit_error", code="server_busy",
                               headers={"Retry-After": "1"})
            try:
                reqs = [self.engine.add_request(p, sp, on_event=on_event,
                                                request_id=f"req-{uuid.uuid4().hex[:16]}")
                        for p, sp in zip(prompts, params)]
            except DsmoeError as err:  # the parser checks all of this first; defence in depth
                raise APIError(400, str(err)) from None
        self._wake.set()
        return reqs

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self._wake.set()

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as err:
            log.critical("the engine thread died", exc_info=True)
            reason = f"{type(err).__name__}"
        else:
            reason = "stopped"
        with self._submit:
            self.dead = reason
        with contextlib.suppress(Exception):
            self.engine.fail_all("the inference engine stopped; retry once the server is restarted")

    def _loop(self) -> None:
        while not self._stopping:
            if not self.engine.has_work():
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                self.engine.step()
            except Exception:  # the engine isolates requests itself; this is the last resort
                log.exception("engine step failed; failing the requests it held")
                self.engine.fail_all("the server failed while running this request; see the server log")


# ------------------------------------------------------------------------------ the app
def create_app(engine: Engine, tokenizer, model_name: str, api_key: str | None = None, *,
               max_body_bytes: int = MAX_BODY_BYTES, max_queue: int = MAX_QUEUE):
    """The FastAPI application; the engine thread starts and stops with it."""
    from fastapi import FastAPI, Request as HTTPRequest
    from fastapi.responses import JSONResponse

    if max_body_bytes < 1 or max_queue < 1:
        raise DsmoeError("max_body_bytes and max_queue must be positive")
    parser = OpenAIParser(tokenizer, model_name, engine.max_len, engine.args.vocab_size, api_key)
    worker = EngineWorker(engine, max_queue)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        worker.start()
        try:
            yield
        finally:
            worker.stop()
            if engine.prefix_cache is not None:
                engine.prefix_cache.flush()  # the disk tier's pending writes survive the restart

    app = FastAPI(title="dsmoe", lifespan=lifespan)
    app.state.parser, app.state.worker = parser, worker
    add_error_handlers(app)
    from dsmoe.analysis.explore import MOUNT, explorer_router  # the routing explorer page
    app.include_router(explorer_router(engine.model, tokenizer, name=model_name), prefix=MOUNT)

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "dsmoe",
                "max_model_len": engine.max_len}

    @app.get("/health")
    async def health():
        if worker.dead is not None:
            return JSONResponse({"status": "error", "model": model_name,
                                 "error": f"the inference engine has stopped ({worker.dead})"}, status_code=503)
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
        return await complete(request, parser, worker, chat=False, max_body_bytes=max_body_bytes)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        return await complete(request, parser, worker, chat=True, max_body_bytes=max_body_bytes)

    return app


def add_error_handlers(app) -> None:
    """Every error as OpenAI's JSON shape: ours, the framework's (404, 405) and its validation's."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @app.exception_handler(APIError)
    async def api_error(_req, err: APIError):
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(HTTPException)
    async def http_error(_req, err: HTTPException):
        return JSONResponse(APIError(err.status_code, str(err.detail)).body(), status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_req, err: RequestValidationError):
        return JSONResponse(APIError(400, str(err.errors())[:500]).body(), status_code=400)


def health_body(engine: Engine, model_name: str) -> dict:
    s = engine.stats
    return {"status": "ok", "model": model_name, "running": len(engine.running),
            "waiting": len(engine.waiting), "prefilling": int(engine.staged is not None),
            "cache_bytes": engine.cache.nbytes(),
            "decode_tokens_per_s": _finite(s.decode_tokens_per_second),
            "draft_acceptance": _finite(s.acceptance) if engine.speculative else None,
            "prefix_cache": engine.prefix_cache.stats() if engine.prefix_cache is not None else None,
            "expert_store": store_stats(engine.model)}  # None unless --max-expert-memory


async def complete(request, parser: OpenAIParser, worker: "EngineWorker", chat: bool,
                   max_body_bytes: int = MAX_BODY_BYTES):
    """One completions request: parse, submit a request per choice, stream or wait for them."""
    from fastapi.responses import StreamingResponse
    from starlette.concurrency import run_in_threadpool

    parser.check_key(request.headers.get("authorization"))
    check_json_content_type(request.headers.get("content-type"))
    if worker.dead is not None:  # at once, before reading anything
        raise APIError(503, "the inference engine has stopped; the server must be restarted",
                       type_="server_error", code="engine_dead")
    raw = await read_body(request, max_body_bytes)
    # decoding, tokenisation and the chat template can take a while: not on the event loop
    parsed = await run_in_threadpool(lambda: parser.parse(decode_body(raw), chat))
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Event] = asyncio.Queue()

    def on_event(ev: Event) -> None:  # called on the engine thread
        with contextlib.suppress(RuntimeError):  # the loop may be closing
            loop.call_soon_threadsafe(queue.put_nowait, ev)

    reqs = worker.submit_all(parsed.prompts, parsed.params, on_event)
    reply = Reply(chat, parser.model_name, reqs)
    if parsed.stream:
        return StreamingResponse(stream_events(reply, queue, parsed.include_usage, worker),
                                 media_type="text/event-stream")
    await wait_for_all(reqs, queue, request, worker)
    failed = [r for r in reqs if r.finish_reason == "error"]
    if failed:
        raise APIError(500, error_message(failed[0]), type_="server_error")
    return reply.full()


def check_json_content_type(content_type: str | None) -> None:
    """Only JSON bodies: a form a web page posts (no CORS preflight) is refused with 415."""
    if (content_type or "").split(";")[0].strip().lower() != "application/json":
        raise APIError(415, "the request body must be JSON, sent with 'Content-Type: application/json'",
                       code="unsupported_media_type")


async def read_body(request, limit: int) -> bytes:
    """The request body, or 413 as soon as it is known to be past `limit` bytes."""
    too_large = APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise too_large
        parts.append(part)
    return b"".join(parts)


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
                yield sse(APIError(500, error_message(ev.request), type_="server_error").body())
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


def error_message(r: Request) -> str:
    """What a client is told about its failed request: generic, with the id to find it in the log."""
    message = r.error or "the server failed while running this request"
    return message if r.id in message else f"{message} (request {r.id})"


def _finite(x: float) -> float | None:
    return x if x == x else None  # JSON has no NaN


# ------------------------------------------------------------------------------- the verb
def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="model directory (dsmoe-trained or a Hugging Face DeepSeek checkpoint)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (better: set "
                        f"${API_KEY_ENV}, which `ps` does not show)")
    parser.add_argument("--served-model-name", default=None, help="model id clients ask for "
                        "(default: the directory's name)")
    parser.add_argument("--max-batch", type=int, default=16, help="requests decoded together")
    parser.add_argument("--max-len", type=int, default=None, help="context per request (default: "
                        "the model's, at most 8192)")
    speculative.add_arguments(parser)
    parser.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES,
                        help=f"largest request body accepted, else 413 (default: {MAX_BODY_BYTES})")
    parser.add_argument("--max-queue", type=int, default=MAX_QUEUE, help="requests waiting or running at "
                        f"once, else 429 with Retry-After (default: {MAX_QUEUE})")
    add_device_arguments(parser, dtype=True)
    prefix_cache.add_arguments(parser)
    add_memory_arguments(parser)


def run(args) -> int:
    from pathlib import Path

    import uvicorn

    if args.max_body_bytes < 1 or args.max_queue < 1:
        raise DsmoeError("--max-body-bytes and --max-queue must be positive")
    prefix = prefix_cache.PrefixCacheSettings.from_args(args)  # a bad size fails before loading
    sock = bind(args.host, args.port)  # before loading the model: a bad address fails at once
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    engine, tokenizer = load_engine(args.model, device=args.device, dtype=args.dtype, max_batch=args.max_batch,
                                    max_len=args.max_len, speculative=args.speculative, prefix=prefix,
                                    quantize=args.quantize, max_expert_memory=args.max_expert_memory)
    name = args.served_model_name or Path(args.model).resolve().name
    app = create_app(engine, tokenizer, name, api_key=api_key, max_body_bytes=args.max_body_bytes,
                     max_queue=args.max_queue)
    print(f"serving {name!r} on http://{args.host}:{sock.getsockname()[1]}/v1 (max batch {engine.max_batch}, "
          f"context {engine.max_len}{', speculative' if engine.speculative else ''}"
          f"{', API key required' if api_key else ''})", flush=True)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")  # our log too
    uvicorn.Server(uvicorn.Config(app, host=args.host, port=sock.getsockname()[1], log_level="info")).run(
        sockets=[sock])
    return 0


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or a DsmoeError saying what is wrong with the address."""
    if not 0 <= port <= 65535:
        raise DsmoeError(f"--port {port} is not a TCP port: choose one in 1..65535 (e.g. 8000)")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as err:
        raise DsmoeError(f"cannot listen on {host}:{port} ({err.strerror or err}): choose another --port, "
                         f"or a --host this machine has") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock
