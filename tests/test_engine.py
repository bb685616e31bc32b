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
