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
from engine.media import AUDIO_RATE, SourceStatus
from engine.sources.base import AudioClock, Source, SourceError, SourceOptions, Timeline

log = logging.getLogger(__name__)

LIVE_SCHEMES = {"udp", "rtp", "srt", "rtmp", "rtmps", "rtsp", "rtsps", "tcp", "http", "https", "hls"}


def is_live_url(url: str) -> bool:
    scheme = urlparse(url).scheme.lower()
    if scheme in ("http", "https"):
        # Plain HTTP files are files; playlists and everything else over HTTP are treated as live.
        path = urlparse(url).path.lower()
        return not any(path.endswith(ext) for ext in (".mp4", ".mkv", ".mov", ".ts", ".avi", ".mpg", ".wav"))
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
        if not self.live:
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
        return av.open(path, options=opts, timeout=(self.options.open_timeout, self.options.read_timeout))

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
        if not self.live and timeline.origin is None:
            starts = [float(s.start_time * s.time_base) for s in (vs, as_) if s is not None and s.start_time is not None]
            if starts:
                timeline.origin = min(starts)
        queue.put_status(SourceStatus("connected", "", time.time(), info=info))
        clock = AudioClock(timeline, AUDIO_RATE)
        realtime = self.realtime
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

        def push_video(items) -> None:
            for raw, frame in items:
                now = time.time()
                frame.pts = timeline.map(raw, frame.duration, now)
                if tiers is not None:
                    # A frame of a sparse tier stands for the time since the previous decoded one.
                    if last_pts and frame.pts > last_pts[0]:
                        frame.duration = frame.pts - last_pts[0]
                    last_pts[:] = [frame.pts]
                frame.index = counters.video_frames
                counters.video_frames += 1
                counters.timestamp_resets = timeline.resets
                if frame.corrupt:
                    counters.corrupt_frames += 1
                pace(frame.pts)
                queue.put_video(frame, now)

        def push_audio(items) -> None:
            for raw, chunk in items:
                chunk.pts, jumped = clock.map(raw, chunk.samples.shape[-1])
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
                counters.audio_chunks += 1
                queue.put_audio(chunk, time.time())

        try:
            for packet in container.demux(*streams):
                if stop.is_set() or queue.closed:
                    return True
                if packet.size == 0:
                    continue  # demuxer's end-of-stream marker; decoders are flushed below
                if packet.stream is vs:
                    if tiers is not None and not tiers.keep(memoryview(packet), packet.is_keyframe):
                        counters.packets_skipped += 1
                        continue
                    push_video(vdec.decode(packet))
                    counters.decode_errors = vdec.errors + (adec.errors if adec else 0)
                elif packet.stream is as_:
                    push_audio(adec.decode(packet))
                    counters.decode_errors = (vdec.errors if vdec else 0) + adec.errors
        except av.error.EOFError:
            pass
        except (av.error.ExitError, TimeoutError, av.error.OSError) as exc:
            if self.live:
                queue.put_status(SourceStatus("disconnected", describe_error(exc), time.time()))
                return False
            raise
        except av.error.InvalidDataError as exc:
            # A truncated or damaged file: what was readable has been analysed; say so and stop cleanly.
            counters.decode_errors += 1
            queue.put_status(SourceStatus("error", f"input damaged, stopped reading: {describe_error(exc)}", time.time()))
            return True
        if vdec is not None:
            push_video(vdec.flush())
        if adec is not None:
            push_audio(adec.flush())
        return not self.live
