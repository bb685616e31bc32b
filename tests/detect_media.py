"""Media helpers for the detector tests: make clips with known faults, run the engine, read FFmpeg's view.

Everything here builds its own media (PyAV encoding of frames from `engine.sources.synthetic.Generator`, or
of hand-made frames) so every test knows to the frame and to the sample where each fault starts and ends.
Nothing here is a test; the test modules import it (tests/ is on sys.path under pytest's rootdir
conftest-less import mode: `from detect_media import ...`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import torch

from engine.alerts import MemorySink
from engine.config import FramewatchConfig, resolve_detectors
from engine.detectors.base import DetectorConfig, Region
from engine.events import Event
from engine.media import AUDIO_RATE
from engine.runner import Engine, StreamSpec
from engine.sources import SourceOptions
from engine.sources.synthetic import Generator, parse_spec

REPO = Path(__file__).resolve().parent.parent
HAVE_FFMPEG = shutil.which("ffmpeg") is not None
needs_ffmpeg = pytest.mark.skipif(not HAVE_FFMPEG, reason="ffmpeg CLI not installed")

VIDEO_TYPES = ("black", "freeze", "blockiness", "blur", "glitch")
AUDIO_TYPES = ("silence", "clipping", "loudness")
ALL_TYPES = (*VIDEO_TYPES, *AUDIO_TYPES, "no_signal")
FAULT_TO_TYPE = {
    "black": "black",
    "freeze": "freeze",
    "blocky": "blockiness",
    "blur": "blur",
    "glitch": "glitch",
    "silence": "silence",
    "clipping": "clipping",
    "loudness": "loudness",
    "nosignal": "no_signal",
}
AUDIO_TOL = 0.010  # seconds: audio edges must be placed within 10 ms


# --------------------------------------------------------------------------------------------- samples
def samples_dir() -> Path:
    env = os.environ.get("FRAMEWATCH_SAMPLES")
    return Path(env) if env else Path.home() / ".cache" / "framewatch" / "samples"


def sample_or_skip(name: str) -> Path:
    p = samples_dir() / name
    if not p.is_file() or p.stat().st_size == 0:
        pytest.skip(f"sample {name} not in {samples_dir()} (run tests/fetch_samples.sh)")
    return p


# --------------------------------------------------------------------------------------------- engine
def detector_configs(**overrides: dict[str, Any]) -> dict[str, DetectorConfig]:
    """Default detector configs with per-detector field overrides, e.g. black={"ignore": (Region(...),)}."""
    dets = resolve_detectors(FramewatchConfig())
    for name, fields_ in overrides.items():
        fields_ = dict(fields_)
        if "ignore" in fields_:
            fields_["ignore"] = tuple(r if isinstance(r, Region) else Region(**r) for r in fields_["ignore"])
        dets[name] = replace(dets[name], **fields_)
    return dets


@dataclass
class EngineRun:
    events: list[Event]  # resolved events, in emission order
    all_events: list[Event]  # firing + resolved
    frames: int
    audio_seconds: float
    media_end: float
    errors: list[str]
    decode_errors: int
    integrated_lufs: float | None
    extra: dict[str, Any] = field(default_factory=dict)

    def of(self, kind: str) -> list[Event]:
        return [e for e in self.events if e.type == kind]

    def types(self) -> list[str]:
        return sorted(e.type for e in self.events)

    def table(self) -> str:
        return ", ".join(f"{e.type} {e.start:.3f}..{e.end:.3f}" for e in self.events) or "no events"


def run_engine(url: str, detectors: dict[str, DetectorConfig] | None = None) -> EngineRun:
    """Run one stream as fast as it can be read through the Python API."""
    sink = MemorySink()
    eng = Engine(sink)
    rt = eng.add_stream(
        StreamSpec("s", str(url), detectors if detectors is not None else detector_configs(), SourceOptions(pace="fast"))
    )
    eng.run()
    resolved = [e for e in sink.events if e.status.value == "resolved"]
    return EngineRun(
        events=resolved,
        all_events=list(sink.events),
        frames=rt.stats.frames_scored,
        audio_seconds=rt.stats.audio_seconds,
        media_end=rt.stats.media_end,
        errors=list(rt.errors),
        decode_errors=rt.counters.decode_errors,
        integrated_lufs=rt.audio.meter.integrated,
    )


def run_check_cli(*files: str | Path, timeout: float = 120) -> tuple[int, list[dict[str, Any]], str]:
    """`python -m engine.cli check FILE... --json`: (exit code, one report per file, stderr)."""
    proc = subprocess.run(
        [sys.executable, "-m", "engine.cli", "check", *map(str, files), "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    return proc.returncode, reports, proc.stderr


def synthetic_url(faults: Iterable[str] = (), size: str = "640x360", fps: float = 25, duration: float = 8, **extra: Any) -> str:
    q = f"size={size}&fps={fps:g}&duration={duration:g}&pace=fast"
    for k, v in extra.items():
        q += f"&{k}={v}"
    faults = list(faults)
    if faults:
        q += "&faults=" + ",".join(faults)
    return f"synthetic://t?{q}"


# --------------------------------------------------------------------------------------------- encoding
FrameFn = Callable[[int], np.ndarray | torch.Tensor]  # frame number -> (H, W) uint8 luma
AudioFn = Callable[[int, int], np.ndarray | torch.Tensor]  # samples [a, b) at 48 kHz -> (C, b - a) float32


@dataclass(frozen=True)
class VideoCodec:
    """How to encode the pictures: codec name, pixel format and codec options."""

    name: str = "libx264"
    bit_rate: int | None = 1_500_000
    gop: int = 50
    options: tuple[tuple[str, str], ...] = (("preset", "veryfast"), ("tune", "film"))

    @staticmethod
    def h264(bit_rate: int = 1_500_000, gop: int = 50, **opts: str) -> VideoCodec:
        o = {"preset": "veryfast", **opts}
        return VideoCodec("libx264", bit_rate, gop, tuple(o.items()))

    @staticmethod
    def h264_lossless(gop: int = 25) -> VideoCodec:
        return VideoCodec("libx264", None, gop, (("preset", "ultrafast"), ("qp", "0")))

    @staticmethod
    def ffv1() -> VideoCodec:
        return VideoCodec("ffv1", None, 1, ())


def encode_clip(
    path: Path,
    frame: FrameFn,
    n_frames: int,
    fps: int,
    audio: AudioFn | None = None,
    video: VideoCodec = VideoCodec(),
    audio_codec: str = "aac",
    audio_bit_rate: int = 192_000,
    channels: int = 2,
) -> Path:
    """Write `n_frames` pictures (luma from `frame`, neutral chroma) and, optionally, the audio of the same
    duration at 48 kHz. The container follows the suffix (.mp4, .ts, .mkv). Audio is fed in video-frame
    sized pieces, interleaved with the pictures as a live encoder would."""
    path = Path(path)
    with av.open(str(path), "w") as out:
        first = np.asarray(frame(0))
        h, w = first.shape
        vs = out.add_stream(video.name, rate=Fraction(fps))
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        vs.codec_context.time_base = Fraction(1, fps)
        if video.bit_rate:
            vs.bit_rate = video.bit_rate
        vs.codec_context.gop_size = video.gop
        opts = dict(video.options)
        if video.name == "libx264":
            # A fixed GOP: key frames exactly every `gop` frames, no scene-cut key frames, no B-frame
            # reordering surprises in the timestamps of short clips.
            opts.setdefault("x264-params", f"keyint={video.gop}:min-keyint={video.gop}:scenecut=0")
        vs.options = opts
        aus = None
        if audio is not None:
            if audio_codec == "aac":
                aus = out.add_stream("aac", rate=AUDIO_RATE)
                aus.bit_rate = audio_bit_rate
                fmt = "fltp"
            else:
                aus = out.add_stream(audio_codec, rate=AUDIO_RATE)
                fmt = "s16"
            aus.layout = "stereo" if channels == 2 else "mono"
        chroma = np.full((h // 2, w), 128, dtype=np.uint8)  # U and V planes of yuv420p, stacked as rows
        for n in range(n_frames):
            y = first if n == 0 else np.asarray(frame(n))
            img = np.concatenate([np.ascontiguousarray(y, dtype=np.uint8), chroma])
            vf = av.VideoFrame.from_ndarray(img, format="yuv420p")
            vf.pts = n
            vf.time_base = Fraction(1, fps)
            for p in vs.encode(vf):
                out.mux(p)
            if aus is not None:
                a, b = n * AUDIO_RATE // fps, (n + 1) * AUDIO_RATE // fps
                x = np.asarray(audio(a, b), dtype=np.float32)
                if fmt == "s16":
                    data = (np.clip(x, -1, 1) * 32767).round().astype(np.int16).T.reshape(1, -1)
                    af = av.AudioFrame.from_ndarray(np.ascontiguousarray(data), format="s16", layout=aus.layout.name)
                else:
                    af = av.AudioFrame.from_ndarray(np.ascontiguousarray(x), format="fltp", layout=aus.layout.name)
                af.sample_rate = AUDIO_RATE
                af.pts = a
                af.time_base = Fraction(1, AUDIO_RATE)
                for p in aus.encode(af):
                    out.mux(p)
        for p in vs.encode(None):
            out.mux(p)
        if aus is not None:
            for p in aus.encode(None):
                out.mux(p)
    return path


def encode_synthetic(path: Path, url: str, video: VideoCodec = VideoCodec(), audio: bool = True, audio_codec: str = "aac") -> Path:
    """Encode the frames and sound of a synthetic:// spec into a file (faults made before the encoder)."""
    spec = parse_spec(url)
    gen = Generator(spec)
    fps = int(spec.fps)
    assert fps == spec.fps, "encode_synthetic needs an integer frame rate"
    n = round(spec.duration * fps)
    return encode_clip(
        path,
        lambda i: _full_size(gen.luma(i).numpy(), spec.height, spec.width),
        n,
        fps,
        (lambda a, b: gen.audio(a, b).numpy()) if audio else None,
        video=video,
        audio_codec=audio_codec,
        channels=spec.channels,
    )


def _full_size(y: np.ndarray, h: int, w: int) -> np.ndarray:
    """Generator.luma's `blocky` fault pools 16x16 blocks and drops the remainder rows (a 640x360 picture
    comes out 640x352); a file needs every picture at the stream size, so the last row is repeated."""
    if y.shape == (h, w):
        return y
    return np.pad(y, ((0, h - y.shape[0]), (0, w - y.shape[1])), mode="edge")


def decoded_luma(path: Path, limit: int | None = None) -> list[np.ndarray]:
    """The luma planes FFmpeg decodes from a file (for checking that a lossless clip is lossless)."""
    out = []
    with av.open(str(path)) as c:
        for f in c.decode(video=0):
            out.append(f.to_ndarray(format="gray").copy() if f.format.name != "yuv420p" else f.to_ndarray()[: f.height].copy())
            if limit is not None and len(out) >= limit:
                break
    return out


# --------------------------------------------------------------------------------------------- ffmpeg
_NUM = r"(-?[0-9.]+(?:e[-+]?[0-9]+)?)"


def ffmpeg_detect(path: Path, vf: str | None = None, af: str | None = None, timeout: float = 120) -> str:
    """Run FFmpeg with detection filters and return its log (stderr)."""
    cmd = ["ffmpeg", "-hide_banner", "-nostats", "-nostdin", "-i", str(path)]
    if vf:
        cmd += ["-vf", vf]
    elif vf is None and af is not None:
        cmd += ["-vn"]
    if af:
        cmd += ["-af", af]
    elif af is None and vf is not None:
        cmd += ["-an"]
    cmd += ["-f", "null", "-"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc.stderr


def ffmpeg_intervals(log: str, what: str) -> list[tuple[float, float | None]]:
    """(start, end) pairs of `what` (black, freeze, silence) from blackdetect / freezedetect / silencedetect
    output; end is None for an interval still open at the end of input."""
    if what == "black":
        out = []
        for m in re.finditer(rf"black_start:{_NUM} black_end:{_NUM}", log):
            out.append((float(m.group(1)), float(m.group(2))))
        return out
    starts = [float(m.group(1)) for m in re.finditer(rf"{what}_start: ?{_NUM}", log)]
    ends = [float(m.group(1)) for m in re.finditer(rf"{what}_end: ?{_NUM}", log)]
    return [(s, ends[i] if i < len(ends) else None) for i, s in enumerate(starts)]


def ffmpeg_integrated_lufs(log: str) -> float:
    m = re.search(r"Integrated loudness:\s*\n\s*I:\s*" + _NUM + " LUFS", log)
    if m is None:
        raise AssertionError(f"no ebur128 summary in the FFmpeg log: {log[-1500:]}")
    return float(m.group(1))
