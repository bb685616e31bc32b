"""Engine worker processes (engine.workers per device): same events as one engine, no alert lost when a
worker dies, streams of a failed GPU restarted on another device."""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import asdict

import pytest
from detect_media import synthetic_url
from media import MovingPattern, with_black

from engine import channel, workers
from engine.alerts import MemorySink
from engine.config import FramewatchConfig, resolve_detectors
from engine.events import Event, Severity, Status, new_event_id, now_iso
from engine.runner import Engine, StreamSpec
from engine.scheduler import match_model
from engine.sources import SourceOptions
from engine.workers import ProcessWorkers, StreamReport

H100 = match_model("NVIDIA H100")


def _specs(pace: str = "fast", duration: float = 6) -> list[StreamSpec]:
    dets = resolve_detectors(FramewatchConfig())
    faults = {"a": ["black@1:2.5"], "b": ["silence@2:2"], "c": []}
    return [
        StreamSpec(sid, synthetic_url(f, size="320x240", fps=25, duration=duration, seed=i + 1).replace("pace=fast", f"pace={pace}"),
                   dets, SourceOptions(pace=pace))
        for i, (sid, f) in enumerate(faults.items())
    ]


def _summary(events) -> list[tuple]:
    return sorted((e.stream, e.type, e.status.value, e.start, e.end) for e in events)


def test_workers_give_the_same_events_as_one_engine() -> None:
    one = MemorySink()
    eng = Engine(one)
    for s in _specs():
        eng.add_stream(s)
    eng.run()
    many = MemorySink()
    pool = ProcessWorkers(many, ["cpu"], per_device=2)
    pool.add_streams(_specs())
    pool.run(deadline=time.monotonic() + 120)
    assert _summary(many.events) == _summary(one.events)
    assert {e.type for e in many.events} == {"black", "silence"}
    assert all(r.state == "ended" and r.frames == 150 for r in pool.reports.values()), pool.reports
    assert len({w.index for w in pool._workers}) == 2


def _run_until_black(pool: ProcessWorkers, sink: MemorySink, stream: str = "a") -> threading.Thread:
    """Start `pool.run` in a thread (a daemon: a run that hangs fails its test, not the whole session) and
    return once `stream`'s black alert fired."""
    runner = threading.Thread(target=pool.run, kwargs={"deadline": time.monotonic() + 120}, daemon=True)
    runner.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(e.stream == stream and e.type == "black" for e in sink.events):
        time.sleep(0.05)
    assert any(e.stream == stream and e.type == "black" and e.status is Status.FIRING for e in sink.events)
    return runner


@pytest.mark.parametrize("how", ["killed", "hung"])
def test_a_lost_worker_loses_no_alert_and_its_streams_restart(how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker killed, or alive but silent (stopped, as a deadlock would leave it: after WATCHDOG it is killed
    and handled as dead)."""
    if how == "hung":
        monkeypatch.setattr(channel, "WATCHDOG", 6.0)  # a healthy worker sends news at least once a second
    sink = MemorySink()
    pool = ProcessWorkers(sink, ["cpu"], per_device=2)
    specs = _specs(pace="realtime", duration=5)
    pool.add_streams(specs)
    runner = _run_until_black(pool, sink)
    # Round robin over two workers: a and c on worker 0, b on worker 1.
    victim = pool._workers[pool._where["a"]]
    os.kill(victim.process.pid, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
    runner.join(timeout=100)
    assert not runner.is_alive() and not victim.process.is_alive()
    lost = {s.id for s in specs if s in victim.specs}
    # The black alert open when the worker died stays open while the stream is read again, and ends once, at
    # the end of the black pictures, as one engine reports it (synthetic sources are not live: they are read
    # again like files).
    black = [e for e in sink.events if e.stream == "a" and e.type == "black"]
    assert [(e.status, e.start, e.end) for e in black] == [(Status.FIRING, 1.0, None), (Status.RESOLVED, 1.0, 3.52)]
    assert black[0].id == black[1].id and "ended" not in black[1].details
    for sid in lost:
        outage = [e for e in sink.events if e.stream == sid and e.type == "no_signal"]
        assert [e.status for e in outage] == [Status.FIRING, Status.RESOLVED], outage
        assert outage[1].details["resumed_on"] == "cpu"
        assert ("died (exit code -9)" if how == "killed" else "sent nothing for") in outage[0].message
        assert outage[1].duration > 0 and outage[1].end == pytest.approx(outage[0].start + outage[1].duration)
        assert pool.reports[sid].state == "ended" and pool.reports[sid].frames == 125  # the whole stream, once
    # The other worker's stream was never touched.
    untouched = {s.id for s in specs} - lost
    assert untouched and not [e for e in sink.events if e.stream in untouched and e.type == "no_signal"]


def test_a_failed_gpu_moves_its_streams_to_another_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bookkeeping only (no processes): a worker reports a device error, then finishes."""
    sink = MemorySink()
    pool = ProcessWorkers(sink, ["cuda:0", "cuda:1"], per_device=1)
    placements = pool.add_streams(_specs(), models=[H100, H100])
    assert [p.gpu for p in placements] == [0, 1, 0] and all(p.tier == "all" for p in placements)
    started: list = []
    monkeypatch.setattr(pool, "_start", lambda w: started.append(w))
    w1 = pool._workers[1]
    assert w1.device == "cuda:1" and [s.id for s in w1.specs] == ["b"]
    pool._handle("progress", 1, {"b": (40, 1.6)})
    pool._handle("device_error", 1, "CUDA error: an illegal memory access was encountered")
    pool._handle("done", 1, [])
    assert pool._failed_devices == {"cuda:1"}
    assert len(started) == 1 and started[0].device == "cuda:0" and [s.id for s in started[0].specs] == ["b"]
    outage = [e for e in sink.events if e.type == "no_signal"]
    assert len(outage) == 1 and outage[0].stream == "b" and outage[0].start == pytest.approx(1.6)
    assert "GPU cuda:1 failed" in outage[0].message and outage[0].details["moved_to"] == "cuda:0"
    # b is not live: it is read again from its start, and its outage ends when it is back where it was.
    pool._handle("progress", started[0].index, {"b": (3, 0.12)})
    assert [e.status for e in sink.events if e.type == "no_signal"] == [Status.FIRING]
    time.sleep(0.01)
    pool._handle("progress", started[0].index, {"b": (41, 1.64)})
    outage = [e for e in sink.events if e.type == "no_signal"]
    assert [e.status for e in outage] == [Status.FIRING, Status.RESOLVED] and outage[1].details["resumed_on"] == "cuda:0"
    assert outage[1].duration > 0 and outage[1].end == pytest.approx(1.6 + outage[1].duration)


def test_streams_the_gpus_cannot_take_are_refused_with_the_reason() -> None:
    specs = _specs()
    specs[1].expect = {"codec": "av1", "width": 1920, "height": 1080, "fps": 30}
    specs[2].expect = {"codec": "hevc", "width": 3840, "height": 2160, "fps": 60}
    pool = ProcessWorkers(MemorySink(), ["cuda:0"], per_device=2)
    placements = {p.stream_id: p for p in pool.add_streams(specs, models=[H100])}
    assert pool.reports["b"].state == "refused" and "AV1" in pool.reports["b"].errors[0]
    assert placements["c"].target == "gpu" and placements["c"].cost > placements["a"].cost
    assert "b" not in pool._where and {pool._workers[pool._where[s]].device for s in ("a", "c")} == {"cuda:0"}


def test_bad_worker_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="at least one device"):
        ProcessWorkers(MemorySink(), [], 1)
    pool = ProcessWorkers(MemorySink(), ["cpu"], 1)
    pool.add_streams(_specs()[:1])
    with pytest.raises(ValueError, match="exists already"):
        pool.add_streams(_specs()[:1])


def _paired(events) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for e in events:
        out.setdefault(e["id"] if isinstance(e, dict) else e.id, []).append(
            e["status"] if isinstance(e, dict) else e.status.value)
    return out


def test_sigterm_to_the_whole_process_group_resolves_every_alert(tmp_path) -> None:
    """GNU timeout, systemctl stop and a terminal signal the whole group: the workers used to die with their
    alerts open (3 fired, 0 resolved). They leave the stopping to the parent now."""
    import json
    import subprocess
    import sys

    cfg = tmp_path / "w2.yaml"
    url = "synthetic://{n}?size=128x72&fps=10&duration=0&seed={i}"
    cfg.write_text("engine: {workers: 2}\nstreams:\n" + "".join(
        f'  - {{id: {n}, url: "{url.format(n=n, i=i)}", faults: [{{kind: {k}, start: 1, duration: 60}}]}}\n'
        for i, (n, k) in enumerate([("a", "black"), ("b", "silence"), ("c", "freeze")])))
    jsonl = tmp_path / "events.jsonl"
    p = subprocess.Popen([sys.executable, "-c", "from engine.cli import main; main()", "run", str(cfg), "--jsonl", str(jsonl),
                          "--duration", "60", "-q"], start_new_session=True, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not jsonl.exists() or jsonl.read_text().count('"firing"') < 3):
            time.sleep(0.2)
        os.killpg(p.pid, signal.SIGTERM)
        out, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    events = [json.loads(x) for x in jsonl.read_text().splitlines()]
    pairs = _paired(events)
    assert sum(1 for v in pairs.values() if v[0] == "firing") >= 3, events
    assert all(v == ["firing", "resolved"] for v in pairs.values()), pairs
    assert p.returncode == 0, out
    assert "Traceback" not in out


def test_a_worker_killed_during_the_shutdown_leaves_nothing_open() -> None:
    sink = MemorySink()
    pool = ProcessWorkers(sink, ["cpu"], per_device=2)
    pool.add_streams(_specs(pace="realtime", duration=30))
    runner = _run_until_black(pool, sink)
    victim = pool._workers[pool._where["a"]]
    pool.stop()
    os.kill(victim.process.pid, signal.SIGKILL)  # before it could finish its streams
    runner.join(timeout=60)
    assert not runner.is_alive()
    pairs = _paired(sink.events)
    assert pairs and all(v == ["firing", "resolved"] for v in pairs.values()), pairs


def test_a_worker_that_does_not_stop_is_killed_after_the_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """stop() with a worker that cannot end its streams: the run still ends, STOP_WAIT later, and what the
    worker had open is resolved with the reason."""
    monkeypatch.setattr(workers, "STOP_WAIT", 2.0)
    sink = MemorySink()
    pool = ProcessWorkers(sink, ["cpu"], per_device=2)
    pool.add_streams(_specs(pace="realtime", duration=30))
    runner = _run_until_black(pool, sink)
    victim = pool._workers[pool._where["a"]]
    os.kill(victim.process.pid, signal.SIGSTOP)  # alive, but it runs nothing more
    asked = time.monotonic()
    pool.stop()
    runner.join(timeout=60)
    assert not runner.is_alive()
    assert time.monotonic() - asked < 2.0 + 5 + 5  # the wait, the kill's join, a margin for a loaded machine
    assert not victim.process.is_alive()
    pairs = _paired(sink.events)
    assert pairs and all(v == ["firing", "resolved"] for v in pairs.values()), pairs
    black = [e for e in sink.events if e.stream == "a" and e.type == "black"]
    assert black[1].details["ended"] == "monitoring stopped before its worker resolved it"


def _wall(e: Event) -> float:
    from datetime import datetime

    return datetime.fromisoformat(e.wallclock).timestamp()


def _outage_is_consistent(outage: list[Event]) -> None:
    """A worker outage: one firing and one resolved event, whose duration is the wall-clock time between them
    (also its value) and whose end is its start plus that."""
    assert [e.status for e in outage] == [Status.FIRING, Status.RESOLVED], outage
    fired, ended = outage
    assert fired.id == ended.id and ended.start == fired.start
    assert ended.duration > 0 and ended.value == pytest.approx(ended.duration, abs=1e-6)
    assert ended.end == pytest.approx(fired.start + ended.duration, abs=1e-6)
    assert abs((_wall(ended) - _wall(fired)) - ended.duration) < 0.05


def test_a_file_whose_worker_died_reports_each_fault_once(make_clip) -> None:
    """A file is read again from its start after its worker died: a fault reported before the death is not
    reported again, one going on at the death fires once and ends once at its real end, and the summary
    counts the file once. Two files, each on its own worker, in real time so that the kills land: `mid`'s
    worker is killed inside its black pictures (1 to 5 s), `after`'s once its black (1 to 3.5 s) ended."""
    size = (320, 240)
    files = {"mid": make_clip("workers_black_1_5.mp4", seconds=8, luma_fn=with_black(MovingPattern(size), 25, 1.0, 5.0)),
             "after": make_clip("workers_black_1_3.5.mp4", seconds=8, luma_fn=with_black(MovingPattern(size), 25, 1.0, 3.5))}
    dets = resolve_detectors(FramewatchConfig())
    one = MemorySink()
    eng = Engine(one)
    for sid, path in files.items():
        eng.add_stream(StreamSpec(sid, str(path), dets, SourceOptions(pace="fast")))
    eng.run()
    assert _summary(one.events) == [("after", "black", "firing", 1.0, None), ("after", "black", "resolved", 1.0, 3.52),
                                    ("mid", "black", "firing", 1.0, None), ("mid", "black", "resolved", 1.0, 5.0)]

    sink = MemorySink()
    pool = ProcessWorkers(sink, ["cpu"], per_device=2)
    pool.add_streams([StreamSpec(sid, str(path), dets, SourceOptions(pace="realtime")) for sid, path in files.items()])
    victims = {sid: pool._workers[pool._where[sid]] for sid in files}
    assert victims["mid"] is not victims["after"]
    runner = threading.Thread(target=pool.run, kwargs={"deadline": time.monotonic() + 120}, daemon=True)
    runner.start()
    try:
        for sid, status in (("mid", Status.FIRING), ("after", Status.RESOLVED)):
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not any(
                    e.stream == sid and e.type == "black" and e.status is status for e in sink.events):
                time.sleep(0.02)
            assert victims[sid].process.is_alive(), f"{sid}'s worker finished before it could be killed"
            os.kill(victims[sid].process.pid, signal.SIGKILL)
    finally:
        runner.join(timeout=120)
    assert not runner.is_alive()
    for sid in files:
        mine = [e for e in sink.events if e.stream == sid and e.type != "no_signal"]
        # What one engine reports, once: the replay's duplicates are not passed on, and mid's black, open at
        # the death, ends at its real end under its first id, not with the death.
        assert _summary(mine) == _summary([e for e in one.events if e.stream == sid]), mine
        assert list(_paired(mine).values()) == [["firing", "resolved"]] and "ended" not in mine[1].details
        outage = [e for e in sink.events if e.stream == sid and e.type == "no_signal"]
        _outage_is_consistent(outage)
        assert "died" in outage[0].message and outage[1].details["resumed_on"] == "cpu"
        rep = pool.reports[sid]
        assert (rep.state, rep.frames, rep.media_end) == ("ended", 200, pytest.approx(8.0)), rep
        assert rep.events == {"black": 1, "no_signal": 1}
    # The outages start where the workers had got: past the black's onset (2 s after 1 s), or its end and
    # recovery (0.5 s after 3.52 s).
    starts = {e.stream: e.start for e in sink.events if e.type == "no_signal" and e.status is Status.FIRING}
    assert starts["mid"] >= 3.0 and starts["after"] >= 4.02, starts


def _fire(stream: str, kind: str, start: float) -> Event:
    return Event(id=new_event_id(), stream=stream, type=kind, status=Status.FIRING, start=start, end=None,
                 duration=None, wallclock=now_iso(), value=1.0, threshold=0.5, severity=Severity.MAJOR,
                 detector_version="1.0", message=kind)


def _said(pool: ProcessWorkers, index: int, e: Event, at: tuple[float, float]) -> None:
    """A worker's event, as it sends it: with the media time (pictures, audio) its stream had reached."""
    pool._handle("event", index, {"event": e.to_dict(), "at": at})


def _rows(events) -> list[tuple]:
    return [(e.type, e.status.value, e.start, e.end, e.details.get("ended")) for e in events]


def test_a_replayed_file_reports_only_what_is_new(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bookkeeping only (no processes): a file's worker dies with freeze and phase alerts open; the new worker
    reads it again from the start."""
    sink = MemorySink()
    measured: list[dict] = []
    pool = ProcessWorkers(sink, ["cpu"], per_device=1, on_measure=measured.append)
    pool.add_streams([StreamSpec("f", "/media/f.mp4", resolve_detectors(FramewatchConfig()))])
    started: list = []
    monkeypatch.setattr(pool, "_start", started.append)
    black, freeze, phase = _fire("f", "black", 1.0), _fire("f", "freeze", 4.0), _fire("f", "phase", 4.5)
    _said(pool, 0, black, (3.0, 3.0))
    _said(pool, 0, black.resolved(3.52), (4.04, 4.0))
    _said(pool, 0, freeze, (6.0, 5.98))
    pool._handle("progress", 0, {"f": (150, 6.0, 5.98, 0, 1)})
    pool._handle("measure", 0, {"stream": "f", "t": 6.0})
    _said(pool, 0, phase, (6.2, 6.21))  # after its last progress: the worker got that far
    pool._lose(pool._workers[0], "worker process 0 on cpu died (exit code -9)")
    assert _rows(sink.events) == [("black", "firing", 1.0, None, None), ("black", "resolved", 1.0, 3.52, None),
                                  ("freeze", "firing", 4.0, None, None), ("phase", "firing", 4.5, None, None),
                                  ("no_signal", "firing", 6.21, None, None)]
    assert pool.reports["f"].frames == 150
    new = started[0].index
    seen = len(sink.events)
    # The replay says it all again (its freeze a picture later); none of it is news.
    black2, freeze2 = _fire("f", "black", 1.0), _fire("f", "freeze", 4.04)
    _said(pool, new, black2, (3.0, 3.0))
    _said(pool, new, black2.resolved(3.52), (4.04, 4.0))
    _said(pool, new, freeze2, (6.0, 5.98))
    pool._handle("measure", new, {"stream": "f", "t": 3.0})
    pool._handle("progress", new, {"f": (150, 6.0, 5.98, 0, 1)})
    assert len(sink.events) == seen and measured == [{"stream": "f", "t": 6.0}]
    time.sleep(0.01)
    # The freeze ends after the death: reported under the first id; a silence is news.
    _said(pool, new, freeze2.resolved(7.0), (7.04, 7.0))
    silence = _fire("f", "silence", 6.5)
    _said(pool, new, silence, (7.04, 7.0))
    # Back where the lost worker was: its phase alert was not raised again, so it ends with the reason; the
    # outage ends.
    pool._handle("progress", new, {"f": (176, 7.04, 7.0, 0, 1)})
    pool._handle("measure", new, {"stream": "f", "t": 7.04})
    after = sink.events[seen:]
    assert _rows(after) == [("freeze", "resolved", 4.0, 7.0, None), ("silence", "firing", 6.5, None, None),
                            ("phase", "resolved", 4.5, 6.21, after[2].details.get("ended")),
                            ("no_signal", "resolved", 6.21, after[3].end, None)]
    assert after[0].id == freeze.id and after[0].duration == 3.0
    assert "died" in after[2].details["ended"] and "not seen again" in after[2].details["ended"]
    _outage_is_consistent([e for e in sink.events if e.type == "no_signal"])
    assert measured[-1] == {"stream": "f", "t": 7.04}
    _said(pool, new, silence.resolved(7.5), (8.0, 8.0))
    pool._handle("done", new, [asdict(StreamReport("f", state="ended", frames=200, media_end=8.0, decode_errors=1,
                                                   events={"black": 1, "freeze": 1, "silence": 1}, device="cpu"))])
    assert all(v == ["firing", "resolved"] for v in _paired(sink.events).values()), _paired(sink.events)
    rep = pool.reports["f"]
    # The replay went over the first 6 s again: the file's numbers, not the two workers' sum.
    assert (rep.state, rep.frames, rep.media_end, rep.decode_errors) == ("ended", 200, 8.0, 1)
    assert rep.events == {"black": 1, "freeze": 1, "phase": 1, "silence": 1, "no_signal": 1}


def test_a_live_stream_restarts_from_now(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bookkeeping only: a live stream is not read again. What its lost worker left open ends with the reason
    where the worker had got, the new worker's alerts are all news, the outage ends at the first picture,
    and the summary adds up what both workers did."""
    sink = MemorySink()
    pool = ProcessWorkers(sink, ["cpu"], per_device=1)
    pool.add_streams([StreamSpec("live", "udp://127.0.0.1:5999", resolve_detectors(FramewatchConfig()))])
    started: list = []
    monkeypatch.setattr(pool, "_start", started.append)
    black = _fire("live", "black", 1.0)
    pool._handle("progress", 0, {"live": (50, 2.0, 2.0, 1, 2)})
    _said(pool, 0, black, (2.6, 2.64))
    pool._lose(pool._workers[0], "worker process 0 on cpu died (exit code -9)")
    why = "worker process 0 on cpu died (exit code -9)"
    assert _rows(sink.events) == [("black", "firing", 1.0, None, None), ("black", "resolved", 1.0, 2.64, why),
                                  ("no_signal", "firing", 2.64, None, None)]
    new = started[0].index
    black2 = _fire("live", "black", 0.0)  # the new worker's media clock starts afresh
    _said(pool, new, black2, (2.0, 2.0))
    time.sleep(0.02)
    pool._handle("progress", new, {"live": (1, 0.04, 0.0, 0, 0)})
    assert _rows(sink.events[3:]) == [("black", "firing", 0.0, None, None),
                                      ("no_signal", "resolved", 2.64, sink.events[4].end, None)]
    _outage_is_consistent([e for e in sink.events if e.type == "no_signal"])
    assert sink.events[4].duration >= 0.02 and sink.events[4].details["resumed_on"] == "cpu"
    _said(pool, new, black2.resolved(3.0), (3.5, 3.5))
    pool._handle("done", new, [asdict(StreamReport("live", state="ended", frames=100, media_end=4.0, frames_dropped=3,
                                                   decode_errors=1, events={"black": 1}, device="cpu"))])
    rep = pool.reports["live"]
    assert (rep.state, rep.frames, rep.media_end, rep.frames_dropped, rep.decode_errors) == ("ended", 150, 6.0, 4, 3)
    assert rep.events == {"black": 2, "no_signal": 1}
