"""Shedding the click analysis when the engine falls behind its live streams (engine/overload.py): when it pauses
and comes back, what the clicks detector says across a pause, and the engine's wiring (live streams only,
counted, logged)."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest
import torch

from engine.alerts import MemorySink
from engine.config import FramewatchConfig, resolve_detectors
from engine.detectors.base import StreamContext
from engine.detectors.clicks import ClicksConfig, ClicksDetector
from engine.overload import LoadShedder
from engine.runner import Engine, StreamSpec
from engine.scoring import AudioState, AudioWork, ScoringStep
from engine.sources import SourceOptions

RATE = 48_000
CHUNK = 4800  # 100 ms


def test_three_slow_ticks_pause_and_fast_ticks_bring_it_back() -> None:
    s = LoadShedder(slow_tick=1.0, slow_ticks=3, recover_after=60.0)
    t = 0.0
    for took in (1.2, 1.5, 0.1, 1.0, 1.1):  # a fast tick in between starts the count again
        t += took
        assert s.update(took, t) is None
    t += 2.0
    assert s.update(2.0, t) is True and s.shed
    # Ticks under a quarter of slow_tick for 60 s bring it back; a middling one starts the wait again.
    for _ in range(30):
        t += 1.0
        assert s.update(0.2, t) is None
    t += 1.0
    assert s.update(0.5, t) is None
    for _ in range(60):
        t += 1.0
        assert s.update(0.2, t) is None
    t += 1.0
    assert s.update(0.2, t) is False and not s.shed


def test_one_very_slow_tick_is_enough() -> None:
    s = LoadShedder(slow_tick=1.5, slow_ticks=3)
    assert s.update(2.0, 2.0) is None
    assert s.update(2.6, 4.6) is True  # 4.6 s of waiting in two ticks: as bad as three of 1.5 s
    s = LoadShedder(slow_tick=1.5, slow_ticks=3)
    assert s.update(9.0, 9.0) is True


def test_pausing_again_soon_after_coming_back_doubles_the_wait() -> None:
    s = LoadShedder(slow_tick=1.0, slow_ticks=1, recover_after=10.0, recover_max=30.0, flap_window=100.0)
    t = 0.0
    waits = []
    for _ in range(4):
        t += 1.0
        assert s.update(1.0, t) is True
        waits.append(s.wait)
        start = t
        while s.update(0.1, t) is not False:
            t += 0.5
        assert t - start == pytest.approx(s.wait, abs=0.5)
    assert waits == [10.0, 20.0, 30.0, 30.0]
    t += 200.0  # long after the last return: the wait is the plain one again
    assert s.update(1.0, t) is True and s.wait == 10.0


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        LoadShedder(slow_tick=0)
    with pytest.raises(ValueError):
        LoadShedder(slow_ticks=0)


def _programme(seconds: float) -> np.ndarray:
    rng = np.random.default_rng(3)
    n = round(seconds * RATE)
    spec = np.fft.rfft(rng.standard_normal((2, n)), axis=-1)
    f = np.fft.rfftfreq(n, 1 / RATE)
    spec[:, (f < 80) | (f > 8000)] = 0
    spec /= np.maximum(f, 80) ** 0.5
    x = np.fft.irfft(spec, n, axis=-1)
    x *= 0.2 / np.abs(x).max()
    x += 0.05 * np.sin(2 * np.pi * 220 * np.arange(n) / RATE)
    return x.astype(np.float32)


def test_clicks_across_a_paused_stretch() -> None:
    """A click before the pause is reported (its event ends during the pause, marked as not watched), one inside
    the pause is not seen, one after it is found on its sample, and the restart itself is not a click."""
    x = _programme(9.0)
    clicks = [round(3.1 * RATE) + 17, round(5.0 * RATE) + 5, round(7.2 * RATE) + 101]
    for k in clicks:
        x[0, k] += 0.4
    events = []
    det = ClicksDetector(ClicksConfig(), StreamContext(stream="s", emit=events.append, live=True))
    step, state = ScoringStep("cpu"), AudioState(clicks=True)
    for c0 in range(0, x.shape[1], CHUNK):
        t0 = c0 / RATE
        paused = 4.0 <= t0 < 6.0
        if not paused and not state.clicks:
            state.clicks, state.impulse = True, None  # what the engine does when it catches up
        state.clicks = not paused
        (m,) = step.score_audio([AudioWork("s", t0, torch.from_numpy(x[:, c0 : c0 + CHUNK]), "stereo", state)])
        det.on_audio(m)
    det.finish(9.0)
    done = [e for e in events if e.status.value == "resolved"]
    assert len(done) == 2, done
    first, second = done
    assert first.start == pytest.approx(clicks[0] / RATE, abs=1.5 / RATE)
    assert first.details.get("analysis_paused") is True and first.details["clicks"] == 1
    assert second.start == pytest.approx(clicks[2] / RATE, abs=1.5 / RATE)
    assert "analysis_paused" not in second.details


def test_engine_pauses_clicks_on_live_streams_only(caplog: pytest.LogCaptureFixture) -> None:
    """An engine whose every tick counts as slow pauses the click analysis of its live stream at once, counts
    and logs it; a file stream in the same engine keeps it (its check must see everything)."""
    from detect_media import synthetic_url

    dets = resolve_detectors(FramewatchConfig())
    sink = MemorySink()
    eng = Engine(sink, load_shedder=LoadShedder(slow_tick=1e-9, slow_ticks=1, recover_after=1e9))
    live = eng.add_stream(StreamSpec("live", synthetic_url([], size="160x96", fps=10, duration=30), dets,
                                     SourceOptions(pace="realtime")))
    assert live.ctx.live and live.audio.clicks
    caplog.set_level(logging.WARNING, logger="framewatch")
    runner = threading.Thread(target=eng.run, kwargs={"until_done": False}, daemon=True)
    runner.start()
    try:
        deadline = time.monotonic() + 10
        while live.counters.clicks_paused == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert live.counters.clicks_paused == 1 and not live.audio.clicks
        assert eng.shedder is not None and eng.shedder.shed
        assert any("click analysis paused on 1 live stream" in r.getMessage() for r in caplog.records)
        # A live stream added while the engine is behind starts without it; a file stream is never shed.
        later = eng.add_stream(StreamSpec("later", synthetic_url([], size="160x96", fps=10, duration=30), dets,
                                          SourceOptions(pace="realtime")))
        assert later.counters.clicks_paused == 1 and not later.audio.clicks
        f = eng.add_stream(StreamSpec("file", synthetic_url([], size="160x96", fps=10, duration=2), dets,
                                      SourceOptions(pace="fast")))
        assert not f.ctx.live and f.audio.clicks and f.counters.clicks_paused == 0
    finally:
        eng.stop()
        runner.join(timeout=30)


class _Scripted(LoadShedder):
    """Pauses on the first tick with live media and comes back on the next, then stays: the engine's two
    transitions, once."""

    calls = 0

    def update(self, tick_seconds: float, now: float) -> bool | None:
        self.calls += 1
        if self.calls > 2:
            return None
        self.shed = self.calls == 1
        return self.shed


def test_engine_resumes_clicks_from_a_fresh_state() -> None:
    from detect_media import synthetic_url

    dets = resolve_detectors(FramewatchConfig())
    eng = Engine(MemorySink(), load_shedder=_Scripted())
    rt = eng.add_stream(StreamSpec("live", synthetic_url([], size="160x96", fps=10, duration=30), dets,
                                   SourceOptions(pace="realtime")))
    rt.audio.impulse = torch.zeros(1)  # stands for the analysis state of the stretch before the pause
    runner = threading.Thread(target=eng.run, kwargs={"until_done": False}, daemon=True)
    runner.start()
    try:
        deadline = time.monotonic() + 10
        while not (rt.counters.clicks_paused and rt.audio.clicks) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        eng.stop()
        runner.join(timeout=30)
    assert rt.counters.clicks_paused >= 1 and rt.audio.clicks
