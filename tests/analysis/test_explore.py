"""The routing explorer: its JSON is `dsmoe route`'s and `dsmoe report`'s, bad input becomes a
message, and in a real browser (headless Chromium) the page draws exactly that JSON."""
import json
import re

import pytest
import torch
from fastapi.testclient import TestClient

from dsmoe import ModelArgs
from dsmoe.analysis.explore import MOUNT, create_app, load_explorer_router
from dsmoe.analysis.routing import encode_trace_text, to_json, token_texts, trace_routes
from dsmoe.cli import main
from dsmoe.data.prepare import prepare
from dsmoe.train.config import TrainConfig
from dsmoe.train.pretrain import train
from dsmoe.train.run_dir import read_metrics

TINY = ModelArgs.from_preset("tiny")
PROMPT = "alpha beta, gamma!\n\tdelta 12 + 30 = 42 lists 7."


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A prepared data folder (three domains, one with too little validation text for the report) and a short
    pretraining run on it, whose exported model (with its tokenizer) is explored."""
    root = tmp_path_factory.mktemp("explore")
    src = root / "src"
    src.mkdir()
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    for domain, n in {"prose": 40, "lists": 40, "small": 5}.items():
        (src / f"{domain}.txt").write_text("\n\n".join(
            " ".join(words[(i * j + j) % 10] for j in range(40)) + f" {domain} {i}." for i in range(n)))
    prepare(root / "data", [src], vocab_size=300, val_fraction=0.2, show_progress=False)
    cfg = TrainConfig(steps=6, batch_size=2, seq_len=32, lr=3e-3, warmup_steps=2, eval_interval=3,
                      eval_batches=1, ckpt_interval=6, keep_last=1, threads=1)
    result = train(TINY.replace(vocab_size=300), cfg, root / "data", root / "run", progress=False)
    return {"data": root / "data", "run": root / "run", "model": result.hf_dir}


@pytest.fixture(scope="module")
def client(dirs):
    router = load_explorer_router(str(dirs["model"]), str(dirs["data"]), str(dirs["run"]), device="cpu")
    with TestClient(create_app(router)) as c:
        c.explorer = router.explorer
        yield c


def cli_route_json(model_dir, text, capsys) -> dict:
    assert main(["route", "--model", str(model_dir), "--prompt", text, "--json", "-", "--device", "cpu"]) == 0
    return json.loads(capsys.readouterr().out)


def test_route_endpoint_is_what_dsmoe_route_prints(client, dirs, capsys):
    expected = cli_route_json(dirs["model"], PROMPT, capsys)
    assert client.post(f"{MOUNT}/api/route", json={"text": PROMPT}).json() == expected
    page = client.post(f"{MOUNT}/api/trace", json={"text": PROMPT}).json()
    assert page["route"] == expected and page["notice"] is None
    # The affinities are the gate's unbiased scores: the chosen experts' weights are them,
    # normalised over the chosen and times route_scale (sigmoid gate, norm_topk_prob).
    args = client.explorer.model.args
    for l, layer in enumerate(expected["layers"]):
        for token in expected["tokens"]:
            scores = torch.tensor(page["scores"][l][token["pos"]])
            route = token["routes"][l]
            assert route["layer"] == layer and len(scores) == args.n_routed_experts
            chosen = scores[route["experts"]]
            assert page["chosen_scores"][l][token["pos"]] == [page["scores"][l][token["pos"]][e]
                                                              for e in route["experts"]]
            torch.testing.assert_close(torch.tensor(route["weights"]), chosen / chosen.sum() * args.route_scale,
                                       atol=2e-5, rtol=0)


def test_large_traces_send_only_the_chosen_affinities(client, monkeypatch):
    from dsmoe.analysis import explore

    full = client.post(f"{MOUNT}/api/trace", json={"text": PROMPT}).json()
    monkeypatch.setattr(explore, "MAX_SCORES", 10)
    small = client.post(f"{MOUNT}/api/trace", json={"text": PROMPT}).json()
    assert small["scores"] is None and full["scores"] is not None
    assert small["chosen_scores"] == full["chosen_scores"] and small["route"] == full["route"]


def test_text_longer_than_the_context_is_cut_with_a_notice(client, dirs, capsys):
    model, tokenizer = client.explorer.model, client.explorer.tokenizer
    limit = model.args.max_seq_len
    text = "alpha beta gamma delta " * limit
    ids = encode_trace_text(tokenizer, text, 10 ** 9)
    assert len(ids) > limit
    page = client.post(f"{MOUNT}/api/trace", json={"text": text}).json()
    assert f"{len(ids):,} tokens" in page["notice"] and f"first {limit:,}" in page["notice"]
    first = ids[:limit]
    assert page["route"] == json.loads(json.dumps(to_json(trace_routes(model, first, token_texts(tokenizer, first)))))
    # The route endpoint refuses it, as `dsmoe route` does, with the same words.
    refused = client.post(f"{MOUNT}/api/route", json={"text": text})
    assert main(["route", "--model", str(dirs["model"]), "--prompt", text, "--json", "-"]) == 1
    assert refused.status_code == 400 and refused.json()["error"] in capsys.readouterr().err


@pytest.mark.parametrize("body, message", [({"text": "  \n"}, "the prompt is empty"),
                                           ({"prompt": "hi"}, 'send {"text": "..."}'),
                                           ("just a string", 'send {"text": "..."}')])
def test_bad_requests_get_a_message_not_a_500(client, body, message):
    for endpoint in ("route", "trace"):
        res = client.post(f"{MOUNT}/api/{endpoint}", json=body)
        assert res.status_code == 400 and message in res.json()["error"]


def test_data_panel_is_the_report_on_the_validation_split(client, dirs, tmp_path):
    data = client.get(f"{MOUNT}/api/data").json()
    # The report refuses the domain without validation data; the page leaves it out and says why.
    assert data["domains"] == ["lists", "prose"] and len(data["skipped"]) == 1
    assert "'small' has" in data["skipped"][0]
    assert main(["report", "--model", str(dirs["model"]), "--data", str(dirs["data"]), "--out", str(tmp_path),
                 "--domains", "lists", "prose", "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())["routing"]
    for key in ("layers", "tokens", "counts", "maxvio", "maxvio_by_domain", "mutual_information_bits",
                "mutual_information_shuffled_bits"):
        assert data[key] == report[key], key
    counts = torch.tensor(report["counts"], dtype=torch.float64)  # (L, D, E)
    tokens = torch.tensor(list(report["tokens"].values()), dtype=torch.float64)
    expected = counts / (tokens[None, :, None] * report["top_k"]) * counts.shape[-1]
    torch.testing.assert_close(torch.tensor(data["relative_share"], dtype=torch.float64), expected, atol=1e-4, rtol=0)


def test_training_panel_is_the_run_log(client, dirs):
    curves = client.get(f"{MOUNT}/api/training").json()
    records = read_metrics(dirs["run"])
    steps = [r for r in records if "loss" in r]
    assert curves["step"] == [1, 2, 3, 4, 5, 6] and curves["loss"] == [r["loss"] for r in steps]
    assert curves["maxvio"] == [r["maxvio"] for r in steps] and not curves["maxvio_is_max"]
    assert curves["val_step"] == [3, 6] and set(curves["val"]) == {"lists", "prose", "small"}
    assert curves["val"]["prose"] == [r["val"]["prose"] for r in records if "val" in r]


def test_page_and_info(client):
    page = client.get(MOUNT)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    # Self-contained: nothing is loaded from another origin (no CDN, works offline).
    assert "<script>" in page.text and not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|@import|url\(""", page.text)
    assert client.get("/", follow_redirects=False).headers["location"] == MOUNT
    info = client.get(f"{MOUNT}/api/info").json()
    assert info["problem"] is None and info["layers"] == [1, 2] and info["top_k"] == TINY.n_activated_experts
    assert len(info["bias"]) == 2 and any(b != 0 for b in info["bias"][0])  # trained: the bias moved


def test_model_without_tokenizer_says_so(dirs, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(dirs["model"], bare)
    (bare / "tokenizer.json").unlink()
    router = load_explorer_router(str(bare), device="cpu")
    with TestClient(create_app(router)) as c:
        assert c.get(MOUNT).status_code == 200
        problem = c.get(f"{MOUNT}/api/info").json()["problem"]
        assert "no tokenizer.json" in problem
        res = c.post(f"{MOUNT}/api/trace", json={"text": "hello"})
        assert res.status_code == 400 and res.json()["error"] == problem
        assert "--data DIR" in c.get(f"{MOUNT}/api/data").json()["error"]
        assert "--run DIR" in c.get(f"{MOUNT}/api/training").json()["error"]


def test_router_mounts_in_the_openai_server(dirs, client):
    from dsmoe.infer.generate import load_engine
    from dsmoe.infer.server import create_app as create_server

    engine, tokenizer = load_engine(dirs["model"], device="cpu")
    app = create_server(engine, tokenizer, "tiny")  # `dsmoe serve` mounts the explorer itself
    with TestClient(app) as c:
        assert c.get("/explore").status_code == 200 and c.get("/explore/").status_code == 200
        assert c.post("/explore/api/route", json={"text": PROMPT}).json() == \
            client.post(f"{MOUNT}/api/route", json={"text": PROMPT}).json()
        assert c.post("/explore/api/trace", json={"text": ""}).json()["error"].startswith("the prompt is empty")
        assert c.post("/v1/completions", json={"model": "tiny", "prompt": "alpha", "max_tokens": 2}).status_code == 200


def test_cli_refuses_missing_folders_and_half_a_screenshot(dirs, tmp_path, capsys):
    assert main(["explore", "--model", str(dirs["model"]), "--data", str(tmp_path / "nope")]) == 1
    assert "--data" in capsys.readouterr().err
    assert main(["explore", "--model", str(dirs["model"]), "--screenshot", str(tmp_path / "x.png")]) == 1
    assert "--prompt" in capsys.readouterr().err


# --- in a real browser --------------------------------------------------------------------------

RENDERED = ("[...document.querySelectorAll('#tokens .tok')].map(n => "
            "[n.textContent, n.dataset.experts, n.dataset.weights])")

COLOURS = ("({tokens: [...document.querySelectorAll('#tokens .tok')].map(n => "
           "getComputedStyle(n).backgroundImage.match(/rgb\\([^)]*\\)/)[0]), "
           "legend: Object.fromEntries([...document.querySelectorAll('#legend .chip')].map(c => "
           "[c.dataset.expert, getComputedStyle(c).backgroundColor]))})")


@pytest.fixture(scope="module")
def browser():
    from dsmoe.analysis.explore_browser import Browser

    with Browser() as b:  # no Chromium: this fails (never skips), saying how to install it
        yield b


def test_chromium_draws_what_the_json_endpoint_answers(client, dirs, browser, tmp_path):
    import httpx

    from dsmoe.analysis.explore_browser import route_prompt, serve_in_thread

    with serve_in_thread(client.app) as url:
        route_prompt(browser, url + MOUNT, PROMPT)  # types the prompt, presses Route, waits for the drawing
        expected = httpx.post(f"{url}{MOUNT}/api/route", json={"text": PROMPT}).json()
        tokens = expected["tokens"]
        for l in range(len(expected["layers"])):
            browser.click(f"#layer-switch button[data-layer='{l}']")
            browser.wait_for(f"document.querySelector('#layer-switch button.on').dataset.layer === '{l}'")
            rendered = browser.evaluate(RENDERED)
            assert [text for text, _, _ in rendered] == [t["text"] for t in tokens]
            assert [[int(e) for e in experts.split()] for _, experts, _ in rendered] == \
                [t["routes"][l]["experts"] for t in tokens]
            assert [[float(w) for w in weights.split()] for _, _, weights in rendered] == \
                [t["routes"][l]["weights"] for t in tokens]
            # Drawn in the colour of its heaviest expert, the colour that expert has in the legend.
            drawn = browser.evaluate(COLOURS)
            assert drawn["tokens"] == [drawn["legend"][str(t["routes"][l]["experts"][0])] for t in tokens]

        # Hovering a token lists its experts with their weights (layer 2 is showing).
        pos = 4
        browser.hover(f"#tokens .tok[data-pos='{pos}']")
        rows = browser.wait_for("[...document.querySelectorAll('#detail-table tr[data-expert]')]"
                                ".map(r => [+r.dataset.expert, +r.dataset.weight, +r.cells[1].textContent, "
                                "+r.cells[2].textContent])")
        route = tokens[pos]["routes"][-1]
        affinities = httpx.post(f"{url}{MOUNT}/api/trace", json={"text": PROMPT}).json()["chosen_scores"][-1][pos]
        assert [r[0] for r in rows] == route["experts"] and [r[1] for r in rows] == route["weights"]
        assert [r[2] for r in rows] == pytest.approx(route["weights"], abs=5e-4 + 1e-9)  # shown to 3 decimals
        assert [r[3] for r in rows] == pytest.approx(affinities, abs=5e-4 + 1e-9)
        assert browser.evaluate("document.getElementById('detail-token').textContent") == \
            json.dumps(tokens[pos]["text"])[1:-1]

        # Clicking an expert highlights every token routed to it, in every layer.
        expert = route["experts"][0]
        browser.click(f"#legend .chip[data-expert='{expert}']")
        hits = browser.evaluate("[...document.querySelectorAll('#tokens .tok.hit')].map(n => +n.dataset.pos)")
        assert hits == [t["pos"] for t in tokens if expert in t["routes"][-1]["experts"]]
        cells = browser.evaluate("[...document.querySelectorAll('#grid .cell.hit')].map(n => [+n.dataset.layer, +n.dataset.pos])")
        assert sorted(cells) == sorted([l, t["pos"]] for l in range(len(expected["layers"]))
                                       for t in tokens if expert in t["routes"][l]["experts"])

        # The data and training panels arrive; the heatmap has one row per evaluated domain.
        browser.wait_for("document.getElementById('data-card').dataset.state === 'ready' && "
                         "document.getElementById('run-card').dataset.state === 'ready'")
        assert browser.evaluate("document.querySelectorAll('#heatmap tbody tr').length") == 2
        assert browser.evaluate("document.querySelectorAll('#run-body svg.chart').length") == 2
        shot = browser.screenshot(tmp_path / "explorer.png")
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000

        # Too long: cut to the context, with a visible notice. Empty: a message, no drawing.
        limit = client.explorer.model.args.max_seq_len
        long_text = "alpha beta gamma delta " * limit
        browser.type("#text", long_text)
        browser.click("#route-btn")
        browser.wait_for(f"document.body.dataset.state === 'ready' && window.explorer.routedText.length === {len(long_text)}")
        assert browser.evaluate("document.querySelectorAll('#tokens .tok').length") == limit
        notice = browser.evaluate("(n => !n.hidden && n.textContent)(document.getElementById('notice'))")
        assert notice and f"showing the first {limit}" in notice
        browser.type("#text", "   ")
        browser.click("#route-btn")
        browser.wait_for("document.body.dataset.state === 'error'")
        error = browser.evaluate("(n => !n.hidden && n.textContent)(document.getElementById('error'))")
        assert "the prompt is empty" in error and browser.evaluate("document.getElementById('routing').hidden")


def test_chromium_shows_why_a_model_without_tokenizer_cannot_route(dirs, browser, tmp_path):
    import shutil

    from dsmoe.analysis.explore_browser import serve_in_thread

    bare = tmp_path / "bare"
    shutil.copytree(dirs["model"], bare)
    (bare / "tokenizer.json").unlink()
    with serve_in_thread(create_app(load_explorer_router(str(bare), device="cpu"))) as url:
        browser.goto(url + MOUNT)
        browser.wait_for("document.body.dataset.state === 'error'")
        problem = browser.evaluate("(n => !n.hidden && n.textContent)(document.getElementById('problem'))")
        assert "no tokenizer.json" in problem and browser.evaluate("document.getElementById('input-card').hidden")


def test_screenshot_command_writes_a_png(dirs, tmp_path):
    shot = tmp_path / "page.png"
    assert main(["explore", "--model", str(dirs["model"]), "--run", str(dirs["run"]), "--device", "cpu",
                 "--prompt", PROMPT, "--screenshot", str(shot)]) == 0
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
