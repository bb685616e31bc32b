"""Live ingest under faults: an FFmpeg CLI process sends MPEG-TS to the engine over UDP, TCP and RTP on
127.0.0.1, and the tests kill and restart it, corrupt its packets, change its picture size, reset its
timestamps, send faster than real time and slow the scoring down.

Every send is a few seconds of a moving test picture with a tone, so the stream itself never gives a reason
for a freeze or black alert: any such alert is a false one made by the fault. The unit tests at the top pin
down, without ffmpeg, the timing rules those live runs depend on.
"""

from __future__ import annotations

import functools
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from engine.alerts import MemorySink
from engine.batch import StreamQueue
from engine.config import FramewatchConfig, resolve_detectors
from engine.detectors.base import StreamContext, VideoMetrics
from engine.detectors.no_signal import NoSignalConfig, NoSignalDetector
from engine.events import Event
from engine.media import AUDIO_RATE, StreamCounters, VideoFrame
from engine.runner import Engine, StreamRuntime, StreamSpec
from engine.sources import SourceOptions, Timeline
from engine.sources.base import AudioClock


def live(fn):
    """A test that runs ffmpeg senders: marked, and skipped without the ffmpeg CLI."""
    fn = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs the ffmpeg CLI")(fn)
    return pytest.mark.ffmpeg(fn)


# Short timeouts so that an outage shows within a second or two; the engine's defaults are for real networks.
FAST = SourceOptions(open_timeout=5.0, read_timeout=1.0, backoff_initial=0.2, backoff_max=1.0)
ONSET = 2.0  # the no_signal detector's default onset, wall-clock seconds without a picture


def _free_port(kind: int, pair: bool = False) -> int:
    """A free port on 127.0.0.1 (with `pair`, an even one whose successor is free too, as RTP takes two)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not pair:
            return port
        if port % 2 == 0 and port < 65535:
            try:
                with socket.socket(socket.AF_INET, kind) as a, socket.socket(socket.AF_INET, kind) as b:
                    a.bind(("127.0.0.1", port))
                    b.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port pair")


def _tcp_listening(port: int) -> bool:
    """Whether something listens on 127.0.0.1:port, read from /proc: connecting to find out would take the
    one connection an ffmpeg `listen=1` output accepts."""
    needle = f"0100007F:{port:04X} 00000000:0000 0A"
    try:
        return needle in Path("/proc/net/tcp").read_text()
    except OSError:
        return False


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


@functools.cache
def _has_readrate() -> bool:
    """ffmpeg's -readrate (FFmpeg 5.0 and later)."""
    out = subprocess.run(["ffmpeg", "-hide_banner", "-h", "long"], capture_output=True, text=True, timeout=30).stdout
    return "-readrate" in out


def _encode(size: str = "320x240", seconds: float = 60, rate: float | None = None, extra: tuple[str, ...] = ()) -> list[str]:
    """ffmpeg arguments encoding a moving test picture and a 1 kHz tone live (a key frame every second, so a
    receiver that joins late decodes from the next one), in real time or at `rate` times real time."""
    if rate is not None and not _has_readrate():
        pytest.skip("this ffmpeg has no -readrate (FFmpeg 5.0 and later)")
    pace = ["-re"] if rate is None else ["-readrate", str(rate)]
    return [*pace, "-f", "lavfi", "-i", f"testsrc2=size={size}:rate=25",
            "-f", "lavfi", "-i", "sine=frequency=1000:sample_rate=48000",
            "-t", str(seconds), "-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency", "-g", "25",
            "-c:a", "aac", *extra]


class Tap:
    """What one stream's source put into its queue: picture times and sizes, audio times, and the most
    pictures the queue ever held."""

    def __init__(self, rt: StreamRuntime) -> None:
        self.video: list[tuple[float, int, int]] = []
        self.audio: list[float] = []
        self.max_queued = 0
        q = rt.queue
        put_video, put_audio = q.put_video, q.put_audio

        def video(frame, now=None):
            ok = put_video(frame, now)
            self.video.append((frame.pts, frame.width, frame.height))
            self.max_queued = max(self.max_queued, len(q._video))
            return ok

        def audio(chunk, now=None):
            ok = put_audio(chunk, now)
            self.audio.append(chunk.pts)
            return ok

        q.put_video, q.put_audio = video, audio

    def current_run(self) -> int:
        """How many pictures of the latest size came in a row."""
        n = 0
        for _, w, h in reversed(self.video):
            if (w, h) != self.video[-1][1:]:
                break
            n += 1
        return n

    def sizes(self) -> list[tuple[int, int]]:
        """The picture sizes in the order they came, each run of one size once."""
        out: list[tuple[int, int]] = []
        for _, w, h in self.video:
            if not out or out[-1] != (w, h):
                out.append((w, h))
        return out


class Live:
    """An engine with the default detectors running in a thread, its streams' states sampled every 20 ms,
    and the ffmpeg senders of a test, all stopped on exit whatever happened."""

    def __init__(self, tmp: Path, queue_frames: int = 64) -> None:
        self.tmp = tmp
        self.sink = MemorySink()
        self.statuses: dict[str, list[str]] = {}
        self.engine = Engine(self.sink, queue_frames=queue_frames,
                             on_status=lambda rt, kind, msg: self.statuses.setdefault(rt.id, []).append(kind))
        self.streams: dict[str, StreamRuntime] = {}
        self.taps: dict[str, Tap] = {}
        self.states: dict[str, list[str]] = {}
        self.senders: list[subprocess.Popen] = []
        self._done = threading.Event()
        self._runner = threading.Thread(target=self.engine.run, kwargs={"until_done": False}, daemon=True)
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> Live:
        self._runner.start()
        self._sampler.start()
        return self

    def __exit__(self, *exc) -> None:
        for p in self.senders:
            self.kill(p)
        self.stop(check=exc[0] is None)

    def _sample(self) -> None:
        while not self._done.wait(0.02):
            for sid, rt in list(self.streams.items()):
                seen = self.states.setdefault(sid, [])
                if not seen or seen[-1] != rt.state:
                    seen.append(rt.state)

    def add(self, sid: str, url: str, options: SourceOptions = FAST) -> StreamRuntime:
        rt = self.engine.add_stream(StreamSpec(sid, url, resolve_detectors(FramewatchConfig()), options))
        self.taps[sid] = Tap(rt)
        self.streams[sid] = rt
        return rt

    def send(self, args: list[str], output: list[str]) -> subprocess.Popen:
        log = (self.tmp / f"ffmpeg-{len(self.senders)}.log").open("w")
        p = subprocess.Popen(["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-y", *args, *output],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
        log.close()
        self.senders.append(p)
        return p

    @staticmethod
    def kill(p: subprocess.Popen) -> None:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)

    def stop(self, check: bool = True) -> None:
        """Stop the engine (before the senders go, in the tests' normal path: an engine stopped while its
        input is down would rightly report that outage too)."""
        self.engine.stop()
        self._runner.join(timeout=20)
        self._done.set()
        self._sampler.join(timeout=5)
        if check:
            assert not self._runner.is_alive(), "the engine did not stop"
        for sid, rt in self.streams.items():  # the final state, after the last sample
            if self.states.get(sid, [None])[-1] != rt.state:
                self.states.setdefault(sid, []).append(rt.state)

    def wait(self, cond: Callable[[], bool], timeout: float, what: str) -> float:
        """Poll until `cond` holds; the seconds it took. Fails the test with what the streams did."""
        t0 = time.monotonic()
        while not cond():
            if time.monotonic() - t0 > timeout:
                pytest.fail(f"{what}: not within {timeout} s\n{self.describe()}")
            time.sleep(0.02)
        return time.monotonic() - t0

    def describe(self) -> str:
        lines = []
        for sid, rt in self.streams.items():
            lines.append(f"{sid}: state {rt.state}, states {self.states.get(sid)}, statuses {self.statuses.get(sid)}, "
                         f"scored {rt.stats.frames_scored}, errors {rt.errors}, {rt.counters}")
        lines += [f"event {e.type} {e.status.value} start={e.start:.2f} end={e.end}" for e in self.sink.events]
        for log in sorted(self.tmp.glob("ffmpeg-*.log")):
            text = log.read_text().strip()
            if text:
                lines.append(f"{log.name}: {text[-500:]}")
        return "\n".join(lines)

    def events(self, kind: str, sid: str | None = None) -> list[Event]:
        return [e for e in self.sink.events if e.type == kind and (sid is None or e.stream == sid)]

    def fired(self, kind: str, sid: str | None = None) -> bool:
        return any(e.status.value == "firing" for e in self.events(kind, sid))

    def resolved(self, kind: str, sid: str | None = None) -> bool:
        return any(e.status.value == "resolved" for e in self.events(kind, sid))


@pytest.fixture
def live_dir():
    with tempfile.TemporaryDirectory(prefix="framewatch-live-") as d:
        yield Path(d)


def _assert_time_runs_forward(live: Live, sid: str) -> None:
    """Media time of what the source handed out, and of every event, never negative and never backwards."""
    tap = live.taps[sid]
    v = np.array([t for t, _, _ in tap.video])
    a = np.array(tap.audio)
    assert v.size and a.size
    assert v[0] >= 0 and a[0] >= 0, (v[0], a[0])
    assert np.all(np.diff(v) > 0), np.flatnonzero(np.diff(v) <= 0)
    assert np.all(np.diff(a) > 0), np.flatnonzero(np.diff(a) <= 0)
    for e in live.sink.events:
        assert e.start >= 0, e
        if e.status.value == "resolved":
            assert e.end >= e.start, e


def _assert_no_false_picture_alerts(live: Live) -> None:
    alerts = [(e.type, e.status.value, round(e.start, 2)) for e in live.sink.events if e.type in ("freeze", "black")]
    assert alerts == [], f"false alerts on a moving picture: {alerts}\n{live.describe()}"


def _assert_one_outage(live: Live, sid: str, gap_from: float) -> tuple[Event, Event]:
    """Exactly one no_signal event, fired where the pictures stopped and resolved after it."""
    outages = live.events("no_signal", sid)
    assert [e.status.value for e in outages] == ["firing", "resolved"], live.describe()
    firing, resolved = outages
    assert firing.id == resolved.id
    assert firing.threshold == ONSET and firing.value >= ONSET
    assert gap_from - 1e-6 <= firing.start <= gap_from + 1.5
    # The outage lasted at least the onset; media time covers it instead of running on without a gap.
    assert resolved.end - firing.start >= ONSET
    return firing, resolved


# -- the timing rules, without ffmpeg -----------------------------------------------------------------------

DUR = 0.04
AAC = 1024  # samples per AAC frame
FIRST_PTS = 1.4  # where a fresh ffmpeg's MPEG-TS timestamps start


def _run(tl: Timeline, clock: AudioClock, raw0: float, seconds: float, wall0: float) -> float:
    """`seconds` of pictures and audio from raw time raw0 on, arriving in real time from wall0; the wall
    time at the end."""
    for i in range(round(seconds / DUR)):
        tl.map(raw0 + i * DUR, DUR, wall0 + i * DUR)
    for i in range(round(seconds * AUDIO_RATE / AAC)):
        clock.map(raw0 - AAC / AUDIO_RATE + i * AAC / AUDIO_RATE, AAC, wall0 + i * AAC / AUDIO_RATE)
    return wall0 + seconds


def test_live_sender_restart_is_a_reset_however_short_the_run_before():
    # 3 s of a sender, then a fresh one on the same connection 0.5 s later: its timestamps go back by ~3 s,
    # less than the 5 s a forward jump needs to count, but a live stream never steps back like that.
    tl = Timeline(live=True)
    clock = AudioClock(tl, AUDIO_RATE)
    end = _run(tl, clock, FIRST_PTS, 3.0, 1000.0)
    last = tl.last
    t = tl.map(FIRST_PTS, DUR, end + 0.5)
    assert tl.resets == 1
    assert t == pytest.approx(last + 0.5 + DUR, abs=0.05)  # continues by the wall-clock gap


def test_live_reset_with_audio_first_keeps_audio_and_pictures_together():
    tl = Timeline(live=True)
    clock = AudioClock(tl, AUDIO_RATE)
    end = _run(tl, clock, FIRST_PTS, 2.0, 1000.0)
    last_picture, audio_next = tl.last, clock.next
    # The restarted sender's first audio arrives 0.5 s later, before any of its pictures.
    start, jumped = clock.map(FIRST_PTS - AAC / AUDIO_RATE, AAC, end + 0.5)
    assert tl.resets == 1 and jumped
    assert start == pytest.approx(max(last_picture, audio_next) + 0.5, abs=0.05)
    # A picture of the old timestamps the decoder still held keeps its place: no second reset.
    assert tl.map(FIRST_PTS + 2.0, DUR, end + 0.51) == pytest.approx(last_picture + DUR)
    # The new pictures line up with the new audio (1024 samples of AAC priming before them).
    first = tl.map(FIRST_PTS, DUR, end + 0.52)
    assert first == pytest.approx(start + AAC / AUDIO_RATE, abs=1e-6)
    assert tl.map(FIRST_PTS + DUR, DUR, end + 0.56) == pytest.approx(first + DUR)
    assert tl.resets == 1


def test_live_reconnect_after_a_long_outage_is_no_reset():
    tl = Timeline(live=True)
    clock = AudioClock(tl, AUDIO_RATE)
    end = _run(tl, clock, FIRST_PTS, 2.0, 1000.0)
    last = tl.last
    tl.reconnected()
    clock = AudioClock(tl, AUDIO_RATE)  # a new connection, a new clock
    audio, _ = clock.map(FIRST_PTS - AAC / AUDIO_RATE, AAC, end + 8.0)  # 8 s later, more than JUMP
    picture = tl.map(FIRST_PTS, DUR, end + 8.01)
    assert tl.resets == 0
    assert audio == pytest.approx(last + 8.0, abs=0.05)
    assert picture == pytest.approx(audio + AAC / AUDIO_RATE, abs=1e-6)


def test_live_audio_hole_in_step_with_the_pictures_is_a_gap_not_a_reset():
    tl = Timeline(live=True)
    clock = AudioClock(tl, AUDIO_RATE)
    for i in range(25):
        clock.map(FIRST_PTS + i * AAC / AUDIO_RATE, AAC, 1000.0 + i * AAC / AUDIO_RATE)
    for i in range(300):  # 12 s of pictures while the audio is missing
        tl.map(FIRST_PTS + i * DUR, DUR, 1000.0 + i * DUR)
    t, jumped = clock.map(FIRST_PTS + 12.0, AAC, 1012.0)
    assert jumped and tl.resets == 0
    assert t == pytest.approx(12.0, abs=1e-6)


def _metrics(pts: list[float]) -> VideoMetrics:
    p = np.array(pts)
    return VideoMetrics(stream="s", pts=p, duration=np.full(p.shape, DUR), values={}, small=None, last=None,
                        prev_small=None)


def test_no_signal_is_not_resolved_by_pictures_from_before_the_outage():
    events: list[Event] = []
    ctx = StreamContext(stream="s", emit=events.append, live=True)
    det = NoSignalDetector(NoSignalConfig(), ctx)
    ctx.extra["last_arrival"] = 100.0
    det.on_video(_metrics([0.0, 0.04]))
    det.on_tick(100.0, 0.08)
    det.on_tick(102.5, 0.08)
    assert [e.status.value for e in events] == ["firing"] and events[0].start == pytest.approx(0.08)
    # At the read timeout the source hands out what the demuxer still had (not an arrival), and the engine
    # scores the picture it had held back: both from before the outage.
    det.on_video(_metrics([0.08, 0.12]))
    det.on_tick(103.0, 0.16)
    det.on_video(_metrics([0.16]))
    assert len(events) == 1
    # Then the signal really comes back.
    ctx.extra["last_arrival"] = 106.0
    det.on_video(_metrics([6.0, 6.04]))
    assert [e.status.value for e in events] == ["firing", "resolved"]
    assert events[1].end == pytest.approx(6.0)


def test_queue_wait_taken_returns_when_the_tick_has_taken_the_pictures():
    q = StreamQueue(StreamCounters(), max_video=8)
    assert q.wait_taken(0.01)  # nothing queued
    q.put_video(VideoFrame(pts=0.0, duration=DUR, luma=None, small=None))
    assert not q.wait_taken(0.05)
    threading.Timer(0.1, lambda: q.drain(8)).start()
    t0 = time.monotonic()
    assert q.wait_taken(5.0)
    assert time.monotonic() - t0 < 2.0
    q.put_video(VideoFrame(pts=0.04, duration=DUR, luma=None, small=None))
    threading.Timer(0.1, q.close).start()
    assert not q.wait_taken(5.0)  # a closed queue: nobody will take them


# -- 1. UDP: the sender dies and comes back ------------------------------------------------------------------


@live
@pytest.mark.timeout(120)
def test_udp_sender_killed_and_restarted(live_dir):
    port = _free_port(socket.SOCK_DGRAM)
    out = ["-f", "mpegts", f"udp://127.0.0.1:{port}?pkt_size=1316"]
    # A read timeout longer than the no_signal onset, as with the defaults (5 s and 2 s): the event must fire
    # before the source gives up on the connection, and stay open when it does.
    options = SourceOptions(open_timeout=5.0, read_timeout=3.0, backoff_initial=0.2, backoff_max=1.0)
    with Live(live_dir) as live:
        first = live.send(_encode(), out)
        rt = live.add("udp", f"udp://127.0.0.1:{port}", options)
        live.wait(lambda: rt.stats.frames_scored >= 50, 20, "pictures from the first sender")
        assert rt.state == "running" and (rt.info.width, rt.info.height) == (320, 240)

        live.kill(first)
        killed = time.monotonic()
        gap_from = rt.stats.media_end  # close to it: what was in flight still arrives
        detected = live.wait(lambda: live.fired("no_signal"), 10, "no_signal event after the kill")
        assert ONSET - 0.1 <= detected <= ONSET + 3.0, detected
        live.wait(lambda: rt.state == "no_signal", 10, "state no_signal after the kill")
        went_down = time.monotonic() - killed
        frames_in_gap = rt.counters.video_frames
        # Hold the outage a while: nothing arrives, nothing but no_signal is said about it.
        while time.monotonic() - killed < 6.0:
            time.sleep(0.05)
        assert rt.counters.video_frames == frames_in_gap
        assert rt.state == "no_signal"
        # Still the one open event: what the demuxer had buffered when the read timed out is no signal.
        assert [e.status.value for e in live.events("no_signal")] == ["firing"]
        _assert_no_false_picture_alerts(live)

        live.send(_encode(), out)
        back = time.monotonic()
        live.wait(lambda: rt.counters.video_frames >= frames_in_gap + 25, 20, "pictures after the restart")
        live.wait(lambda: live.resolved("no_signal"), 10, "no_signal resolved")
        live.wait(lambda: rt.state == "running", 5, "state running again")
        recovered = time.monotonic() - back
        # Another 3 s of pictures: a freeze or black state machine set off by the gap would fire by then.
        scored = rt.stats.frames_scored
        live.wait(lambda: rt.stats.frames_scored >= scored + 75, 20, "3 s of pictures after the restart")
        live.stop()

    print(f"udp: no_signal state {went_down:.2f} s and event {detected:.2f} s after the kill; "
          f"back {recovered:.2f} s after the restart")
    _assert_one_outage(live, "udp", gap_from)
    _assert_no_false_picture_alerts(live)
    _assert_time_runs_forward(live, "udp")
    assert live.states["udp"] == ["starting", "running", "no_signal", "running", "ended"], live.states
    statuses = live.statuses["udp"]
    assert statuses[0] == "connected" and statuses.count("connected") == 2 and statuses[-1] == "eof"
    assert "disconnected" in statuses[1:statuses.index("connected", 1)]
    c = rt.counters
    assert c.reconnects == 1, c
    assert c.timestamp_resets == 0, c  # a new connection re-anchors: that is not a reset within one
    assert rt.errors == []


# -- 2. corrupted packets ------------------------------------------------------------------------------------


@live
@pytest.mark.timeout(90)
def test_udp_corrupted_packets_are_counted_and_the_stream_goes_on(live_dir):
    bad_port, good_port = _free_port(socket.SOCK_DGRAM), _free_port(socket.SOCK_DGRAM)
    # FFmpeg's noise bitstream filter garbles about one byte in 500 of every inter-frame packet: key frames
    # stay clean, so the decoder conceals errors for the rest of each second and recovers at the next key.
    noise = ("-bsf:v", r"noise=amount=if(key\,0\,500)")
    with Live(live_dir) as live:
        live.send(_encode(extra=noise), ["-f", "mpegts", f"udp://127.0.0.1:{bad_port}?pkt_size=1316"])
        live.send(_encode(), ["-f", "mpegts", f"udp://127.0.0.1:{good_port}?pkt_size=1316"])
        bad = live.add("bad", f"udp://127.0.0.1:{bad_port}")
        good = live.add("good", f"udp://127.0.0.1:{good_port}")
        live.wait(lambda: bad.counters.corrupt_frames >= 25 and bad.stats.frames_scored >= 100, 30,
                  "damaged pictures counted")
        live.wait(lambda: good.stats.frames_scored >= 100, 10, "the clean stream's pictures")
        live.stop()

    print(f"corrupted: {bad.counters.corrupt_frames} corrupt frames, {bad.counters.decode_errors} decode errors "
          f"of {bad.counters.video_frames} pictures")
    assert bad.counters.corrupt_frames >= 25
    # The damage is counted, not raised: the stream ran throughout and said nothing was wrong with its input.
    assert live.states["bad"] == ["starting", "running", "ended"], live.states
    assert live.statuses["bad"] == ["connected", "eof"]
    assert bad.errors == [] and bad.counters.reconnects == 0
    assert live.events("no_signal") == []
    # The other stream in the process is untouched.
    assert live.states["good"] == ["starting", "running", "ended"]
    g = good.counters
    assert (g.corrupt_frames, g.decode_errors, g.reconnects) == (0, 0, 0), g
    assert [e for e in live.sink.events if e.stream == "good"] == []
    _assert_time_runs_forward(live, "bad")


# -- 3. a new picture size and reset timestamps within one connection ---------------------------------------


@live
@pytest.mark.timeout(120)
def test_udp_restart_at_another_size_resets_timestamps(live_dir):
    port = _free_port(socket.SOCK_DGRAM)
    out = ["-f", "mpegts", f"udp://127.0.0.1:{port}?pkt_size=1316"]
    # A read timeout longer than a sender restart: the new sender arrives on the same connection, so the
    # source sees the stream's own timestamps jump, as after an encoder restart behind a gateway.
    options = SourceOptions(open_timeout=5.0, read_timeout=6.0, backoff_initial=0.2, backoff_max=1.0)
    with Live(live_dir) as live:
        first = live.send(_encode("320x240"), out)
        rt = live.add("udp", f"udp://127.0.0.1:{port}", options)
        tap = live.taps["udp"]
        live.wait(lambda: rt.stats.frames_scored >= 75, 20, "pictures from the first sender")

        # A fresh ffmpeg starts its timestamps again near 1.4 s, 3 s or more back: a backward reset.
        live.kill(first)
        second = live.send(_encode("640x360"), out)
        live.wait(lambda: len(tap.sizes()) == 2 and tap.current_run() >= 75, 20, "640x360 pictures")
        assert (rt.info.width, rt.info.height) == (640, 360)
        assert rt.counters.timestamp_resets == 1

        # And one whose timestamps start 10 minutes on: a forward reset, back at the first size.
        live.kill(second)
        live.send(_encode("320x240", extra=("-output_ts_offset", "600")), out)
        live.wait(lambda: len(tap.sizes()) == 3 and tap.current_run() >= 75, 20, "320x240 pictures again")
        assert (rt.info.width, rt.info.height) == (320, 240)
        scored = rt.stats.frames_scored
        live.wait(lambda: rt.stats.frames_scored >= scored + 25, 10, "pictures scored at the new size")
        live.stop()

    c = rt.counters
    assert c.timestamp_resets == 2, c
    assert c.reconnects == 0, c
    assert live.statuses["udp"][:1] == ["connected"] and "disconnected" not in live.statuses["udp"]
    assert tap.sizes() == [(320, 240), (640, 360), (320, 240)]
    assert rt.stats.frames_scored >= len(tap.video) - 1  # every picture, of every size, was scored
    _assert_time_runs_forward(live, "udp")
    # The pictures' time went on by about the wall-clock time, not by the 10 minutes the timestamps jumped.
    v = np.array([t for t, _, _ in tap.video])
    assert np.max(np.diff(v)) < options.read_timeout, np.max(np.diff(v))
    # Audio and pictures stay together across the resets (audio re-anchors with the pictures, not seconds
    # behind or ahead of them).
    assert abs(tap.audio[-1] - v[-1]) < 1.0, (tap.audio[-1], v[-1])
    assert c.audio_overlaps == 0, c
    _assert_no_false_picture_alerts(live)
    assert live.events("no_signal") == [] or [e.status.value for e in live.events("no_signal")] == ["firing", "resolved"]
    assert rt.errors == []


# -- 4. other live protocols ---------------------------------------------------------------------------------


@live
@pytest.mark.timeout(120)
@pytest.mark.parametrize("protocol", ["tcp", "rtp"])
def test_other_protocol_sender_killed_and_restarted(live_dir, protocol):
    if protocol == "tcp":
        # The sender listens, the engine connects: a restarted sender is found by the engine's reconnects.
        port = _free_port(socket.SOCK_STREAM)
        out = ["-f", "mpegts", f"tcp://127.0.0.1:{port}?listen=1"]
    else:
        port = _free_port(socket.SOCK_DGRAM, pair=True)
        out = ["-f", "rtp_mpegts", f"rtp://127.0.0.1:{port}"]
    url = f"{protocol}://127.0.0.1:{port}"

    def start_sender() -> subprocess.Popen:
        p = live.send(_encode(), out)
        if protocol == "tcp":
            live.wait(lambda: _tcp_listening(port) or p.poll() is not None, 10, "the sender listening")
        return p

    with Live(live_dir) as live:
        first = start_sender()
        rt = live.add(protocol, url)
        live.wait(lambda: rt.stats.frames_scored >= 50, 20, "pictures from the first sender")
        assert rt.info.container == ("mpegts" if protocol == "tcp" else "rtp")

        live.kill(first)
        gap_from = rt.stats.media_end
        went_down = live.wait(lambda: rt.state == "no_signal", 10, "state no_signal after the kill")
        detected = live.wait(lambda: live.fired("no_signal"), 10, "no_signal event after the kill") + went_down
        frames_in_gap = rt.counters.video_frames
        _assert_no_false_picture_alerts(live)

        start_sender()
        live.wait(lambda: rt.counters.video_frames >= frames_in_gap + 50, 20, "pictures after the restart")
        live.wait(lambda: live.resolved("no_signal"), 10, "no_signal resolved")
        live.wait(lambda: rt.state == "running", 5, "state running again")
        live.stop()

    print(f"{protocol}: no_signal state {went_down:.2f} s and event {detected:.2f} s after the kill")
    assert ONSET - 0.1 <= detected <= ONSET + 3.0, detected
    _assert_one_outage(live, protocol, gap_from)
    _assert_no_false_picture_alerts(live)
    _assert_time_runs_forward(live, protocol)
    assert live.states[protocol] == ["starting", "running", "no_signal", "running", "ended"], live.states
    assert live.statuses[protocol].count("connected") == 2
    assert rt.counters.reconnects == 1, rt.counters
    assert rt.errors == []


# -- 5. bounded memory --------------------------------------------------------------------------------------


@live
@pytest.mark.timeout(150)
def test_queue_and_memory_stay_bounded(live_dir):
    port = _free_port(socket.SOCK_DGRAM)
    out = ["-f", "mpegts", f"udp://127.0.0.1:{port}?pkt_size=1316"]
    limit = 16
    with Live(live_dir, queue_frames=limit) as live:
        # Scoring slowed to one batch a second, slower than the pictures come: the queue must drop its oldest
        # pictures (counted), never grow.
        slow = threading.Event()
        score_video = live.engine.scoring.score_video

        def slowed(works):
            if slow.is_set():
                time.sleep(1.0)
            return score_video(works)

        live.engine.scoring.score_video = slowed
        sender = live.send(_encode(), out)
        rt = live.add("udp", f"udp://127.0.0.1:{port}")
        tap = live.taps["udp"]
        live.wait(lambda: rt.stats.frames_scored >= 25, 20, "pictures")
        slow.set()
        live.wait(lambda: rt.counters.frames_dropped >= 25, 15, "pictures dropped while the scoring is slow")
        slow.clear()
        assert tap.max_queued <= limit
        assert rt.state == "running" and not live.fired("no_signal")  # slow scoring is not a lost signal
        live.kill(sender)
        live.wait(lambda: live.fired("no_signal"), 10, "no_signal after the kill")

        # Senders four times faster than real time, each for 2 s, then gone. The source must not hold their
        # pictures back to media time: the backlog would sit in the socket buffer, stale pictures would come
        # for seconds after the sender stopped, and the outage would be reported that much later.
        rss_before = _rss_mb()
        rss: list[float] = []
        latencies: list[float] = []
        for cycle in range(4):
            before = rt.counters.video_frames
            outages = len(live.events("no_signal"))
            burst = live.send(_encode(seconds=8, rate=4), out)
            live.wait(lambda before=before: rt.counters.video_frames >= before + 25, 20, f"pictures of burst {cycle}")
            live.wait(lambda burst=burst: burst.poll() is not None, 20, f"burst {cycle} sent")
            gone = time.monotonic()
            live.wait(lambda outages=outages: len(live.events("no_signal")) >= outages + 2, 15,
                      f"a new outage after burst {cycle}")
            latencies.append(time.monotonic() - gone)
            # 8 s of media sent in 2 s: held back to media time, the rest would come out over 6 s more.
            assert latencies[-1] <= ONSET + 2.0, latencies
            assert tap.max_queued <= limit
            rss.append(_rss_mb())
        live.stop()

    growth = max(rss[1:]) - rss[0]  # the first cycle warms up allocator pools; growth after it is a leak
    print(f"bounded: queue max {tap.max_queued}/{limit}, {rt.counters.frames_dropped} pictures dropped, "
          f"no_signal {', '.join(f'{t:.2f}' for t in latencies)} s after each fast sender stopped, "
          f"RSS {rss_before:.0f} MB before, {', '.join(f'{r:.0f}' for r in rss)} MB after each cycle "
          f"(growth after the first {growth:+.1f} MB)")
    assert tap.max_queued <= limit
    assert growth < 60, rss
    assert max(rss) - rss_before < 60, (rss_before, rss)
    assert rt.counters.reconnects >= 4
    assert rt.errors == []
    _assert_no_false_picture_alerts(live)
    _assert_time_runs_forward(live, "udp")


@live
def test_check_watches_a_live_url_for_its_duration():
    """`framewatch check` on a live URL watches it for --duration seconds and reports like a file (it once
    waited for an end that a live input never has); a URL that gives nothing is an error, with the reason."""
    from media import Cli, json_lines

    port = _free_port(socket.SOCK_DGRAM)
    sender = subprocess.Popen(["ffmpeg", "-hide_banner", "-loglevel", "error", "-re", "-f", "lavfi", "-i",
                               "color=black:size=320x240:rate=25", "-f", "lavfi", "-i", "sine=frequency=1000:sample_rate=48000",
                               "-t", "30", "-c:v", "libx264", "-preset", "ultrafast", "-g", "25", "-c:a", "aac",
                               "-f", "mpegts", f"udp://127.0.0.1:{port}?pkt_size=1316"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        t0 = time.monotonic()
        proc = Cli("check", "--json", "--duration", "5", f"udp://127.0.0.1:{port}", timeout=40).result()
        took = time.monotonic() - t0
    finally:
        sender.kill()
        sender.wait()
    assert proc.returncode == 1, proc.stderr
    (report,) = json_lines(proc.stdout)
    assert report["errors"] == [] and report["video"]["frames"] > 50
    assert [e["type"] for e in report["events"] if e["type"] == "black"] == ["black"]
    assert took < 30  # 5 s watched, plus start-up

    refused = Cli("check", "--json", "--duration", "1", "tcp://127.0.0.1:9", timeout=30).result()
    assert refused.returncode == 2
    (report,) = json_lines(refused.stdout)
    assert report["errors"][0].startswith("no media within 1 s (cannot open: ") and "Connection refused" in report["errors"][0]
    assert refused.stderr.splitlines() == [f"framewatch: error: tcp://127.0.0.1:9: {report['errors'][0]}"]


def test_mpeg_ts_over_http_is_live_files_over_http_are_files():
    from engine.sources import is_live_url

    assert is_live_url("http://iptv.example/channel/1.ts") and is_live_url("https://cdn.example/live.m3u8")
    assert not is_live_url("http://vod.example/movie.mp4") and not is_live_url("https://a.example/clip.mkv")
