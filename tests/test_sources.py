"""Sources: timestamp normalisation, the PyAV source on every common container, and a live UDP stream that
goes away and comes back."""

from __future__ import annotations

import socket
import subprocess
import threading
import time

import numpy as np
import pytest
from media import MovingPattern, has_ffmpeg

from engine.alerts import MemorySink
from engine.batch import StreamQueue
from engine.config import FramewatchConfig, resolve_detectors
from engine.media import AUDIO_RATE, StreamCounters
from engine.runner import Engine, StreamSpec
from engine.sources import MediaSource, SourceOptions, Timeline, open_source
from engine.sources.base import AudioClock, SourceError

DUR = 0.04


def _map_all(tl: Timeline, raws, wall0: float = 1000.0) -> list[float]:
    return [round(tl.map(r, DUR, wall0 + i * DUR), 6) for i, r in enumerate(raws)]


# -- Timeline --------------------------------------------------------------------------------------------


def test_timeline_starts_at_zero_from_any_origin():
    assert _map_all(Timeline(live=False), [10.0, 10.04, 10.08]) == [0.0, 0.04, 0.08]


def test_timeline_file_repeated_and_backward_timestamps_stay_monotonic():
    # pts repeated (10.04 twice) and going back (10.02): each keeps the cadence after the last one
    out = _map_all(Timeline(live=False), [10.0, 10.04, 10.04, 10.02, 10.08, 10.2])
    assert out == [0.0, 0.04, 0.08, 0.12, 0.16, 0.2]


def _map_settled(tl: Timeline, raws) -> tuple[list[float], list[int]]:
    """Times as a file source hands them out: an item the timeline defers (the first timestamp beyond a jump)
    takes its own time when the next one confirms the jump (MediaSource's settle), the cadence otherwise.
    Also the indexes that were deferred."""
    out, deferred, held = [], [], None
    for i, r in enumerate(raws):
        t = round(tl.map(r, DUR, 1000.0 + i * DUR), 6)
        if held is not None:
            out[held] = round(tl.confirmed, 6) if tl.confirmed is not None else out[held]
            held = None
        out.append(t)
        if tl.deferring:
            held = i
            deferred.append(i)
    return out, deferred


def test_timeline_file_gaps_are_kept():
    # a 10 s hole in a file is a fact about the media, even beyond the live re-anchoring jump: its first
    # timestamp waits for the next one, which agrees, and both keep their own times
    tl = Timeline(live=False)
    out, deferred = _map_settled(tl, [0.0, 0.04, 10.04, 10.08, 2.0])
    assert out[:4] == [0.0, 0.04, 10.04, 10.08] and deferred == [2] and tl.outliers == 0
    assert out[4] == 10.12  # and a big jump back never runs time backwards


def test_timeline_file_lone_garbage_timestamp_keeps_the_cadence():
    # one picture's timestamp 18.6 h on (a damaged packet), the next ones back in the series: garbage
    tl = Timeline(live=False)
    out, deferred = _map_settled(tl, [0.0, 0.04, 67000.08, 0.12, 0.16])
    assert out == [0.0, 0.04, 0.08, 0.12, 0.16] and deferred == [2] and tl.outliers == 1
    # a slide show (or a sparse tier) steps 10 s at a time: after its first step, nothing is a jump
    slides = Timeline(live=False)
    out, deferred = _map_settled(slides, [0.0, 10.0, 20.0, 30.0, 40.0])
    assert out == [0.0, 10.0, 20.0, 30.0, 40.0] and deferred == [1] and slides.outliers == 0
    # a live stream's jump is a reset, re-anchored at once (never deferred)
    live = Timeline(live=True)
    _map_settled(live, [0.0, 0.04, 67000.08, 67000.12])
    assert live.resets == 1 and live.outliers == 0


def test_timeline_unknown_timestamps_follow_the_cadence():
    assert _map_all(Timeline(live=False), [None, None, 5.0, None]) == [0.0, 0.04, 5.0, 5.04]


def test_timeline_live_reset_reanchors_and_time_goes_on():
    tl = Timeline(live=True)
    wall = 1000.0
    out = []
    for i in range(3):  # 95000.00 .. 95000.08
        out.append(tl.map(95000.0 + i * DUR, DUR, wall))
        wall += DUR
    # the encoder restarts: timestamps drop to 0, the wall clock went on by one frame
    for i in range(3):
        out.append(tl.map(i * DUR, DUR, wall))
        wall += DUR
    assert [round(t, 6) for t in out] == [0.0, 0.04, 0.08, 0.12, 0.16, 0.2]


def test_timeline_live_jump_forward_continues_by_the_wall_clock():
    tl = Timeline(live=True)
    assert tl.map(50.0, DUR, 1000.0) == 0.0
    # a timestamp wrap / jump of an hour, 0.5 s of wall time later: continue by the wall clock
    t = tl.map(3650.0, DUR, 1000.5)
    assert t == pytest.approx(0.5)
    assert tl.map(3650.04, DUR, 1000.54) == pytest.approx(0.54)


def test_timeline_reconnect_continues_after_the_outage():
    tl = Timeline(live=True)
    tl.map(7.0, DUR, 1000.0)
    tl.map(7.04, DUR, 1000.04)
    tl.reconnected()
    # the new connection starts at raw 3.0, 4 s of wall clock after the last picture arrived
    assert tl.map(3.0, DUR, 1004.04) == pytest.approx(4.04)
    assert tl.map(3.04, DUR, 1004.08) == pytest.approx(4.08)


def test_timeline_reconnect_with_audio_first_continues_after_the_outage():
    now = time.time()
    tl = Timeline(live=True)
    tl.map(7.0, DUR, now - 4.04)
    tl.map(7.04, DUR, now - 4.0)
    tl.reconnected()
    clock = AudioClock(tl, AUDIO_RATE)  # MediaSource makes a new clock for every connection
    audio_start, _ = clock.map(2.98, 1024)  # the new connection's first packet is audio
    video = tl.map(3.0, DUR, time.time())
    assert audio_start >= 0.08  # time never runs backwards
    assert video == pytest.approx(4.04 + 0.02, abs=0.3)
    assert audio_start == pytest.approx(video - 0.02, abs=0.3)


# -- the PyAV source on files ----------------------------------------------------------------------------


def _read_all(path, **options) -> tuple[MediaSource, StreamQueue, list, list, list]:
    q = StreamQueue(StreamCounters(), max_video=100_000, max_audio=100_000, block=False)
    src = MediaSource(str(path), SourceOptions(pace="fast", **options))
    t = threading.Thread(target=src.run, args=(q, threading.Event()), daemon=True)
    t.start()
    t.join(timeout=30)
    assert not t.is_alive(), "source did not finish"
    d = q.drain(100_000)
    return src, q, d.video, d.audio, d.status


CONTAINERS = [
    # (file name, write_clip arguments, video codec, audio codec, video frames, first video pts)
    ("src.mp4", {}, "h264", "aac", 50, 0.0),
    ("src.mov", {}, "h264", "aac", 50, 0.0),
    ("src.mkv", {"codec": "ffv1", "audio_codec": "pcm_s16le"}, "ffv1", "pcm_s16le", 50, 0.0),
    # MPEG-TS starting at 10 s; AAC's 1024-sample priming puts the first picture 1024/48000 s after the audio
    ("src.ts", {"start": 10.0}, "h264", "aac", 50, 1024 / AUDIO_RATE),
    ("src.avi", {"codec": "mpeg4"}, "mpeg4", "pcm_s16le", 50, 0.0),
]


@pytest.mark.parametrize(("name", "kwargs", "vcodec", "acodec", "frames", "first"), CONTAINERS, ids=[c[0] for c in CONTAINERS])
def test_pyav_source_reads_container(make_clip, name, kwargs, vcodec, acodec, frames, first):
    path = make_clip(name, seconds=2.0, **kwargs)
    src, q, video, audio, status = _read_all(path)
    assert [s.kind for s in status] == ["connected", "eof"]
    info = status[0].info
    assert (info.video_codec, info.audio_codec, info.width, info.height, info.fps) == (vcodec, acodec, 320, 240, 25.0)
    assert info.live is False and src.realtime is False

    assert len(video) == frames
    pts = np.array([f.pts for f in video])
    assert pts[0] == pytest.approx(first, abs=1e-6)
    assert np.allclose(np.diff(pts), 1 / 25, atol=1e-6)
    assert [f.index for f in video] == list(range(frames))
    assert all(f.luma.shape == (240, 320) and f.small.shape == (180, 320) for f in video)

    assert audio[0].pts == pytest.approx(0.0, abs=1e-6)  # normalised: the earliest stream starts at 0
    assert all(c.samples.dtype.is_floating_point and str(c.samples.dtype) == "torch.float32" for c in audio)
    assert all(c.samples.shape[0] == 2 for c in audio)
    total = sum(c.samples.shape[-1] for c in audio)
    if acodec == "aac":
        # AAC frames are 1024 samples, plus 1024 of encoder priming where the container has no edit list (TS)
        assert 2 * AUDIO_RATE <= total <= 2 * AUDIO_RATE + 2048, total
    else:
        assert total == 2 * AUDIO_RATE
    starts = np.array([c.pts for c in audio])
    assert np.all(np.diff(starts) > 0)
    assert q.counters.video_frames == frames and q.counters.decode_errors == 0


def test_pyav_source_lossless_luma_is_exact(make_clip):
    # 200x120: the decoder's line size (256) is wider than the picture, so the stride must be honoured
    pattern = MovingPattern((200, 120), seed=5)
    path = make_clip("exact.mkv", size=(200, 120), seconds=1.0, codec="ffv1", audio=False, luma_fn=pattern)
    _, _, video, audio, status = _read_all(path)
    assert audio == [] and status[0].info.audio_codec is None
    assert len(video) == 25
    for n, f in enumerate(video):  # every frame, after the whole file was decoded (no buffer reuse)
        assert np.array_equal(f.luma.numpy(), pattern(n)), n


def test_pyav_source_wav_is_resampled_to_48k(make_clip):
    path = make_clip("tone44k.wav", seconds=1.0, audio_rate=44_100)
    _, _, video, audio, status = _read_all(path)
    assert video == []
    info = status[0].info
    assert (info.video_codec, info.audio_codec, info.audio_rate, info.audio_channels) == (None, "pcm_s16le", 44_100, 2)
    total = sum(c.samples.shape[-1] for c in audio)
    assert abs(total - AUDIO_RATE) <= 48
    x = np.concatenate([c.samples.numpy() for c in audio], axis=1)
    assert x.dtype == np.float32
    # the -20 dBFS sine survives resampling: RMS 0.1 / sqrt(2)
    mid = x[:, 4800:-4800]
    assert np.sqrt(np.mean(mid**2)) == pytest.approx(0.1 / np.sqrt(2), rel=0.01)
    assert audio[0].pts == 0.0


def test_pyav_source_video_or_audio_only_options(make_clip):
    path = make_clip("src.mp4", seconds=2.0)
    _, _, video, audio, _ = _read_all(path, audio=False)
    assert len(video) == 50 and audio == []
    _, _, video, audio, _ = _read_all(path, video=False)
    assert video == [] and sum(c.samples.shape[-1] for c in audio) >= 2 * AUDIO_RATE


def test_open_source_rejects_unknown_schemes_before_any_io():
    with pytest.raises(SourceError, match="unsupported URL scheme 'gopher'"):
        open_source("gopher://example.org/x")
    with pytest.raises(SourceError, match="empty URL"):
        open_source("  ")
    with pytest.raises(SourceError, match="faults can only be scheduled on synthetic"):
        open_source("clip.mp4", faults=[{"kind": "black", "start": 1, "duration": 1}])
    assert isinstance(open_source("udp://127.0.0.1:1234"), MediaSource)
    assert open_source("udp://127.0.0.1:1234").live is True
    assert open_source("clip.mp4").live is False


# -- a live UDP stream that goes away and comes back -------------------------------------------------------


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sender(port: int) -> subprocess.Popen:
    """ffmpeg sending test pictures and a tone as MPEG-TS over UDP in real time, a key frame every second
    (a receiver that joins late decodes from the next one), until killed (60 s at most)."""
    return subprocess.Popen(
        ["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-re",
         "-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25",
         "-f", "lavfi", "-i", "sine=frequency=1000:sample_rate=48000",
         "-t", "60", "-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency", "-g", "25",
         "-c:a", "aac", "-f", "mpegts", f"udp://127.0.0.1:{port}?pkt_size=1316"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def _wait(cond, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return bool(cond())


@pytest.mark.skipif(not has_ffmpeg(), reason="needs the ffmpeg CLI")
@pytest.mark.timeout(60)
def test_live_udp_no_signal_and_reconnect():
    port = _free_udp_port()
    sink = MemorySink()
    statuses: list[str] = []
    engine = Engine(sink, on_status=lambda rt, kind, msg: statuses.append(kind))
    options = SourceOptions(open_timeout=2.0, read_timeout=1.0, backoff_initial=0.2, backoff_max=1.0)
    rt = engine.add_stream(StreamSpec("udp", f"udp://127.0.0.1:{port}", resolve_detectors(FramewatchConfig()), options))
    assert rt.ctx.live is True
    runner = threading.Thread(target=engine.run, kwargs={"deadline": time.monotonic() + 45}, daemon=True)
    senders: list[subprocess.Popen] = []
    try:
        runner.start()
        senders.append(_sender(port))
        assert _wait(lambda: rt.stats.frames_scored >= 50, 15), "no pictures from the first sender"
        before = rt.counters.video_frames
        media_before = rt.stats.media_end
        senders[0].kill()
        senders[0].wait(timeout=5)

        assert _wait(lambda: any(e.type == "no_signal" for e in sink.events), 10), "no_signal never fired"
        assert _wait(lambda: rt.state == "no_signal", 5)
        at_firing = rt.counters.video_frames
        time.sleep(1.5)  # about 4 s without pictures in all
        assert rt.counters.video_frames == at_firing  # nothing arrived while the event was open
        assert rt.stats.frames_scored >= before

        senders.append(_sender(port))
        assert _wait(lambda: rt.counters.video_frames >= at_firing + 25, 20), "no pictures after the sender came back"
        assert _wait(lambda: any(e.type == "no_signal" and e.status.value == "resolved" for e in sink.events), 10)
        assert _wait(lambda: rt.state == "running", 5)
    finally:
        for s in senders:
            s.kill()
            s.wait(timeout=5)
        engine.stop()
        runner.join(timeout=15)
    assert not runner.is_alive()

    outages = [e for e in sink.events if e.type == "no_signal"]
    assert [e.status.value for e in outages] == ["firing", "resolved"]
    firing, resolved = outages
    assert firing.id == resolved.id and firing.stream == resolved.stream == "udp"
    assert media_before - 1e-6 <= firing.start <= media_before + 2.0  # where the pictures stopped
    assert firing.value >= 2.0 and firing.threshold == 2.0  # seconds without pictures when it fired
    # How much media time the outage takes depends on which packet of the new connection comes first (see
    # test_timeline_reconnect_with_audio_first_continues_after_the_outage); it never runs backwards.
    assert resolved.end >= firing.start
    assert rt.counters.reconnects >= 1
    assert statuses[0] == "connected" and "disconnected" in statuses
    # connected again after the first disconnect
    assert "connected" in statuses[statuses.index("disconnected"):]
    assert rt.state == "ended" and rt.errors == []
