"""`synthetic://` — moving test content with tone and noise audio, and faults at scheduled times.

URL form: synthetic://NAME?size=640x360&fps=25&duration=30&tone=1000&level=-20&seed=1
          &faults=black@5:3,freeze@10:3,loudness@20:4:12
A fault is KIND@START:DURATION[:PARAM] in seconds. Kinds: black, freeze, blocky, blur, glitch (single bad
frames every PARAM seconds, default 0.2), silence, clipping (PARAM = gain dB, default 18), loudness
(PARAM = gain dB, default 12), nosignal (nothing is delivered), dropout (all channels digital zero), phase
(the second channel inverted), mute (the second channel digital zero), dc (PARAM added to the first
channel, default 0.05), clicks (a 0.3 impulse on the first channel every PARAM seconds, default 0.25).
duration=0 runs until stopped.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlparse

import numpy as np
import torch
import torch.nn.functional as F

from engine.batch import StreamQueue
from engine.media import AUDIO_RATE, SMALL_H, SMALL_W, AudioChunk, SourceStatus, StreamInfo, VideoFrame
from engine.sources.base import Source, SourceError, SourceOptions

FAULT_KINDS = ("black", "freeze", "blocky", "blur", "glitch", "silence", "clipping", "loudness", "nosignal",
               "dropout", "phase", "mute", "dc", "clicks")


@dataclass(frozen=True)
class Fault:
    kind: str
    start: float
    duration: float
    param: float | None = None

    @property
    def end(self) -> float:
        return self.start + self.duration

    def covers(self, t: float) -> bool:
        return self.start <= t < self.end


@dataclass(frozen=True)
class SyntheticSpec:
    name: str = "synthetic"
    width: int = 640
    height: int = 360
    fps: float = 25.0
    duration: float = 30.0
    tone: float = 1000.0
    level_db: float = -20.0
    noise_db: float = -50.0
    channels: int = 2
    seed: int = 1
    faults: tuple[Fault, ...] = field(default_factory=tuple)


def parse_fault(text: str) -> Fault:
    try:
        kind, rest = text.strip().split("@", 1)
        parts = [float(p) for p in rest.split(":")]
    except ValueError as exc:
        raise SourceError(f"bad fault {text!r}: expected KIND@START:DURATION[:PARAM]") from exc
    kind = kind.strip().lower()
    if kind not in FAULT_KINDS:
        raise SourceError(f"unknown fault kind {kind!r}; known: {', '.join(FAULT_KINDS)}")
    if len(parts) not in (2, 3) or parts[0] < 0 or parts[1] <= 0 or not all(math.isfinite(x) and abs(x) < 1e9 for x in parts):
        raise SourceError(f"bad fault {text!r}: expected KIND@START:DURATION[:PARAM], finite, with DURATION > 0")
    return Fault(kind, parts[0], parts[1], parts[2] if len(parts) == 3 else None)


def parse_spec(url: str, extra_faults: list[dict] | None = None) -> SyntheticSpec:
    u = urlparse(url)
    if u.scheme != "synthetic":
        raise SourceError(f"not a synthetic URL: {url}")
    q = {k: v[-1] for k, v in parse_qs(u.query, keep_blank_values=True).items()}
    known = {"size", "fps", "duration", "tone", "level", "noise", "channels", "seed", "faults", "pace"}
    unknown = set(q) - known
    if unknown:
        raise SourceError(f"unknown synthetic option(s) {sorted(unknown)}; known: {sorted(known)}")
    try:
        w, h = (int(x) for x in q.get("size", "640x360").lower().split("x"))
        spec = SyntheticSpec(
            name=(u.netloc or u.path.strip("/") or "synthetic"),
            width=w,
            height=h,
            fps=float(q.get("fps", 25)),
            duration=float(q.get("duration", 30)),
            tone=float(q.get("tone", 1000)),
            level_db=float(q.get("level", -20)),
            noise_db=float(q.get("noise", -50)),
            channels=int(q.get("channels", 2)),
            seed=int(q.get("seed", 1)),
        )
    except ValueError as exc:
        raise SourceError(f"bad synthetic URL {url!r}: {exc}") from exc
    if spec.width < 64 or spec.height < 64 or spec.width % 16 or spec.height % 8 or spec.width * spec.height > 7680 * 4320:
        raise SourceError("synthetic size must be 64x64 to 8K (7680x4320 pixels) with width a multiple of 16, height of 8")
    if not 1 <= spec.fps <= 240 or not 0 <= spec.duration < 1e9 or not 1 <= spec.channels <= 8:
        raise SourceError("synthetic fps must be 1..240, duration >= 0, channels 1..8")
    # NaN passes every comparison and then silences the audio analysis: said here instead.
    if not 1 <= spec.tone <= 23_000 or not -150 <= spec.level_db <= 0 or not -150 <= spec.noise_db <= 0 or spec.seed < 0:
        raise SourceError("synthetic tone must be 1..23000 Hz, level and noise -150..0 dBFS, seed >= 0")
    faults = [parse_fault(f) for f in q.get("faults", "").split(",") if f.strip()]
    for f in extra_faults or []:
        faults.append(parse_fault(f"{f['kind']}@{f['start']}:{f['duration']}" + (f":{f['param']}" if f.get("param") is not None else "")))
    return SyntheticSpec(**{**spec.__dict__, "faults": tuple(sorted(faults, key=lambda f: f.start))})


class Generator:
    """Deterministic content for a spec: frame n and the audio samples [a, b) are pure functions of n, a, b."""

    def __init__(self, spec: SyntheticSpec) -> None:
        self.spec = spec
        g = torch.Generator().manual_seed(spec.seed)
        h, w = spec.height, spec.width
        ch, cw = 2 * h, 2 * w
        # A canvas twice the picture size, panned along a Lissajous path: large soft shapes plus fine
        # texture, so every frame moves, has real detail (for blur) and no 8x8 grid (for blockiness).
        coarse = torch.rand(1, 1, ch // 32 + 2, cw // 32 + 2, generator=g)
        soft = F.interpolate(coarse, size=(ch, cw), mode="bicubic", align_corners=False)[0, 0]
        mid = F.interpolate(torch.rand(1, 1, ch // 6 + 2, cw // 6 + 2, generator=g), size=(ch, cw), mode="bilinear", align_corners=False)[0, 0]
        fine = torch.rand(ch, cw, generator=g)
        canvas = 40 + 150 * soft.clamp(0, 1) + 30 * mid + 14 * fine
        yy, xx = torch.meshgrid(torch.arange(ch), torch.arange(cw), indexing="ij")
        for k in range(6):  # a few hard-edged discs at odd positions
            cy, cx, r = (float(v) for v in torch.rand(3, generator=g) * torch.tensor([ch, cw, h / 6]) + torch.tensor([0, 0, 12]))
            canvas = torch.where((yy - cy) ** 2 + (xx - cx) ** 2 < r * r, torch.tensor(45.0 + 30 * k), canvas)
        self.canvas = canvas.clamp(16, 235).round().to(torch.uint8)
        self.chroma = torch.stack(
            [
                (128 + 40 * torch.sin(torch.linspace(0, 3.1, SMALL_W // 2))).repeat(SMALL_H // 2, 1),
                (128 + 40 * torch.cos(torch.linspace(0, 3.1, SMALL_H // 2))).unsqueeze(1).repeat(1, SMALL_W // 2),
            ]
        ).round().to(torch.uint8)
        self.noise_rng = np.random.default_rng(spec.seed)
        self._glitch_rng = torch.Generator().manual_seed(spec.seed + 7)

    def rgb_fn(self, luma: torch.Tensor, black: bool):
        """Thumbnail renderer for a frame: its luma tinted with the stream's colour gradient."""

        def render() -> np.ndarray:
            y = (small_of(luma).float() - 16.0) * 1.164
            c = self.chroma.float().repeat_interleave(2, 1).repeat_interleave(2, 2) - 128.0
            if black:
                c = torch.zeros_like(c)
            u, v = c[0], c[1]
            rgb = torch.stack([y + 1.596 * v, y - 0.392 * u - 0.813 * v, y + 2.017 * u], dim=-1)
            return rgb.clamp(0, 255).to(torch.uint8).numpy()

        return render

    def fault(self, kind: str, t: float) -> Fault | None:
        for f in self.spec.faults:
            if f.kind == kind and f.covers(t):
                return f
        return None

    def _clean(self, t: float) -> torch.Tensor:
        s = self.spec
        # A steady diagonal pan bouncing inside the canvas, like a slow camera move: about 1/12 of the width
        # per second, never standing still (a sinusoidal path would stop at its turning points).
        ox = int(_bounce(t * s.width / 12.0 + s.width / 3, s.width))
        oy = int(_bounce(t * s.height / 20.0 + s.height / 5, s.height))
        return self.canvas[oy : oy + s.height, ox : ox + s.width]

    def luma(self, n: int) -> torch.Tensor:
        s = self.spec
        t = n / s.fps
        if self.fault("black", t):
            return torch.full((s.height, s.width), 16, dtype=torch.uint8)
        fz = self.fault("freeze", t)
        y = self._clean(fz.start if fz else t).clone()
        if self.fault("blocky", t):
            b = 16
            y = F.avg_pool2d(y[None, None].float(), b, ceil_mode=True)[0, 0].round().to(torch.uint8)
            y = y.repeat_interleave(b, 0).repeat_interleave(b, 1)[: s.height, : s.width].contiguous()
        if self.fault("blur", t):
            k = torch.exp(-((torch.arange(-9, 10, dtype=torch.float32) / 3.0) ** 2) / 2)
            k = (k / k.sum()).view(1, 1, 1, -1)
            z = y[None, None].float()
            z = F.conv2d(F.pad(z, (9, 9, 0, 0), mode="replicate"), k)
            z = F.conv2d(F.pad(z, (0, 0, 9, 9), mode="replicate"), k.transpose(2, 3))
            y = z[0, 0].round().clamp(0, 255).to(torch.uint8)
        gl = self.fault("glitch", t)
        if gl:
            period = gl.param or 0.2
            k = round((t - gl.start) * s.fps)
            if k % max(1, round(period * s.fps)) == 0:
                # Decoder garbage: random 16x16 blocks, visible at any scale.
                blocks = torch.randint(16, 236, (s.height // 16 + 1, s.width // 16), dtype=torch.uint8, generator=self._glitch_rng)
                y = blocks.repeat_interleave(16, 0).repeat_interleave(16, 1)[: s.height]
        return y

    def audio(self, a: int, b: int) -> torch.Tensor:
        """Samples a..b-1 of the stream at 48 kHz, shape (channels, b - a)."""
        s = self.spec
        idx = np.arange(a, b, dtype=np.float64)
        t = idx / AUDIO_RATE
        amp = 10 ** (s.level_db / 20)
        x = amp * np.sin(2 * np.pi * s.tone * t)
        x = x + 10 ** (s.noise_db / 20) * self.noise_rng.standard_normal(len(idx))
        gain = np.ones_like(t)
        for f in s.faults:
            inside = (t >= f.start) & (t < f.end)
            if f.kind in ("silence", "dropout"):
                gain[inside] = 0.0
            elif f.kind == "loudness":
                gain[inside] = 10 ** ((f.param if f.param is not None else 12.0) / 20)
            elif f.kind == "clipping":
                gain[inside] = 10 ** ((f.param if f.param is not None else 18.0) / 20)
        x = np.tile(x * gain, (s.channels, 1))
        for f in s.faults:
            # Channel faults switch in and out over 2 ms, as a router or mixer does: a hard switch would
            # itself be a click.
            ramp = np.clip(np.minimum(t - f.start, f.end - t) / 0.002, 0.0, 1.0)
            if f.kind == "phase" and s.channels > 1:
                x[1] *= 1.0 - 2.0 * ramp
            elif f.kind == "mute" and s.channels > 1:
                x[1] *= 1.0 - ramp
            elif f.kind == "dc":
                x[0] += ramp * (f.param if f.param is not None else 0.05)
            elif f.kind == "clicks":
                period = round((f.param if f.param is not None else 0.25) * AUDIO_RATE)
                first, last = round(f.start * AUDIO_RATE), round(f.end * AUDIO_RATE)
                hit = ((idx - first) % period == 0) & (idx >= first) & (idx < last)
                x[0, hit] += 0.3
        return torch.from_numpy(np.clip(x, -1.0, 1.0).astype(np.float32))


def _bounce(x: float, span: int) -> float:
    """Triangle wave between 0 and span: a position that moves at constant speed and turns around."""
    x = x % (2 * span)
    return x if x <= span else 2 * span - x


def small_of(luma: torch.Tensor) -> torch.Tensor:
    return F.interpolate(luma[None, None].float(), size=(SMALL_H, SMALL_W), mode="area")[0, 0].round().to(torch.uint8)


class SyntheticSource(Source):
    live = False

    def __init__(self, url: str, options: SourceOptions, faults: list[dict] | None = None) -> None:
        self.spec = parse_spec(url, faults)
        q = parse_qs(urlparse(url).query)
        if "pace" in q and options.pace == "auto":
            options.pace = q["pace"][-1]
        super().__init__(url, options)
        s = self.spec
        self.info = StreamInfo(url=url, live=False, container="synthetic", video_codec="raw", width=s.width,
                               height=s.height, fps=s.fps, audio_codec="pcm", audio_channels=s.channels,
                               audio_rate=AUDIO_RATE, duration=s.duration or None, decoder="synthetic")

    @property
    def realtime(self) -> bool:
        return self.options.pace != "fast"

    def run(self, queue: StreamQueue, stop: threading.Event) -> None:
        s = self.spec
        gen = Generator(s)
        queue.put_status(SourceStatus("connected", "", time.time(), info=self.info))
        wall0 = time.monotonic()
        n = 0
        dur = 1.0 / s.fps
        while not stop.is_set() and not queue.closed:
            t = n / s.fps
            if s.duration and t >= s.duration - 1e-9:
                break
            if self.realtime:
                ahead = t - (time.monotonic() - wall0)
                if ahead > 0 and stop.wait(ahead):
                    break
            if gen.fault("nosignal", t):
                n += 1
                continue
            now = time.time()
            # The source options' video/audio switches hold here as for real inputs (load tests, video-only
            # monitoring): the time line runs on either way.
            if self.options.video:
                y = gen.luma(n)
                black = gen.fault("black", t) is not None
                frame = VideoFrame(pts=t, duration=dur, luma=y, small=small_of(y), rgb=gen.rgb_fn(y, black),
                                   key_frame=True, index=n)
                queue.counters.video_frames += 1
                queue.put_video(frame, now)
            if self.options.audio:
                a, b = round(n * AUDIO_RATE / s.fps), round((n + 1) * AUDIO_RATE / s.fps)
                layout = "stereo" if s.channels == 2 else ("mono" if s.channels == 1 else f"{s.channels}c")
                queue.counters.audio_chunks += 1
                queue.put_audio(AudioChunk(pts=a / AUDIO_RATE, samples=gen.audio(a, b), layout=layout), now)
            n += 1
        queue.put_status(SourceStatus("eof", "", time.time()))
