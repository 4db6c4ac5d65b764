"""Drive a system Chromium headless over the DevTools protocol (websocket-client; no browser download):
open a dashboard, collect JavaScript errors and network requests, evaluate expressions, take
screenshots. Used by the browser tests and to make docs/dashboard.png.

    with Page.open("study.html") as page:
        page.errors          # uncaught exceptions, console.error calls, error log entries
        page.requests        # URLs the page asked for beyond file:/data:/about: (should be none)
        page.evaluate("document.title")
        page.screenshot("shot.png", width=1400, height=1800)
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
                  "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio", "--remote-allow-origins=*"]


class BrowserError(RuntimeError):
    """Chromium could not be started or did not answer."""


def find_chromium() -> str | None:
    from .build import find_chromium as _find
    return _find()


class Page:
    """One headless Chromium with one page, driven over the DevTools websocket."""

    def __init__(self, binary: str | None = None, width: int = 1400, height: int = 1000, timeout: float = 60.0):
        import websocket  # websocket-client (the test extra)

        self.binary = binary or find_chromium()
        if not self.binary:
            raise BrowserError("Chromium not found (apt-get install chromium, or set BROWSER_PATH)")
        self.timeout = timeout
        self.errors: list[str] = []
        self.requests: list[str] = []
        self._events: list[dict] = []
        self._id = 0
        self._profile = tempfile.mkdtemp(prefix="specbatch-chromium-")
        self._log = open(Path(self._profile) / "chromium.log", "wb")
        self.proc = subprocess.Popen([self.binary, *CHROMIUM_FLAGS, f"--user-data-dir={self._profile}",
                                      "--remote-debugging-port=0", f"--window-size={width},{height}", "about:blank"],
                                     stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            port = self._port()
            targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
            page = next(t for t in targets if t.get("type") == "page")
            self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=timeout, suppress_origin=True)
            for domain in ("Runtime", "Log", "Page", "Network"):
                self.send(f"{domain}.enable")
        except BaseException:
            self.close()
            raise

    def _port(self) -> int:
        f = Path(self._profile) / "DevToolsActivePort"
        end = time.monotonic() + self.timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise BrowserError(f"Chromium exited with code {self.proc.returncode}; log: "
                                   f"{(Path(self._profile) / 'chromium.log').read_text(errors='replace')[-2000:]}")
            if f.is_file():
                lines = f.read_text().split()
                if lines:
                    return int(lines[0])
            time.sleep(0.05)
        raise BrowserError(f"Chromium did not open its DevTools port within {self.timeout} s")

    @classmethod
    def open(cls, html: str | os.PathLike, **kw) -> "Page":
        p = cls(**kw)
        try:
            p.navigate(Path(html).resolve().as_uri())
        except BaseException:
            p.close()
            raise
        return p

    def __enter__(self) -> "Page":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        ws = getattr(self, "ws", None)
        if ws is not None:
            try:
                ws.close()
            except Exception:
                pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        shutil.rmtree(self._profile, ignore_errors=True)

    # -- protocol ---------------------------------------------------------------------------------------

    def _handle(self, msg: dict) -> None:
        m, p = msg.get("method"), msg.get("params", {})
        if m == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            self.errors.append(f"exception: {d.get('exception', {}).get('description') or d.get('text')}")
        elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            self.errors.append("console.error: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
        elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            e = p["entry"]
            self.errors.append(f"log: {e.get('text')} {e.get('url', '')}".strip())
        elif m == "Network.requestWillBeSent":
            url = p.get("request", {}).get("url", "")
            if not url.startswith(("file:", "data:", "about:", "blob:")):
                self.requests.append(url)
        if m:
            self._events.append(msg)

    def send(self, method: str, params: dict | None = None) -> dict:
        self._id += 1
        mid = self._id
        self.ws.send(json.dumps({"id": mid, "method": method, "params": params or {}}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == mid:
                if "error" in msg:
                    raise BrowserError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self._handle(msg)

    def wait_event(self, method: str, timeout: float | None = None) -> dict:
        for i, e in enumerate(self._events):
            if e.get("method") == method:
                return self._events.pop(i)
        end = time.monotonic() + (timeout or self.timeout)
        while time.monotonic() < end:
            self.ws.settimeout(max(0.1, end - time.monotonic()))
            msg = json.loads(self.ws.recv())
            self._handle(msg)
            if msg.get("method") == method:
                self._events.remove(msg)
                return msg
        raise BrowserError(f"no {method} within {timeout or self.timeout} s")

    def navigate(self, url: str) -> None:
        self.send("Page.navigate", {"url": url})
        self.wait_event("Page.loadEventFired")
        self.settle()

    def settle(self, quiet: float = 0.3) -> None:
        """Drain events until none arrive for ``quiet`` seconds (rendering finished)."""
        import websocket

        self.ws.settimeout(quiet)
        try:
            while True:
                self._handle(json.loads(self.ws.recv()))
        except websocket.WebSocketTimeoutException:
            pass
        finally:
            self.ws.settimeout(self.timeout)

    def evaluate(self, expression: str):
        """The JSON value of a JavaScript expression (promises awaited)."""
        r = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in r:
            raise BrowserError(f"evaluate failed: {r['exceptionDetails'].get('exception', {}).get('description')}")
        return r.get("result", {}).get("value")

    def screenshot(self, path: str | os.PathLike, width: int = 1400, height: int = 1800) -> Path:
        """A PNG of the top ``width`` × ``height`` pixels of the page."""
        self.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                         "mobile": False})
        self.evaluate("window.dispatchEvent(new Event('resize')); 0")
        self.settle(1.0)
        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path


#: JavaScript: per Plotly figure, its id, trace count and data points (x/y/z/cells values), and whether
#: any trace is visible.
FIGURE_STATS_JS = """
Array.from(document.querySelectorAll('.js-plotly-plot')).map(function(g){
  var pts=0, vis=0;
  function len(a){ return a ? (a.length!==undefined ? a.length : 0) : 0; }
  (g._fullData||g.data||[]).forEach(function(t){
    var n=0;
    if(t.type==='table'){ n=len(t.cells&&t.cells.values&&t.cells.values[0]); }
    else if(t.z){ n=len(t.z)*(len(t.z[0])||1); }
    else if(t.y){ n=len(t.y); } else if(t.x){ n=len(t.x); }
    pts+=n; if(t.visible!==false){vis+=1;}
  });
  return {id:g.id, traces:(g.data||[]).length, points:pts, visible_traces:vis,
          svg:g.querySelectorAll('svg.main-svg').length};
})
"""
