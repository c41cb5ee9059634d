"""What a person sees in `mlflow ui` after the smoke flow: headless Chromium renders the runs table, a run's metrics,
a plot and the registered model, and the test reads them off the screen.

`make docs-screenshots` runs this file with CXR_SCREENSHOTS=docs/images: each page is then also saved there as a
small PNG for docs/ui.md.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import select
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient
from PIL import Image

from cxr_pneumonia.model_server import start_tracking_server, stop_model_server
from tests.conftest import FlowRun

SCREENSHOTS_ENV = "CXR_SCREENSHOTS"  # a folder: save each page there as a docs picture as well
NO_CHROMIUM = "chromium not installed (Debian: apt-get install chromium): the UI is not checked in a browser"
# a skip before any fixture runs (no smoke flow trained for nothing); in CI and when asked for screenshots the
# `chromium` fixture fails instead
pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.skipif(shutil.which("chromium") is None and not os.environ.get("CI")
                                 and not os.environ.get(SCREENSHOTS_ENV), reason=NO_CHROMIUM)]

VIEWPORT = (1600, 900)  # wide enough for the runs table's default columns and one metric column
DOCS_WIDTH, MAX_PNG_BYTES = 1200, 150_000  # a docs picture: downscaled and palette-quantized to under 150 KB
PLOT = "plots/roc.png"  # a plot of numbers, not of patients' images (the docs carry no copy of the data)
RENDER_TIMEOUT = 90  # seconds for a page's data to arrive and render on a loaded 2-core machine

# the text nodes among `needles` that are on screen and not covered (what a person sees, not what the DOM holds)
VISIBLE_JS = """(needles) => !document.body ? [] : needles.filter((needle) => {
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let node; (node = walker.nextNode());) {
    if (!node.textContent.includes(needle)) continue;
    const range = document.createRange();
    range.selectNodeContents(node);
    const box = range.getBoundingClientRect();
    if (box.width === 0 || box.left < 0 || box.top < 0 || box.right > innerWidth || box.bottom > innerHeight) continue;
    const hit = document.elementFromPoint(box.left + box.width / 2, box.top + box.height / 2);
    const owner = node.parentElement;
    if (hit && (hit === owner || owner.contains(hit) || hit.contains(owner))) return true;
  }
  return false;
})"""


# an image on screen, at least 200 px wide and not covered: its size and its bytes (base64), fetched from its own src
SHOWN_IMAGE_JS = """(async () => {
  const img = [...document.images].find((i) => {
    if (!i.complete || i.naturalWidth < 100) return false;
    const b = i.getBoundingClientRect();
    if (b.width < 200 || b.right > innerWidth || b.bottom > innerHeight) return false;
    const hit = document.elementFromPoint(b.left + b.width / 2, b.top + b.height / 2);
    return hit === i;
  });
  if (!img) return null;
  const bytes = new Uint8Array(await (await fetch(img.src)).arrayBuffer());
  let text = '';
  for (const byte of bytes) text += String.fromCharCode(byte);
  return {width: img.naturalWidth, height: img.naturalHeight, shownWidth: img.width, data: btoa(text)};
})()"""


class Tab:
    """One browser tab, driven by Chrome DevTools protocol commands on its session."""

    def __init__(self, browser: Browser, target: str, session: str, shots: Path) -> None:
        self.browser, self.target, self.session, self.shots = browser, target, session, shots

    def send(self, method: str, **params) -> dict:
        return self.browser.send(method, session=self.session, **params)

    def evaluate(self, expression: str):
        reply = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in reply:
            raise RuntimeError(f"{expression[:200]}: {reply['exceptionDetails'].get('exception', reply)}")
        return reply["result"].get("value")

    def open(self, url: str) -> None:
        self.send("Page.navigate", url=url)

    def visible(self, needles: list[str]) -> list[str]:
        return self.evaluate(f"({VISIBLE_JS})({json.dumps(needles)})")

    def wait_until(self, expression: str, what: str | Callable[[], str], timeout: float = RENDER_TIMEOUT) -> object:
        """Poll a JavaScript expression until it is truthy; on timeout fail with a screenshot and the page's text."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.5)
        path = self.shots / f"timeout-{int(time.time() * 1000)}.png"
        path.write_bytes(self.screenshot())
        text = self.evaluate("document.body ? document.body.innerText : ''") or ""
        what = what() if callable(what) else what
        raise AssertionError(f"not seen within {timeout:.0f} s: {what} (screenshot {path}); the page reads:\n"
                             f"{text[:3000]}")

    def wait_visible(self, needles: list[str], timeout: float = RENDER_TIMEOUT) -> None:
        self.wait_until(f"({VISIBLE_JS})({json.dumps(needles)}).length === {len(needles)}",
                        lambda: f"{needles}, of which only {self.visible(needles)} are on screen", timeout)

    def click(self, element_js: str) -> None:
        """A real mouse click (pressed and released) in the middle of the element `element_js` evaluates to."""
        center = self.wait_until(
            f"(() => {{ const e = {element_js}; if (!e) return null; e.scrollIntoView({{block: 'center'}});"
            " const b = e.getBoundingClientRect(); return [b.x + b.width / 2, b.y + b.height / 2]; })()",
            f"an element to click: {element_js}")
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=center[0], y=center[1], button="left", clickCount=1)

    def type(self, text: str) -> None:
        self.send("Input.insertText", text=text)

    def press_escape(self) -> None:
        for kind in ("keyDown", "keyUp"):
            self.send("Input.dispatchKeyEvent", type=kind, key="Escape", code="Escape", windowsVirtualKeyCode=27)

    def screenshot(self) -> bytes:
        return base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"])


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`): no driver, no
    websocket client and no open port; messages are JSON, each ended by a NUL byte."""

    def __init__(self, executable: str, workdir: Path) -> None:
        commands_r, self._commands = os.pipe()
        self._replies, replies_w = os.pipe()
        # Chromium reads commands on fd 3 and writes replies on fd 4 (bash: dash takes no fd numbers over 9)
        cmd = ["bash", "-c", f'exec "$0" "$@" 3<&{commands_r} 4>&{replies_w}', executable,
               "--headless", "--remote-debugging-pipe",
               "--no-sandbox",  # root in CI, and containers lack the namespaces the sandbox needs
               "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check",
               "--hide-scrollbars", "--mute-audio", f"--user-data-dir={workdir / 'profile'}",
               f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}", "about:blank"]
        self.log = workdir / "chromium.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, pass_fds=(commands_r, replies_w), stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        os.close(commands_r)
        os.close(replies_w)
        self._pending, self._last_id = b"", 0

    def send(self, method: str, session: str | None = None, timeout: float = 60, **params) -> dict:
        self._last_id += 1
        message = {"id": self._last_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self._pending:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self._replies], [], [], left)[0]:
                    raise TimeoutError(f"Chromium did not answer {method} within {timeout:.0f} s")
                chunk = os.read(self._replies, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"Chromium exited ({self.proc.poll()}):\n{self.log.read_text()[-3000:]}")
                self._pending += chunk
            raw, self._pending = self._pending.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._last_id:  # events and other replies are not awaited
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error'].get('message')}")
                return reply["result"]

    def new_tab(self, shots: Path) -> Tab:
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        tab = Tab(self, target, session, shots)
        tab.send("Emulation.setDeviceMetricsOverride", width=VIEWPORT[0], height=VIEWPORT[1], deviceScaleFactor=1,
                 mobile=False)
        return tab

    def close(self) -> None:
        with contextlib.suppress(OSError, RuntimeError, TimeoutError):
            self.send("Browser.close", timeout=10)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
        os.close(self._commands)
        os.close(self._replies)


def docs_png(png: bytes) -> bytes:
    """A screenshot as a docs picture: DOCS_WIDTH wide, palette colours, under MAX_PNG_BYTES."""
    img = Image.open(io.BytesIO(png)).convert("RGB")
    img = img.resize((DOCS_WIDTH, round(img.height * DOCS_WIDTH / img.width)), Image.Resampling.LANCZOS)
    for colours in (128, 64, 32):
        out = io.BytesIO()
        img.quantize(colours, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(out, "PNG",
                                                                                             optimize=True)
        if out.tell() < MAX_PNG_BYTES:
            return out.getvalue()
    raise AssertionError(f"a {img.size} screenshot stays over {MAX_PNG_BYTES} bytes at 32 colours")


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's `chromium` (the module skips without it, except in CI and when asked for screenshots)."""
    path = shutil.which("chromium")
    if path is None:
        pytest.fail(NO_CHROMIUM)
    return path


@pytest.fixture(scope="module")
def ui(chromium: str, smoke_flow: FlowRun, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow ui` (an alias of `mlflow server` in MLflow 3) on the smoke flow's store; yields its URL."""
    root = tmp_path_factory.mktemp("ui")
    proc, url = start_tracking_server(root / "store", root / "ui.log", timeout=240,
                                      backend_store_uri=smoke_flow.tracking_uri)
    try:
        yield url
    finally:
        stop_model_server(proc)


@pytest.fixture(scope="module")
def browser(chromium: str, ui: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    """One browser profile for the module, its MLflow assistant panel closed."""
    workdir = tmp_path_factory.mktemp("chromium")
    browser = Browser(chromium, workdir)
    try:
        close_assistant(browser.new_tab(workdir), ui)
        yield browser
    finally:
        browser.close()


@pytest.fixture
def tab(browser: Browser, tmp_path: Path) -> Iterator[Tab]:
    tab = browser.new_tab(tmp_path)
    yield tab
    browser.send("Target.closeTarget", targetId=tab.target)


def close_assistant(tab: Tab, ui: str) -> None:
    """MLflow's assistant panel opens by itself on a first visit and covers a third of every page: close it as a
    person would, once (the profile then keeps it closed)."""
    tab.open(f"{ui}/#/experiments")
    tab.wait_until("document.body && document.body.innerText.includes('Experiments')", "MLflow's experiments page")
    close = "document.querySelector('[data-component-id=\"mlflow.assistant.chat_panel.close\"]')"
    try:
        tab.wait_until(f"{close} !== null", "the assistant panel", timeout=20)
    except AssertionError:
        return  # an MLflow without the panel
    tab.click(close)
    tab.wait_until(f"{close} === null", "the assistant panel to close", timeout=15)


@pytest.fixture(scope="module")
def flow_run(smoke_flow: FlowRun):
    """The smoke flow's pipeline run, as MLflow has it."""
    return MlflowClient(smoke_flow.tracking_uri).get_run(smoke_flow.result["run_id"])


def keep(tab: Tab, name: str) -> None:
    """The page as it is now: into the test's folder, and as a docs picture when CXR_SCREENSHOTS names a folder."""
    tab.evaluate("document.activeElement?.blur()")  # no focus ring left from the last click
    png = tab.screenshot()
    (tab.shots / f"{name}.png").write_bytes(png)
    if folder := os.environ.get(SCREENSHOTS_ENV):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"{name}.png").write_bytes(docs_png(png))


def test_runs_page_lists_the_run_its_trials_and_its_test_accuracy(ui: str, flow_run, smoke_flow: FlowRun,
                                                                   tab: Tab) -> None:
    tab.open(f"{ui}/#/experiments/{flow_run.info.experiment_id}/runs")
    tab.wait_visible([flow_run.info.run_name, "Training runs"])
    # the metric column a person adds to compare runs: Columns, search, tick
    tab.click("document.querySelector('[data-testid=column-selection-dropdown]')")
    tab.click("document.querySelector('input[placeholder=\"Search columns\"]')")
    tab.type("test_accuracy")
    tab.click("[...document.querySelectorAll('[role=dialog] strong')].find(e => e.textContent.trim() === "
              "'test_accuracy')")
    tab.press_escape()
    tab.wait_until("document.querySelector('[role=dialog] input[placeholder=\"Search columns\"]') === null",
                   "the column menu to close", timeout=15)
    accuracy = flow_run.data.metrics["test_accuracy"]
    tab.wait_visible([flow_run.info.run_name, "test_accuracy", str(accuracy)[:5], "cxr-pneumonia"])
    # the search's trials are nested runs: the expander in the run's name cell shows them. The cell is found by
    # its link to this run, since a later run of the same name (a resumed search, without trials) may be listed
    tab.click(f"document.querySelector('[role=gridcell] a[href$=\"/runs/{flow_run.info.run_id}\"]')"
              f"?.closest('[role=gridcell]')?.querySelector('button')")
    trials = MlflowClient(smoke_flow.tracking_uri).search_runs(
        [flow_run.info.experiment_id], f"tags.mlflow.parentRunId = '{flow_run.info.run_id}'")
    assert trials
    tab.wait_visible([t.info.run_name for t in trials])
    keep(tab, "mlflow-runs")


def test_run_page_shows_the_test_metrics(ui: str, flow_run, tab: Tab) -> None:
    tab.open(f"{ui}/#/experiments/{flow_run.info.experiment_id}/runs/{flow_run.info.run_id}")
    tab.wait_visible([flow_run.info.run_name, "Overview", "Artifacts"])
    tab.click("document.querySelector('input[placeholder=\"Search metrics\"]')")
    tab.type("test")
    accuracy = flow_run.data.metrics["test_accuracy"]
    # JavaScript and Python print a double the same way: the shortest text that reads back as it
    tab.wait_visible(["test_accuracy", str(accuracy), "test/roc_auc", str(flow_run.data.metrics["test/roc_auc"])])
    keep(tab, "mlflow-run-metrics")


def test_run_page_shows_a_plot(ui: str, flow_run, smoke_flow: FlowRun, tab: Tab) -> None:
    run = flow_run.info
    tab.open(f"{ui}/#/experiments/{run.experiment_id}/runs/{run.run_id}/artifacts/{PLOT}")
    tab.wait_visible([run.run_name, "Artifacts", PLOT, Path(PLOT).name])
    # the picture on screen is the logged plot, byte for byte: its bytes read back from the page's own image
    shown = tab.wait_until(SHOWN_IMAGE_JS, f"the plot {PLOT} drawn on the page")
    logged = Path(MlflowClient(smoke_flow.tracking_uri).download_artifacts(run.run_id, PLOT, str(tab.shots)))
    assert base64.b64decode(shown["data"]) == logged.read_bytes()
    assert (shown["width"], shown["height"]) == Image.open(logged).size and shown["shownWidth"] >= 300
    keep(tab, "mlflow-run")


def test_model_page_shows_the_champion_alias(ui: str, smoke_flow: FlowRun, tab: Tab) -> None:
    registered = smoke_flow.result["registered"]
    assert registered["alias"] == "champion"  # the first version of a fresh store is the champion
    # the store is shared with tests/test_flow.py, whose resumed run takes the alias when its model is better:
    # the page must show the alias where the registry holds it now
    champion = MlflowClient(smoke_flow.tracking_uri).get_model_version_by_alias(registered["name"], "champion")
    tab.open(f"{ui}/#/models/{registered['name']}")
    version = f"Version {champion.version}"
    tab.wait_visible([registered["name"], version, "champion", "test_accuracy"])
    row = tab.evaluate(f"[...document.querySelectorAll('tr, [role=row]')].map(r => r.innerText)"
                       f".find(t => t.includes({json.dumps(version)})) || ''")
    assert "@\u00a0champion" in row or "@ champion" in row, row
    keep(tab, "mlflow-model")
