"""WebhookSink: Alertmanager payloads, retries with backoff, persistence, rejection and bounded shutdown,
against a real HTTP receiver on 127.0.0.1 whose behaviour each test controls."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from waiting import free_tcp_port

from engine.alerts.webhook import ZERO_TIME, WebhookSink, alertmanager_alert, alertmanager_payload
from engine.events import Event, Severity, Status

ROOT = Path(__file__).resolve().parent.parent


def make_event(i: int, stream: str = "cam1", type_: str = "black", **kw: Any) -> Event:
    fields: dict[str, Any] = dict(
        id=f"alert{i:04d}", stream=stream, type=type_, status=Status.FIRING, start=10.0 + i, end=None,
        duration=None, wallclock="2024-05-01T12:00:00.000Z", value=0.98, threshold=0.9,
        severity=Severity.MAJOR, detector_version="1", message="", details={"frames": i},
    )
    fields.update(kw)
    return Event(**fields)


def resolve(event: Event, after: float = 2.5) -> Event:
    return replace(event.resolved(event.start + after), wallclock="2024-05-01T12:00:02.500Z")


def key(alert: dict[str, Any]) -> tuple[str, str]:
    return alert["labels"]["alert_id"], alert["status"]




class Receiver:
    """An Alertmanager receiver stand-in. `answer(payload) -> status` decides each reply; `hang` makes it sit
    on requests until released. Only alerts of 2xx replies count as delivered."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_tcp_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.requests: list[tuple[float, int, dict[str, Any]]] = []
        self.delivered: list[dict[str, Any]] = []
        self.answer: Callable[[dict[str, Any]], int] = lambda payload: 200
        self.hang = threading.Event()
        self.release = threading.Event()
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                payload = json.loads(body)
                if receiver.hang.is_set():
                    receiver.release.wait(10)
                code = receiver.answer(payload)
                with receiver.lock:
                    receiver.requests.append((time.monotonic(), code, payload))
                    if 200 <= code < 300:
                        receiver.delivered.extend(payload["alerts"])
                try:
                    self.send_response(code)
                    self.send_header("content-length", "2")
                    self.end_headers()
                    self.wfile.write(b"no" if code >= 400 else b"ok")
                except OSError:
                    pass  # the client gave up waiting

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self.release.set()
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def keys(self) -> list[tuple[str, str]]:
        with self.lock:
            return [key(a) for a in self.delivered]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


@pytest.fixture
def sinks() -> Iterator[list[WebhookSink]]:
    """Sinks a test opens are closed at teardown even when it fails, so no thread outlives the test."""
    opened: list[WebhookSink] = []
    yield opened
    for s in opened:
        s.close(timeout=0.2)


def open_sink(sinks: list[WebhookSink], url: str, db: Path, cls: type[WebhookSink] = WebhookSink,
              **kw: Any) -> WebhookSink:
    kw = {"backoff_initial": 0.01, "backoff_max": 0.05, "timeout": 2.0, "idle_poll": 0.2, **kw}
    s = cls(url, db, **kw)
    sinks.append(s)
    return s


def rows(db: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT seq, alert_id, status, state, attempts, last_error FROM outbox ORDER BY seq").fetchall()


def emitted_keys(events: list[Event]) -> list[tuple[str, str]]:
    return [(e.id, e.status.value) for e in events]


def interleaved(n: int) -> list[Event]:
    """Firing events with resolutions mixed in, so per-alert order and global order both matter."""
    firing = [make_event(i) for i in range(n)]
    out: list[Event] = []
    for i, ev in enumerate(firing):
        out.append(ev)
        if i % 2:
            out.append(resolve(firing[i - 1]))
    return out


# ------------------------------------------------------------------------------------------------- tests


def test_payload_shape(receiver: Receiver, sinks: list[WebhookSink], tmp_path: Path) -> None:
    sink = open_sink(sinks, receiver.url, tmp_path / "o.db", external_url="http://fw:8080/", batch_max=1)
    fire = make_event(1, thumbnail="thumbs/a.jpg", message="black picture")
    orphan = resolve(make_event(2))  # its firing event was never seen by this outbox
    for ev in (fire, resolve(fire), orphan):
        sink.emit(ev)
    assert sink.flush(5)

    bodies = [json.loads(json.dumps(p)) for _, _, p in receiver.requests]
    assert len(bodies) == 3
    for body in bodies:
        assert body["version"] == "4"
        assert set(body) == {"version", "groupKey", "truncatedAlerts", "status", "receiver", "groupLabels",
                             "commonLabels", "commonAnnotations", "externalURL", "alerts"}
        assert body["receiver"] == "framewatch" and body["externalURL"] == "http://fw:8080"
        assert body["truncatedAlerts"] == 0 and body["groupLabels"] == {}
        assert body["commonLabels"] == body["alerts"][0]["labels"]
    firing, resolved, orphaned = (b["alerts"][0] for b in bodies)
    assert [b["status"] for b in bodies] == ["firing", "resolved", "resolved"]
    assert set(firing) == {"status", "labels", "annotations", "startsAt", "endsAt", "generatorURL", "fingerprint"}
    assert firing["labels"] == {"alertname": "black", "stream": "cam1", "severity": "major",
                                "service": "framewatch", "alert_id": fire.id}
    ann = firing["annotations"]
    assert ann["summary"] == "black picture" and ann["thumbnail"] == "thumbs/a.jpg"
    assert (ann["value"], ann["threshold"], ann["media_start"]) == ("0.98", "0.9", "11.0")
    assert "media_end" not in ann and json.loads(ann["details"]) == {"frames": 1}
    assert resolved["annotations"]["media_end"] == "13.5"
    assert firing["generatorURL"] == f"http://fw:8080/#alert={fire.id}"
    assert len(firing["fingerprint"]) == 16 and int(firing["fingerprint"], 16) >= 0
    assert firing["fingerprint"] == resolved["fingerprint"] != orphaned["fingerprint"]
    assert firing["startsAt"] == resolved["startsAt"] == fire.wallclock
    assert firing["endsAt"] == ZERO_TIME and resolved["endsAt"] == "2024-05-01T12:00:02.500Z"
    # Without the firing row, startsAt is the resolved time minus the fault's duration.
    assert orphaned["startsAt"] == "2024-05-01T12:00:00.000Z" and orphaned["annotations"]["summary"] == \
        "black on cam1"

    # The pure function: batch status is firing while any alert fires; only shared labels are common.
    a = alertmanager_alert(make_event(3, stream="cam2"), generator_url="u")
    b = alertmanager_alert(resolve(make_event(4)), generator_url="u")
    body = alertmanager_payload([b, a], "rx", "http://x")
    assert body["status"] == "firing" and body["receiver"] == "rx" and body["alerts"] == [b, a]
    assert body["commonLabels"] == {"alertname": "black", "severity": "major", "service": "framewatch"}
    assert alertmanager_payload([b], "rx", "")["status"] == "resolved"
    json.dumps(body, allow_nan=False)
    # generator_url callback wins over external_url.
    sink2 = open_sink(sinks, receiver.url, tmp_path / "o.db", name="other", generator_url=lambda e: f"g/{e.id}")
    sink2.emit(make_event(9))
    assert sink2.flush(5)
    assert receiver.delivered[-1]["generatorURL"] == "g/alert0009"


def test_server_errors_then_ok_delivers_each_once_in_order(receiver: Receiver, sinks: list[WebhookSink],
                                                           tmp_path: Path) -> None:
    failing = 40
    codes = [500, 503, 429, 408]
    count = 0

    def answer(payload: dict[str, Any]) -> int:
        nonlocal count
        count += 1
        return codes[count % len(codes)] if count <= failing else 200

    receiver.answer = answer
    db = tmp_path / "o.db"
    sink = open_sink(sinks, receiver.url, db, batch_max=4, backoff_initial=0.005, backoff_max=0.03)
    events = interleaved(20)
    for ev in events[:10]:
        sink.emit(ev)
    time.sleep(0.2)  # some arrive during the outage, behind a head that keeps failing
    for ev in events[10:]:
        sink.emit(ev)
    assert sink.flush(20), sink.stats()

    assert receiver.keys() == emitted_keys(events)  # once each, in emit order
    assert sum(1 for _, code, _ in receiver.requests if code != 200) == failing
    st = sink.stats()
    assert (st["pending"], st["delivered"], st["rejected"]) == (0, len(events), 0)
    assert st["failures"] == failing and st["consecutive_failures"] == 0 and "HTTP" in st["last_error"]
    assert st["attempts"] > len(events)
    table = rows(db)
    assert table[0][4] > 1 and all(r[3] == "delivered" for r in table)


class TimedSink(WebhookSink):
    """Records when each post starts: with the port closed there is no receiver to see the attempts."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        self.post_times: list[float] = []
        super().__init__(*args, **kw)

    def _post(self, client: httpx.Client, payload: dict[str, Any]) -> Any:
        self.post_times.append(time.monotonic())
        return super()._post(client, payload)


def test_receiver_down_then_up_backoff_grows_and_is_capped(sinks: list[WebhookSink], tmp_path: Path) -> None:
    receiver = Receiver()  # not started: connections are refused
    sink = open_sink(sinks, receiver.url, tmp_path / "o.db", cls=TimedSink, backoff_initial=0.03,
                     backoff_max=0.24)
    assert isinstance(sink, TimedSink)
    events = interleaved(6)
    for ev in events:
        sink.emit(ev)
    time.sleep(1.6)
    assert sink.stats()["pending"] == len(events)
    receiver.start()
    try:
        assert sink.flush(5)
        assert receiver.keys() == emitted_keys(events)
    finally:
        receiver.stop()

    times = sink.post_times
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert len(gaps) >= 8
    # Jitter shortens a wait by at most 20 %, so each doubling still shows; the refusal itself takes ~1 ms.
    assert all(gaps[i + 1] > 1.2 * gaps[i] for i in range(3)), gaps
    assert gaps[3] > 4 * gaps[0]
    assert max(gaps) < 0.24 + 0.1, gaps
    assert all(g > 0.24 * 0.75 for g in gaps[4:-1]), gaps
    st = sink.stats()
    assert st["delivered"] == len(events) and st["failures"] == len(times) - 1


def test_outbox_survives_restart_and_dedupes(sinks: list[WebhookSink], tmp_path: Path) -> None:
    db = tmp_path / "o.db"
    receiver = Receiver()
    first = open_sink(sinks, receiver.url, db)
    events = interleaved(5)
    for ev in events:
        first.emit(ev)
    t0 = time.monotonic()
    first.close(timeout=0.3)
    assert time.monotonic() - t0 < 1.5
    assert [r[3] for r in rows(db)] == ["pending"] * len(events)

    # A process killed right after emit: the committed row is there for the next start.
    killed = make_event(99)
    code = (
        "import os, sys\n"
        "from engine.alerts.webhook import WebhookSink\n"
        "from engine.events import Event, Status, Severity\n"
        f"s = WebhookSink({receiver.url!r}, {str(db)!r}, backoff_initial=5)\n"
        f"s.emit(Event(**{{**{killed.to_dict()!r}, 'status': Status.FIRING, 'severity': Severity.MAJOR}}))\n"
        "os.kill(os.getpid(), 9)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=30,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == -9, proc.stderr.decode()

    receiver.start()
    try:
        second = open_sink(sinks, receiver.url, db)
        assert second.flush(5)
        expected = emitted_keys(events) + [(killed.id, "firing")]
        assert receiver.keys() == expected
        for ev in events + [killed]:  # a replay after restart is not queued again
            second.emit(ev)
        assert second.flush(5)
        time.sleep(0.3)
        assert receiver.keys() == expected
        assert len(rows(db)) == len(expected)
        assert second.stats()["delivered"] == len(expected)
    finally:
        receiver.stop()


def test_refused_alert_is_rejected_alone(receiver: Receiver, sinks: list[WebhookSink], tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    bad = "alert0003"
    receiver.answer = lambda p: 400 if any(a["labels"]["alert_id"] == bad for a in p["alerts"]) else 200
    receiver.hang.set()  # hold the first post so the rest queue up behind it and go as one batch
    db = tmp_path / "o.db"
    sink = open_sink(sinks, receiver.url, db, batch_max=16)
    events = [make_event(i) for i in range(8)]
    with caplog.at_level(logging.ERROR, logger="engine.alerts.webhook"):
        for ev in events:
            sink.emit(ev)
        time.sleep(0.1)
        receiver.hang.clear()
        receiver.release.set()
        assert sink.flush(5)

    good = [(e.id, "firing") for e in events if e.id != bad]
    assert receiver.keys() == good
    assert any(len(p["alerts"]) > 1 and code == 400 for _, code, p in receiver.requests)  # batch was split
    st = sink.stats()
    assert (st["pending"], st["delivered"], st["rejected"]) == (0, len(good), 1)
    states = {r[1]: (r[3], r[5]) for r in rows(db)}
    assert states[bad][0] == "rejected" and states[bad][1].startswith("HTTP 400") and "no" in states[bad][1]
    assert all(state == "delivered" for aid, (state, _) in states.items() if aid != bad)
    refused = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(refused) == 1 and bad in refused[0].getMessage()


def test_close_is_bounded_with_hanging_receiver(receiver: Receiver, sinks: list[WebhookSink],
                                                tmp_path: Path) -> None:
    receiver.hang.set()
    db = tmp_path / "o.db"
    sink = open_sink(sinks, receiver.url, db, timeout=5.0)
    for ev in interleaved(10):
        sink.emit(ev)
    time.sleep(0.1)  # the first post is now stuck in the receiver
    t0 = time.monotonic()
    sink.close(timeout=0.5)
    elapsed = time.monotonic() - t0
    assert 0.4 < elapsed < 1.5
    assert sink.flush(0.1) is False
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT COUNT(*) FROM outbox WHERE state = 'pending'").fetchone()[0] == 15
    receiver.release.set()
    sink._thread.join(5)  # the abandoned post ends without touching the closed database
    assert not sink._thread.is_alive()
    assert all(r[3] == "pending" for r in rows(db))


def test_emit_never_waits_on_network(receiver: Receiver, sinks: list[WebhookSink], tmp_path: Path) -> None:
    receiver.hang.set()
    sink = open_sink(sinks, receiver.url, tmp_path / "o.db", timeout=5.0)
    events = [make_event(i) for i in range(1000)]
    t0 = time.monotonic()
    for ev in events:
        sink.emit(ev)
    elapsed = time.monotonic() - t0
    assert elapsed < 1.0, f"1000 emits took {elapsed:.2f} s"
    st = sink.stats()
    assert st["pending"] == 1000 and st["oldest_pending_age_s"] >= 0.0


def test_resolved_starts_at_comes_from_the_outbox(receiver: Receiver, sinks: list[WebhookSink],
                                                  tmp_path: Path) -> None:
    """A resolved event whose duration does not match the wall-clock gap (media time vs. real time) still
    carries the exact startsAt of its firing notification."""
    sink = open_sink(sinks, receiver.url, tmp_path / "o.db")
    fire = make_event(5, wallclock="2024-05-01T11:00:00.000Z")
    sink.emit(fire)
    sink.emit(resolve(fire, after=1.0))
    assert sink.flush(5)
    starts = [a["startsAt"] for a in receiver.delivered]
    assert starts == ["2024-05-01T11:00:00.000Z"] * 2  # not 12:00:01.5, the wall clock minus media duration
