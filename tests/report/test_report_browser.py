"""The report in a real browser: headless Chromium loads it with no console errors, no network
requests and no script run from data; the page is not blank, and still fits a phone's width.

Chromium is driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: JSON
messages ending in NUL on fds 3 and 4), so no websocket library or browser download is needed.
Screenshots are decoded with zlib (no Pillow). Set EVALSUITE_SCREENSHOTS=DIR to keep them.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import queue
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))

from sample_results import HOSTILE, make_results  # noqa: E402
from test_report_reliability import wide_results  # noqa: E402

from evalsuite.report.render import render_compare, render_report  # noqa: E402

CHROMIUM = os.environ.get("EVALSUITE_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--disable-default-apps", "--mute-audio", "--remote-debugging-pipe"]

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason=f"{CHROMIUM} not found (Debian: apt-get install -y chromium)")


class Browser:
    """A headless Chromium and one page, spoken to in DevTools protocol over fds 3 (in) and 4 (out)."""

    def __init__(self, profile: Path):
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()

        def wire_fds():  # in the child: move the pipe ends to 3 and 4 (dup2 clears close-on-exec)
            a = fcntl.fcntl(to_child_r, fcntl.F_DUPFD, 10)
            b = fcntl.fcntl(from_child_w, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                     preexec_fn=wire_fds, close_fds=False, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_child_r)
        os.close(from_child_w)
        self._next_id = 0
        self._inbox: queue.Queue = queue.Queue()
        self.events: list[dict] = []
        threading.Thread(target=self._read, daemon=True).start()
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable", page=True)

    def _read(self):
        buf = b""
        while chunk := os.read(self._from_child, 1 << 16):
            buf += chunk
            *messages, buf = buf.split(b"\0")
            for m in messages:
                self._inbox.put(json.loads(m))

    def call(self, method: str, params: dict | None = None, page: bool = False, timeout: float = 30) -> dict:
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params or {}}
        if page:
            msg["sessionId"] = self.session
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            try:
                m = self._inbox.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"no reply from Chromium to {method} in {timeout} s") from None
            if m.get("id") == self._next_id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self._event(m)

    def _event(self, m: dict):
        self.events.append(m)
        if m.get("method") == "Page.javascriptDialogOpening":  # an alert() would block the page
            os.write(self._to_child, json.dumps({"id": 0, "sessionId": self.session, "method": "Page.handleJavaScriptDialog",
                                                 "params": {"accept": True}}).encode() + b"\0")

    def wait_for(self, method: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == method for e in self.events):
            self._event(self._inbox.get(timeout=max(0.1, deadline - time.monotonic())))
        return next(e for e in self.events if e.get("method") == method)

    def open(self, url: str, width: int, height: int, mobile: bool = False):
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile}, page=True)
        self.events.clear()
        self.call("Page.navigate", {"url": url}, page=True)
        self.wait_for("Page.loadEventFired")
        time.sleep(0.3)  # late console messages
        self.call("Runtime.evaluate", {"expression": "1"}, page=True)  # drain pending events

    def js(self, expression: str):
        return self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, page=True)["result"].get("value")

    def screenshot(self, scale: float = 1.0, full_page: bool = False) -> bytes:
        w, h = self.js("[window.innerWidth, window.innerHeight]")
        if full_page:
            h = min(self.js("document.documentElement.scrollHeight"), 12000)
        clip = {"x": 0, "y": 0, "width": w, "height": h, "scale": scale}
        data = self.call("Page.captureScreenshot", {"format": "png", "clip": clip, "captureBeyondViewport": full_page},
                         page=True)["data"]
        return base64.b64decode(data)

    def problems(self, own_url: str) -> list[str]:
        """Console errors, uncaught exceptions, dialogs, and any request other than the page itself."""
        out = []
        for e in self.events:
            method, p = e.get("method"), e.get("params", {})
            if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert", "warning"):
                out.append(f"console {p['type']}: {[a.get('value', a.get('description')) for a in p.get('args', [])]}")
            elif method == "Runtime.exceptionThrown":
                details = p.get("exceptionDetails", {})
                out.append(f"exception: {details.get('text')} {details.get('exception', {}).get('description', '')}")
            elif method == "Log.entryAdded" and p.get("entry", {}).get("level") in ("error", "warning"):
                out.append(f"log {p['entry']['level']}: {p['entry'].get('text')} {p['entry'].get('url', '')}")
            elif method == "Network.requestWillBeSent" and p.get("request", {}).get("url") != own_url:
                out.append(f"request: {p['request']['url']}")
            elif method == "Page.javascriptDialogOpening":
                out.append(f"dialog: {p.get('message')}")
        return out

    def close(self):
        try:
            self.call("Browser.close", timeout=5)
        except Exception:  # noqa: BLE001 - the browser may already be gone
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_child)


def png_pixels(png: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB(A) bytes) of an 8-bit RGB/RGBA PNG, undoing the scanline filters."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, width = 8, b"", 0
    while pos < len(png):
        length, kind = struct.unpack(">I4s", png[pos:pos + 8])
        body = png[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and colour in (2, 6), f"unexpected PNG format {depth=} {colour=}"
            bpp = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw, stride, rows, prev = zlib.decompress(idat), width * bpp, [], bytearray(width * bpp)
    for y in range(height):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return width, height, rows


def assert_not_blank(png: bytes):
    width, height, rows = png_pixels(png)
    bpp = len(rows[0]) // width
    pixels = [row[i:i + 3] for row in rows for i in range(0, len(row), bpp)]
    background = max(set(pixels), key=pixels.count)
    ink = sum(p != background for p in pixels) / len(pixels)
    assert len(set(pixels)) > 20 and ink > 0.02, f"screenshot looks blank ({ink:.1%} non-background pixels)"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    b = Browser(tmp_path_factory.mktemp("chromium-profile"))
    yield b
    b.close()


def _keep(name: str, png: bytes):
    if os.environ.get("EVALSUITE_SCREENSHOTS"):
        out = Path(os.environ["EVALSUITE_SCREENSHOTS"])
        out.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(png)


def _page(tmp_path: Path, html: str) -> str:
    path = tmp_path / "report.html"
    path.write_text(html, encoding="utf-8")
    return path.resolve().as_uri()


@pytest.mark.parametrize(("width", "height", "mobile"), [(1280, 900, False), (390, 844, True)],
                         ids=["desktop", "phone"])
def test_report_in_browser(browser, tmp_path, width, height, mobile):
    r = make_results(HOSTILE)
    r["gates"] = [{"dtype": "bf16", "metric": "kl_mean", "op": "<=", "bound": 0.01, "value": 0.001, "passed": True}]
    url = _page(tmp_path, render_report(r))
    browser.open(url, width, height, mobile)
    assert browser.problems(url) == []
    assert browser.js("document.scripts.length") == 0  # the hostile <script> is text
    assert HOSTILE in browser.js("document.body.innerText")  # shown as text, not run
    assert browser.js("document.querySelectorAll('svg.chart').length") == 2
    # Reads at phone width: the page itself never scrolls sideways (wide tables scroll in their box).
    assert browser.js("document.documentElement.scrollWidth") <= width
    assert_not_blank(browser.screenshot(scale=0.25, full_page=True))
    _keep(f"report-{width}.png", browser.screenshot(full_page=True))


def test_compare_in_browser(browser, tmp_path):
    a, b = make_results(), make_results(HOSTILE)
    b["dtypes"]["bf16"]["metrics"]["kl_mean"] = 2e-3
    url = _page(tmp_path, render_compare(a, b, files=("a.json", "b.json")))
    browser.open(url, 1280, 900)
    assert browser.problems(url) == []
    assert HOSTILE in browser.js("document.body.innerText")
    assert browser.js("document.documentElement.scrollWidth") <= 1280
    png = browser.screenshot(scale=0.25)
    assert_not_blank(png)
    _keep("compare-1280.png", browser.screenshot(full_page=True))


def test_blank_page_is_detected(browser, tmp_path):
    """The blank check itself: an empty page must fail it."""
    url = _page(tmp_path, "<!doctype html><title>blank</title>")
    browser.open(url, 800, 600)
    with pytest.raises(AssertionError, match="blank"):
        assert_not_blank(browser.screenshot(scale=0.25))



def test_problem_detection_works(browser, tmp_path):
    """The checks themselves: a console error, an exception and a remote image are all caught."""
    html = ("<!doctype html><title>bad</title><img src='http://127.0.0.1:9/x.png'>"
            "<script>console.error('boom'); throw new Error('oops')</script>")
    url = _page(tmp_path, html)
    browser.open(url, 800, 600)
    found = " | ".join(browser.problems(url))
    assert "boom" in found and "oops" in found and "http://127.0.0.1:9/x.png" in found


def test_example_report_in_browser(browser):
    """The committed example (reports/example) opens clean, every chart drawn (both KL charts at least)."""
    path = Path(__file__).resolve().parents[2] / "reports" / "example" / "report.html"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    url = path.as_uri()
    browser.open(url, 1280, 900)
    assert browser.problems(url) == []
    charts = path.read_text(encoding="utf-8").count('<svg class="chart"')
    assert charts >= 2  # the two KL charts, and the benchmark ones where the run has them
    assert browser.js("document.querySelectorAll('svg.chart').length") == charts
    assert_not_blank(browser.screenshot(scale=0.25))


OVERFLOWING = ("[...document.querySelectorAll('section .scroll')].filter(e => e.scrollWidth > e.clientWidth + 1)"
               ".map(e => e.closest('section').id)")


def test_wide_tables_fit_1280_and_scroll_in_their_box_on_a_phone(browser, tmp_path):
    """Numerics and benchmark comparison tables are read whole at 1280 px; on a phone they scroll
    inside their box (overflow-x auto), and the page itself never scrolls sideways."""
    url = _page(tmp_path, render_report(wide_results()))
    browser.open(url, 1280, 900)
    assert browser.problems(url) == []
    assert browser.js("document.getElementById('numerics') !== null && document.getElementById('benchmarks') !== null")
    assert browser.js(OVERFLOWING) == []
    _keep("wide-1280.png", browser.screenshot(full_page=True))
    browser.open(url, 390, 844, True)
    assert browser.js("document.documentElement.scrollWidth") <= 390
    cut = browser.js(OVERFLOWING)
    assert {"numerics", "benchmarks"} <= set(cut)  # too wide for a phone: scrolled, so none is cut off
    assert browser.js("[...document.querySelectorAll('section .scroll')].every(e => "
                      "getComputedStyle(e).overflowX === 'auto')")


def _cjk_families() -> set[str]:
    try:
        out = subprocess.run(["fc-list", ":lang=zh", "family"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return set()
    return {f.strip() for line in out.splitlines() for f in line.split(",")}


STACK = ("Noto Sans CJK SC", "PingFang SC", "Microsoft YaHei", "Source Han Sans SC")


@pytest.mark.skipif(not set(STACK) & _cjk_families(), reason="no CJK font of the report's stack installed "
                    "(Debian: apt-get install -y fonts-noto-cjk)")
def test_chinese_is_drawn_with_a_cjk_font(browser, tmp_path):
    """The worst-token context is Chinese: Chromium draws it with a CJK family from the stack (not
    a Latin font's empty boxes, nor a Japanese variant picked by fallback)."""
    url = _page(tmp_path, render_report(make_results()))
    browser.open(url, 1280, 900)
    browser.call("DOM.enable", page=True)
    browser.call("CSS.enable", page=True)
    root = browser.call("DOM.getDocument", page=True)["root"]["nodeId"]
    node = browser.call("DOM.querySelector", {"nodeId": root, "selector": "td.ctx"}, page=True)["nodeId"]
    fonts = browser.call("CSS.getPlatformFontsForNode", {"nodeId": node}, page=True)["fonts"]
    assert any(f["familyName"] in STACK and f["glyphCount"] > 0 for f in fonts), fonts
