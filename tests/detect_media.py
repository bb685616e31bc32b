"""Media helpers for the detector tests: make clips with known faults, run the engine, read FFmpeg's view.

Everything here builds its own media (PyAV encoding of frames from `engine.sources.synthetic.Generator`, or
of hand-made frames) so every test knows to the frame and to the sample where each fault starts and ends.
Nothing here is a test; test modules import it as `from detect_media import ...` (pytest's default
"prepend" import mode puts tests/, which has no __init__.py, on sys.path). Set FRAMEWATCH_TIMING_LOG to a
file to collect the measured start/end errors of every timing assertion as JSON lines.
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
AUDIO_TYPES = ("silence", "clipping", "loudness", "true_peak", "dropout", "phase", "missing_channel", "dc_offset",
               "clicks", "channel_silence")
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
    "dropout": "dropout",
    "phase": "phase",
    "mute": "missing_channel",
    "dc": "dc_offset",
    "clicks": "clicks",
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


REAL_CLIPS = ("Megamind.avi", "tree.avi", "vtest.avi", "cityCC0.mpg")
_sample_reports: dict[str, Any] | None = None


def sample_reports() -> dict[str, Any]:
    """`check --json` over the real sample clips that are present, run once per test session (one process
    for all of them): {"rc": exit code, "stderr": ..., "reports": {name: report}}."""
    global _sample_reports
    if _sample_reports is None:
        present = [samples_dir() / n for n in REAL_CLIPS if (samples_dir() / n).is_file()]
        if not present:
            _sample_reports = {"rc": None, "stderr": "", "reports": {}}
        else:
            rc, reports, stderr = run_check_cli(*present, timeout=300)
            _sample_reports = {"rc": rc, "stderr": stderr, "reports": {Path(r["file"]).name: r for r in reports}}
    return _sample_reports


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
            # Two encoder threads whatever the machine: x264's rate control depends on the thread count, so a
            # fixed count makes the same bits on every machine.
            opts.setdefault("x264-params", f"keyint={video.gop}:min-keyint={video.gop}:scenecut=0:threads=2")
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
    assert spec.fps == int(spec.fps), "encode_synthetic needs an integer frame rate"
    frame, sound, n, fps = synthetic_frames(url)
    return encode_clip(path, frame, n, fps, sound if audio else None, video=video, audio_codec=audio_codec, channels=spec.channels)


def _full_size(y: np.ndarray, h: int, w: int) -> np.ndarray:
    """Generator.luma's `blocky` fault pools 16x16 blocks and drops the remainder rows (a 640x360 picture
    comes out 640x352); a file needs every picture at the stream size, so the last row is repeated."""
    if y.shape == (h, w):
        return y
    return np.pad(y, ((0, h - y.shape[0]), (0, w - y.shape[1])), mode="edge")


def decoded_luma(path: Path, keep: Iterable[int] | None = None) -> tuple[int, dict[int, np.ndarray]]:
    """Decode every picture of a file: (frame count, {index: luma plane} for the indices in `keep`, all when
    None). For checking that a lossless clip decodes to exactly the frames that were made."""
    wanted = None if keep is None else set(keep)
    out: dict[int, np.ndarray] = {}
    n = 0
    with av.open(str(path)) as c:
        for f in c.decode(video=0):
            if wanted is None or n in wanted:
                p = f.planes[0]
                out[n] = np.frombuffer(p, np.uint8).reshape(-1, p.line_size)[: f.height, : f.width].copy()
            n += 1
    return n, out


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


def remux(src: Path, dst: Path, format: str | None = None) -> Path:
    """Copy the coded streams of `src` into another container (e.g. MP4 -> MPEG-TS) without re-encoding."""
    with av.open(str(src)) as i, av.open(str(dst), "w", format=format) as o:
        omap = {s.index: o.add_stream_from_template(s) for s in i.streams if s.type in ("video", "audio")}
        for p in i.demux():
            if p.dts is None or p.stream.index not in omap:
                continue
            p.stream = omap[p.stream.index]
            o.mux(p)
    return dst


def stream_starts(path: Path) -> dict[str, float]:
    """Start time (s) of the first video and audio stream, and of the container timeline ('origin': the
    earliest of them, where framewatch and FFmpeg count media time from)."""
    out: dict[str, float] = {}
    with av.open(str(path)) as c:
        for kind in ("video", "audio"):
            ss = getattr(c.streams, kind)
            if ss and ss[0].start_time is not None:
                out[kind] = float(ss[0].start_time * ss[0].time_base)
    out["origin"] = min(out.values()) if out else 0.0
    return out


# --------------------------------------------------------------------------------------------- timing log
_TIMING_LOG = os.environ.get("FRAMEWATCH_TIMING_LOG")


def log_timing(name: str, kind: str, start_err: float, end_err: float) -> None:
    """Append measured edge errors (seconds) to $FRAMEWATCH_TIMING_LOG as JSON lines, when set."""
    if _TIMING_LOG:
        with open(_TIMING_LOG, "a") as f:
            f.write(json.dumps({"case": name, "type": kind, "start_err": start_err, "end_err": end_err}) + "\n")


# --------------------------------------------------------------------------------------------- frame makers
def canvas(seed: int = 1) -> np.ndarray:
    """The synthetic generator's still canvas (soft shapes, fine texture, hard-edged discs), 720x1280 uint8."""
    return Generator(parse_spec(f"synthetic://c?size=640x360&seed={seed}")).canvas.numpy()


def slow_pan(speed_px_per_frame: float, h: int = 360, w: int = 640, seed: int = 1) -> FrameFn:
    """A textured picture panning horizontally by a fraction of a pixel per frame (linear interpolation)."""
    c = canvas(seed).astype(np.float32)

    def frame(n: int) -> np.ndarray:
        x = 100 + n * speed_px_per_frame
        i = int(np.floor(x))
        f = x - i
        a, b = c[40 : 40 + h, i : i + w], c[40 : 40 + h, i + 1 : i + 1 + w]
        return np.round(a * (1 - f) + b * f).clip(0, 255).astype(np.uint8)

    return frame


def moving_object(size: int, every: int, h: int = 360, w: int = 640, seed: int = 1) -> FrameFn:
    """A static textured background with a small bright textured square moving right by 1 px every `every`
    frames (a far-away pedestrian, a slow car)."""
    bg = canvas(seed)[40 : 40 + h, 100 : 100 + w].copy()
    obj = (np.random.default_rng(seed + 100).integers(0, 60, (size, size)) + 170).astype(np.uint8)

    def frame(n: int) -> np.ndarray:
        y = bg.copy()
        x = w // 3 + n // every
        y0 = h // 2 - size // 2
        y[y0 : y0 + size, x : x + size] = obj
        return y

    return frame


def with_clock(base: FrameFn, box: tuple[int, int, int, int]) -> FrameFn:
    """Overlay a running clock: a box (x, y, w, h) of high-contrast 'digits' that change on every frame."""
    x, y, bw, bh = box

    def frame(n: int) -> np.ndarray:
        img = np.array(base(n), dtype=np.uint8, copy=True)
        cells = np.random.default_rng(10_000 + n).integers(16, 236, (bh // 8, bw // 8)).astype(np.uint8)
        img[y : y + bh, x : x + bw] = np.kron(cells, np.ones((8, 8), dtype=np.uint8))
        return img

    return frame


def with_logo(base: FrameFn, box: tuple[int, int, int, int], seed: int = 5) -> FrameFn:
    """Overlay a static bright textured logo in a box (x, y, w, h) on every frame."""
    x, y, bw, bh = box
    logo = (np.random.default_rng(seed).integers(0, 40, (bh, bw)) + 180).astype(np.uint8)

    def frame(n: int) -> np.ndarray:
        img = np.array(base(n), dtype=np.uint8, copy=True)
        img[y : y + bh, x : x + bw] = logo
        return img

    return frame


def synthetic_frames(url: str) -> tuple[FrameFn, AudioFn, int, int]:
    """(luma of frame n, audio samples [a, b), frame count, fps) of a synthetic:// spec, full-size frames.

    Pictures are Generator.luma's, except that `blur` frames are cropped from a canvas blurred once (the
    generator's Gaussian, sigma 3) instead of blurring every frame: the same picture up to the 9 pixels at
    the borders, at a fraction of the cost (the per-frame convolution dominates clip making on a CPU)."""
    spec = parse_spec(url)
    gen = Generator(spec)
    fps = int(spec.fps)
    blurred = Generator(spec)
    blurred.canvas = _gauss_np(gen.canvas.numpy(), 3.0, 9)

    def frame(i: int) -> np.ndarray:
        t = i / spec.fps
        if gen.fault("blur", t) and not any(gen.fault(k, t) for k in ("black", "freeze", "blocky", "glitch")):
            return np.asarray(blurred._clean(t))
        return _full_size(gen.luma(i).numpy(), spec.height, spec.width)

    return frame, (lambda a, b: gen.audio(a, b).numpy()), round(spec.duration * fps), fps


def _gauss_np(img: np.ndarray, sigma: float, r: int) -> np.ndarray:
    k = np.exp(-((np.arange(-r, r + 1) / sigma) ** 2) / 2)
    k /= k.sum()
    z = img.astype(np.float32)
    for axis in (1, 0):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (r, r)
        zp = np.pad(z, pad, mode="edge")
        n = z.shape[axis]
        z = sum(k[j] * np.take(zp, np.arange(j, j + n), axis=axis) for j in range(2 * r + 1))
    return np.round(z).clip(0, 255).astype(np.uint8)


def break_scoring_for(engine: Any, stream: str) -> None:
    """Make the engine's black metric family fail whenever `stream` is in the batch: a stand-in for a frame
    no kernel can digest."""
    real = engine.scoring.families["black"]

    def black_family(batch, req, idx):
        if any(w.stream == stream for w in batch.works):
            raise RuntimeError("cannot score this frame")
        return real(batch, req, idx)

    engine.scoring.add_family("black", black_family)
