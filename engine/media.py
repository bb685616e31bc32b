"""Typed units that flow from sources and decoders to the batcher.

Every backend (PyAV on the CPU, NVDEC later, the synthetic generator) produces these, so the batcher, the
scoring step and the detectors never know where a frame came from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import torch

# The small plane is the fixed-size view used for frame-difference work, glitch scoring and thumbnails
# (and later the corruption CNN). A fixed size lets frames of every stream and resolution share one batch.
SMALL_W = 320
SMALL_H = 180

# Audio is always analysed at 48 kHz (EBU R128 and FFmpeg's ebur128 work there) in 5 ms windows, handed
# over in 100 ms chunks so a chunk is a whole number of windows and of R128's 100 ms gating steps.
AUDIO_RATE = 48_000
AUDIO_WINDOW = 240
AUDIO_CHUNK = 4_800


class ColorRange(StrEnum):
    LIMITED = "limited"  # 16..235 luma (TV/MPEG range, the default for broadcast video)
    FULL = "full"  # 0..255 luma (JPEG range, yuvj formats)


@dataclass(slots=True)
class LumaSummary:
    """What remains of a frame's native luma plane when it is not kept (GPU frames): the 256-bin histogram
    (256,) int32, which gives the black fraction for any threshold, and every `row_stride`-th row (R, W)
    uint8, which is what the blockiness/blur kernel reads."""

    hist: torch.Tensor
    rows: torch.Tensor
    row_stride: int
    height: int
    width: int


@dataclass(slots=True)
class VideoFrame:
    """One decoded picture.

    `luma` is the native-size 8-bit Y plane on the frame's device (H, W); `small` is the Y plane scaled to
    SMALL_H x SMALL_W with area averaging, limited range. `rgb`, when set, renders the picture as an
    (SMALL_H, SMALL_W, 3) uint8 array for thumbnails: only pictures that raise an alert pay for colour.
    `pts` is seconds from the stream start; `duration` the frame's nominal display time.
    """

    pts: float
    duration: float
    luma: torch.Tensor | None  # None when only `summary` was kept
    small: torch.Tensor
    rgb: Callable[[], np.ndarray] | None = None
    color_range: ColorRange = ColorRange.LIMITED
    key_frame: bool = False
    index: int = 0  # frame number in the stream, set by the source
    corrupt: bool = False  # the decoder concealed an error in this frame
    # Lost or damaged data since the last key frame (decode order): a packet of this picture or of one it may
    # predict from was flagged by the demuxer or rejected by the decoder (engine.decode.base.DamageTracker).
    damaged: bool = False
    summary: LumaSummary | None = None

    @property
    def height(self) -> int:
        return int(self.luma.shape[-2]) if self.luma is not None else self.summary.height

    @property
    def width(self) -> int:
        return int(self.luma.shape[-1]) if self.luma is not None else self.summary.width


@dataclass(slots=True)
class AudioChunk:
    """Float32 samples at AUDIO_RATE, shape (C, T) on the CPU; `pts` of the first sample in seconds."""

    pts: float
    samples: torch.Tensor
    layout: str = "stereo"
    # The container's timing of this chunk (see engine.detectors.base.TimestampNote): sample clock minus
    # timestamp, a re-synchronisation jump, a timestamp reset; set by the source.
    drift: float | None = None
    jump: float = 0.0
    reset: bool = False

    @property
    def channels(self) -> int:
        return int(self.samples.shape[0])

    @property
    def duration(self) -> float:
        return self.samples.shape[-1] / AUDIO_RATE


@dataclass(slots=True)
class StreamInfo:
    """What a source knows about its media once opened (or reopened after a reconnect)."""

    url: str
    live: bool
    container: str = ""
    video_codec: str | None = None
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    audio_codec: str | None = None
    audio_channels: int | None = None
    audio_rate: int | None = None
    duration: float | None = None  # seconds, files only
    decoder: str = "pyav"  # backend that decodes the video
    decoder_note: str = ""  # why it is not the backend asked for (a fallback), else empty
    tier: str = "all"


@dataclass(slots=True)
class SourceStatus:
    """Out-of-band news from a source: connection lost/restored, end of input, a per-stream error."""

    kind: str  # "connected" | "disconnected" | "error" | "eof" | "info"
    message: str = ""
    wallclock: float = 0.0
    info: StreamInfo | None = None


@dataclass(slots=True)
class StreamCounters:
    """Per-stream counters a user would look at (and Prometheus will later export)."""

    video_frames: int = 0
    audio_chunks: int = 0
    frames_dropped: int = 0
    audio_dropped: int = 0
    decode_errors: int = 0
    corrupt_frames: int = 0
    reconnects: int = 0
    packets_skipped: int = 0  # video packets not decoded because of the stream's density tier
    decoder_fallbacks: int = 0  # times the requested decoder backend could not be used
    audio_gaps: int = 0  # audio timestamps jumped forward past the samples (missing audio)
    audio_overlaps: int = 0  # audio timestamps went back over samples already played
    timestamp_resets: int = 0  # live timestamp discontinuities (encoder restarts, wraps) re-anchored on
    timestamp_outliers: int = 0  # lone garbage timestamps of a file (a damaged packet's), ignored
    clicks_paused: int = 0  # times the click analysis paused because the engine fell behind its live streams
