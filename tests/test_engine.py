"""Engine-level behaviour: one stream's failure stays with that stream."""

from __future__ import annotations

import pytest
from detect_media import break_scoring_for

from engine.alerts import MemorySink
from engine.config import FramewatchConfig, resolve_detectors
from engine.runner import Engine, StreamSpec
from engine.sources import SourceOptions

URL = "synthetic://{name}?size=320x240&fps=25&duration=5&pace=fast&faults=black@1:3"


@pytest.mark.timeout(120)
def test_a_stream_whose_frames_break_scoring_fails_alone() -> None:
    sink = MemorySink()
    engine = Engine(sink)
    break_scoring_for(engine, "bad")
    detectors = resolve_detectors(FramewatchConfig())
    good = engine.add_stream(StreamSpec("good", URL.format(name="good"), detectors, SourceOptions(pace="fast")))
    bad = engine.add_stream(StreamSpec("bad", URL.format(name="bad"), detectors, SourceOptions(pace="fast")))
    engine.run()

    assert bad.state == "error"
    assert bad.errors == ["scoring failed: cannot score this frame"]
    assert good.state == "ended" and good.errors == []
    assert good.stats.frames_scored == 125
    black = [(e.status.value, e.start, e.end) for e in sink.events if e.stream == "good" and e.type == "black"]
    assert black == [("firing", 1.0, None), ("resolved", 1.0, 4.0)]
    assert not [e for e in sink.events if e.stream == "bad"]


@pytest.mark.timeout(120)
def test_streams_removed_from_another_thread_and_from_the_engine_thread_end_with_their_alerts() -> None:
    """A remover on another thread is answered at the end of the running tick; the engine thread itself (a
    device-failure handler moving streams away inside a tick) removes at once, never waiting on its own tick."""
    import threading
    import time

    sink = MemorySink()
    engine = Engine(sink)
    engine.REMOVE_WAIT = 60.0  # a wait on its own tick would show as a minute
    detectors = resolve_detectors(FramewatchConfig())
    live = "synthetic://{name}?size=64x64&fps=25&duration=0&faults=black@0:3600"
    for name in ("a", "b"):
        engine.add_stream(StreamSpec(name, live.format(name=name), detectors, SourceOptions()))
    took: dict[str, float] = {}

    def on_tick() -> None:
        if "b" not in took and any(e.stream == "b" and e.type == "black" for e in sink.events):
            t0 = time.monotonic()
            engine.remove_stream("b")
            took["b"] = time.monotonic() - t0
            assert sink.events[-1].stream == "b" and sink.events[-1].status.value == "resolved"

    runner = threading.Thread(target=engine.run, kwargs={"until_done": False, "on_tick": on_tick})
    runner.start()
    try:
        deadline = time.monotonic() + 60
        while not ("b" in took and any(e.stream == "a" and e.type == "black" for e in sink.events)):
            assert time.monotonic() < deadline, "no black alert on both streams"
            time.sleep(0.05)
        t0 = time.monotonic()
        engine.remove_stream("a")
        took["a"] = time.monotonic() - t0
        assert [e.status.value for e in sink.events if e.stream == "a" and e.type == "black"] == ["firing", "resolved"]
    finally:
        engine.stop()
        runner.join(30)
    assert took["b"] < 5 and took["a"] < 5, took
    for name in ("a", "b"):
        black = [e.status.value for e in sink.events if e.stream == name and e.type == "black"]
        assert black == ["firing", "resolved"], (name, black)
    assert not engine.streams and not engine._removals
