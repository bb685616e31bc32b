"""The mosaic page of `framewatch serve`, end to end: a real service under uvicorn, Debian's headless Chromium
driven by Selenium. The page loads, shows a tile per stream, turns a tile red when a fault is injected,
acknowledges the alert, drops a removed stream's tile, and works behind a bearer token. A screenshot is kept
in framewatch-out/mosaic.png for a human to look at. The page files themselves: plain, no external assets.
"""

from __future__ import annotations

import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STATIC = ROOT / "engine" / "service" / "static"
OUT = ROOT / "framewatch-out"
TOKEN = "x" * 20
STREAM = "synthetic://{name}?size=128x72&fps=10&duration=0&seed={seed}"


# ---------------------------------------------------------------------------------------------- helpers
def _config(ids: list[str]):
    from engine.config import load_config

    streams = "\n".join(f'  - {{id: {sid}, url: "{STREAM.format(name=sid, seed=i + 1)}"}}' for i, sid in enumerate(ids))
    return load_config(text=f"output: {{jsonl: null}}\nstreams:\n{streams}\n")


@contextmanager
def serve(state_dir: Path, ids: list[str], token: str | None = None) -> Iterator[tuple[str, object]]:
    """A real service (engine thread + uvicorn) on 127.0.0.1 and a free port, stopped on exit."""
    import httpx
    import uvicorn

    from engine.service import Service
    from engine.service.app import create_app

    service = Service(_config(ids), state_dir=state_dir, token=token)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="on", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            assert thread.is_alive(), "the server thread ended while starting"
            try:
                if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the service did not become ready in 20 s"
            time.sleep(0.1)
        yield base, service
    finally:
        service.broadcast.close()  # the page's event streams end, so the graceful shutdown is quick
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()
    assert not thread.is_alive(), "the server did not stop in 20 s"


@pytest.fixture
def browser():
    pytest.importorskip("selenium")
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not chromedriver:
        pytest.skip("needs Debian's chromium and chromedriver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as ChromeService

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,900", "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit chromedriver: Selenium Manager must never try to download one.
    drv = webdriver.Chrome(service=ChromeService(chromedriver), options=opts)
    drv.set_page_load_timeout(20)
    drv.set_script_timeout(10)
    try:
        yield drv
    finally:
        drv.quit()


TILES_JS = """
return [...document.querySelectorAll('#tiles .tile')].map(t => {
  const img = t.querySelector('img.thumb');
  return {id: t.dataset.stream, level: t.dataset.level || '', cls: t.className,
          state: t.querySelector('.state').textContent, fps: t.querySelector('.fps').textContent,
          lufs: t.querySelector('.lufs').textContent,
          picture: img && !img.hidden && img.complete ? img.naturalWidth : 0,
          badges: [...t.querySelectorAll('.badge')].map(b => ({text: b.textContent, cls: b.className,
                                                               alert: b.dataset.alert}))};
});
"""


def tiles(drv) -> dict[str, dict]:
    return {t["id"]: t for t in drv.execute_script(TILES_JS)}


def wait(drv, what: str, check, timeout: float = 15):
    """check(drv) until truthy (its value is returned); on timeout, say what the page showed."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(drv, timeout, poll_frequency=0.2).until(lambda d: check(d))
    except TimeoutException:
        pytest.fail(f"timed out after {timeout} s waiting for {what}; tiles: {tiles(drv)}; "
                    f"console: {drv.get_log('browser')[-10:]}")


def healthy(t: dict) -> bool:
    m = re.fullmatch(r"(\d+\.\d) fps", t["fps"])
    return (t["level"] == "ok" and "level-ok" in t["cls"] and t["picture"] > 0 and m is not None
            and float(m.group(1)) > 0 and "LUFS" in t["lufs"])


def text(drv, css: str) -> str:
    from selenium.webdriver.common.by import By

    return drv.find_element(By.CSS_SELECTOR, css).text


def script_errors(drv) -> list[dict]:
    """Uncaught exceptions in the page (network failures are the server's business, not the page's)."""
    return [e for e in drv.get_log("browser") if e["level"] == "SEVERE" and e.get("source") == "javascript"]


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.slow
def test_mosaic_tiles_alarm_ack_and_removal(browser, tmp_path: Path) -> None:
    import httpx
    from selenium.webdriver.common.by import By

    drv = browser
    with serve(tmp_path / "state", ["cam-1", "cam-2"]) as (base, _service):
        api = httpx.Client(base_url=base, timeout=10)
        drv.get(base + "/")
        assert "framewatch" in drv.title

        # One tile per stream, each live: green, a picture, a frame rate and a loudness reading.
        ids = sorted(s["id"] for s in api.get("/api/streams").json())
        assert ids == ["cam-1", "cam-2"]
        wait(drv, "a tile per stream", lambda d: sorted(tiles(d)) == ids)
        assert len(drv.execute_script(TILES_JS)) == len(ids)
        wait(drv, "green tiles with pictures", lambda d: all(healthy(t) for t in tiles(d).values()))
        assert text(drv, "#count-streams") == "2"
        assert text(drv, "#count-alarms") == "0"
        assert drv.find_element(By.ID, "conn").get_attribute("data-state") == "live"

        # Inject a fault: a new stream that goes black at 2 s (black is critical: an alarm).
        r = api.post("/api/streams", json={"id": "faulty", "url": STREAM.format(name="kids", seed=3),
                                           "faults": [{"kind": "black", "start": 2, "duration": 30}]})
        assert r.status_code == 201, r.text
        wait(drv, "the new tile", lambda d: "faulty" in tiles(d), timeout=5)
        t = wait(drv, "the faulty tile in alarm",
                 lambda d: (x := tiles(d).get("faulty")) and "level-alarm" in x["cls"] and x["badges"] and x,
                 timeout=20)
        assert t["level"] == "alarm"
        assert any(b["text"] == "black · critical" for b in t["badges"]), t["badges"]
        assert all(tiles(drv)[sid]["level"] == "ok" for sid in ids)  # the others carry on
        assert text(drv, "#count-alarms") == "1"

        # The alert log shows it, firing, with an Ack button.
        row_css = 'tr.alert-row[data-stream="faulty"][data-status="firing"]'
        wait(drv, "the firing alert in the log", lambda d: d.find_elements(By.CSS_SELECTOR, row_css + " button[data-ack]"))
        button = drv.find_element(By.CSS_SELECTOR, row_css + " button[data-ack]")
        alert_id = button.get_attribute("data-ack")
        alert = api.get(f"/api/alerts/{alert_id}").json()
        assert (alert["stream"], alert["type"], alert["status"], alert["acknowledged"]) == (
            "faulty", "black", "firing", False)
        row = drv.find_element(By.CSS_SELECTOR, f'tr[data-alert="{alert_id}"]')
        shown = row.get_attribute("textContent")
        assert "FIRING" in shown and "black" in shown and "critical" in shown, shown
        assert row.find_element(By.CSS_SELECTOR, "img.alert-thumb").get_attribute("src").endswith(
            f"/api/alerts/{alert_id}/thumbnail.jpg")

        # Acknowledge it from the page.
        drv.find_element(By.ID, "operator").send_keys("tester")
        button.click()
        wait(drv, "the Ack button to go",
             lambda d: not d.find_elements(By.CSS_SELECTOR, f'button[data-ack="{alert_id}"]'), timeout=10)
        wait(drv, "who acknowledged it", lambda d: "✓ tester" in d.find_element(
            By.CSS_SELECTOR, f'tr[data-alert="{alert_id}"]').text, timeout=5)
        acked = api.get(f"/api/alerts/{alert_id}").json()
        assert acked["acknowledged"] is True and acked["acked_by"] == "tester"
        wait(drv, "the tile's badge marked acknowledged",
             lambda d: any("acked" in b["cls"] for b in tiles(d)["faulty"]["badges"] if b["alert"] == alert_id),
             timeout=5)
        assert tiles(drv)["faulty"]["level"] == "alarm"  # acknowledged, but the picture is still black

        # A picture of the wall, for people.
        shot = tmp_path / "mosaic.png"
        assert drv.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        OUT.mkdir(exist_ok=True)
        shutil.copyfile(shot, OUT / "mosaic.png")

        # Removal: the tile goes, the others stay, and the alert resolves in the log.
        assert api.delete("/api/streams/faulty").status_code == 204
        wait(drv, "the removed tile to go", lambda d: sorted(tiles(d)) == ids, timeout=5)
        assert text(drv, "#count-streams") == "2"
        wait(drv, "the alert resolved in the log",
             lambda d: d.find_element(By.CSS_SELECTOR, f'tr[data-alert="{alert_id}"]').get_attribute(
                 "data-status") == "resolved", timeout=5)
        assert script_errors(drv) == []
        api.close()


@pytest.mark.slow
def test_mosaic_with_a_token(browser, tmp_path: Path) -> None:
    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    drv = browser
    with serve(tmp_path / "state", ["cam-1"], token=TOKEN) as (base, _service):
        assert httpx.get(base + "/api/streams").status_code == 401
        assert httpx.get(base + "/api/streams", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200

        # The token in the URL fragment: the feed and the pictures get through (cookie), nothing is asked.
        drv.get(base + "/#token=" + TOKEN)
        wait(drv, "a green tile with a picture", lambda d: (t := tiles(d).get("cam-1")) and healthy(t))
        assert TOKEN not in drv.current_url  # taken out of the address bar
        assert drv.execute_script("return sessionStorage.getItem('framewatch_token')") == TOKEN
        assert any(c["name"] == "framewatch_token" and c["value"] == TOKEN for c in drv.get_cookies())
        assert drv.find_element(By.ID, "conn").get_attribute("data-state") == "live"

        # No token at all: the page asks for it, then carries on.
        drv.execute_script("sessionStorage.clear()")
        drv.delete_all_cookies()
        drv.get(base + "/")
        prompt = WebDriverWait(drv, 10).until(EC.alert_is_present())
        prompt.send_keys(TOKEN)
        prompt.accept()
        wait(drv, "a green tile after the prompt", lambda d: (t := tiles(d).get("cam-1")) and healthy(t))
        assert script_errors(drv) == []


def test_page_files_are_plain() -> None:
    """No build step, nothing fetched from elsewhere, and no server text ever parsed as HTML."""
    html = (STATIC / "index.html").read_text(encoding="utf-8")
    js = (STATIC / "app.js").read_text(encoding="utf-8")
    css = (STATIC / "style.css").read_text(encoding="utf-8")
    assert '<script src="/static/app.js"' in html and 'href="/static/style.css"' in html
    for name, body in (("index.html", html), ("app.js", js), ("style.css", css)):
        assert not re.search(r"https?://|(?:src|href)=[\"']?//|url\(\s*[\"']?//|@import", body, re.I), (
            f"{name} loads something from elsewhere")
    assert not re.search(r"^\s*import\b|\bimport\s*\(|\brequire\s*\(", js, re.M), "app.js needs a bundler"
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in js, f"app.js uses {sink}"
