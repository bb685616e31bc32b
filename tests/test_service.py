"""`framewatch serve` in-process: the stream API, validation, alert history and acks, thumbnails, metrics,
health, security, and the state that survives a restart. (The page: test_mosaic.py; SIGTERM, crashes and the
webhook from a real process: test_serve_process.py; live inputs: test_live_ingest.py.)"""

from __future__ import annotations

import sqlite3
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from waiting import wait_until

from engine.config import load_config
from engine.service import Service
from engine.service.app import create_app, is_loopback

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SYN = "synthetic://{name}?size=128x72&fps=10&duration=0&seed={seed}"
TOKEN = "t0ken-for-tests-0123456789"




def config(streams: str = "", extra: str = "") -> object:
    return load_config(text=f"output: {{jsonl: null}}\nprofiles: {{quiet: {{only: [black, no_signal]}}}}\n{extra}\n"
                            f"streams:{streams or ' []'}\n")


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    cfg = config(f"""
  - {{id: news, url: "{SYN.format(name='news', seed=1)}", faults: [{{kind: black, start: 1, duration: 3}}]}}
""")
    svc = Service(cfg, state_dir=tmp_path / "state")
    with TestClient(create_app(svc)) as c:
        c.service = svc  # type: ignore[attr-defined]
        yield c


def test_streams_add_get_change_remove(client: TestClient) -> None:
    r = client.post("/api/streams", json={"id": "kids", "url": SYN.format(name="kids", seed=2), "profile": "quiet"})
    assert r.status_code == 201, r.text
    assert r.json()["id"] == "kids" and r.json()["profile"] == "quiet"
    assert {s["id"] for s in client.get("/api/streams").json()} == {"news", "kids"}
    s = wait_until(lambda: (x := client.get("/api/streams/kids").json())["state"] == "running" and x["fps"] > 5 and x)
    assert (s["level"], s["decoder"], s["tier"], s["device"]) == ("ok", "synthetic", "all", "cpu")
    assert s["info"]["width"] == 128 and s["info"]["height"] == 72
    assert s["config"] == {"id": "kids", "url": SYN.format(name="kids", seed=2), "profile": "quiet"}
    assert s["loudness"] is not None and s["loudness"]["momentary"] == pytest.approx(-20, abs=1.5)
    assert -20 < s["loudness"]["max_true_peak_dbtp"] < 0
    assert s["av_sync"] is None  # not in the 'quiet' profile; the default one has it:
    assert set(client.get("/api/streams/news").json()["av_sync"]) == {"offset", "confidence", "timestamp_drift"}
    # Same id twice: refused, the running stream untouched.
    assert client.post("/api/streams", json={"id": "kids", "url": SYN.format(name="x", seed=3)}).status_code == 409
    # A change is a merge patch and restarts the stream with it.
    r = client.patch("/api/streams/kids", json={"faults": [{"kind": "black", "start": 0.5, "duration": 3}]})
    assert r.status_code == 200, r.text
    cfgd = client.get("/api/streams/kids").json()["config"]
    assert cfgd["profile"] == "quiet" and cfgd["faults"][0]["kind"] == "black"
    wait_until(lambda: any(a["type"] == "black" and a["stream"] == "kids" for a in client.get("/api/alerts").json()))
    assert client.patch("/api/streams/kids", json={"profile": None}).json()["profile"] == "default"
    assert client.patch("/api/streams/kids", json={"id": "other"}).status_code == 422
    assert client.delete("/api/streams/kids").status_code == 204
    assert client.get("/api/streams/kids").status_code == 404
    assert client.delete("/api/streams/kids").status_code == 404
    assert client.patch("/api/streams/kids", json={"url": "x"}).status_code == 404
    assert [s["id"] for s in client.get("/api/streams").json()] == ["news"]


@pytest.mark.parametrize("body, loc, words", [
    ({"id": "a b", "url": "udp://127.0.0.1:5000"}, ["body", "id"], "stream id must be"),
    ({"url": "udp://127.0.0.1:5000"}, ["body", "id"], "Field required"),
    ({"id": "a", "url": ""}, ["body", "url"], "must not be empty"),
    ({"id": "a", "url": "gopher://x"}, ["body", "url"], "unsupported URL scheme 'gopher'"),
    ({"id": "a", "url": "synthetic://x?size=7x7"}, ["body", "url"], "synthetic size"),
    ({"id": "a", "url": "udp://127.0.0.1:5000", "profile": "loud"}, ["body", "profile"], "unknown profile 'loud'"),
    ({"id": "a", "url": "udp://127.0.0.1:5000", "options": {"speed": 2}}, ["body", "options"], "unknown source option 'speed'"),
    ({"id": "a", "url": "udp://127.0.0.1:5000", "options": {"read_timeout": "soon"}}, ["body", "options"],
     "read_timeout must be a number"),
    ({"id": "a", "url": "udp://127.0.0.1:5000", "options": {"reconnect": 1}}, ["body", "options"], "true or false"),
    ({"id": "a", "url": "udp://127.0.0.1:5000", "options": {"decoder": "cuvid"}}, ["body", "options"],
     "decoder must be one of"),
    ({"id": "a", "url": "udp://127.0.0.1:5000", "detectors": {"black": {"onst": 1}}},
     ["body", "detectors", "black", "onst"], "Extra inputs"),
    ({"id": "a", "url": "udp://127.0.0.1:5000", "detectors": {"black": {"pix_th": "dark"}}},
     ["body", "detectors", "black", "pix_th"], "valid number"),
    ({"id": "a", "url": "udp://127.0.0.1:5000", "tier": "keyframes"}, ["body"], "need every frame"),
    ({"id": "a", "url": "udp://127.0.0.1:5000", "colour": "red"}, ["body", "colour"], "Extra inputs"),
])
def test_bad_bodies_get_422_with_field_and_reason(client: TestClient, body: dict, loc: list, words: str) -> None:
    r = client.post("/api/streams", json=body)
    assert r.status_code == 422, r.text
    err = r.json()["detail"][0]
    assert err["loc"] == loc and words in err["msg"], err
    assert [s["id"] for s in client.get("/api/streams").json()] == ["news"]  # nothing half-added


def test_not_json_and_wrong_types_are_refused(client: TestClient) -> None:
    assert client.post("/api/streams", content=b"{not json", headers={"content-type": "application/json"}).status_code == 422
    assert client.post("/api/streams", json=["a"]).status_code == 422
    assert client.post("/api/streams", content=b"x" * 300_000, headers={"content-type": "application/json"}).status_code == 413
    assert client.get("/api/streams/..%2F..%2Fetc").status_code == 404


def test_unreachable_url_is_accepted_and_reported_as_no_signal(client: TestClient) -> None:
    r = client.post("/api/streams", json={"id": "gone", "url": "tcp://127.0.0.1:9",
                                          "options": {"open_timeout": 0.5, "read_timeout": 0.5, "backoff_max": 1}})
    assert r.status_code == 201
    s = wait_until(lambda: (x := client.get("/api/streams/gone").json())["state"] == "no_signal"
                   and x["active_alerts"] and x, timeout=20)
    assert s["level"] == "alarm" and s["active_alerts"][0]["type"] == "no_signal"
    assert s["active_alerts"][0]["severity"] == "critical"
    # The other stream carries on.
    assert client.get("/api/streams/news").json()["state"] == "running"
    ok, problems = client.service.readiness()  # type: ignore[attr-defined]
    assert ok, problems


def test_alert_history_filters_ack_and_thumbnails(client: TestClient) -> None:
    a = wait_until(lambda: [x for x in client.get("/api/alerts?stream=news&type=black").json() if x["status"] == "resolved"])[0]
    # The event schema of the JSONL sink, plus history fields.
    for key in ("id", "stream", "type", "status", "start", "end", "duration", "wallclock", "value", "threshold",
                "severity", "detector_version", "thumbnail", "message", "details"):
        assert key in a
    assert (a["type"], a["severity"], a["acknowledged"]) == ("black", "critical", False)
    assert a["start"] == pytest.approx(1.0, abs=0.11) and a["end"] == pytest.approx(4.0, abs=0.11)
    assert client.get("/api/alerts?status=firing&type=black").json() == []
    assert client.get("/api/alerts?stream=nope").json() == []
    assert client.get("/api/alerts?since=2999-01-01T00:00:00Z").json() == []
    assert [x["id"] for x in client.get(f"/api/alerts?since={time.time() - 600}").json()] == [a["id"]]
    assert client.get("/api/alerts?since=yesterday").status_code == 422
    assert client.get("/api/alerts?status=maybe").status_code == 422
    assert client.get("/api/alerts?limit=0").status_code == 422
    r = client.post(f"/api/alerts/{a['id']}/ack", json={"by": "night shift", "comment": "seen"})
    assert r.status_code == 200 and r.json()["acknowledged"] and r.json()["acked_by"] == "night shift"
    first = r.json()["acked_at"]
    assert client.post(f"/api/alerts/{a['id']}/ack", json={"by": "someone else"}).json()["acked_by"] == "night shift"
    assert client.get(f"/api/alerts/{a['id']}").json()["acked_at"] == first
    assert [x["id"] for x in client.get("/api/alerts?status=acknowledged").json()] == [a["id"]]
    assert client.post("/api/alerts/ffffffffffffffff/ack").status_code == 404
    assert client.post(f"/api/alerts/{a['id']}/ack", json={"by": 5}).status_code == 422
    # Thumbnails: the alert's (a JPEG of the black picture) and the stream's current picture.
    r = client.get(a["thumbnail_url"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg" and r.content[:2] == b"\xff\xd8"
    r = client.get("/api/streams/news/thumbnail.jpg")
    assert r.status_code == 200 and r.content[:2] == b"\xff\xd8"


def test_thumbnails_only_from_the_service_store(client: TestClient, tmp_path: Path) -> None:
    """A thumbnail path in the database that points elsewhere (a tampered or moved store) is never served."""
    a = wait_until(lambda: client.get("/api/alerts?type=black").json())[0]
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"\xff\xd8 not yours")
    svc = client.service  # type: ignore[attr-defined]
    for bad in (str(secret), str(svc.thumbs_dir / ".." / ".." / "secret.jpg"), "/etc/passwd"):
        with sqlite3.connect(svc.store.path) as db:
            db.execute("UPDATE alerts SET event = json_set(event, '$.thumbnail', ?) WHERE id = ?", (bad, a["id"]))
        assert client.get(f"/api/alerts/{a['id']}/thumbnail.jpg").status_code == 404
    assert client.get("/api/alerts/..%2F..%2Fetc%2Fpasswd/thumbnail.jpg").status_code == 404
    assert client.get("/static/../state/state.sqlite").status_code == 404


def test_metrics_exports_what_operators_scrape(client: TestClient) -> None:
    wait_until(lambda: client.get("/api/alerts?type=black&status=resolved").json())
    client.post("/api/streams", json={"id": "gone", "url": "tcp://127.0.0.1:9",
                                      "options": {"open_timeout": 0.5, "read_timeout": 0.5}})
    wait_until(lambda: client.get("/api/streams/gone").json()["active_alerts"])
    wait_until(lambda: 'framewatch_stream_fps{stream="news"} 0.0' not in client.get("/metrics").text)
    text = client.get("/metrics").text
    for name in ('framewatch_frames_decoded_total{stream="news"}', 'framewatch_frames_dropped_total{stream="news"}',
                 'framewatch_decode_errors_total{stream="news"}', 'framewatch_reconnects_total{stream="gone"}',
                 'framewatch_alerts_active{severity="critical",stream="gone",type="no_signal"} 1.0',
                 'framewatch_alerts_total{type="black"} 1.0', "framewatch_detection_latency_seconds_bucket",
                 'framewatch_stream_fps{stream="news"}', 'framewatch_loudness_lufs{stream="news",window="short_term"}',
                 "framewatch_build_info{", "process_resident_memory_bytes"):
        assert name in text, name
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values['framewatch_frames_decoded_total{stream="news"}'] > 10
    assert 5 < values['framewatch_stream_fps{stream="news"}'] < 15
    # Black at 1.0 s, onset 2 s of the defaults... the alert fired some media seconds after the fault began.
    assert values["framewatch_detection_latency_seconds_count"] >= 2
    assert 0 < values["framewatch_detection_latency_seconds_sum"] < 30


def test_health(client: TestClient) -> None:
    assert client.get("/livez").json() == {"status": "alive"}
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["status"] == "ready"


def test_token_required_when_set(tmp_path: Path) -> None:
    svc = Service(config(), state_dir=tmp_path, token=TOKEN)
    with TestClient(create_app(svc)) as c:
        assert c.get("/api/streams").status_code == 401
        assert c.get("/metrics").status_code == 401
        assert c.get("/api/streams", headers={"Authorization": "Bearer wrong-token-0123456789"}).status_code == 401
        assert c.get("/api/streams", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        assert c.get("/api/streams", cookies={"framewatch_token": TOKEN}).status_code == 200
        assert c.get(f"/metrics?access_token={TOKEN}").status_code == 200
        assert c.post("/api/streams", json={"id": "a", "url": SYN.format(name="a", seed=1)}).status_code == 401
        assert c.get("/livez").status_code == 200 and c.get("/readyz").status_code == 200
        assert c.get("/api/streams").headers["www-authenticate"] == "Bearer"


def test_serve_refuses_open_binding_without_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from engine.cli import app

    monkeypatch.delenv("FRAMEWATCH_TOKEN", raising=False)
    r = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", "--state-dir", str(tmp_path)])
    assert r.exit_code == 2 and "set a bearer token" in r.output
    r = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", "--token", "short", "--state-dir", str(tmp_path)])
    assert r.exit_code == 2 and "at least 16 characters" in r.output
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("example.org")


def test_state_survives_a_restart(tmp_path: Path) -> None:
    """Streams (added, changed, removed through the API) and alert history with acks come back; alerts open
    at shutdown were resolved once, said to be a shutdown, and nothing is duplicated."""
    state = tmp_path / "state"
    cfg = config(f"""
  - {{id: a, url: "{SYN.format(name='a', seed=1)}"}}
  - {{id: b, url: "{SYN.format(name='b', seed=2)}"}}
""")
    svc = Service(cfg, state_dir=state)
    with TestClient(create_app(svc)) as c:
        c.post("/api/streams", json={"id": "c", "url": SYN.format(name="c", seed=3),
                                     "faults": [{"kind": "black", "start": 0.5, "duration": 3600}]})
        c.patch("/api/streams/a", json={"profile": "quiet"})
        c.delete("/api/streams/b")
        firing = wait_until(lambda: c.get("/api/alerts?status=firing&stream=c").json())[0]
        c.post(f"/api/alerts/{firing['id']}/ack", json={"by": "op"})
    # Stopped: the open alert was resolved as a shutdown (once).
    svc2 = Service(cfg, state_dir=state)
    with TestClient(create_app(svc2)) as c:
        ids = sorted(s["id"] for s in c.get("/api/streams").json())
        assert ids == ["a", "c"]  # b stays removed although the config lists it
        assert c.get("/api/streams/a").json()["profile"] == "quiet"  # the API's change wins over the file
        old = c.get(f"/api/alerts/{firing['id']}").json()
        assert old["status"] == "resolved" and old["details"]["resolution"] == "shutdown"
        assert old["acknowledged"] and old["acked_by"] == "op" and "service shut down" in old["message"]
        # The fault is still there after the restart: a new alert, not the old one again.
        new = wait_until(lambda: c.get("/api/alerts?status=firing&stream=c").json())[0]
        assert new["id"] != firing["id"] and new["run"] != old["run"]
        hist = c.get("/api/alerts?stream=c&type=black").json()
        assert sorted(a["id"] for a in hist) == sorted({firing["id"], new["id"]})
    with sqlite3.connect(state / "state.sqlite") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT COUNT(*) FROM alerts WHERE status = 'firing'").fetchone()[0] == 0


def test_alerts_left_firing_by_a_killed_process_are_resolved_once_at_start(tmp_path: Path) -> None:
    from engine.events import Event, Severity, Status
    from engine.service.store import StateStore

    store = StateStore(tmp_path / "state.sqlite")
    ev = Event(id="abcdef0123456789", stream="a", type="freeze", status=Status.FIRING, start=12.0, end=None,
               duration=None, wallclock="2026-01-01T00:00:00.000Z", value=3.0, threshold=2.0,
               severity=Severity.CRITICAL, detector_version="1", message="picture frozen")
    store.record(ev, "earlier-run")
    store.put_stream("a", {"id": "a", "url": SYN.format(name="a", seed=1)})
    store.note_media_times({"a": 30.5})
    store.close()
    seen: list = []
    svc = Service(config(), state_dir=tmp_path)
    svc.outputs.add(type("Spy", (), {"emit": lambda self, e: seen.append(e), "close": lambda self: None})())
    with TestClient(create_app(svc)) as c:
        a = c.get(f"/api/alerts/{ev.id}").json()
        assert a["status"] == "resolved" and a["details"]["resolution"] == "restart" and a["end"] == 30.5
        assert a["run"] == "earlier-run"
    assert [(e.id, e.status.value) for e in seen if e.id == ev.id] == [(ev.id, "resolved")]
    # And not again at the next start.
    seen.clear()
    svc = Service(config(), state_dir=tmp_path)
    svc.outputs.add(type("Spy", (), {"emit": lambda self, e: seen.append(e), "close": lambda self: None})())
    with TestClient(create_app(svc)):
        pass
    assert not [e for e in seen if e.id == ev.id]


def test_a_stream_that_cannot_start_does_not_stop_the_others(tmp_path: Path) -> None:
    """A stored stream the current config cannot run (its profile was removed) is reported, the rest runs."""
    from engine.service.store import StateStore

    store = StateStore(tmp_path / "state.sqlite")
    store.put_stream("odd", {"id": "odd", "url": SYN.format(name="o", seed=1), "profile": "gone"})
    store.put_stream("fine", {"id": "fine", "url": SYN.format(name="f", seed=2)})
    store.close()
    svc = Service(config(), state_dir=tmp_path)
    with TestClient(create_app(svc)) as c:
        # Listed and shown with its reason (it once answered 404 here and 409 to a POST of the same id).
        states = {s["id"]: s["state"] for s in c.get("/api/streams").json()}
        assert sorted(states) == ["fine", "odd"] and states["odd"] == "error"
        odd = c.get("/api/streams/odd").json()
        assert odd["level"] == "alarm" and odd["errors"] == ["not started: unknown profile 'gone'; known: quiet"]
        assert c.post("/api/streams", json={"id": "odd", "url": SYN.format(name="o", seed=1)}).status_code == 409
        assert 'framewatch_stream_up{state="error",stream="odd"} 0.0' in c.get("/metrics").text
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["problems"] == ["stream odd not started"]
        # The operator fixes it through the API.
        assert c.patch("/api/streams/odd", json={"profile": None}).status_code == 200
        assert c.get("/readyz").status_code == 200


def test_events_feed_pushes_snapshots_and_alerts(client: TestClient) -> None:
    import json

    seen: dict[str, list] = {"streams": [], "alert": []}
    with client.stream("GET", "/api/events") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: ") and kind in seen:
                seen[kind].append(json.loads(line[6:]))
            if seen["alert"] and len(seen["streams"]) >= 2:
                break
    assert seen["streams"][0][0]["id"] == "news"
    assert seen["alert"][0]["type"] == "black" and seen["alert"][0]["stream"] == "news"


def test_history_is_bounded_by_retention(client: TestClient) -> None:
    """Resolved alerts older than service.retention_days go, with their thumbnails; firing ones stay."""
    svc = client.service  # type: ignore[attr-defined]
    a = wait_until(lambda: client.get("/api/alerts?type=black&status=resolved").json())[0]
    thumb = Path(a["thumbnail"])
    assert thumb.is_file()
    outside = svc.state_dir.parent / "keep.jpg"
    outside.write_bytes(b"\xff\xd8")
    client.post("/api/streams", json={"id": "gone", "url": "tcp://127.0.0.1:9", "options": {"open_timeout": 0.5}})
    firing = wait_until(lambda: client.get("/api/alerts?status=firing&stream=gone").json())[0]
    assert svc.purge_history(now=time.time()) == 0  # nothing is 90 days old
    with sqlite3.connect(svc.store.path) as db:  # a stored path pointing outside the store is never deleted
        db.execute("INSERT INTO alerts SELECT 'e0e0e0e0e0e0e0e0', stream, type, severity, status, fired_at, "
                   "resolved_at, run, json_set(event, '$.thumbnail', ?), NULL, NULL, NULL FROM alerts WHERE id = ?",
                   (str(outside), a["id"]))
    assert svc.purge_history(now=time.time() + 91 * 86400) == 2
    assert client.get(f"/api/alerts/{a['id']}").status_code == 404 and not thumb.exists()
    assert outside.exists()
    assert client.get(f"/api/alerts/{firing['id']}").json()["status"] == "firing"


def test_several_devices_spread_streams_refuse_what_does_not_fit_and_admit_it_later(tmp_path: Path) -> None:
    """`engine.devices` with several GPUs: one engine per device, the scheduler placing streams (GPUs simulated by
    CPU engines with one-NVDEC-engine H100 models: each takes two 4K60 streams that need every frame)."""
    from dataclasses import replace as dc_replace

    from engine.scheduler import KNOWN_MODELS

    small = dc_replace(KNOWN_MODELS["h100"], name="NVIDIA H100 (one engine)", nvdec_engines=1)
    uhd = {"codec": "h264", "width": 3840, "height": 2160, "fps": 60}
    names = ("a", "b", "c", "d")
    cfg = config("".join(f"""
  - {{id: {n}, url: "{SYN.format(name=n, seed=i)}", expect: {{codec: h264, width: 3840, height: 2160, fps: 60}}}}"""
                         for i, n in enumerate(names)))
    svc = Service(cfg, state_dir=tmp_path / "state", devices=["cpu", "cpu"], gpu_models=[small, small])
    with TestClient(create_app(svc)) as client:
        running = {n: wait_until(lambda n=n: (x := client.get(f"/api/streams/{n}").json())["state"] == "running" and x)
                   for n in names}
        # Two on each simulated GPU (least loaded first), named apart since both are "cpu".
        devices = [s["device"] for s in running.values()]
        assert sorted(devices) == ["cpu (gpu 0)", "cpu (gpu 0)", "cpu (gpu 1)", "cpu (gpu 1)"]
        r = client.post("/api/streams", json={"id": "e", "url": SYN.format(name="e", seed=9), "expect": uhd})
        assert r.status_code == 201, r.text
        e = r.json()
        assert (e["state"], e["level"], e["device"], e["frames"]) == ("refused", "alarm", None, 0)
        assert "needs every frame" in e["errors"][0] and e["url"] == SYN.format(name="e", seed=9)
        assert client.get("/api/streams/e").json()["config"]["expect"]["width"] == 3840
        assert {s["id"]: s["state"] for s in client.get("/api/streams").json()}["e"] == "refused"
        assert client.get("/readyz").status_code == 200  # refused for capacity: said per stream, service ready
        assert 'framewatch_stream_up{state="refused",stream="e"} 0.0' in client.get("/metrics").text
        assert client.post("/api/streams", json={"id": "e", "url": SYN.format(name="e", seed=9)}).status_code == 409
        # Removing a running stream frees room on its GPU: the refused one starts there by itself.
        assert client.delete("/api/streams/a").status_code == 204
        e = wait_until(lambda: (x := client.get("/api/streams/e").json())["state"] == "running" and x)
        assert e["device"] == running["a"]["device"] and e["tier"] == "all"
        assert client.delete("/api/streams/e").status_code == 204
        assert client.get("/api/streams/e").status_code == 404
        assert sorted(s["id"] for s in client.get("/api/streams").json()) == ["b", "c", "d"]
        assert client.get("/api/about").json()["device"] == "cpu (gpu 0), cpu (gpu 1)"


def three_on_a_quarter_core(tmp_path: Path) -> Service:
    """Three 128x72 streams at 10 fps (0.087 cores each with every default detector) on `cpu_cores: 0.25` (0.212
    after the head room): a and b run, c is refused."""
    cfg = config("".join(f"""
  - {{id: {n}, url: "{SYN.format(name=n, seed=i)}"}}""" for i, n in enumerate(("a", "b", "c"))),
                 extra="engine: {cpu_cores: 0.25}")
    return Service(cfg, state_dir=tmp_path / "state")


def test_cpu_cores_admits_streams_within_the_cpu_and_says_why_not(tmp_path: Path) -> None:
    """`engine.cpu_cores` on a CPU service: live streams are admitted within the cores (a 128x72 stream at 10
    fps with every default detector costs 0.087 cores: 10 pictures of 1.04 ms and 77 ms of audio analysis a
    second), at a cheaper tier when that fits, else refused with the reason; freed cores admit them later."""
    with TestClient(create_app(three_on_a_quarter_core(tmp_path))) as client:
        for n in ("a", "b"):
            wait_until(lambda n=n: client.get(f"/api/streams/{n}").json()["state"] == "running")
        c = client.get("/api/streams/c").json()
        assert (c["state"], c["level"], c["frames"]) == ("refused", "alarm", 0)
        assert c["errors"][0] == (
            "refused: the CPU has 0.038 of 0.212 cores free and the stream needs 0.087 at full rate (all is its "
            "cheapest allowed tier: detector 'glitch' needs every frame)"), c["errors"][0]
        # One that may go cheaper (only black and no_signal) and says it is 1080p30: keyframes only.
        r = client.post("/api/streams", json={"id": "d", "url": SYN.format(name="d", seed=7), "profile": "quiet",
                                              "expect": {"width": 1920, "height": 1080, "fps": 30}})
        assert r.status_code == 201, r.text
        d = wait_until(lambda: (x := client.get("/api/streams/d").json())["state"] == "running" and x)
        assert d["tier"] == "keyframes"
        assert client.get("/api/about").json()["device"] == "cpu"
        assert client.get("/readyz").status_code == 200
        # Freed cores go to the refused stream first; the downgraded one stays where it is.
        assert client.delete("/api/streams/a").status_code == 204
        c = wait_until(lambda: (x := client.get("/api/streams/c").json())["state"] == "running" and x)
        assert c["tier"] == "all" and c["device"] == "cpu"
        assert client.get("/api/streams/d").json()["tier"] == "keyframes"


def test_a_changed_stream_keeps_its_cores_before_a_refused_one(tmp_path: Path) -> None:
    """PATCH of a running stream restarts it: it keeps the cores it had (it used to be removed first, its
    cores went to the refused stream, and the changed stream itself came back refused)."""
    with TestClient(create_app(three_on_a_quarter_core(tmp_path))) as client:
        for n in ("a", "b"):
            wait_until(lambda n=n: client.get(f"/api/streams/{n}").json()["state"] == "running")
        r = client.patch("/api/streams/a", json={"detectors": {"black": {"onset": 3.0}}})
        assert r.status_code == 200, r.text
        wait_until(lambda: client.get("/api/streams/a").json()["state"] == "running")
        assert {s["id"]: s["state"] for s in client.get("/api/streams").json()} == {
            "a": "running", "b": "running", "c": "refused"}
        # A change that no longer fits (1080p30 needing every frame: 0.383 cores) refuses it, and the cores
        # it had go to the refused one.
        r = client.patch("/api/streams/b", json={"expect": {"width": 1920, "height": 1080, "fps": 30}})
        assert r.status_code == 200 and r.json()["state"] == "refused", r.text
        wait_until(lambda: client.get("/api/streams/c").json()["state"] == "running")


def test_cpu_cores_replans_a_stream_once_it_opens(tmp_path: Path, make_clip, caplog: pytest.LogCaptureFixture) -> None:
    """A stream without `expect` is planned as 1080p30 H.264 (0.383 cores with every default detector); once
    open it is 320x240 at 25 fps (0.110): the cores it does not need go to the stream refused meanwhile (0.595
    cores: one planned stream, or one known and one planned)."""
    clip = make_clip("replan_320x240.mp4", seconds=30.0)
    cfg = config("".join(f"""
  - {{id: {n}, url: "{clip}", pace: realtime}}""" for n in ("a", "b")), extra="engine: {cpu_cores: 0.7}")
    svc = Service(cfg, state_dir=tmp_path / "state")
    with TestClient(create_app(svc)) as client:
        b = wait_until(lambda: (x := client.get("/api/streams/b").json())["state"] == "running" and x)
        assert b["tier"] == "all"
        known = (25 * (9.2 * 320 * 240 / 1920 / 1080 + 1.0) + 77) / 1000
        # b opened too: re-planned in place (after the tick that saw it open, so waited for).
        placements = wait_until(lambda: (x := svc.engine.pool.placements())["b"].cost < 0.2 and x)
        assert placements["a"].cost == pytest.approx(known) and placements["b"].cost == pytest.approx(known)
        assert placements["b"].reason.startswith("admitted after capacity was freed: cpu: fits at full rate")
    assert ("stream b not started: refused: the CPU has 0.212 of 0.595 cores free and the stream needs 0.383 at "
            "full rate") in caplog.text


def test_cpu_cores_replans_an_audio_only_stream_by_its_audio(tmp_path: Path, make_clip) -> None:
    """A stream that turns out to have no pictures (a radio channel nobody marked `video: false`) is costed by
    its audio once open (77 ms a second with clicks, 0.077 cores), not as the 1080p30 video planned."""
    clip = make_clip("replan_radio.wav", codec=None, seconds=30.0)
    cfg = config("".join(f"""
  - {{id: {n}, url: "{clip}", pace: realtime}}""" for n in ("a", "b")), extra="engine: {cpu_cores: 0.7}")
    svc = Service(cfg, state_dir=tmp_path / "state")
    with TestClient(create_app(svc)) as client:
        wait_until(lambda: client.get("/api/streams/b").json()["state"] == "running")
        placements = wait_until(lambda: (x := svc.engine.pool.placements())["b"].cost < 0.1 and x)
        assert placements["a"].cost == pytest.approx(0.077) and placements["b"].cost == pytest.approx(0.077)


def test_cpu_cores_beside_gpus_decodes_what_they_cannot_take(tmp_path: Path) -> None:
    """With GPU devices, `engine.cpu_cores` is hybrid decode: a stream no GPU has room for runs on the CPU
    engine (4K60 needing every frame: 60 pictures of 37.8 ms plus audio, 2.35 cores of the 3.4 of 4 cores)."""
    from dataclasses import replace as dc_replace

    from engine.scheduler import KNOWN_MODELS

    small = dc_replace(KNOWN_MODELS["h100"], name="NVIDIA H100 (one engine)", nvdec_engines=1)
    uhd = "{codec: h264, width: 3840, height: 2160, fps: 60}"
    cfg = config("".join(f"""
  - {{id: {n}, url: "{SYN.format(name=n, seed=i)}", expect: {uhd}}}""" for i, n in enumerate("abcde")),
                 extra="engine: {cpu_cores: 4}")
    svc = Service(cfg, state_dir=tmp_path / "state", devices=["cpu"], gpu_models=[small])
    with TestClient(create_app(svc)) as client:
        states = {n: wait_until(lambda n=n: (x := client.get(f"/api/streams/{n}").json())["state"] in ("running", "refused") and x)
                  for n in "abcde"}
        where = sorted((s["state"], s["device"]) for s in states.values())
        # Two on the one-engine GPU (simulated: "cpu"), one on the CPU engine, two refused (no room anywhere).
        assert where == [("refused", None), ("refused", None), ("running", "cpu"), ("running", "cpu"),
                         ("running", "cpu (hybrid decode)")], where
        refused = next(s for s in states.values() if s["state"] == "refused")
        assert "the CPU has" in refused["errors"][0] and "cores free" in refused["errors"][0]


def test_a_failed_device_moves_its_streams_and_the_service_stays_ready(tmp_path: Path) -> None:
    from engine.scheduler import KNOWN_MODELS

    h100 = KNOWN_MODELS["h100"]
    cfg = config("".join(f"""
  - {{id: {n}, url: "{SYN.format(name=n, seed=i)}"}}""" for i, n in enumerate(("a", "b"))))
    svc = Service(cfg, state_dir=tmp_path / "state", devices=["cpu", "cpu"], gpu_models=[h100, h100])
    with TestClient(create_app(svc)) as client:
        before = {n: wait_until(lambda n=n: (x := client.get(f"/api/streams/{n}").json())["state"] == "running" and x)
                  for n in ("a", "b")}
        assert {s["device"] for s in before.values()} == {"cpu (gpu 0)", "cpu (gpu 1)"}
        lost = next(n for n, s in before.items() if s["device"] == "cpu (gpu 1)")

        def broken(works):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        svc.engine.engines[1].scoring.score_video = broken  # type: ignore[method-assign]
        moved = wait_until(lambda: (x := client.get(f"/api/streams/{lost}").json())["device"] == "cpu (gpu 0)"
                           and x["state"] == "running" and x["frames"] > 0 and x)
        assert moved["tier"] == "all"
        outage = wait_until(lambda: [a for a in client.get("/api/alerts").json()
                                     if a["stream"] == lost and a["type"] == "no_signal" and a["status"] == "resolved"])
        assert "GPU cpu (gpu 1) failed" in outage[0]["message"] and "moved to cpu (gpu 0)" in outage[0]["message"]
        assert client.get("/readyz").status_code == 200  # one of two devices lost: degraded, still serving


def test_devices_this_machine_lacks_are_said_and_left_out(caplog: pytest.LogCaptureFixture) -> None:
    import torch

    from engine.service.service import service_devices

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    assert service_devices(config()) == ["cpu"]
    with caplog.at_level("WARNING"):
        assert service_devices(config(extra="engine: {devices: [cuda:0, cuda:1]}")) == ["cpu"]
        assert service_devices(config(extra="engine: {devices: [cpu, cuda:1]}")) == ["cpu"]
    assert "devices cuda:0, cuda:1 not available on this machine (0 GPU(s)); their streams run on the CPU" in caplog.text
    assert "devices cuda:1 not available on this machine (0 GPU(s)); the others take their streams" in caplog.text


def test_a_second_service_on_the_same_state_dir_is_refused(tmp_path: Path) -> None:
    """Two services on one state dir ran every stream twice and resolved each other's open alerts."""
    first = Service(config(), state_dir=tmp_path / "state")
    with pytest.raises(RuntimeError, match=r"another framewatch serve uses this state dir \(pid \d+\)"):
        Service(config(), state_dir=tmp_path / "state")
    first.stop()
    Service(config(), state_dir=tmp_path / "state").stop()  # free again once the first has stopped


def test_a_damaged_state_database_is_found_at_start(tmp_path: Path) -> None:
    import sqlite3

    state = tmp_path / "state"
    svc = Service(config(f"""
  - {{id: a, url: "{SYN.format(name='a', seed=1)}"}}"""), state_dir=state)
    for i in range(300):  # enough rows for pages beyond the first few
        svc.store.put_stream(f"s{i}", {"id": f"s{i}", "url": SYN.format(name=f"s{i}", seed=i), "profile": "x" * 200})
    svc.stop()
    db = state / "state.sqlite"
    data = bytearray(db.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4096] = b"\xa5" * 4096
    db.write_bytes(bytes(data))
    with pytest.raises(sqlite3.DatabaseError, match="state.sqlite is damaged .*; move it away to start afresh"):
        Service(config(), state_dir=state)


def test_request_limits_and_bad_since(client: TestClient) -> None:
    def chunks():
        for _ in range(40):
            yield b" " * 16384  # 640 kB, sent without a length
    r = client.post("/api/streams", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "larger than" in r.json()["detail"]
    for since in ("inf", "1e300", "-1e300", "nan", "garbage"):
        r = client.get(f"/api/alerts?since={since}")
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "since"], (since, r.text)


def test_a_failed_store_write_changes_nothing(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store is written before the engine is touched: a write that fails leaves no stream running
    unrecorded and no recorded stream stopped."""
    import sqlite3

    svc = client.service  # type: ignore[attr-defined]
    wait_until(lambda: client.get("/api/streams/news").json()["state"] == "running")

    def fail(*a, **k):
        raise sqlite3.OperationalError("attempt to write a readonly database")

    monkeypatch.setattr(svc.store, "put_stream", fail)
    monkeypatch.setattr(svc.store, "delete_stream", fail)
    with TestClient(create_app(svc, manage=False), raise_server_exceptions=False) as c:
        assert c.post("/api/streams", json={"id": "new", "url": SYN.format(name="n", seed=5)}).status_code == 500
        assert "new" not in svc.engine.streams and c.get("/api/streams/new").status_code == 404
        assert c.delete("/api/streams/news").status_code == 500
        assert c.get("/api/streams/news").json()["state"] == "running"


def test_state_no_signal_and_acks_broadcast_once(client: TestClient) -> None:
    svc = client.service  # type: ignore[attr-defined]
    r = client.post("/api/streams", json={"id": "out", "url": SYN.format(name="out", seed=7),
                                          "faults": [{"kind": "nosignal", "start": 0.5, "duration": 60}]})
    assert r.status_code == 201
    wait_until(lambda: client.get("/api/streams/out").json()["state"] == "no_signal")
    assert 'framewatch_stream_up{state="no_signal",stream="out"} 0.0' in client.get("/metrics").text
    alert = wait_until(lambda: [a for a in client.get("/api/alerts?stream=out").json() if a["type"] == "no_signal"])[0]
    published = []
    real = svc.broadcast.publish
    svc.broadcast.publish = lambda kind, data: (published.append(kind), real(kind, data))
    for _ in range(3):
        assert client.post(f"/api/alerts/{alert['id']}/ack", json={"by": "op"}).status_code == 200
    assert published.count("ack") == 1


def test_removing_a_stalled_network_stream_does_not_wait_for_its_read_timeout(client: TestClient) -> None:
    import socket

    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(4)
    try:
        url = f"http://127.0.0.1:{hole.getsockname()[1]}/live.ts"
        r = client.post("/api/streams", json={"id": "stuck", "url": url, "options": {"open_timeout": 30, "read_timeout": 30}})
        assert r.status_code == 201
        time.sleep(1.0)  # its thread is inside FFmpeg, waiting
        t0 = time.monotonic()
        assert client.delete("/api/streams/stuck").status_code == 204
        assert time.monotonic() - t0 < 2.0
    finally:
        hole.close()
