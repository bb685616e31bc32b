"""Files and live URLs through FFmpeg (PyAV): demux, decode, normalise timestamps, reconnect with backoff."""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from urllib.parse import urlparse

import av

from engine.batch import StreamQueue
from engine.decode import PyAVAudioDecoder, Tier, TierFilter, video_decoder
from engine.media import AUDIO_RATE, SourceStatus, VideoFrame
from engine.sources.base import AudioClock, Source, SourceError, SourceOptions, Timeline

log = logging.getLogger(__name__)

LIVE_SCHEMES = {"udp", "rtp", "srt", "rtmp", "rtmps", "rtsp", "rtsps", "tcp", "http", "https", "hls"}
# Protocols whose sender sets the pace: media arrives as it is produced. Holding their frames back to media
# time only moves any backlog (a sender faster than real time, a sender clock running fast) into the socket
# buffer, where every later frame waits behind it and an outage hides behind stale pictures for as long as
# the backlog lasts. Pulled inputs (HLS, HTTP) fetch whole segments at once and are still held to media time.
SENDER_PACED = {"udp", "rtp", "srt", "tcp", "rtmp", "rtmps", "rtsp", "rtsps"}


def is_local_url(url: str) -> bool:
    """A path on this machine: no scheme, file://, or a Windows drive letter (which urlparse takes for one)."""
    scheme = urlparse(url).scheme.lower()
    return scheme in ("", "file") or len(scheme) == 1


def is_live_url(url: str) -> bool:
    scheme = urlparse(url).scheme.lower()
    if scheme in ("http", "https"):
        # Plain HTTP files are files; playlists and everything else over HTTP are treated as live, MPEG-TS too:
        # IPTV channels are served as endless http://host/channel.ts (VOD comes as MP4 or HLS).
        path = urlparse(url).path.lower()
        return not any(path.endswith(ext) for ext in (".mp4", ".mkv", ".mov", ".avi", ".mpg", ".wav"))
    return scheme in LIVE_SCHEMES


def describe_error(exc: BaseException) -> str:
    """One line a user can act on."""
    if isinstance(exc, FileNotFoundError):
        return f"no such file: {exc.filename}"
    if isinstance(exc, IsADirectoryError):
        return f"is a directory, not a media file: {exc.filename}"
    if isinstance(exc, PermissionError):
        return f"permission denied: {exc.filename}"
    if isinstance(exc, av.error.InvalidDataError):
        return "not a readable media file (invalid data found when processing input)"
    if isinstance(exc, (av.error.ExitError, TimeoutError)):
        return "no data within the read timeout"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text


class MediaSource(Source):
    def __init__(self, url: str, options: SourceOptions) -> None:
        self.live = is_live_url(url)
        super().__init__(url, options)
        self.info.live = self.live
        self.video_errors = 0
        self.audio_errors = 0

    def _open(self) -> av.container.InputContainer:
        path = self.url[len("file://"):] if self.url.startswith("file://") else self.url
        if is_local_url(self.url):
            if not os.path.exists(path):
                raise FileNotFoundError(2, "No such file", path)
            if os.path.isdir(path):
                raise IsADirectoryError(21, "Is a directory", path)
        opts: dict[str, str] = {}
        if self.live:
            us = str(int(self.options.read_timeout * 1_000_000))
            scheme = urlparse(self.url).scheme.lower()
            if scheme in ("rtsp", "rtsps"):
                opts["timeout"] = us
                opts["rtsp_transport"] = "tcp"
            elif scheme in ("udp", "rtp"):
                opts["timeout"] = us
                opts["overrun_nonfatal"] = "1"
                opts["fifo_size"] = "1000000"
            else:
                opts["rw_timeout"] = us
        # Tags in another encoding than UTF-8 (Latin-1 titles are common) must not make a playable input
        # unreadable: undecodable bytes become U+FFFD.
        return av.open(path, options=opts, timeout=(self.options.open_timeout, self.options.read_timeout),
                       metadata_errors="replace")

    def run(self, queue: StreamQueue, stop: threading.Event) -> None:
        timeline = Timeline(self.live)
        delay = self.options.backoff_initial
        connected_once = False
        while not stop.is_set():
            try:
                container = self._open()
            except Exception as exc:  # any open failure is this stream's problem alone
                msg = describe_error(exc)
                if not self.live or not self.options.reconnect:
                    queue.put_status(SourceStatus("error", msg, time.time()))
                    queue.put_status(SourceStatus("eof", "", time.time()))
                    return
                queue.put_status(SourceStatus("disconnected", f"cannot open: {msg}", time.time()))
                if stop.wait(delay * (0.8 + 0.4 * random.random())):
                    break
                delay = min(delay * 2, self.options.backoff_max)
                continue
            if connected_once:
                queue.counters.reconnects += 1
                timeline.reconnected()
            connected_once = True
            delay = self.options.backoff_initial
            try:
                finished = self._pump(container, queue, stop, timeline)
            except Exception as exc:
                finished = not self.live
                queue.put_status(SourceStatus("error", describe_error(exc), time.time()))
            finally:
                container.close()
            if finished or not self.live or not self.options.reconnect:
                break
            # The tick handles a drain's news before its pictures: the pictures that came before the end (the
            # decoder's last ones) must be taken first, or they would count as the signal coming back.
            queue.wait_taken(1.0)
            queue.put_status(SourceStatus("disconnected", "input ended or stalled; reconnecting", time.time()))
            if stop.wait(delay):
                break
        queue.put_status(SourceStatus("eof", "", time.time()))

    def _reuse(self, vs: av.video.stream.VideoStream):
        """The GPU decoder of the previous connection, taking the new input's packets: NVDEC sessions are
        created once per stream, not once per reconnect."""
        old = getattr(self, "_vdec", None)
        if old is None or not hasattr(old, "rebind"):
            return None
        try:
            old.rebind(vs)
        except Exception as exc:  # another codec now: a new session
            log.info("%s: new decoder session: %s", self.url, exc)
            return None
        return old

    def _pump(self, container: av.container.InputContainer, queue: StreamQueue, stop: threading.Event, timeline: Timeline) -> bool:
        """Read until end of input (True) or a live stall (False)."""
        v_streams = container.streams.video if self.options.video else ()
        a_streams = container.streams.audio if self.options.audio else ()
        vs = v_streams[0] if v_streams else None
        as_ = a_streams[0] if a_streams else None
        if vs is None and as_ is None:
            raise SourceError("no audio or video stream in the input")
        info = self.info
        info.container = container.format.name
        vdec = adec = None
        tiers: TierFilter | None = None
        if vs is not None:
            vdec, fallback = self._reuse(vs), None
            if vdec is None:
                vdec, fallback = video_decoder(
                    vs, self.options.decoder, self.options.threads, self.options.device, self.options.tier,
                    self.options.keep_luma)
            self._vdec = vdec
            info.decoder = vdec.backend
            if fallback:
                queue.counters.decoder_fallbacks += 1
                info.decoder_note = fallback
                log.warning("%s: %s", self.url, fallback)
            if Tier(self.options.tier) is not Tier.ALL:
                tiers = TierFilter.for_stream(self.options.tier, vs)
            info.tier = self.options.tier
            info.video_codec = vs.codec_context.name
            info.width, info.height = vs.codec_context.width, vs.codec_context.height
            info.fps = vdec.fps
        if as_ is not None:
            adec = PyAVAudioDecoder(as_)
            info.audio_codec = as_.codec_context.name
            info.audio_channels = as_.codec_context.channels
            info.audio_rate = as_.codec_context.sample_rate
        if container.duration is not None:
            info.duration = container.duration / 1_000_000
        if timeline.origin is None and timeline.last is None:
            # The earliest stream starts at 0: anchoring on whichever packet comes first would put the other
            # stream's first items (AAC priming comes before the first picture) at negative times.
            starts = [float(s.start_time * s.time_base) for s in (vs, as_) if s is not None and s.start_time is not None]
            if starts and (not self.live or max(starts) - min(starts) < Timeline.JUMP):
                timeline.origin = min(starts)
        queue.put_status(SourceStatus("connected", "", time.time(), info=info))
        clock = AudioClock(timeline, AUDIO_RATE)
        realtime = self.realtime and not (
            self.options.pace == "auto" and urlparse(self.url).scheme.lower() in SENDER_PACED)
        wall0: float | None = None
        media0 = 0.0
        counters = queue.counters
        streams = [s for s in (vs, as_) if s is not None]

        def pace(t: float) -> None:
            nonlocal wall0, media0
            if not realtime:
                return
            now = time.monotonic()
            if wall0 is None:
                wall0, media0 = now, t
            ahead = (t - media0) - (now - wall0)
            if ahead > 0:
                stop.wait(min(ahead, 1.0))

        last_pts: list[float] = []
        resets_seen = [timeline.resets]
        # Wall-clock time of the last item that came in as it arrived. Late items (see below) are put on the
        # timeline as of then and do not count as arrivals: the signal was gone when they came out.
        fresh = [time.time()]

        # A file's picture whose timestamp jumped far ahead waits for the next timestamp (of either track): a
        # real gap puts it at its own time, a lone garbage timestamp leaves it at the cadence (Timeline.outlier).
        deferred: list[tuple[VideoFrame, float | None]] = []

        def settle() -> None:
            if deferred:
                frame, at = deferred.pop()
                if timeline.confirmed is not None:
                    frame.pts, timeline.confirmed = timeline.confirmed, None
                queue.put_video(frame, at)

        def push_video(items, late: bool = False) -> None:
            for raw, frame in items:
                now = fresh[0] if late else time.time()
                fresh[0] = now
                frame.pts = timeline.map(raw, frame.duration, now)
                settle()
                if tiers is not None:
                    # A frame of a sparse tier stands for the time since the previous decoded one.
                    if last_pts and frame.pts > last_pts[0]:
                        frame.duration = frame.pts - last_pts[0]
                    last_pts[:] = [frame.pts]
                if (frame.width, frame.height) != (info.width, info.height):
                    # The sender changed the picture size within the connection (the decoder follows it).
                    log.info("%s: picture size %sx%s -> %dx%d", self.url, info.width, info.height, frame.width, frame.height)
                    info.width, info.height = frame.width, frame.height
                frame.index = counters.video_frames
                counters.video_frames += 1
                counters.timestamp_resets = timeline.resets
                counters.timestamp_outliers = timeline.outliers
                if frame.corrupt:
                    counters.corrupt_frames += 1
                if timeline.deferring:
                    deferred.append((frame, None if late else now))
                    continue
                pace(frame.pts)
                queue.put_video(frame, None if late else now)

        def push_audio(items, late: bool = False) -> None:
            for raw, chunk in items:
                now = fresh[0] if late else time.time()
                fresh[0] = now
                chunk.pts, jumped = clock.map(raw, chunk.samples.shape[-1], now)
                settle()
                chunk.drift = clock.drift
                if jumped:
                    chunk.jump = clock.jump_size
                    if clock.jump_size > 0:
                        counters.audio_gaps += 1
                    else:
                        counters.audio_overlaps += 1
                if timeline.resets != resets_seen[0]:
                    chunk.reset = True
                    resets_seen[0] = timeline.resets
                    counters.timestamp_resets = timeline.resets
                counters.timestamp_outliers = timeline.outliers
                counters.audio_chunks += 1
                queue.put_audio(chunk, None if late else now)

        def take(packet: av.Packet, late: bool = False) -> None:
            if packet.stream is vs:
                if tiers is not None and not tiers.keep(memoryview(packet), packet.is_keyframe):
                    counters.packets_skipped += 1
                    return
                push_video(vdec.decode(packet), late)
                counters.decode_errors = vdec.errors + (adec.errors if adec else 0)
            elif packet.stream is as_:
                push_audio(adec.decode(packet), late)
                counters.decode_errors = (vdec.errors if vdec else 0) + adec.errors

        def stalled(held: list[av.Packet]) -> None:
            """Everything received before a live input stalled or ended after a stall, analysed as late."""
            for p in held:
                take(p, late=True)
            if vdec is not None:
                push_video(vdec.flush(), late=True)
            if adec is not None:
                push_audio(adec.flush(), late=True)

        # When a live read times out (or the input ends), the demuxer first hands out what it still had
        # buffered (MPEG-TS completes its last PES packets): pictures from before the outage, seconds late,
        # that would count as the signal coming back. So packets that come after a long wait are held until
        # the input either fails right after them (they are late) or shows it is alive by bringing more
        # packets than it has streams. A live stream's packets never wait that long otherwise.
        held: list[av.Packet] = []
        long_wait = 0.5 * self.options.read_timeout
        alive_after = len(container.streams) + 1
        packets = container.demux(*streams)
        try:
            while True:
                asked = time.monotonic()
                packet = next(packets, None)
                if packet is None:
                    break
                if stop.is_set() or queue.closed:
                    return True
                if packet.size == 0:
                    continue  # demuxer's end-of-stream marker; decoders are flushed below
                if self.live and (held or time.monotonic() - asked >= long_wait):
                    held.append(packet)
                    if len(held) <= alive_after:
                        continue
                    for p in held:
                        take(p)
                    held.clear()
                    continue
                take(packet)
        except av.error.EOFError:
            pass
        except (av.error.ExitError, TimeoutError, av.error.OSError) as exc:
            if self.live:
                stalled(held)
                # The tick handles a drain's news before its pictures: the late pictures are taken first, or
                # they would count as the signal coming back after the disconnect.
                queue.wait_taken(1.0)
                queue.put_status(SourceStatus("disconnected", describe_error(exc), time.time()))
                return False
            raise
        except av.error.InvalidDataError as exc:
            # A truncated or damaged file: what was readable has been analysed; say so and stop cleanly.
            counters.decode_errors += 1
            settle()
            queue.put_status(SourceStatus("error", f"input damaged, stopped reading: {describe_error(exc)}", time.time()))
            return True
        if held:  # the input ended right after a stall
            stalled(held)
            return not self.live
        if vdec is not None:
            push_video(vdec.flush())
        if adec is not None:
            push_audio(adec.flush())
        settle()  # a last jump nothing came after to confirm: garbage, left at the cadence
        return not self.live
