"""What a GPU can decode and what a stream costs: NVDEC engine budgets, stream demand, calibration files.

Units. A stream's decode cost is in *engine units*: the fraction of one NVDEC engine's time it takes, so a
GPU with 7 engines has 7 units (less head room). A 1080p H.264 stream at 30 frames/s on an engine that decodes
640 1080p H.264 frames/s costs 30 / 640 = 0.047 units; pixels scale linearly (4K costs 4 × 1080p), which is
how NVIDIA states NVDEC throughput for other resolutions.

Where the figures come from (all are overridable: build your own `GpuModel`, or measure with
`framewatch bench` and `apply_calibration`):

- Engine counts (NVIDIA's NVDEC support matrix): H100 7, H200 7, A100 5, L4 4, L40S 3, A10 2, T4 2.
- Codec support (NVDEC application note, "NVDEC Hardware Capabilities"): Turing, GA100 (A100) and Hopper
  (H100, H200) decode MPEG-1/2/4, VC-1, H.264, HEVC, VP8 and VP9 but not AV1; GA10x Ampere (A10) and Ada
  (L4, L40S) add AV1.
- Per-engine rates: NVIDIA's 1080p decode figures for Turing, per engine, at a video clock of 1545 MHz:
  H.264 640, HEVC 1093, VP9 900 frames/s. Other generations are assumed to run the same engine design
  scaled by their video clock (H100 1755, H200 1545, A100 1410 MHz; L4 1590, L40S 1830, A10 1695 MHz are
  approximate clocks, not NVIDIA-published figures). AV1, where decodable, is assumed at 0.9 × the HEVC rate,
  and the simpler legacy codecs (MPEG-1/2/4, VC-1, VP8) at the H.264 rate, which understates them.
- Memory: the MiB the driver reports for each board (H100 81559, H200 143771, A100 81920, L4 23034,
  L40S 46068, A10 23028, T4 15360); `match_model(name, memory_mb=...)` replaces it with what the device
  reports, since boards of one name ship with different memory.

Real throughput depends on bitrate, profile and content (CABAC-heavy, high-bitrate streams decode slower), so
the table is a starting point; a calibration file measured on the actual machine replaces it.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import date
from pathlib import Path
from types import MappingProxyType

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from engine import __version__
from engine.decode.tiers import Tier  # one tier vocabulary for decoders, config and scheduler

log = logging.getLogger(__name__)

REFERENCE_CLOCK_MHZ = 1545.0
"""Video clock at which the Turing per-engine rates below were stated."""

TURING_PER_ENGINE_FPS: Mapping[str, float] = MappingProxyType({"h264": 640.0, "hevc": 1093.0, "vp9": 900.0})
"""1080p frames/s per NVDEC engine at REFERENCE_CLOCK_MHZ."""

AV1_OF_HEVC = 0.9
"""AV1 per-engine rate as a fraction of the HEVC rate, on GPUs that decode AV1 (an assumption)."""

LEGACY_CODECS = frozenset({"mpeg1", "mpeg2", "mpeg4", "vc1", "vp8"})
BASE_CODECS = frozenset({"h264", "hevc", "vp9"}) | LEGACY_CODECS

PIXELS_1080P = 1920 * 1080

# Decoder output is NV12: 1.5 bytes a pixel.
BYTES_PER_PIXEL = 1.5
DECODE_SURFACES = 26
"""One NVDEC session in NV12 frames: measured 79 MiB for 1080p H.264 on an H200 (PyNvVideoCodec 2.2.4,
ThreadedDecoder with an 8-surface ring and one cached session; a packet-fed session measured 75 MiB)."""
QUEUED_FRAMES = 4
"""The frame queue in NV12-frame equivalents: GPU frames keep a small plane, a histogram and sampled rows
(about 180 KB at 1080p), so 64 queued frames cost about 4 full frames."""
KEYFRAME_FRAMES = 11
"""A keyframes-only stream's low-latency session, measured at 35 to 50 MiB per 1080p stream with 256 streams."""

CPU_CODEC_FACTOR: Mapping[str, float] = MappingProxyType(
    {
        "h264": 1.0,
        "hevc": 1.5,
        "vp9": 1.5,
        "av1": 2.0,
        "vp8": 1.0,
        "mpeg2": 0.5,
        "mpeg1": 0.5,
        "mpeg4": 0.7,
        "vc1": 1.0,
    }
)
"""CPU decode cost of one frame relative to an H.264 frame of the same size (libavcodec/dav1d, rough)."""

_ALIASES = {
    "avc": "h264",
    "avc1": "h264",
    "h.264": "h264",
    "x264": "h264",
    "h265": "hevc",
    "h.265": "hevc",
    "hev1": "hevc",
    "hvc1": "hevc",
    "x265": "hevc",
    "av01": "av1",
    "libdav1d": "av1",
    "mpeg2video": "mpeg2",
    "mpeg1video": "mpeg1",
    "wmv3": "vc1",
}

_DISPLAY = {
    "h264": "H.264",
    "hevc": "HEVC",
    "av1": "AV1",
    "vp9": "VP9",
    "vp8": "VP8",
    "mpeg2": "MPEG-2",
    "mpeg1": "MPEG-1",
    "mpeg4": "MPEG-4",
    "vc1": "VC-1",
}


def normalize_codec(codec: str) -> str:
    """Lower-case canonical codec name, accepting FFmpeg and container spellings ("avc1", "h265", ...)."""
    c = codec.strip().lower()
    return _ALIASES.get(c, c)


def codec_display(codec: str) -> str:
    c = normalize_codec(codec)
    return _DISPLAY.get(c, c.upper())


TIER_ORDER: tuple[Tier, ...] = tuple(Tier)  # best first


def tier_words(tier: Tier) -> str:
    return "full rate" if tier is Tier.ALL else f"the {tier.value} tier"


@dataclass(frozen=True, slots=True)
class GpuModel:
    """Decode capacity of one GPU model. `per_engine_fps` is 1080p frames/s per engine for each codec."""

    name: str
    nvdec_engines: int
    video_clock_mhz: float
    # A read-only mapping, left out of the hash so the model stays hashable.
    per_engine_fps: Mapping[str, float] = field(hash=False)
    memory_mb: float
    codecs: frozenset[str]

    def __post_init__(self) -> None:
        if self.nvdec_engines < 0:
            raise ValueError(f"{self.name}: nvdec_engines must be >= 0, got {self.nvdec_engines}")
        if self.memory_mb <= 0:
            raise ValueError(f"{self.name}: memory_mb must be > 0, got {self.memory_mb}")
        rates = {normalize_codec(c): float(r) for c, r in self.per_engine_fps.items()}
        object.__setattr__(self, "per_engine_fps", MappingProxyType(rates))
        object.__setattr__(self, "codecs", frozenset(normalize_codec(c) for c in self.codecs))

    def supports(self, codec: str) -> bool:
        c = normalize_codec(codec)
        return self.nvdec_engines > 0 and c in self.codecs and self.per_engine_fps.get(c, 0.0) > 0

    def engine_fps(self, codec: str) -> float:
        """1080p frames/s one engine decodes for `codec`; KeyError when this GPU cannot decode it."""
        c = normalize_codec(codec)
        if not self.supports(c):
            raise KeyError(f"{self.name} has no {codec_display(c)} decoder")
        return self.per_engine_fps[c]

    def engine_budget(self, headroom: float) -> float:
        """Engine units usable for streams, keeping `headroom` (a fraction) free for bursts and reconnects."""
        return self.nvdec_engines * (1.0 - headroom)

    def memory_budget_mb(self, headroom: float) -> float:
        return self.memory_mb * (1.0 - headroom)


def _clock_scaled_rates(clock_mhz: float, av1: bool) -> dict[str, float]:
    f = clock_mhz / REFERENCE_CLOCK_MHZ
    rates = {c: round(r * f, 1) for c, r in TURING_PER_ENGINE_FPS.items()}
    for c in LEGACY_CODECS:
        rates[c] = rates["h264"]
    if av1:
        rates["av1"] = round(rates["hevc"] * AV1_OF_HEVC, 1)
    return rates


def _model(name: str, engines: int, clock_mhz: float, memory_mb: float, av1: bool) -> GpuModel:
    codecs = BASE_CODECS | ({"av1"} if av1 else set())
    return GpuModel(
        name, engines, clock_mhz, _clock_scaled_rates(clock_mhz, av1), memory_mb, frozenset(codecs)
    )


KNOWN_MODELS: Mapping[str, GpuModel] = MappingProxyType(
    {
        "h100": _model("NVIDIA H100", 7, 1755, 81559, av1=False),
        "h200": _model("NVIDIA H200", 7, 1545, 143771, av1=False),
        "a100": _model("NVIDIA A100", 5, 1410, 81920, av1=False),
        "l4": _model("NVIDIA L4", 4, 1590, 23034, av1=True),
        "l40s": _model("NVIDIA L40S", 3, 1830, 46068, av1=True),
        "a10": _model("NVIDIA A10", 2, 1695, 23028, av1=True),
        "t4": _model("NVIDIA T4", 2, REFERENCE_CLOCK_MHZ, 15360, av1=False),
    }
)
"""Known models keyed by the token that identifies them in a device name."""

_TOKEN = re.compile(r"[a-z0-9]+")


def match_model(
    name: str, memory_mb: float | None = None, models: Mapping[str, GpuModel] = KNOWN_MODELS
) -> GpuModel | None:
    """The known model for a device name as NVML or torch report it ("NVIDIA H100 80GB HBM3"), or None.

    Keys are matched as whole words of the name, case-insensitively, so "NVIDIA L40S" is not an L4 and
    "NVIDIA A100-SXM4-40GB" is not an A10. `memory_mb`, when given, replaces the table's memory.
    """
    tokens = set(_TOKEN.findall(name.lower()))
    for key in sorted(models, key=lambda k: (-len(k), k)):
        if key.lower() in tokens:
            model = models[key]
            return replace(model, memory_mb=float(memory_mb)) if memory_mb else model
    return None


def generic_model(name: str, memory_mb: float) -> GpuModel:
    """Conservative stand-in for an unknown GPU: 2 engines at Turing rates, no AV1. Logs a warning."""
    log.warning(
        "GPU %r is not in the NVDEC table: assuming 2 decode engines at Turing rates and no AV1; "
        "run `framewatch bench` to measure it",
        name,
    )
    return _model(name, 2, REFERENCE_CLOCK_MHZ, memory_mb, av1=False)


def model_for_device(name: str, memory_mb: float) -> GpuModel:
    """The known model for a device (with its reported memory), else the generic fallback."""
    return match_model(name, memory_mb) or generic_model(name, memory_mb)


def _same_gpu(a: str, b: str) -> bool:
    if a.strip().lower() == b.strip().lower():
        return True
    ma, mb = match_model(a), match_model(b)
    return ma is not None and mb is not None and ma.name == mb.name


# --- streams ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamDemand:
    """What one monitored stream asks of a decoder.

    `nonref_fraction` is the share of frames no other frame references (B-frames, usually): skip_nonref saves
    exactly that share, and 0 (unknown, or an all-reference stream) takes the tier out of the choices.
    `needs_every_frame` is set when an enabled detector (freeze, glitch) needs every frame, which leaves only
    the full-rate tier; `every_frame_reason` says which, for the user ("detector 'freeze' needs every frame").
    For a CPU engine: `audio` (the stream's audio is analysed), `clicks` (with the click analysis), and `paced`
    (read in real time: a live stream; a file read as fast as it can be takes what is left, so it costs
    nothing there). `video` False: the pictures are not decoded at all (an audio-only stream, source option
    `video: false`), so it costs its audio alone.
    """

    id: str
    codec: str
    width: int
    height: int
    fps: float
    gop_seconds: float = 2.0
    nonref_fraction: float = 0.5
    needs_every_frame: bool = False
    allowed_tiers: tuple[Tier, ...] = TIER_ORDER
    every_frame_reason: str = ""
    audio: bool = True
    clicks: bool = False
    paced: bool = True
    video: bool = True
    # Pictures per second the corruption CNN analyses on a CPU engine (engine.corruption: its `fps`, 5 when not
    # said; 0 for every decoded picture), plus every key frame; None: the detector is off.
    corruption_fps: float | None = None

    def __post_init__(self) -> None:
        if not self.id:
            raise ValueError("stream id must not be empty")
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"stream {self.id}: size must be positive, got {self.width}x{self.height}")
        if self.fps <= 0:
            raise ValueError(f"stream {self.id}: fps must be > 0, got {self.fps}")
        if self.gop_seconds <= 0:
            raise ValueError(f"stream {self.id}: gop_seconds must be > 0, got {self.gop_seconds}")
        if not 0.0 <= self.nonref_fraction < 1.0:
            raise ValueError(
                f"stream {self.id}: nonref_fraction must be in [0, 1), got {self.nonref_fraction}"
            )
        try:
            allowed = {Tier(t) for t in self.allowed_tiers}
        except ValueError as e:
            raise ValueError(f"stream {self.id}: {e}; tiers are {', '.join(TIER_ORDER)}") from None
        if not allowed:
            raise ValueError(f"stream {self.id}: allowed_tiers is empty")
        if self.needs_every_frame and Tier.ALL not in allowed:
            raise ValueError(f"stream {self.id}: needs every frame but the 'all' tier is not allowed")
        object.__setattr__(self, "codec", normalize_codec(self.codec))
        object.__setattr__(self, "allowed_tiers", tuple(t for t in TIER_ORDER if t in allowed))

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def scale(self) -> float:
        """Size relative to 1080p."""
        return self.pixels / PIXELS_1080P

    def decoded_fps(self, tier: Tier) -> float:
        if not self.video:
            return 0.0  # audio only: no picture is decoded, whatever its expected size says
        if tier is Tier.ALL:
            return self.fps
        if tier is Tier.SKIP_NONREF:
            return self.fps * (1.0 - self.nonref_fraction)
        return min(self.fps, 1.0 / self.gop_seconds)

    def analysed_fps(self, tier: Tier) -> float:
        """Pictures per second the corruption CNN reads at `tier` (0 with the detector off): its rate and every key
        frame, never more than are decoded. Pictures with reported loss are read too; they are not planned for."""
        decoded = self.decoded_fps(tier)
        if self.corruption_fps is None or decoded <= 0:
            return 0.0
        if self.corruption_fps <= 0:
            return decoded
        return min(decoded, self.corruption_fps + 1.0 / self.gop_seconds)

    def candidate_tiers(self) -> tuple[Tier, ...]:
        """Tiers to try, best first: allowed ones, minus those that would decode no fewer frames."""
        if self.needs_every_frame:
            return (Tier.ALL,)
        out: list[Tier] = []
        for t in self.allowed_tiers:
            if t is Tier.SKIP_NONREF and self.nonref_fraction <= 0:
                continue
            if out and self.decoded_fps(t) >= self.decoded_fps(out[-1]):
                continue
            out.append(t)
        return tuple(out) or (self.allowed_tiers[0],)

    def cheapest_tier_why(self) -> str:
        """Why the stream cannot go cheaper than its cheapest candidate tier, for refusal messages."""
        if self.needs_every_frame:
            return self.every_frame_reason or "a detector needs every frame"
        if self.candidate_tiers()[-1] is not Tier.KEYFRAMES:
            return "cheaper tiers are not allowed for this stream"
        return ""


def engine_cost(stream: StreamDemand, tier: Tier, gpu: GpuModel) -> float:
    """Engine units the stream takes on `gpu` at `tier`; KeyError when the GPU cannot decode its codec."""
    return stream.decoded_fps(tier) * stream.scale / gpu.engine_fps(stream.codec)


def stream_memory_mb(stream: StreamDemand, tier: Tier) -> float:
    """GPU memory (MiB) for the stream's decoder surfaces and frame queue at `tier`.

    skip_nonref still keeps every reference surface, so it costs what full rate costs.
    """
    frame = stream.pixels * BYTES_PER_PIXEL
    frames = KEYFRAME_FRAMES if tier is Tier.KEYFRAMES else DECODE_SURFACES + QUEUED_FRAMES
    return frame * frames / 2**20


def cpu_cost(stream: StreamDemand, tier: Tier, codec_factor: Mapping[str, float] = CPU_CODEC_FACTOR) -> float:
    """CPU decode work in 1080p-H.264-equivalent frames/s. Unknown codecs count double, to be safe."""
    return stream.decoded_fps(tier) * stream.scale * codec_factor.get(stream.codec, 2.0)


# --- CPU engines --------------------------------------------------------------------------------------------

DECODE_MS_1080P_H264 = 9.2
"""CPU ms (one core) to decode one 1080p H.264 picture at a broadcast rate: FFmpeg decode-only of an 8 Mbit/s
1080p30 clip on the 2-core development VM (`benchmarks/results/cpu_vs_ffmpeg.json`, 9.16 ms CPU per frame).
Lower bit rates decode faster (the same VM: about 4 ms at 1.5 Mbit/s), so this errs on the safe side."""
PICTURE_MS = 1.0
"""CPU ms per decoded picture besides decoding, whatever its size (source thread, conversion to the analysis
planes, the detectors): `benchmarks/engine_cpu.py` on the same VM (4 streams, 1.5 Mbit/s, audio's share taken
out) spends 1.03 ms a picture at 384x216 and 4.8 ms at 1920x1080, i.e. about 0.9 ms plus 3.8 ms of decoding per
1080p picture at that low rate."""
SCORING_MS_PER_PICTURE = 0.8
"""Of that, the engine's scoring thread's share (`engine_cpu.py`: 0.69 ms at 384x216, 0.72 at 1280x720, 0.88 at
1920x1080, audio included): one thread per engine process scores every stream, so its sum is a budget of its
own."""
AUDIO_MS_PER_S = 19.0
"""CPU ms per second of a stream's audio with every default audio detector but clicks (`audio_bench.py`: 68.5 CPU
s per stream-hour), all of it on the scoring thread."""
CLICKS_MS_PER_S = 58.0
"""What the click analysis adds (`audio_bench.py`: 275.7 against 68.5 CPU s per stream-hour)."""
CORRUPTION_MS_1080P = 72.3
"""CPU ms (one core) for the corruption CNN to read one 1080p picture, with the shipped model's two views (the
picture and its 180-degree turn): `benchmarks/corruption_vs_blockdetect.py` on 2026-12-07 (night; the later run
in `benchmarks/results/corruption_vs_blockdetect.json` gave 68.7: the VM varies by that much from run to run),
scaled by pixels. It runs in the scoring step, so the scoring thread spends it too. Measured without the allocator
settings the engine runs with (tune_allocator; the benchmark has them since), so it errs high; and per machine: a
2-core AVX2 VM gave 93-164 ms (benchmarks/results/corruption_cost.json, README)."""


@dataclass(frozen=True, slots=True)
class CpuModel:
    """What a CPU engine can carry, in cores, and what a stream costs it.

    Two budgets: every core the engine may use (`cores`), and its scoring threads (`scoring_threads`, one per
    engine process), which run the batched kernels of every stream one after the other. On two cores the first
    binds; on a large machine the second does, long before the cores are busy (which is what more worker
    processes are for). A stream costs, per decoded picture, its decoding (by pixels and codec) and a fixed share
    for everything else, plus its audio analysis per second and, with the corruption detector on, the CNN's reading
    of the pictures it analyses (by pixels). The figures are the development VM's
    (see the constants above); `decode_ms_1080p` and the others can be set from a measurement of the
    actual machine.
    """

    cores: float
    scoring_threads: int = 1
    decode_ms_1080p: float = DECODE_MS_1080P_H264
    picture_ms: float = PICTURE_MS
    scoring_ms_per_picture: float = SCORING_MS_PER_PICTURE
    audio_ms_per_s: float = AUDIO_MS_PER_S
    clicks_ms_per_s: float = CLICKS_MS_PER_S
    corruption_ms_1080p: float = CORRUPTION_MS_1080P
    codec_factor: Mapping[str, float] = field(default_factory=lambda: CPU_CODEC_FACTOR, hash=False)

    def __post_init__(self) -> None:
        if not (self.cores > 0 and self.cores < float("inf")):
            raise ValueError(f"CPU cores must be a positive number, got {self.cores}")
        if self.scoring_threads < 1:
            raise ValueError(f"scoring_threads must be >= 1, got {self.scoring_threads}")
        for name in ("decode_ms_1080p", "picture_ms", "scoring_ms_per_picture", "audio_ms_per_s", "clicks_ms_per_s",
                     "corruption_ms_1080p"):
            v = getattr(self, name)
            if not (v >= 0 and v < float("inf")):
                raise ValueError(f"{name} must be a finite number >= 0, got {v}")

    @classmethod
    def decode_only(cls, fps_1080p: float) -> CpuModel:
        """Spare CPU decode capacity stated as 1080p H.264 frames/s (the hybrid decode of a GPU pool): decoding
        alone is charged, in cores of `DECODE_MS_1080P_H264`, with no scoring-thread budget."""
        return cls(cores=fps_1080p * DECODE_MS_1080P_H264 / 1000.0, picture_ms=0.0, scoring_ms_per_picture=0.0,
                   audio_ms_per_s=0.0, clicks_ms_per_s=0.0, corruption_ms_1080p=0.0)

    def budget(self, headroom: float) -> float:
        """Cores the streams may take, head room kept free."""
        return self.cores * (1.0 - headroom)

    def scoring_budget(self, headroom: float) -> float:
        """Scoring-thread time the streams may take, in cores."""
        return self.scoring_threads * (1.0 - headroom)

    def _audio_ms(self, stream: StreamDemand) -> float:
        if not stream.audio:
            return 0.0
        return self.audio_ms_per_s + (self.clicks_ms_per_s if stream.clicks else 0.0)

    def cost(self, stream: StreamDemand, tier: Tier) -> float:
        """Cores the stream takes at `tier` in all (0 for a stream not read in real time). Unknown codecs count
        double, to be safe."""
        if not stream.paced:
            return 0.0
        per_picture = self.decode_ms_1080p * stream.scale * self.codec_factor.get(stream.codec, 2.0) + self.picture_ms
        return (stream.decoded_fps(tier) * per_picture + self._audio_ms(stream) + self._corruption_ms(stream, tier)) / 1000.0

    def _corruption_ms(self, stream: StreamDemand, tier: Tier) -> float:
        return stream.analysed_fps(tier) * self.corruption_ms_1080p * stream.scale

    def scoring_cost(self, stream: StreamDemand, tier: Tier) -> float:
        """Of `cost`, what the scoring thread spends on the stream, in cores."""
        if not stream.paced:
            return 0.0
        return (stream.decoded_fps(tier) * self.scoring_ms_per_picture + self._audio_ms(stream)
                + self._corruption_ms(stream, tier)) / 1000.0


# --- calibration --------------------------------------------------------------------------------------------


class Calibration(BaseModel):
    """Decode rates measured on one machine by `framewatch bench`, replacing the table's figures.

    Give `per_engine_fps` (frames/s one engine sustains) or `gpu_fps` (the whole GPU, all engines busy);
    rates measured at another size than 1080p are scaled by pixels to 1080p. `engines` is the engine count
    the whole-GPU figures are shared by; left out, the GPU model's count is used. The file `framewatch bench
    --calibration` writes (`gpu`, `gpu_fps_1080p`, `decoder_util`) reads as is.
    """

    # Written by a program that may be newer than this reader: unknown fields are ignored, not fatal.
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    gpu_name: str = Field(min_length=1, validation_alias=AliasChoices("gpu_name", "gpu"))
    engines: int | None = Field(default=None, ge=1)
    per_engine_fps: dict[str, float] = Field(default_factory=dict)
    gpu_fps: dict[str, float] = Field(
        default_factory=dict, validation_alias=AliasChoices("gpu_fps", "gpu_fps_1080p")
    )
    decoder_util: dict[str, float | None] = Field(default_factory=dict)
    width: int = Field(default=1920, gt=0)
    height: int = Field(default=1080, gt=0)
    date: str = Field(default_factory=lambda: date.today().isoformat())
    framewatch_version: str | None = __version__
    source: str = "framewatch bench"

    @field_validator("per_engine_fps", "gpu_fps")
    @classmethod
    def _rates(cls, v: dict[str, float]) -> dict[str, float]:
        out: dict[str, float] = {}
        for codec, fps in v.items():
            if not fps > 0:
                raise ValueError(f"{codec}: fps must be > 0, got {fps}")
            out[normalize_codec(codec)] = float(fps)
        return out

    @model_validator(mode="after")
    def _some_rate(self) -> Calibration:
        if not self.per_engine_fps and not self.gpu_fps:
            raise ValueError("no measured rates: give per_engine_fps or gpu_fps")
        return self

    def engine_rates(self, engines: int | None = None) -> dict[str, float]:
        """Measured 1080p frames/s per engine for each measured codec (per-engine figures win); whole-GPU
        figures are divided by `self.engines`, else by `engines`."""
        to_1080p = self.width * self.height / PIXELS_1080P
        n = self.engines or engines
        if self.gpu_fps and not n:
            raise ValueError(f"calibration for {self.gpu_name!r}: whole-GPU rates but no engine count")
        rates = {c: fps / n * to_1080p for c, fps in self.gpu_fps.items()} if n else {}
        rates.update({c: fps * to_1080p for c, fps in self.per_engine_fps.items()})
        return rates

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")


def load_calibration(path: str | Path) -> Calibration:
    """Read a calibration file; ValueError with a one-line message when it is missing or invalid."""
    p = Path(path)
    try:
        raw = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"calibration file {p}: not found") from None
    except OSError as e:
        raise ValueError(f"calibration file {p}: cannot be read ({e.strerror or e})") from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"calibration file {p}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"calibration file {p}: expected a JSON object, got {type(data).__name__}")
    try:
        return Calibration.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in err['loc']) or 'file'}: {err['msg']}" for err in e.errors()
        )
        raise ValueError(f"calibration file {p}: {problems}") from None


def apply_calibration(model: GpuModel, cal: Calibration) -> GpuModel:
    """`model` with measured per-engine rates for the codecs `cal` measured, others kept.

    A calibration for another GPU is ignored with a warning, so a file copied between machines cannot
    silently inflate a budget.
    """
    if not _same_gpu(model.name, cal.gpu_name):
        log.warning("calibration for %r ignored: this GPU is %r", cal.gpu_name, model.name)
        return model
    if cal.engines is not None and cal.engines != model.nvdec_engines:
        log.warning(
            "calibration for %r measured %d engines, the table says %d; "
            "keeping %d and the measured per-engine rates",
            cal.gpu_name,
            cal.engines,
            model.nvdec_engines,
            model.nvdec_engines,
        )
    measured = cal.engine_rates(model.nvdec_engines)
    rates = dict(model.per_engine_fps) | measured
    # A measured codec is decodable whatever the table says.
    return replace(model, per_engine_fps=rates, codecs=model.codecs | frozenset(measured))
