"""PyAV (FFmpeg) decoding on the CPU: libavcodec, luma straight from the decoder's buffer, and the errors the
decoder reports for each packet as loss evidence."""

from __future__ import annotations

import logging

import av
import numpy as np
import torch
from av.video.reformatter import VideoReformatter

from engine.decode.base import DamageTracker, annex_b
from engine.media import AUDIO_RATE, SMALL_H, SMALL_W, AudioChunk, ColorRange, VideoFrame

log = logging.getLogger(__name__)

# 8-bit formats whose first plane is the luma plane at full size: no conversion needed.
_Y_FIRST = {
    "yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p", "yuvj444p", "yuv440p", "yuvj440p",
    "yuv411p", "yuv410p", "nv12", "nv21", "nv16", "gray", "yuva420p",
}
_FULL_RANGE_FORMATS = {"yuvj420p", "yuvj422p", "yuvj444p", "yuvj440p"}


def capture_decoder_errors() -> None:
    """Once per process: FFmpeg's error messages reach Python, one by one, so `decode_packet` can tell which
    packet the decoder found damaged. PyAV drops FFmpeg's logs by default and folds identical consecutive
    messages into one process-wide ("repeated N times"), which would hide one stream's error behind another's.
    Messages no decode call captures (a demuxer's, a frame thread's) are not logged: per packet they are noise
    for an operator, who sees the stream's error counts and the alerts instead."""
    global _capturing
    if _capturing:
        return
    level = av.logging.get_level()
    if level is None or level < av.logging.ERROR:
        av.logging.set_level(av.logging.ERROR)
    av.logging.set_skip_repeated(False)
    libav = logging.getLogger("libav")
    if libav.level == logging.WARNING:  # PyAV's own default, not a choice of the application's
        libav.setLevel(logging.CRITICAL)
    _capturing = True


_capturing = False


def decode_packet(cc: av.codec.context.CodecContext, packet: av.Packet | None) -> tuple[list, bool, int]:
    """(frames, failed, errors) of one packet (None flushes): the frames it completed, whether the decoder
    refused it, and how many errors the decoder logged while decoding it. FFmpeg's HEVC decoder conceals
    nothing and reports nothing on the pictures (no corrupt flag): a CABAC value out of range, a missing first
    slice or reference is only logged, and decoding goes on with garbage (measured on the corruption data's
    held-out HEVC decodes: every long damage episode the model missed had neither transport nor decoder flags;
    the decoder had logged an error on the first picture of most). Only a decoder running in the calling thread
    logs there (`thread_type` NONE): a frame thread's messages cannot be told apart from another stream's."""
    capture_decoder_errors()
    failed = False
    with av.logging.Capture(local=True) as logs:
        try:
            frames = cc.decode(packet)
        except av.error.EOFError:
            frames = []
        except av.error.FFmpegError as exc:
            frames, failed = [], True
            log.debug("decode error: %s", exc)
    return frames, failed, sum(1 for level, _, _ in logs if level <= av.logging.ERROR)


# Decoders whose logged errors are not loss evidence. FFmpeg's H.264 decoder conceals the damage it finds and flags
# the picture (is_corrupt, which DamageTracker.concealed carries on), so its messages add little, and some of them
# come from whole pictures: box.mp4 (the core's sample clip) opens on a mangled SEI that the decoder reads as a
# P slice in an IDR NAL unit, refuses with an error, and then decodes the key frame whole; counted, that held its
# first GOP (8.4 s) as damaged. Measured on the corruption data's training and validation H.264 decodes: without
# the messages the evidence met 689 of 700 damaged validation pictures against 691 with them, 3,013 of 3,060
# training ones against 3,028, and marked one clean picture fewer.
_CONCEALING = frozenset({"h264"})


def loss_evidence(codec: str, failed: bool, logged: int) -> bool:
    """Whether decode_packet's (failed, logged errors) of one packet mark it damaged for a `codec` decoder: a
    refused packet always, logged errors where the decoder does not conceal and flag what it finds."""
    return failed or (logged > 0 and codec not in _CONCEALING)


def _decode(owner: PyAVVideoDecoder | PyAVAudioDecoder, packet: av.Packet | None) -> list:
    """Frames completed by a packet (None flushes). A damaged packet is counted, never raised: FFmpeg has
    concealed what it could and the stream goes on."""
    try:
        return owner.stream.codec_context.decode(packet)
    except av.error.EOFError:
        return []
    except av.error.FFmpegError as exc:
        owner.errors += 1
        log.debug("%s decode error: %s", owner.stream.type, exc)
        return []


def _plane(frame: av.VideoFrame, index: int, height: int, width: int) -> np.ndarray:
    p = frame.planes[index]
    return np.frombuffer(p, np.uint8).reshape(-1, p.line_size)[:height, :width]


class PyAVVideoDecoder:
    backend = "pyav"

    def __init__(self, stream: av.video.stream.VideoStream, threads: int = 0, low_delay: bool = False) -> None:
        self.stream = stream
        cc = stream.codec_context
        # One thread: the decoder's error messages then arrive in this thread, so they mark this stream's
        # packets (decode_packet), and no picture is held back per frame thread (seconds of delay with key
        # frames only); slice threads would switch FFmpeg's H.264 error concealment off (damage shown
        # unconcealed, none flagged). Frame threads, as the ffmpeg CLI runs, when more are asked for (`threads`
        # > 1) or, by default, for pictures over 1080p, which one core may not decode in real time: that
        # stream's decoder errors are then not seen (only transport loss and concealed pictures are).
        big = (cc.width or 0) * (cc.height or 0) > 1920 * 1088
        self.threaded = not low_delay and (threads > 1 or (threads == 0 and big))
        cc.thread_type = "AUTO" if self.threaded else "NONE"
        cc.thread_count = threads if self.threaded else 1
        self.errors = 0  # packets the decoder refused or reported errors in
        self.corrupt = 0
        self.damage = DamageTracker(annexb=annex_b(bytes(cc.extradata or b"")))
        self._codec = cc.name
        self._scaler = VideoReformatter()
        self._convert = VideoReformatter()
        self.fps = float(stream.average_rate or stream.guessed_rate or 25.0)

    def _to_frame(self, frame: av.VideoFrame) -> tuple[float | None, VideoFrame]:
        fmt = frame.format.name
        full = fmt in _FULL_RANGE_FORMATS or int(getattr(frame, "color_range", 0) or 0) == 2
        src = frame
        if fmt not in _Y_FIRST:
            # 10-bit, RGB or packed input: one conversion to 8-bit planar YUV (limited range kept).
            src = self._convert.reformat(frame, format="yuv420p")
            full = False
        luma = torch.from_numpy(_plane(src, 0, frame.height, frame.width))
        # One thread: a 320x180 area scale is too small to gain from swscale's worker threads, which the
        # decoder's frame threads need. Both ranges are declared equal so swscale only averages and keeps
        # the code values (it would otherwise stretch "gray" to full range).
        small = self._scaler.reformat(
            src, width=SMALL_W, height=SMALL_H, format="gray", interpolation="AREA",
            src_color_range="JPEG", dst_color_range="JPEG", threads=1,
        )
        y = torch.from_numpy(_plane(small, 0, SMALL_H, SMALL_W).copy())
        if full:
            # The small plane's analyses are calibrated on limited-range luma.
            y = (y.to(torch.float32) * (219.0 / 255.0) + 16.0).round_().to(torch.uint8)
        corrupt = bool(getattr(frame, "is_corrupt", False))
        damaged = self.damage.take(frame.pts) or corrupt
        if corrupt:
            self.corrupt += 1
            self.damage.concealed()
        # Frames drained from frame threads can come without a time base; the stream's is the same one.
        tb = frame.time_base or self.stream.time_base
        ts = float(frame.pts * tb) if frame.pts is not None and tb else None
        vf = VideoFrame(
            pts=0.0,
            duration=1.0 / self.fps,
            luma=luma,
            small=y,
            rgb=lambda: frame.to_ndarray(width=SMALL_W, height=SMALL_H, format="rgb24"),
            color_range=ColorRange.FULL if full else ColorRange.LIMITED,
            key_frame=bool(frame.key_frame),
            corrupt=corrupt,
            damaged=damaged,
        )
        return ts, vf

    def decode(self, packet: av.Packet | None) -> list[tuple[float | None, VideoFrame]]:
        frames, failed, logged = decode_packet(self.stream.codec_context, packet)
        self.errors += failed or logged > 0  # refused, or decoded with errors the decoder reported
        if packet is not None:
            self.damage.note_packet(packet, self._codec, loss_evidence(self._codec, failed, logged))
        return [self._to_frame(f) for f in frames]

    def flush(self) -> list[tuple[float | None, VideoFrame]]:
        return self.decode(None)


class PyAVAudioDecoder:
    """Any audio to float32 planar at 48 kHz, channel layout kept (mono stays mono, 5.1 stays 5.1).

    The resampler gives packed samples, made planar here: PyAV's planar frames with 8 or more channels report
    one plane too many, and reading them crashes the process (7.1 and 16-channel audio are ordinary in
    broadcast). A stream whose sample rate, sample format or layout changes midway (a spliced programme, a
    concatenated file) gets a new resampler to the same output, the old one drained first, so the analysis
    goes on at the stream's layout instead of ending."""

    def __init__(self, stream: av.audio.stream.AudioStream) -> None:
        self.stream = stream
        self.errors = 0
        self.format_changes = 0
        layout = stream.codec_context.layout
        self.layout = layout.name if layout is not None else "stereo"
        self._resampler: av.AudioResampler | None = None
        self._input: tuple | None = None

    @staticmethod
    def _samples(r: av.AudioFrame) -> torch.Tensor:
        channels = len(r.layout.channels)
        flat = np.frombuffer(r.planes[0], np.float32)[: r.samples * channels]
        return torch.from_numpy(np.ascontiguousarray(flat.reshape(r.samples, channels).T))  # (C, T) planar

    def _drain(self) -> list[tuple[float | None, AudioChunk]]:
        out = []
        if self._resampler is not None:
            try:
                for r in self._resampler.resample(None):
                    out.append((None, AudioChunk(pts=0.0, samples=self._samples(r), layout=self.layout)))
            except (av.error.FFmpegError, ValueError):
                pass
        return out

    def _chunks(self, frames: list[av.AudioFrame]) -> list[tuple[float | None, AudioChunk]]:
        out: list[tuple[float | None, AudioChunk]] = []
        for frame in frames:
            ts = float(frame.pts * frame.time_base) if frame.pts is not None and frame.time_base else None
            shape = (frame.format.name, frame.layout.name, frame.sample_rate)
            if shape != self._input:
                if self._input is not None:
                    self.format_changes += 1
                    log.info("audio changed from %s %s %d Hz to %s %s %d Hz; resampled to %s as before",
                             *self._input, *shape, self.layout)
                    out.extend(self._drain())
                self._input = shape
                self._resampler = av.AudioResampler(format="flt", layout=self.layout, rate=AUDIO_RATE)
            for r in self._resampler.resample(frame):
                out.append((ts, AudioChunk(pts=0.0, samples=self._samples(r), layout=self.layout)))
                ts = None  # only the first resampled piece carries the input's time
        return out

    def decode(self, packet: av.Packet | None) -> list[tuple[float | None, AudioChunk]]:
        return self._chunks(_decode(self, packet))

    def flush(self) -> list[tuple[float | None, AudioChunk]]:
        return self.decode(None) + self._drain()
