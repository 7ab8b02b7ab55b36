"""Open a local HTML file in headless Chromium and report what a person would see.

Chromium is driven over the DevTools protocol (a websocket; `websocket-client`), which gives
the console messages, uncaught exceptions and failed loads of the page, the DOM's answers to a
JavaScript expression, and a full-page screenshot — from one browser session.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--hide-scrollbars",
    "--window-size=1280,1600",
    "--remote-debugging-port=0",
]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class Page:
    errors: list[str] = field(default_factory=list)  # console errors, exceptions, failed loads
    facts: dict = field(default_factory=dict)  # the value of the JavaScript expression
    screenshot: bytes = b""  # PNG of the whole page


def _debugger_url(profile: Path, process: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    port_file = profile / "DevToolsActivePort"
    while not port_file.exists() or len(port_file.read_text().split()) < 2:
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(
                f"chromium did not start: {process.stderr.read().decode(errors='replace')[-800:] if process.stderr else ''}"
            )
        time.sleep(0.1)
    port = port_file.read_text().split()[0]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
        pages = [t for t in json.loads(response.read()) if t["type"] == "page"]
    return pages[0]["webSocketDebuggerUrl"]


def load_page(path: Path, expression: str, timeout: float = 60.0) -> Page:
    """Load `path`, wait for its load event, evaluate `expression` (JSON-serialisable result), screenshot it."""
    import websocket

    page = Page()
    # Chromium's helper processes can still be writing the profile when the browser has exited: cleanup is best effort
    with tempfile.TemporaryDirectory(prefix="chromium-profile-", ignore_cleanup_errors=True) as profile:
        process = subprocess.Popen(
            [chromium(), *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            socket = websocket.create_connection(
                _debugger_url(Path(profile), process, timeout), timeout=timeout, suppress_origin=True
            )
            ids = itertools.count(1)

            def call(method: str, **params) -> dict:
                number = next(ids)
                socket.send(json.dumps({"id": number, "method": method, "params": params}))
                while True:
                    message = json.loads(socket.recv())
                    if message.get("id") == number:
                        if "error" in message:
                            raise RuntimeError(f"{method}: {message['error']}")
                        return message["result"]
                    collect(message)

            def collect(message: dict) -> None:
                method, params = message.get("method"), message.get("params", {})
                if method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                    page.errors.append(
                        "console: " + " ".join(str(a.get("value", a.get("description"))) for a in params["args"])
                    )
                elif method == "Runtime.exceptionThrown":
                    page.errors.append(
                        "exception: "
                        + params["exceptionDetails"]
                        .get("exception", {})
                        .get("description", params["exceptionDetails"]["text"])
                    )
                elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                    page.errors.append(f"log: {params['entry']['text']} {params['entry'].get('url', '')}")

            for domain in ("Page", "Runtime", "Log"):
                call(f"{domain}.enable")
            call("Page.navigate", url=Path(path).absolute().as_uri())
            while True:  # until the load event: every image decoded or failed
                message = json.loads(socket.recv())
                collect(message)
                if message.get("method") == "Page.loadEventFired":
                    break
            result = call("Runtime.evaluate", expression=f"JSON.stringify({expression})", returnByValue=True)
            page.facts = json.loads(result["result"]["value"])
            page.screenshot = base64.b64decode(
                call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
            )
            socket.close()
        finally:
            process.terminate()
            process.wait(timeout=30)
    return page


def region_std(png: bytes, box: dict) -> float:
    """Pixel standard deviation inside a CSS-pixel box ({x, y, width, height}) of a screenshot: 0 means blank."""
    import numpy as np
    from PIL import Image

    image = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=float)
    x, y = int(box["x"]), int(box["y"])
    region = image[y : y + int(box["height"]), x : x + int(box["width"])]
    return float(region.std()) if region.size else 0.0
