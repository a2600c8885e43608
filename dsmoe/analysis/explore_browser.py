"""The explorer page in a real browser: headless Chromium driven over the DevTools protocol.

Design note
-----------
- Used twice: by `dsmoe explore --screenshot` (the PNG in the docs) and by the browser test,
  which types a prompt and compares what the page rendered with the JSON endpoint's answer.
- Chromium is Debian's `chromium` package; it is started with a fresh profile and
  `--remote-debugging-port=0`, and the port it picked is read from the profile's
  `DevToolsActivePort` file (no fixed port to collide with). Commands go over one websocket
  to one page target (`websockets`' synchronous client: a dev dependency, imported here only).
- Input is real input: `Input.insertText` types into the focused text box and
  `Input.dispatchMouseEvent` moves, presses and releases the mouse at an element's centre,
  so the page's own event handlers run as they would for a person.
- The app under test runs in-process on a uvicorn thread bound to a free loopback port.
Deliberately not here: a general browser-automation library; only what the page needs.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

from dsmoe.errors import DsmoeError

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--remote-debugging-port=0"]
INSTALL_HINT = ("install it with `apt-get update && apt-get install -y chromium` (Debian/Ubuntu, as root; "
                "`make browser` does this), or put a Chromium binary on PATH as `chromium`")


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    raise DsmoeError(f"no Chromium found for the explorer's browser check: {INSTALL_HINT}")


class Browser:
    """One headless Chromium page, spoken to over the DevTools protocol."""

    def __init__(self, width: int = 1280, height: int = 900, timeout: float = 30.0):
        try:
            from websockets.sync.client import connect
        except ImportError:
            raise DsmoeError("driving Chromium needs the `websockets` package: pip install 'dsmoe[dev]'") from None
        self.timeout = timeout
        self._open = ExitStack()  # the websocket, closed with the browser
        self._profile = tempfile.TemporaryDirectory(prefix="dsmoe-chromium-", ignore_cleanup_errors=True)
        # its own process group: closing stops Chromium's helper processes too, which would
        # otherwise go on writing into the profile while it is being removed
        self._proc = subprocess.Popen([find_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={self._profile.name}",
                                       f"--window-size={width},{height}", "about:blank"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        try:
            port = self._devtools_port()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=timeout) as res:
                pages = [t for t in json.load(res) if t["type"] == "page"]
            self._ws = self._open.enter_context(
                connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=timeout))
        except BaseException:
            self.close()
            raise
        self._id = 0
        self.send("Page.enable")
        self.send("Runtime.enable")
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height,
                  deviceScaleFactor=1, mobile=False)

    def _devtools_port(self) -> int:
        marker = Path(self._profile.name) / "DevToolsActivePort"
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise DsmoeError(f"Chromium exited with status {self._proc.returncode}: "
                                 f"{self._proc.stderr.read().decode(errors='replace')[-800:]}")
            if marker.is_file() and marker.read_text().strip():
                return int(marker.read_text().split()[0])
            time.sleep(0.05)
        raise DsmoeError(f"Chromium did not open its DevTools port within {self.timeout:.0f} s")

    def close(self) -> None:
        self._open.close()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with suppress(ProcessLookupError):
                os.killpg(self._proc.pid, sig)  # Chromium and every helper it started
            try:
                self._proc.wait(timeout=10)
                break
            except subprocess.TimeoutExpired:
                continue
        self._proc.stderr.close()
        for _ in range(20):  # a helper still exiting may add a file while the tree is removed
            try:
                shutil.rmtree(self._profile.name)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)
        self._profile.cleanup()

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- protocol ---
    def send(self, method: str, **params) -> dict:
        """Send one command and wait for its answer (events that arrive meanwhile are dropped)."""
        self._id += 1
        self._ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        deadline = time.monotonic() + self.timeout
        while True:
            message = json.loads(self._ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if message.get("id") == self._id:
                if "error" in message:
                    raise DsmoeError(f"Chromium refused {method}: {message['error'].get('message')}")
                return message.get("result", {})

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise DsmoeError(f"the page threw: {details.get('exception', {}).get('description') or details.get('text')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float | None = None):
        """Poll a JavaScript expression until it is truthy; return its value."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.05)
        raise DsmoeError(f"timed out waiting for the page: {expression}")

    # --- a person's actions ---
    def goto(self, url: str) -> None:
        self.send("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete'")

    def _centre(self, selector: str) -> tuple[float, float]:
        box = self.evaluate(f"(() => {{ const n = document.querySelector({json.dumps(selector)}); if (!n) return null;"
                            " n.scrollIntoView({block: 'center'}); const r = n.getBoundingClientRect();"
                            " return [r.left + r.width / 2, r.top + r.height / 2]; })()")
        if box is None:
            raise DsmoeError(f"no element {selector!r} on the page")
        return box[0], box[1]

    def hover(self, selector: str) -> None:
        x, y = self._centre(selector)
        self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)

    def click(self, selector: str) -> None:
        x, y = self._centre(selector)
        self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def type(self, selector: str, text: str) -> None:
        """Click into a text box, select what it holds and type `text` over it, as a person would."""
        self.click(selector)
        self.evaluate(f"document.querySelector({json.dumps(selector)}).select()")
        self.send("Input.insertText", text=text)

    def screenshot(self, path: str | Path) -> Path:
        """A PNG of the whole page (not just the window)."""
        import base64

        height = self.evaluate("Math.ceil(document.documentElement.scrollHeight)")
        width = self.evaluate("Math.ceil(document.documentElement.clientWidth)")
        self.evaluate("window.scrollTo(0, 0)")
        data = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                         clip={"x": 0, "y": 0, "width": width, "height": height, "scale": 1})["data"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path


@contextmanager
def serve_in_thread(app):
    """Run a FastAPI app on a free loopback port in this process; yield its base URL."""
    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="dsmoe-explore-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise DsmoeError(f"the explorer's server did not start on port {port}")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def route_prompt(browser: Browser, page_url: str, prompt: str) -> None:
    """Open the explorer page, type `prompt`, press Route and wait until the routing is drawn."""
    browser.goto(page_url)
    browser.wait_for("document.body.dataset.state !== 'loading'")
    browser.type("#text", prompt)
    browser.click("#route-btn")
    browser.wait_for(f"document.body.dataset.state === 'ready' && window.explorer.routedText === {json.dumps(prompt)}")


def screenshot_page(app, page_path: str, prompt: str, path: str | Path) -> Path:
    """The page at `page_path` of `app` with `prompt` routed, a token hovered and its heaviest
    expert selected, as a PNG."""
    with serve_in_thread(app) as url, Browser() as browser:
        route_prompt(browser, url + page_path, prompt)
        for card in ("data-card", "run-card"):  # wait for the panels that were asked for
            browser.wait_for(f"(c => c.hidden || ['ready', 'error'].includes(c.dataset.state))"
                             f"(document.getElementById('{card}'))", timeout=600)
        n_tokens = browser.evaluate("document.querySelectorAll('#tokens .tok').length")
        hovered = f"#tokens .tok[data-pos='{min(3, n_tokens - 1)}']"
        expert = browser.evaluate(f"document.querySelector(\"{hovered}\").dataset.experts.split(' ')[0]")
        browser.click(f"#legend .chip[data-expert='{expert}']")
        browser.hover(hovered)
        browser.evaluate("document.activeElement.blur()")
        return _palette_png(browser.screenshot(path))


def _palette_png(path: Path) -> Path:
    """Rewrite a screenshot as a 256-colour PNG (a third of the size; a page is flat colours),
    when Pillow is installed (it comes with matplotlib, the `report` extra)."""
    try:
        from PIL import Image
    except ImportError:
        return path
    with Image.open(path) as image:
        palette = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT,
                                                dither=Image.Dither.NONE)
    palette.save(path, optimize=True)
    return path
