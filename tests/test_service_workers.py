"""`framewatch serve` with `engine.workers` > 1: the streams run in engine processes of their own and the service
reads them as it reads local ones (status, alerts, thumbnails, metrics, removal, shutdown), a worker that dies
loses no alert, and the CPU budget counts a scoring thread per process."""

from __future__ import annotations

import os
import signal
import warnings
from pathlib import Path

import pytest
from waiting import wait_until

from engine import channel
from engine.config import load_config
from engine.service import Service
from engine.service.app import create_app

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SYN = "synthetic://{name}?size=128x72&fps=10&duration=0&seed={seed}"


def config(streams: str, engine: str = "workers: 2") -> object:
    return load_config(text=f"output: {{jsonl: null}}\nengine: {{{engine}}}\nstreams:{streams}\n")


def running(client: TestClient, sid: str, frames: int = 1) -> dict:
    return wait_until(lambda: (x := client.get(f"/api/streams/{sid}").json())["state"] == "running"
                      and x["frames"] >= frames and x, timeout=60)


def test_streams_in_worker_processes_read_like_local_ones(tmp_path: Path) -> None:
    cfg = config(f"""
  - {{id: a, url: "{SYN.format(name='a', seed=1)}", faults: [{{kind: black, start: 1, duration: 2}}]}}
  - {{id: b, url: "{SYN.format(name='b', seed=2)}", faults: [{{kind: black, start: 1, duration: 60}}]}}""")
    svc = Service(cfg, state_dir=tmp_path / "state")
    with TestClient(create_app(svc)) as client:
        a, b = running(client, "a", 20), running(client, "b", 20)
        # One stream per worker (the least loaded takes the next), named by process.
        assert {a["device"], b["device"]} == {"cpu (worker 0)", "cpu (worker 1)"}
        assert client.get("/api/about").json()["device"] == "cpu (2 worker processes)"
        assert a["info"]["width"] == 128 and a["loudness"]["integrated"] is not None and a["counters"]["video_frames"] > 0
        black = wait_until(lambda: [x for x in client.get("/api/alerts?stream=a&type=black").json()
                                    if x["status"] == "resolved"], timeout=30)[0]
        # black@1:2 at 10 fps: frames 10..29 black, frame 30 (3.0 s) is not.
        assert (black["start"], black["end"]) == (1.0, 3.0)
        assert black["thumbnail_url"] and client.get(black["thumbnail_url"]).status_code == 200
        tile = client.get("/api/streams/a/thumbnail.jpg")
        assert tile.status_code == 200 and tile.content[:2] == b"\xff\xd8"
        assert client.get("/readyz").status_code == 200
        metrics = client.get("/metrics").text
        assert 'framewatch_stream_up{state="running",stream="a"} 1.0' in metrics
        assert 'framewatch_frames_decoded_total{stream="a"}' in metrics
        # Removing a stream ends it in its worker: its open alert resolves there, marked removed.
        firing = wait_until(lambda: client.get("/api/alerts?stream=b&status=firing").json(), timeout=30)[0]
        assert client.delete("/api/streams/b").status_code == 204
        gone = client.get(f"/api/alerts/{firing['id']}").json()
        assert gone["status"] == "resolved" and gone["details"]["resolution"] == "removed"
        assert [s["id"] for s in client.get("/api/streams").json()] == ["a"]


@pytest.mark.parametrize("how", ["killed", "hung"])
def test_a_worker_that_dies_loses_no_alert(how: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker killed, or alive but silent (stopped, as a deadlock would leave it: after WATCHDOG it is killed
    and replaced as if it had died)."""
    if how == "hung":
        monkeypatch.setattr(channel, "WATCHDOG", 6.0)  # a healthy worker sends a snapshot twice a second
    cfg = config(f"""
  - {{id: a, url: "{SYN.format(name='a', seed=1)}", faults: [{{kind: black, start: 1, duration: 600}}]}}""")
    svc = Service(cfg, state_dir=tmp_path / "state")
    with TestClient(create_app(svc)) as client:
        before = running(client, "a", 20)
        black = wait_until(lambda: client.get("/api/alerts?stream=a&type=black&status=firing").json(), timeout=30)[0]
        proc = svc.engine._procs[svc.engine._streams["a"].worker]
        os.kill(proc.process.pid, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        after = wait_until(lambda: (x := client.get("/api/streams/a").json())["device"] != before["device"]
                           and x["state"] == "running" and x["frames"] > 0 and x, timeout=60)
        assert after["device"].startswith("cpu (worker ") and not proc.process.is_alive()
        why = "died (exit code -9)" if how == "killed" else "sent nothing for"
        old = client.get(f"/api/alerts/{black['id']}").json()
        assert old["status"] == "resolved" and why in old["details"]["ended"] and old["end"] >= 2.0
        outage = wait_until(lambda: [x for x in client.get("/api/alerts?stream=a&type=no_signal").json()
                                     if x["status"] == "resolved"], timeout=30)[0]
        assert outage["severity"] == "critical" and why in outage["message"]
        assert outage["duration"] > 0 and outage["end"] == pytest.approx(outage["start"] + outage["duration"])
        # The fault is still there in the new worker: a new alert, from its own start.
        assert wait_until(lambda: [x for x in client.get("/api/alerts?stream=a&type=black&status=firing").json()
                                   if x["id"] != black["id"]], timeout=30)
        assert client.get("/readyz").status_code == 200
    # The shutdown resolves what is still open, marked so (read back by the next service on the state dir).
    with TestClient(create_app(Service(config(" []"), state_dir=tmp_path / "state"))) as client:
        blacks = [x for x in client.get("/api/alerts?stream=a&type=black").json()
                  if x["id"] != black["id"] and x["run"] == svc.run_id]
        assert blacks and all(x["status"] == "resolved" and x["details"]["resolution"] == "shutdown" for x in blacks)


def test_cpu_cores_counts_a_scoring_thread_per_worker(tmp_path: Path) -> None:
    """Six 128x72 streams at 10 fps with every default detector: 0.085 cores of scoring thread each. One
    process's thread (0.85 of a core) takes 10 of them, two take all; the cores (2 x 0.85 = 1.7 budget of 2)
    are not the limit here. With cpu_cores 0.2 one fits (0.087 of 0.17): the rest are refused, the reason said."""
    streams = "".join(f"""
  - {{id: s{i}, url: "{SYN.format(name=f's{i}', seed=i)}"}}""" for i in range(3))
    svc = Service(config(streams, "workers: 2, cpu_cores: 0.2"), state_dir=tmp_path / "state")
    with TestClient(create_app(svc)) as client:
        running(client, "s0")
        states = {s["id"]: s["state"] for s in client.get("/api/streams").json()}
        assert states == {"s0": "running", "s1": "refused", "s2": "refused"}
        reason = client.get("/api/streams/s1").json()["errors"][0]
        assert reason.startswith("refused: the CPU has 0.083 of 0.170 cores free and the stream needs 0.087"), reason
        # Removing the running one admits the next, in a worker.
        assert client.delete("/api/streams/s0").status_code == 204
        s1 = running(client, "s1")
        assert s1["device"].startswith("cpu (worker ")


def test_a_changed_stream_keeps_its_place_in_a_worker(tmp_path: Path) -> None:
    """PATCH of a running stream with cpu_cores: its alerts resolve once, as changed, and the new one starts in a
    worker with the cores the old one had (not handed to the refused stream, leaving the changed one refused)."""
    streams = "".join(f"""
  - {{id: s{i}, url: "{SYN.format(name=f's{i}', seed=i)}"{', faults: [{kind: black, start: 1, duration: 600}]' if i == 0 else ''}}}""" for i in range(2))
    svc = Service(config(streams, "workers: 2, cpu_cores: 0.2"), state_dir=tmp_path / "state")
    with TestClient(create_app(svc)) as client:
        running(client, "s0")
        black = wait_until(lambda: client.get("/api/alerts?stream=s0&type=black&status=firing").json(), timeout=30)[0]
        r = client.patch("/api/streams/s0", json={"detectors": {"black": {"onset": 3.0}}})
        assert r.status_code == 200, r.text
        old = client.get(f"/api/alerts/{black['id']}").json()
        assert old["status"] == "resolved" and old["details"]["resolution"] == "changed"
        assert running(client, "s0")["device"].startswith("cpu (worker ")
        assert client.get("/api/streams/s1").json()["state"] == "refused"
        assert [x["id"] for x in client.get("/api/alerts?stream=s0&type=black").json()
                if x["details"].get("resolution")] == [black["id"]]


def test_removing_a_stream_whose_worker_dies_meanwhile_does_not_wait(tmp_path: Path) -> None:
    """A removal waits for the worker to end the stream; a worker that dies meanwhile (here: stopped, then
    killed while the removal waits) answers nothing, and the API answered only after REMOVE_WAIT (10 s), every
    other stream change waiting too. Now its death lets the removal go on: alerts resolved, marked removed."""
    import threading
    import time

    cfg = config(f"""
  - {{id: a, url: "{SYN.format(name='a', seed=1)}", faults: [{{kind: black, start: 1, duration: 600}}]}}""")
    svc = Service(cfg, state_dir=tmp_path / "state")
    with TestClient(create_app(svc)) as client:
        running(client, "a")
        black = wait_until(lambda: client.get("/api/alerts?stream=a&type=black&status=firing").json(), timeout=30)[0]
        pid = svc.engine._procs[svc.engine._streams["a"].worker].process.pid
        os.kill(pid, signal.SIGSTOP)
        answer: list = []
        t0 = time.monotonic()
        deleting = threading.Thread(target=lambda: answer.append(client.delete("/api/streams/a").status_code))
        deleting.start()
        wait_until(lambda: "a" in svc.engine._removing)
        os.kill(pid, signal.SIGKILL)
        deleting.join(timeout=15)
        assert answer == [204] and time.monotonic() - t0 < 5
        gone = client.get(f"/api/alerts/{black['id']}").json()
        assert gone["status"] == "resolved" and gone["details"]["resolution"] == "removed"
        assert client.get("/api/streams/a").status_code == 404
        assert not client.get("/api/alerts?stream=a&type=no_signal").json()  # not restarted: it was removed


def test_a_stream_given_up_stays_alerted_until_changed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream whose worker died more than RESTARTS times is given up: nothing watches it, so a critical
    no_signal stays open (it used to end with every alert resolved and none open). A change through the API
    is a new stream with restarts of its own (the count used to carry over: given up again at the next death)."""
    from engine.service import remote

    monkeypatch.setattr(remote, "RESTARTS", 1)
    cfg = config(f"""
  - {{id: a, url: "{SYN.format(name='a', seed=1)}"}}""")
    svc = Service(cfg, state_dir=tmp_path / "state")

    def kill() -> str:
        before = running(client, "a")["device"]
        os.kill(svc.engine._procs[svc.engine._streams["a"].worker].process.pid, signal.SIGKILL)
        return before

    with TestClient(create_app(svc)) as client:
        first = kill()
        wait_until(lambda: (x := client.get("/api/streams/a").json())["device"] != first and x["state"] == "running"
                   and x["frames"] > 0, timeout=60)
        kill()
        given_up = wait_until(lambda: [x for x in client.get("/api/alerts?stream=a&type=no_signal&status=firing").json()
                                       if "given up" in x["message"]], timeout=30)[0]
        assert given_up["severity"] == "critical"
        assert client.get("/api/streams/a").json()["state"] == "error"
        assert client.patch("/api/streams/a", json={"detectors": {"black": {"onset": 3.0}}}).status_code == 200
        assert client.get(f"/api/alerts/{given_up['id']}").json()["status"] == "resolved"
        second = kill()
        after = wait_until(lambda: (x := client.get("/api/streams/a").json())["device"] != second
                           and x["state"] == "running" and x["frames"] > 0 and x, timeout=60)
        assert after["errors"] == []


def _snap(frames: int, gen: int | None) -> dict:
    return {"state": "running", "errors": [], "tier": "all", "info": None,
            "stats": {"frames_scored": frames, "audio_seconds": 0.0, "media_end": frames / 10, "events": {}},
            "audio_end": 0.0, "counters": {}, "meter": {"momentary": None, "short_term": None, "integrated": None,
                                                          "loudness_range": None},
            "max_true_peak": float("nan"), "has_frame": True, "last_arrival": None, "live": False, "thread": True,
            "eof": False, "finished": False, "sync": None, "gen": gen}


def _workers_without_processes(monkeypatch: pytest.MonkeyPatch):
    """A ServiceWorkers whose bookkeeping runs without starting any process (commands just queue up)."""
    from engine.alerts import MemorySink
    from engine.config import stream_specs
    from engine.service.remote import ServiceWorkers

    sink = MemorySink()
    sw = ServiceWorkers(sink, ["cpu"], 2, {})
    spec = stream_specs(config(f"""
  - {{id: a, url: "{SYN.format(name='a', seed=1)}"}}"""))[0]
    sw.add_stream(spec)
    return sw, sink, spec


def test_a_snapshot_from_before_a_change_is_not_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream changed in place (same id, same worker): a snapshot the worker took of the old one must not
    show its figures as the new one's."""
    sw, _, spec = _workers_without_processes(monkeypatch)
    s = sw._streams["a"]
    old_gen, worker = s.gen, s.worker
    sw._handle("status", worker, ({"a": _snap(50, old_gen)}, False))
    assert sw.streams["a"].stats.frames_scored == 50
    sw._place(s, sw._procs[worker])  # the change: a new add on the same worker
    sw._handle("status", worker, ({"a": _snap(60, old_gen)}, False))  # late news of the old stream
    assert sw.streams["a"].stats.frames_scored == 0
    sw._handle("status", worker, ({"a": _snap(3, s.gen)}, False))
    assert sw.streams["a"].stats.frames_scored == 3


def test_restarts_count_within_a_window_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Worker deaths weeks apart (a driver hiccup now and then) never add up to giving a stream up; more than
    RESTARTS within RESTART_WINDOW do."""
    from engine.service import remote

    sw, sink, _ = _workers_without_processes(monkeypatch)
    clock = [1000.0]
    monkeypatch.setattr(remote.time, "monotonic", lambda: clock[0])
    for _ in range(6):  # one death a day
        clock[0] += 86400
        sw._restart(sw._streams["a"], "worker died", None)
        sw._end_outage("a", None)
    assert sw._streams["a"].worker is not None and sw._streams["a"].runtime.state != "error"
    for _ in range(remote.RESTARTS + 1):  # a burst
        clock[0] += 10
        sw._restart(sw._streams["a"], "worker died", None)
        sw._end_outage("a", None)
    assert sw._streams["a"].runtime.state == "error"
    assert sw._streams["a"].runtime.errors[-1] == "worker died; given up after 3 restarts within 10 minutes"


def test_an_event_brings_where_its_stream_was(monkeypatch: pytest.MonkeyPatch) -> None:
    """The service measures detection latency (fault onset to alert) from the stream's media time when the
    alert fired: a worker's snapshot can be a tick old (seconds when it is loaded), so the event carries it."""
    from engine.events import Event, Severity, Status

    sw, sink, _ = _workers_without_processes(monkeypatch)
    worker = sw._streams["a"].worker
    sw._handle("status", worker, ({"a": _snap(10, sw._streams["a"].gen)}, False))
    e = Event(id="e1", stream="a", type="black", status=Status.FIRING, start=2.0, end=None, duration=None,
              wallclock="2026-12-04T00:00:00.000Z", value=1.0, threshold=0.1, severity=Severity.CRITICAL,
              detector_version="x", message="black", details={})
    sw._handle("event", worker, (e.to_dict(), (4.2, 4.25, 1234.5)))
    rt = sw.streams["a"]
    assert (rt.stats.media_end, rt.audio_end, rt.queue.last_arrival) == (4.2, 4.25, 1234.5)
    assert [x.id for x in sink.events] == ["e1"]


def test_a_worker_whose_engine_ends_by_itself_is_a_lost_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker's engine that ends while the service runs (an exception out of its run; the process says
    "done" and exits) leaves its streams unmonitored: they get a no_signal and move to a new worker."""
    sw, sink, _ = _workers_without_processes(monkeypatch)
    worker = sw._streams["a"].worker
    sw._handle("done", worker, None)
    assert sw._procs[worker].lost and sw._streams["a"].worker not in (None, worker)
    outage = [e for e in sink.events if e.stream == "a" and e.type == "no_signal"]
    assert len(outage) == 1 and "ended unexpectedly" in outage[0].message
    sw._closing = True  # once the service stops, "done" is what every worker says
    other = sw._streams["a"].worker
    sw._handle("done", other, None)
    assert not sw._procs[other].lost and len([e for e in sink.events if e.type == "no_signal"]) == 1


def test_a_stream_is_replanned_once_it_opens(tmp_path: Path, make_clip) -> None:
    """As in one process (test_service): planned as 1080p30 H.264 (0.383 cores), a 320x240 file at 25 fps
    read in real time costs 0.110 once open; the cores it does not need go to the stream refused meanwhile."""
    clip = make_clip("replan_320x240.mp4", seconds=30.0)
    cfg = config("".join(f"""
  - {{id: {n}, url: "{clip}", pace: realtime}}""" for n in ("a", "b")), "workers: 2, cpu_cores: 0.7")
    svc = Service(cfg, state_dir=tmp_path / "state")
    with TestClient(create_app(svc)) as client:
        b = running(client, "b")
        assert b["tier"] == "all" and b["device"].startswith("cpu (worker ")
        known = (25 * (9.2 * 320 * 240 / 1920 / 1080 + 1.0) + 77) / 1000
        placements = wait_until(lambda: (x := svc.engine.scheduler.snapshot().placements)["b"].cost < 0.2 and x,
                                timeout=30)
        assert placements["a"].cost == pytest.approx(known) and placements["b"].cost == pytest.approx(known)
        assert placements["b"].reason.startswith("admitted after capacity was freed: cpu: fits at full rate")


def test_cpu_cores_beside_gpus_puts_what_they_cannot_take_on_cpu_workers() -> None:
    """Hybrid decode with worker processes (bookkeeping only: no GPU here, no process started): a 4K60 stream
    that no GPU has room for goes to a CPU worker process, made for it."""
    from dataclasses import replace as dc_replace

    from engine.alerts import MemorySink
    from engine.config import stream_specs
    from engine.scheduler import KNOWN_MODELS, CpuModel
    from engine.service.remote import ServiceWorkers

    small = dc_replace(KNOWN_MODELS["h100"], name="NVIDIA H100 (one engine)", nvdec_engines=1)
    sw = ServiceWorkers(MemorySink(), ["cuda:0"], 2, {}, cpu=CpuModel(cores=4), models=[small])
    uhd = "{codec: h264, width: 3840, height: 2160, fps: 60}"
    for spec in stream_specs(config("".join(f"""
  - {{id: {n}, url: "{SYN.format(name=n, seed=i)}", expect: {uhd}}}""" for i, n in enumerate("abcd")))):
        sw.add_stream(spec)
    where = {sid: sw.device_of(sid) for sid in "abcd"}
    # Two on the one-engine GPU (one per worker), one on a CPU worker made for it, one refused.
    assert sorted(map(str, where.values())) == ["None", "cpu (worker 2)", "cuda:0 (worker 0)", "cuda:0 (worker 1)"], where
    assert "the CPU has" in sw.refused()[next(k for k, v in where.items() if v is None)]
