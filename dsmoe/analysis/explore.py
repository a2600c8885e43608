"""The routing explorer: one page that shows where every token goes (`dsmoe explore`).

    dsmoe explore --model DIR [--data DIR] [--run DIR] [--port N]
    dsmoe explore --model DIR --prompt TEXT --screenshot out.png     (render once, headless)

Design note
-----------
- One self-contained page (`explore.html`: hand-written HTML, CSS and JavaScript, no CDN,
  nothing vendored) over a few JSON endpoints, served by a FastAPI router that `dsmoe serve`
  mounts at `/explore` as well (`explorer_router`).
- Nothing is computed twice: a trace is `routing.trace_routes` rendered by `routing.to_json`,
  so `POST api/route` answers exactly what `dsmoe route --json -` prints; the data panel is
  `report.collect_routing` over `report.validation_inputs` with `dsmoe report`'s defaults, and the
  training panel reads `metrics.jsonl` with `run_dir.read_metrics`.
- The page's own endpoint (`api/trace`) wraps that same JSON with what only a page needs:
  the unbiased affinities of every expert, the gates' selection biases, and a notice when
  the text was cut to the model's context (the CLI refuses such text; a page cuts it and
  says so).
- Bad input never gives a blank page or a 500: an empty text, a model folder without a
  tokenizer, data the model cannot read all come back as a message the page shows.
Deliberately not here: generation (that is `dsmoe serve`), routing of the MTP modules, and
writing report files (`dsmoe report`). The page holds no state on the server.
"""
from __future__ import annotations

import argparse
import sys
import threading
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from dsmoe.analysis.routing import (encode_trace_text, main_moe_blocks, route_text, to_json, token_texts,
                                    trace_routes)
from dsmoe.device import add_device_arguments
from dsmoe.errors import DataError, DsmoeError

PAGE = "explore.html"
MOUNT = "/explore"
REPORT_SEQ_LEN = 256  # `dsmoe report`'s sequence length when none is given (capped by max_seq_len)
MAX_CURVE_POINTS = 2000  # training curves are thinned to this many steps for the page
# Affinities of every expert for every token and layer are sent up to this many values
# (DeepSeek-V3: 58 layers x 256 experts x 512 tokens would be 7.6M); the chosen experts'
# affinities are always sent.
MAX_SCORES = 1_000_000


def _rounded(values: list) -> list:
    return [_rounded(v) for v in values] if isinstance(values, list) else round(values, 6)


def page_html() -> str:
    return resources.files("dsmoe.analysis").joinpath(PAGE).read_text(encoding="utf-8")


def _report_default(option: str):
    """One of `dsmoe report`'s option defaults, read from its parser so the two never drift."""
    from dsmoe.analysis import report

    parser = argparse.ArgumentParser()
    report.add_arguments(parser)
    return parser.get_default(option)


@dataclass
class Explorer:
    """What the page shows, as plain JSON data; `problem` says why the model cannot route."""
    model: object | None
    tokenizer: object | None
    name: str = "model"
    data_dir: Path | None = None
    run_dir: Path | None = None
    problem: str | None = None
    _data: dict | None = field(default=None, repr=False)
    _data_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self):
        if self.problem is None and self.model is not None and self.tokenizer is None:
            self.problem = (f"{self.name} has no tokenizer.json: copy the tokenizer the model was "
                            "trained with (tokenizer.json, tokenizer_config.json) into the model folder")
        if self.problem is None and self.model is None:
            self.problem = "no model is loaded"

    def _ready(self) -> None:
        if self.problem:
            raise DataError(self.problem)

    def info(self) -> dict:
        out = {"name": self.name, "problem": self.problem, "data": self.data_dir is not None,
               "run": self.run_dir is not None}
        if self.model is not None:
            a = self.model.args
            blocks = main_moe_blocks(self.model)
            out.update(layers=[i for i, _ in blocks], n_experts=a.n_routed_experts,
                       top_k=a.n_activated_experts, max_seq_len=a.max_seq_len, score_func=a.score_func,
                       bias=[moe.gate.bias.float().cpu().tolist() for _, moe in blocks])
        return out

    def route(self, text: str) -> dict:
        """Exactly `dsmoe route --json -` for `text`: refuses empty or too long text alike."""
        self._ready()
        return to_json(route_text(self.model, self.tokenizer, text))

    def trace(self, text: str) -> dict:
        """The page's view: the route JSON of the text cut to the context, the affinities, a notice."""
        self._ready()
        limit = self.model.args.max_seq_len
        ids = encode_trace_text(self.tokenizer, text, sys.maxsize)  # the empty-text check, no length check
        notice = None
        if len(ids) > limit:
            notice = (f"The text is {len(ids):,} tokens long but the model reads at most "
                      f"{limit:,} (max_seq_len): showing the first {limit:,}.")
            ids = ids[:limit]
        trace = trace_routes(self.model, ids, token_texts(self.tokenizer, ids))
        scores_LTE = trace.scores_LTE
        return {"route": to_json(trace), "notice": notice,
                "chosen_scores": _rounded(scores_LTE.gather(-1, trace.experts_LTK).tolist()),
                "scores": _rounded(scores_LTE.tolist()) if scores_LTE.numel() <= MAX_SCORES else None}

    def data_stats(self) -> dict:
        """Domain-by-expert routing and MaxVio on the validation split, as `dsmoe report` counts
        them; computed once (the first visit pays for it) and kept."""
        if self.data_dir is None:
            raise DataError("no data folder was given: start the explorer with --data DIR "
                            "(a folder made by `dsmoe prepare`)")
        self._ready()
        with self._data_lock:
            if self._data is None:
                self._data = self._compute_data_stats()
        return self._data

    def _compute_data_stats(self) -> dict:
        from dsmoe.analysis.report import collect_routing, open_validation_shards, validation_inputs
        from dsmoe.data.shards import TokenShards

        batch_size, n_tokens = _report_default("batch_size"), _report_default("tokens_per_domain")
        seq_len = min(REPORT_SEQ_LEN, self.model.args.max_seq_len)
        domains, skipped = [], []
        for domain in TokenShards(self.data_dir).domains:  # a domain the report would refuse is left out
            try:
                shards, _ = open_validation_shards(self.data_dir, self.tokenizer, [domain], seq_len)
                domains.append(domain)
            except DataError as err:
                skipped.append(str(err))
        if not domains:
            raise DataError(skipped[0] if skipped else f"{self.data_dir} holds no domain")
        batches = {d: validation_inputs(shards, d, batch_size, seq_len, n_tokens) for d in domains}
        stats = collect_routing(self.model, batches, seed=_report_default("seed"))
        relative = stats.share_LDE() * stats.counts_LDE.shape[-1]  # 1.0 = an even spread, as the report plots
        return {**stats.to_dict(), "relative_share": [[[round(v, 4) for v in row] for row in layer]
                                                      for layer in relative.tolist()],
                "skipped": skipped, "seq_len": seq_len, "tokens_per_domain": n_tokens}

    def training(self) -> dict:
        """Loss, MTP loss, validation loss per domain and MaxVio per MoE layer over the steps."""
        from dsmoe.train.run_dir import METRICS_FILE, read_metrics

        if self.run_dir is None:
            raise DataError("no training run was given: start the explorer with --run DIR "
                            "(the folder `dsmoe train --out` wrote)")
        if not (self.run_dir / METRICS_FILE).is_file():
            raise DataError(f"no {METRICS_FILE} in {self.run_dir}: give the folder `dsmoe train --out` wrote")
        records = read_metrics(self.run_dir)
        steps = [r for r in records if "loss" in r]
        stride = max(1, -(-len(steps) // MAX_CURVE_POINTS))
        steps = steps[::stride] + ([steps[-1]] if steps and (len(steps) - 1) % stride else [])
        vals = [r for r in records if "val" in r]
        domains = sorted({d for r in vals for d in r["val"]})
        # Pretraining logs MaxVio per MoE layer; fine-tuning runs log their maximum over layers.
        maxvio = [r.get("maxvio") for r in steps]
        return {"step": [r["step"] for r in steps], "loss": [r["loss"] for r in steps],
                "mtp_loss": [r.get("mtp_loss") for r in steps],
                "maxvio": [v if isinstance(v, list) else [] if v is None else [v] for v in maxvio],
                "maxvio_is_max": any(isinstance(v, (int, float)) for v in maxvio),
                "val_step": [r["step"] for r in vals],
                "val": {d: [r["val"].get(d) for r in vals] for d in domains}}


# --- web -----------------------------------------------------------------------------------------

def explorer_router(model, tokenizer, *, name: str = "model", data_dir: str | Path | None = None,
                    run_dir: str | Path | None = None, problem: str | None = None):
    """A FastAPI router serving the page at its root and the JSON under `api/`; include it with
    `app.include_router(explorer_router(...), prefix="/explore")`."""
    from fastapi import APIRouter, Body
    from fastapi.responses import HTMLResponse, JSONResponse

    explorer = Explorer(model, tokenizer, name, Path(data_dir) if data_dir else None,
                        Path(run_dir) if run_dir else None, problem)
    router = APIRouter()

    def answer(compute):
        """JSON of `compute()`, or the problem as {"error": message} with status 400."""
        try:
            return compute()
        except DsmoeError as err:
            return JSONResponse({"error": str(err)}, status_code=400)

    def text_of(body) -> str:
        text = body.get("text") if isinstance(body, dict) else None
        if not isinstance(text, str):
            raise DataError('send {"text": "..."} as the JSON body')
        return text

    @router.get("", response_class=HTMLResponse, include_in_schema=False)
    @router.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page():
        return page_html()

    @router.get("/api/info")
    def info():
        return explorer.info()

    # Plain `def` routes: FastAPI runs them on its thread pool, so a forward pass never
    # blocks the event loop (nor, under `dsmoe serve`, the token streams).
    @router.post("/api/route")
    def route(body=Body(None)):
        return answer(lambda: explorer.route(text_of(body)))

    @router.post("/api/trace")
    def trace(body=Body(None)):
        return answer(lambda: explorer.trace(text_of(body)))

    @router.get("/api/data")
    def data():
        return answer(explorer.data_stats)

    @router.get("/api/training")
    def training():
        return answer(explorer.training)

    router.explorer = explorer  # for tests and callers that want the data without HTTP
    return router


def create_app(router):
    """A FastAPI app with the explorer at MOUNT and `/` sending the browser there."""
    from fastapi import FastAPI
    from fastapi.responses import RedirectResponse

    app = FastAPI(title="dsmoe explorer")
    app.include_router(router, prefix=MOUNT)

    @app.get("/", include_in_schema=False)
    def root():
        return RedirectResponse(MOUNT)

    return app


def load_explorer_router(model_dir: str, data_dir: str | None = None, run_dir: str | None = None,
                         device: str = "auto"):
    """The router for a model folder; a folder whose model loads but cannot be routed with
    (no tokenizer, a tokenizer of another model) gives a page that says so, not an exit."""
    from dsmoe.interop.hf import load_model_dir

    for flag, path in (("--data", data_dir), ("--run", run_dir)):
        if path is not None and not Path(path).is_dir():
            raise DataError(f"{flag} {path}: no such folder")
    try:
        model, tokenizer = load_model_dir(model_dir, device=device)
        model, problem = model.eval(), None
    except DataError as err:  # the tokenizer belongs to another model
        model, tokenizer, problem = None, None, str(err)
    return explorer_router(model, tokenizer, name=str(model_dir), data_dir=data_dir,
                           run_dir=run_dir, problem=problem)


# --- command line -------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="model directory (config.json, safetensors, tokenizer.json)")
    parser.add_argument("--data", metavar="DIR", help="a `dsmoe prepare` folder: domain-by-expert "
                        "routing and MaxVio on its validation split")
    parser.add_argument("--run", metavar="DIR", help="a `dsmoe train --out` folder: loss and MaxVio over training")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8001)
    add_device_arguments(parser)
    parser.add_argument("--screenshot", metavar="PNG", help="render the page once in headless "
                        "Chromium, save it to PNG and exit (with --prompt)")
    parser.add_argument("--prompt", metavar="TEXT", help="the text routed for --screenshot")


def run(args) -> int:
    if (args.screenshot is None) != (args.prompt is None):
        raise DataError("--screenshot PNG and --prompt TEXT go together")
    router = load_explorer_router(args.model, args.data, args.run, args.device)
    app = create_app(router)
    if args.screenshot:
        from dsmoe.analysis.explore_browser import screenshot_page

        screenshot_page(app, MOUNT, args.prompt, args.screenshot)
        print(f"wrote {args.screenshot}")
        return 0
    import uvicorn

    print(f"explorer for {router.explorer.name!r} on http://{args.host}:{args.port}{MOUNT}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
