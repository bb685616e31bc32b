"""StreamQueue: thinning for live streams (counted), blocking for files (never drops), status ordering."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from engine.batch import StreamQueue
from engine.media import AudioChunk, SourceStatus, StreamCounters, VideoFrame


def _frame(i: int) -> VideoFrame:
    y = torch.full((4, 4), i % 256, dtype=torch.uint8)
    return VideoFrame(pts=i * 0.04, duration=0.04, luma=y, small=y, index=i)


def _chunk(i: int) -> AudioChunk:
    return AudioChunk(pts=i * 0.1, samples=torch.zeros(2, 4800))


def test_live_queue_drops_oldest_and_counts():
    counters = StreamCounters()
    q = StreamQueue(counters, max_video=3, max_audio=2, block=False)
    for i in range(7):
        assert q.put_video(_frame(i), now=100.0 + i) is True
    for i in range(5):
        assert q.put_audio(_chunk(i)) is True
    assert counters.frames_dropped == 4
    assert counters.audio_dropped == 3
    assert q.last_arrival == 106.0
    d = q.drain(10)
    # Thinned: each kept picture stands for the ones dropped after it (0.0 to 0.2 s, 0.2 to 0.24 s).
    assert [f.index for f in d.video] == [0, 5, 6]
    assert [f.duration for f in d.video] == pytest.approx([0.2, 0.04, 0.04])
    assert [c.pts for c in d.audio] == pytest.approx([0.3, 0.4])
    assert q.pending() == 0


def test_drain_takes_at_most_max_video_in_order():
    q = StreamQueue(StreamCounters(), max_video=10)
    for i in range(5):
        q.put_video(_frame(i))
    assert [f.index for f in q.drain(2).video] == [0, 1]
    assert [f.index for f in q.drain(2).video] == [2, 3]
    assert [f.index for f in q.drain(2).video] == [4]
    assert not q.drain(2)


def test_the_tick_is_woken_only_when_a_whole_batch_waits():
    wakeup = threading.Event()
    q = StreamQueue(StreamCounters(), max_video=64, wakeup=wakeup, wake_at=3)
    q.put_video(_frame(0))
    q.put_video(_frame(1))
    assert not wakeup.is_set()
    q.put_video(_frame(2))
    assert wakeup.is_set()


def test_file_queue_blocks_the_producer_and_never_drops():
    counters = StreamCounters()
    wakeup = threading.Event()
    q = StreamQueue(counters, max_video=2, block=True, wakeup=wakeup, wake_at=2)
    produced: list[int] = []

    def producer() -> None:
        for i in range(6):
            assert q.put_video(_frame(i))
            produced.append(i)

    t = threading.Thread(target=producer, daemon=True)
    t.start()
    deadline = time.monotonic() + 5
    while len(produced) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # a producer that does not block would be done by now
    assert produced == [0, 1]
    assert t.is_alive()
    assert q.pending() == 2
    assert wakeup.is_set()

    got = [f.index for f in q.drain(1).video]  # room for one more frame
    deadline = time.monotonic() + 5
    while len(produced) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    assert produced == [0, 1, 2]  # exactly one more, then blocked again
    assert t.is_alive()

    deadline = time.monotonic() + 10
    while (t.is_alive() or q.pending()) and time.monotonic() < deadline:
        got += [f.index for f in q.drain(1).video]
        time.sleep(0.005)
    assert not t.is_alive()
    assert got == [0, 1, 2, 3, 4, 5]
    assert counters.frames_dropped == 0


def test_close_unblocks_a_waiting_producer():
    q = StreamQueue(StreamCounters(), max_video=1, block=True)
    q.put_video(_frame(0))
    result: list[bool] = []
    t = threading.Thread(target=lambda: result.append(q.put_video(_frame(1))), daemon=True)
    t.start()
    time.sleep(0.2)
    assert t.is_alive() and result == []
    q.close()
    t.join(timeout=2)
    assert not t.is_alive()
    assert result == [False]  # refused, not queued
    assert q.closed
    assert [f.index for f in q.drain(10).video] == [0]


def test_status_comes_after_the_frames_queued_before_it():
    q = StreamQueue(StreamCounters(), max_video=16, block=True)
    for i in range(5):
        q.put_video(_frame(i))
    q.put_status(SourceStatus("eof", "", 1.0))
    d1 = q.drain(2)
    assert [f.index for f in d1.video] == [0, 1] and d1.status == []
    d2 = q.drain(2)
    assert [f.index for f in d2.video] == [2, 3] and d2.status == []
    d3 = q.drain(2)
    assert [f.index for f in d3.video] == [4]
    assert [s.kind for s in d3.status] == ["eof"]
    assert q.pending() == 0


def test_status_on_an_empty_queue_is_delivered_at_once_and_never_dropped():
    counters = StreamCounters()
    q = StreamQueue(counters, max_video=1, block=False)
    for kind in ("connected", "disconnected", "error", "connected"):
        q.put_status(SourceStatus(kind, kind, 0.0))
    d = q.drain(4)
    assert d.video == [] and [s.kind for s in d.status] == ["connected", "disconnected", "error", "connected"]
    assert counters.frames_dropped == 0


def test_a_full_live_queue_thins_and_keeps_time_continuous():
    """A tick that falls behind scores fewer pictures of the same stretch of time: the durations of what is
    taken tile the time without holes (but the first), so a fault still fills its onset."""
    counters = StreamCounters()
    q = StreamQueue(counters, max_video=16, block=False)
    taken = []
    for i in range(400):
        q.put_video(_frame(i))
        if i % 50 == 49:  # a slow tick takes 8 pictures now and then
            taken += q.drain(8).video
    taken += q.drain(100).video
    assert taken[-1].index >= 398 and counters.frames_dropped == 400 - len(taken)
    assert len(taken) < 100
    ends = [f.pts + f.duration for f in taken]
    holes = [round(b.pts - a_end, 6) for a_end, b in zip(ends[:-1], taken[1:], strict=True) if b.pts - a_end > 1e-6]
    assert holes == []
    assert sum(f.duration for f in taken) == pytest.approx(400 * 0.04)
    assert all(b.pts > a.pts for a, b in zip(taken, taken[1:], strict=False))
