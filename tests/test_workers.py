"""Engine worker processes (engine.workers per device): same events as one engine, no alert lost when a
worker dies, streams of a failed GPU restarted on another device."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from detect_media import synthetic_url

from engine.alerts import MemorySink
from engine.config import FramewatchConfig, resolve_detectors
from engine.events import Status
from engine.runner import Engine, StreamSpec
from engine.scheduler import match_model
from engine.sources import SourceOptions
from engine.workers import ProcessWorkers

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


def test_a_killed_worker_loses_no_alert_and_its_streams_restart() -> None:
    sink = MemorySink()
    pool = ProcessWorkers(sink, ["cpu"], per_device=2)
    specs = _specs(pace="realtime", duration=5)
    pool.add_streams(specs)
    runner = threading.Thread(target=pool.run, kwargs={"deadline": time.monotonic() + 90})
    runner.start()
    # Round robin over two workers: a and c on worker 0, b on worker 1.
    victim = pool._workers[pool._where["a"]]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(e.stream == "a" and e.type == "black" for e in sink.events):
        time.sleep(0.05)
    assert any(e.stream == "a" and e.type == "black" and e.status is Status.FIRING for e in sink.events)
    os.kill(victim.process.pid, signal.SIGKILL)
    runner.join(timeout=90)
    assert not runner.is_alive()
    lost = {s.id for s in specs if s in victim.specs}
    # The black alert open when the worker died is resolved by the parent, saying why.
    black = [e for e in sink.events if e.stream == "a" and e.type == "black"]
    ended = [e for e in black if e.status is Status.RESOLVED and "ended" in e.details]
    assert ended and "died" in ended[0].details["ended"]
    for sid in lost:
        outage = [e for e in sink.events if e.stream == sid and e.type == "no_signal"]
        assert [e.status for e in outage] == [Status.FIRING, Status.RESOLVED], outage
        assert "worker process" in outage[0].message and outage[1].details["resumed_on"] == "cpu"
        assert pool.reports[sid].state == "ended" and pool.reports[sid].frames == 125  # ran again in full
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
    pool._handle("progress", started[0].index, {"b": (3, 0.12)})
    assert [e.status for e in sink.events if e.type == "no_signal"] == [Status.FIRING, Status.RESOLVED]


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
    runner = threading.Thread(target=pool.run, kwargs={"deadline": time.monotonic() + 90})
    runner.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(e.type == "black" for e in sink.events):
        time.sleep(0.05)
    victim = pool._workers[pool._where["a"]]
    pool.stop()
    os.kill(victim.process.pid, signal.SIGKILL)  # before it could finish its streams
    runner.join(timeout=60)
    assert not runner.is_alive()
    pairs = _paired(sink.events)
    assert pairs and all(v == ["firing", "resolved"] for v in pairs.values()), pairs
