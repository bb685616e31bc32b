"""`framewatch serve` as a real process: SIGTERM drains (sources stop, open alerts resolved as a shutdown,
the webhook outbox flushed, the database consistent), a killed process leaves nothing lost or duplicated,
and a receiver that is down at shutdown gets everything from the next start."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from waiting import free_tcp_port, wait_until

pytestmark = pytest.mark.slow

SYN = "synthetic://{name}?size=128x72&fps=10&duration=0&seed={seed}"






class Receiver:
    """An Alertmanager webhook receiver on 127.0.0.1 that records what it accepts, and can fail on demand."""

    def __init__(self, port: int | None = None) -> None:
        self.alerts: list[dict] = []
        self.fail = False
        self.posts = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                outer.posts += 1
                if outer.fail:
                    self.send_response(500)
                    self.end_headers()
                    return
                outer.alerts.extend(json.loads(body)["alerts"])
                self.send_response(200)
                self.end_headers()

            def log_message(self, *a: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port or 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def keys(self) -> list[tuple[str, str]]:
        return [(a["labels"]["alert_id"], a["status"]) for a in self.alerts]

    def of(self, alertname: str) -> list[dict]:
        return [a for a in self.alerts if a["labels"]["alertname"] == alertname]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.stop()


def write_config(tmp: Path, port: int, hook_port: int, drain: float = 10) -> Path:
    cfg = tmp / "serve.yaml"
    cfg.write_text(f"""
output: {{jsonl: {tmp / 'alerts.jsonl'}, webhooks: [{{url: "http://127.0.0.1:{hook_port}/hook", timeout: 2, backoff_max: 1}}]}}
service: {{port: {port}, state_dir: {tmp / 'state'}, drain_timeout: {drain}}}
streams:
  - {{id: dark, url: "{SYN.format(name='dark', seed=1)}", faults: [{{kind: black, start: 0.5, duration: 3600}}]}}
  - {{id: fine, url: "{SYN.format(name='fine', seed=2)}"}}
""")
    return cfg


def start(cfg: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("FRAMEWATCH_TOKEN", None)
    p = subprocess.Popen([sys.executable, "-c", "from engine.cli import main; main()", "serve", str(cfg)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)

    def ready() -> bool:
        if p.poll() is not None:
            raise AssertionError(f"serve exited: {p.stdout.read() if p.stdout else ''}")
        try:
            return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(ready, timeout=60, every=0.3)
    return p


def stop(p: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> tuple[int, str]:
    p.send_signal(sig)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, _ = p.communicate()
        raise AssertionError(f"serve did not exit within {timeout} s after signal {sig}:\n{out}") from None
    return p.returncode, out


def outbox(state: Path) -> dict[str, int]:
    with sqlite3.connect(state / "state.sqlite") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE 'outbox%'")]
        table = next(t for t in tables if db.execute(f"PRAGMA table_info({t})").fetchall()
                     and "state" in [c[1] for c in db.execute(f"PRAGMA table_info({t})")])
        return dict(db.execute(f"SELECT state, COUNT(*) FROM {table} GROUP BY state").fetchall())


def test_sigterm_drains_sources_alerts_outbox_and_database(tmp_path: Path, receiver: Receiver) -> None:
    port = free_tcp_port()
    cfg = write_config(tmp_path, port, receiver.port)
    p = start(cfg, port)
    try:
        firing = wait_until(lambda: receiver.of("black"), timeout=30)[0]
        assert firing["status"] == "firing" and firing["labels"]["stream"] == "dark"
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert 'framewatch_webhook_pending{sink="webhook-1"}' in metrics
        delivered = [float(x.rsplit(" ", 1)[1]) for x in metrics.splitlines()
                     if x.startswith('framewatch_webhook_delivered_total{sink="webhook-1"}')]
        assert delivered and delivered[0] >= 1
        # Live page connections must not hold the shutdown up.
        stream = httpx.stream("GET", f"http://127.0.0.1:{port}/api/events", timeout=5)
        events = stream.__enter__()
        assert events.status_code == 200
        t0 = time.monotonic()
        rc, out = stop(p)
        took = time.monotonic() - t0
        stream.__exit__(None, None, None)
    finally:
        if p.poll() is None:
            p.kill()
    assert rc == 0, out
    assert took < 15, f"shutdown took {took:.1f} s"
    # The open alert went out resolved, said to be a shutdown, after its firing, exactly once each.
    black = [a for a in receiver.alerts if a["labels"]["alert_id"] == firing["labels"]["alert_id"]]
    assert [a["status"] for a in black] == ["firing", "resolved"]
    assert json.loads(black[1]["annotations"]["details"])["resolution"] == "shutdown"
    assert black[1]["fingerprint"] == black[0]["fingerprint"] and black[1]["startsAt"] == black[0]["startsAt"]
    assert len(receiver.keys()) == len(set(receiver.keys()))
    assert outbox(tmp_path / "state") == {"delivered": len(receiver.alerts)}
    with sqlite3.connect(tmp_path / "state" / "state.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM alerts WHERE status = 'firing'").fetchone()[0] == 0
    # The JSONL sink got the same events.
    lines = [json.loads(x) for x in (tmp_path / "alerts.jsonl").read_text().splitlines()]
    assert [(e["id"], e["status"]) for e in lines] == receiver.keys()


def test_kill_and_receiver_outage_lose_nothing_and_duplicate_nothing(tmp_path: Path) -> None:
    hook_port = free_tcp_port()
    receiver = Receiver(hook_port)
    port = free_tcp_port()
    cfg = write_config(tmp_path, port, hook_port, drain=1)
    p = start(cfg, port)
    try:
        first = wait_until(lambda: receiver.of("black"), timeout=30)[0]
        # The receiver fails for a while; the alert raised meanwhile waits in the outbox.
        receiver.fail = True
        httpx.post(f"http://127.0.0.1:{port}/api/streams", json={
            "id": "late", "url": SYN.format(name="late", seed=3), "faults": [{"kind": "black", "start": 0.5, "duration": 3600}]})
        wait_until(lambda: receiver.posts >= 3, timeout=30)
        p.send_signal(signal.SIGKILL)  # a crash: nothing gets resolved or flushed
        p.wait(timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
    assert [a["labels"]["stream"] for a in receiver.of("black")] == ["dark"]
    receiver.fail = False
    p = start(cfg, port)
    try:
        # What the killed process left: its pending firing of 'late', then both old alerts resolved as
        # interrupted, then the faults (still there) fire again as new alerts.
        wait_until(lambda: len([a for a in receiver.of("black") if a["status"] == "firing"]) >= 4, timeout=40)
        rc, out = stop(p)
    finally:
        if p.poll() is None:
            p.kill()
        receiver.stop()
    assert rc == 0, out
    keys = receiver.keys()
    assert len(keys) == len(set(keys)), "an alert state was delivered twice"
    by_id: dict[str, list[dict]] = {}
    for a in receiver.of("black"):
        by_id.setdefault(a["labels"]["alert_id"], []).append(a)
    assert len(by_id) == 4
    for alerts in by_id.values():  # order per alert kept: firing, then resolved
        assert [a["status"] for a in alerts] == ["firing", "resolved"]
    resolutions = sorted(json.loads(a[1]["annotations"]["details"])["resolution"] for a in by_id.values())
    assert resolutions == ["restart", "restart", "shutdown", "shutdown"]
    old = by_id[first["labels"]["alert_id"]]
    assert old[1]["endsAt"] > old[0]["startsAt"]
    assert outbox(tmp_path / "state") == {"delivered": len(keys)}


def test_run_delivers_to_webhooks_too(tmp_path: Path, receiver: Receiver) -> None:
    """Sinks are chosen in config for `run` as well: its webhook outbox is flushed before it exits."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"""
output: {{jsonl: null, summary: false, outbox: {tmp_path / 'outbox.sqlite'},
          webhooks: [{{url: "http://127.0.0.1:{receiver.port}/hook", timeout: 2}}]}}
streams:
  - {{id: dark, url: "synthetic://d?size=128x72&fps=10&duration=5&seed=1&pace=fast",
      faults: [{{kind: black, start: 1, duration: 3}}]}}
""")
    r = subprocess.run([sys.executable, "-c", "from engine.cli import main; main()", "run", str(cfg), "-q"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    black = receiver.of("black")
    assert [a["status"] for a in black] == ["firing", "resolved"]
    assert black[1]["annotations"]["media_start"] == "1.0" and black[1]["annotations"]["media_end"] == "4.0"


def test_sigterm_with_a_source_stalled_inside_ffmpeg_exits_cleanly(tmp_path: Path) -> None:
    """An HTTP input that accepts and never answers, read with 30 s timeouts: its thread is inside FFmpeg when
    the service stops. The process once died of a segfault there (status 139) in the interpreter's teardown."""
    import socket

    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(16)
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: [accepted.append(hole.accept()[0]) for _ in range(16)], daemon=True).start()
    port = free_tcp_port()
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(f"""
output: {{jsonl: {tmp_path / 'alerts.jsonl'}}}
service: {{port: {port}, state_dir: {tmp_path / 'state'}, drain_timeout: 3}}
streams:
  - {{id: stalled, url: "http://127.0.0.1:{hole.getsockname()[1]}/live.ts", options: {{open_timeout: 30, read_timeout: 30}}}}
  - {{id: fine, url: "{SYN.format(name='fine', seed=2)}"}}
""")
    p = start(cfg, port)
    try:
        jsonl = tmp_path / "alerts.jsonl"
        wait_until(lambda: jsonl.exists() and '"no_signal"' in jsonl.read_text(), timeout=30)
        assert accepted  # the source is connected and waiting inside FFmpeg
        t0 = time.monotonic()
        rc, out = stop(p)
        took = time.monotonic() - t0
    finally:
        if p.poll() is None:
            p.kill()
        hole.close()
        for c in accepted:
            c.close()
    assert rc == 0, out
    assert took < 15, f"shutdown took {took:.1f} s"
    events = [json.loads(x) for x in (tmp_path / "alerts.jsonl").read_text().splitlines()]
    outage = [e for e in events if e["stream"] == "stalled" and e["type"] == "no_signal"]
    assert [e["status"] for e in outage] == ["firing", "resolved"] and outage[1]["details"]["resolution"] == "shutdown"
