"""Helpers shared by the tests: generated clips (PyAV), the framewatch CLI in processes of its own, the
FFmpeg CLI and the optional real sample clips.

Everything here makes its own media; nothing is downloaded. Clips are small (320x240, a few seconds) so a
whole test file stays within seconds. Import as `from media import write_clip, Cli, ...` (tests/ is on
sys.path under pytest's default import mode).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

REPO = Path(__file__).resolve().parent.parent
AUDIO_RATE = 48_000

LumaFn = Callable[[int], np.ndarray]
AudioFn = Callable[[int, int], np.ndarray]

# suffix -> (container format, default audio codec)
_CONTAINERS = {
    ".mp4": ("mp4", "aac"),
    ".mov": ("mov", "aac"),
    ".mkv": ("matroska", "aac"),
    ".ts": ("mpegts", "aac"),
    ".avi": ("avi", "pcm_s16le"),
    ".wav": ("wav", "pcm_s16le"),
}


# -- content -------------------------------------------------------------------------------------------


class MovingPattern:
    """Default picture content: a textured canvas twice the picture size panned diagonally at about
    one pixel per frame (never still, real fine detail, no 8x8 grid), deterministic for a seed."""

    def __init__(self, size: tuple[int, int], seed: int = 1) -> None:
        w, h = size
        self.w, self.h = w, h
        rng = np.random.default_rng(seed)
        ch, cw = 2 * h, 2 * w
        yy, xx = np.mgrid[0:ch, 0:cw].astype(np.float32)
        soft = np.zeros((ch, cw), np.float32)
        for _ in range(6):  # a few large soft waves
            fx, fy, ph = rng.uniform(0.5, 3.0), rng.uniform(0.5, 3.0), rng.uniform(0, 2 * np.pi)
            soft += np.sin(2 * np.pi * (fx * xx / cw + fy * yy / ch) + ph)
        soft = (soft - soft.min()) / (soft.max() - soft.min())
        fine = rng.random((ch, cw), dtype=np.float32)
        canvas = 40 + 140 * soft + 24 * fine
        for k in range(6):  # hard-edged discs
            cy, cx, r = rng.uniform(0, ch), rng.uniform(0, cw), rng.uniform(h / 10, h / 5)
            canvas = np.where((yy - cy) ** 2 + (xx - cx) ** 2 < r * r, 50.0 + 28 * k, canvas)
        self.canvas = np.clip(np.round(canvas), 16, 235).astype(np.uint8)

    def __call__(self, n: int) -> np.ndarray:
        ox = _bounce(n * 1.0 + self.w / 3, self.w)
        oy = _bounce(n * 0.6 + self.h / 5, self.h)
        return self.canvas[int(oy) : int(oy) + self.h, int(ox) : int(ox) + self.w]


def _bounce(x: float, span: int) -> float:
    x = x % (2 * span)
    return x if x <= span else 2 * span - x


def sine(freq: float = 1000.0, dbfs: float = -20.0, channels: int = 2, rate: int = AUDIO_RATE) -> AudioFn:
    """audio_fn for a sine of `dbfs` peak level in every channel."""
    amp = 10 ** (dbfs / 20)

    def fn(a: int, b: int) -> np.ndarray:
        t = np.arange(a, b, dtype=np.float64) / rate
        x = (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)
        return np.tile(x, (channels, 1))

    return fn


def with_black(luma_fn: LumaFn, fps: float, start: float, end: float) -> LumaFn:
    """luma_fn with black pictures (luma 16) for frames whose time n/fps is in [start, end)."""

    def fn(n: int) -> np.ndarray:
        y = luma_fn(n)
        if start <= n / fps < end:
            return np.full_like(y, 16)
        return y

    return fn


def synthetic_luma(url: str) -> LumaFn:
    """luma_fn from the engine's own synthetic:// generator (faults included)."""
    from engine.sources.synthetic import Generator, parse_spec

    gen = Generator(parse_spec(url))
    return lambda n: gen.luma(n).numpy()


def synthetic_audio(url: str) -> AudioFn:
    """audio_fn from the engine's synthetic:// generator (48 kHz)."""
    from engine.sources.synthetic import Generator, parse_spec

    gen = Generator(parse_spec(url))
    return lambda a, b: gen.audio(a, b).numpy()


# -- writing clips -------------------------------------------------------------------------------------


def _yuv420(y: np.ndarray) -> np.ndarray:
    h, w = y.shape
    c = np.full((h // 2) * (w // 2), 128, np.uint8)
    return np.concatenate([y.reshape(-1), c, c]).reshape(h * 3 // 2, w)


def write_clip(
    path: str | Path,
    *,
    size: tuple[int, int] = (320, 240),
    fps: int = 25,
    seconds: float = 4.0,
    codec: str | None = "libx264",
    audio: bool = True,
    luma_fn: LumaFn | None = None,
    audio_fn: AudioFn | None = None,
    crf: int = 18,
    gop: int = 25,
    audio_codec: str | None = None,
    audio_rate: int = AUDIO_RATE,
    channels: int = 2,
    start: float = 0.0,
    audio_drop: tuple[float, float] | None = None,
    bframes: int = 0,
    audio_clock: Callable[[float], float] | None = None,
) -> Path:
    """Write a clip with PyAV; the container follows the suffix (.mp4 .mov .mkv .ts .avi .wav).

    Video (unless codec is None or the file is .wav): `round(seconds * fps)` frames of luma_fn(n), an
    (H, W) uint8 array, with neutral chroma; libx264 (crf, gop), ffv1 (lossless: decoded frames equal the
    input) or any other encoder PyAV has, e.g. mpeg4. Audio: `channels` float samples from audio_fn(a, b)
    (default a 1 kHz sine at -20 dBFS) at `audio_rate`, encoded with AAC or, for .wav/.avi or when asked,
    pcm_s16le. `start` shifts every timestamp (seconds), like a capture that does not begin at 0.
    `audio_drop=(a, b)` leaves out the audio frames that begin within [a, b) seconds (lost packets: a gap
    in the audio timestamps while the video goes on). `audio_clock(t)` maps each audio frame's true time
    to the timestamp written for it (timestamps that drift or jump while the samples stay continuous).
    Encoding is single-threaded, so a clip is the same bytes on every machine. Returns the path.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _CONTAINERS:
        raise ValueError(f"unsupported suffix {suffix!r}")
    fmt, default_acodec = _CONTAINERS[suffix]
    if suffix == ".wav":
        codec = None
        audio = True
    w, h = size
    luma_fn = luma_fn or MovingPattern(size)
    audio_fn = audio_fn or sine(rate=audio_rate, channels=channels)
    acodec = audio_codec or default_acodec
    n_frames = round(seconds * fps) if codec else 0
    n_samples = round(seconds * audio_rate)

    out = av.open(str(path), "w", format=fmt)
    try:
        vs = as_ = None
        if codec:
            vs = out.add_stream(codec, rate=fps)
            vs.width, vs.height = w, h
            vs.pix_fmt = "yuv420p"
            vs.time_base = Fraction(1, fps)
            vs.codec_context.time_base = Fraction(1, fps)
            if codec == "libx264":
                vs.options = {"crf": str(crf), "preset": "veryfast", "g": str(gop), "keyint_min": str(gop),
                              "sc_threshold": "0", "bf": str(bframes), "threads": "1"}
            elif codec == "libx265":
                vs.options = {"crf": str(crf + 4), "preset": "ultrafast", "x265-params":
                              f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes={bframes}:pools=1:frame-threads=1:log-level=error"}
            elif codec == "mpeg4":
                vs.codec_context.gop_size = gop
                vs.options = {"qscale": "3"}
                vs.codec_context.qmax = 4
            elif codec == "ffv1":
                vs.codec_context.gop_size = 1
        if audio:
            layout = "stereo" if channels == 2 else ("mono" if channels == 1 else f"{channels}c")
            as_ = out.add_stream(acodec, rate=audio_rate, layout=layout)
            if acodec == "aac":
                as_.codec_context.bit_rate = 192_000
            as_.time_base = Fraction(1, audio_rate)

        a_done = 0
        aframe = 1024

        def push_audio(until: int) -> None:
            nonlocal a_done
            while as_ is not None and a_done < min(until, n_samples):
                b = min(a_done + aframe, n_samples)
                if audio_drop is not None and audio_drop[0] <= a_done / audio_rate < audio_drop[1]:
                    a_done = b
                    continue
                x = np.ascontiguousarray(audio_fn(a_done, b), dtype=np.float32)
                assert x.shape == (channels, b - a_done), x.shape
                # Packed samples: PyAV's planar frames of 8 or more channels have one plane too many.
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x.T).reshape(1, -1), format="flt",
                                                   layout=as_.codec_context.layout.name)
                frame.sample_rate = audio_rate
                t_audio = a_done / audio_rate if audio_clock is None else audio_clock(a_done / audio_rate)
                frame.pts = round((t_audio + start) * audio_rate)
                frame.time_base = Fraction(1, audio_rate)
                for p in as_.encode(frame):
                    out.mux(p)
                a_done = b

        for n in range(n_frames):
            y = np.ascontiguousarray(luma_fn(n), dtype=np.uint8)
            assert y.shape == (h, w), (y.shape, (h, w))
            frame = av.VideoFrame.from_ndarray(_yuv420(y), format="yuv420p")
            frame.pts = n + round(start * fps)
            frame.time_base = Fraction(1, fps)
            for p in vs.encode(frame):
                out.mux(p)
            push_audio(round((n + 1) * audio_rate / fps))
        push_audio(n_samples)
        if vs is not None:
            for p in vs.encode(None):
                out.mux(p)
        if as_ is not None:
            for p in as_.encode(None):
                out.mux(p)
    finally:
        out.close()
    return path


def flash_and_beep(offset: float, fps: int = 25, period: float = 1.0, first: float = 0.48, flash_frames: int = 1,
                   size: tuple[int, int] = (320, 240), beep: float | None = None, freq: float = 1000.0,
                   dbfs: float = -12.0, channels: int = 2) -> tuple[LumaFn, AudioFn]:
    """The A/V sync test pattern: `flash_frames` white frames on black every `period` seconds from the frame
    at `first` (both rounded to whole frames), and a tone burst as long as the flash (or `beep` seconds) that
    starts `offset` seconds after each flash starts (positive: audio late)."""
    w, h = size
    black = np.full((h, w), 16, np.uint8)
    white = np.full((h, w), 235, np.uint8)
    amp = 10 ** (dbfs / 20)
    every = round(period * fps)
    n0 = round(first * fps)
    burst = flash_frames / fps if beep is None else beep

    def luma(n: int) -> np.ndarray:
        return white if n >= n0 and (n - n0) % every < flash_frames else black

    def audio(a: int, b: int) -> np.ndarray:
        t = np.arange(a, b) / AUDIO_RATE
        phase = t - n0 / fps - offset
        k = np.floor(phase * fps / every)
        into = phase - k * every / fps
        inside = (k >= 0) & (into < burst)
        x = np.where(inside, amp * np.sin(2 * np.pi * freq * into), 0.0)
        return np.repeat(x[None].astype(np.float32), channels, axis=0)

    return luma, audio


def decoded_audio(path: str | Path, rate: int = AUDIO_RATE) -> tuple[np.ndarray, str]:
    """All audio of a file as float32 (C, T) at `rate`, and its layout name (PyAV, like the engine)."""
    with av.open(str(path)) as c:
        s = c.streams.audio[0]
        layout = s.codec_context.layout.name
        res = av.AudioResampler(format="fltp", layout=layout, rate=rate)
        parts = []
        for packet in c.demux(s):
            try:
                frames = packet.decode()
            except av.error.InvalidDataError:
                continue  # a damaged packet (Megamind.avi has one): skipped, as the engine does
            for frame in frames:
                parts.extend(r.to_ndarray() for r in res.resample(frame))
        parts.extend(r.to_ndarray() for r in res.resample(None))
    return np.concatenate(parts, axis=1).astype(np.float32), layout


def shift_audio(src: str | Path, dst: str | Path, offset: float, transform: Callable[[np.ndarray], np.ndarray] | None = None) -> Path:
    """Copy `src`'s video packets into Matroska `dst` and re-write its audio as PCM with the content moved
    `offset` seconds later (positive: audio late; silence is put in front) or earlier (the first samples
    are cut), timestamps starting at 0 for both: what a sync fault upstream of an encoder looks like.
    `transform` may change the decoded samples (C, T) first (a fault injected into real audio)."""
    x, layout = decoded_audio(src)
    if transform is not None:
        x = np.ascontiguousarray(transform(x), dtype=np.float32)
    shift = round(abs(offset) * AUDIO_RATE)
    if offset > 0:
        x = np.concatenate([np.zeros((x.shape[0], shift), np.float32), x], axis=1)
    elif offset < 0:
        x = x[:, shift:]
    with av.open(str(src)) as inp, av.open(str(dst), "w", format="matroska") as out:
        vin = inp.streams.video[0]
        vout = out.add_stream_from_template(vin)
        aout = out.add_stream("pcm_s16le", rate=AUDIO_RATE, layout=layout)
        aout.time_base = Fraction(1, AUDIO_RATE)
        v0 = vin.start_time or 0
        packets = []
        for pkt in inp.demux(vin):
            if pkt.size == 0:
                continue
            if pkt.pts is not None:
                pkt.pts -= v0
            if pkt.dts is not None:
                pkt.dts -= v0
            pkt.stream = vout
            packets.append((float((pkt.pts if pkt.pts is not None else 0) * vin.time_base), pkt))
        a = 0

        def audio_until(t: float) -> None:
            nonlocal a
            while a < x.shape[1] and a / AUDIO_RATE <= t:
                b = min(a + 1024, x.shape[1])
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x[:, a:b]), format="fltp", layout=layout)
                frame.sample_rate = AUDIO_RATE
                frame.pts = a
                frame.time_base = Fraction(1, AUDIO_RATE)
                for p in aout.encode(frame):
                    out.mux(p)
                a = b

        for t, pkt in packets:  # interleaved by time, as a muxer expects
            audio_until(t)
            out.mux(pkt)
        audio_until(float("inf"))
        for p in aout.encode(None):
            out.mux(p)
    return Path(dst)


def frame_count(path: str | Path) -> int:
    """Frames in the first video stream, by decoding (the truth for comparisons)."""
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


# -- the CLI -------------------------------------------------------------------------------------------
#
# A fresh `python -m engine.cli` spends about 3 s of CPU importing torch before it does anything. `Cli`
# therefore runs commands by default in processes forked from one server that imported engine.cli once:
# each command still is a process of its own (its own stdout/stderr files, exit code, signals; a crash in
# FFmpeg is a negative exit code, not a dead test run), it just starts warm. `fresh=True` (and run_cli /
# run_check) start a real `python -m engine.cli` instead.

_SERVER = r"""
import json, os, select, sys, traceback

import engine.cli  # the slow import, once for every command


def child(req):
    code = 1
    try:
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, req["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                                (2, req["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
            f = os.open(path, flags, 0o644)
            os.dup2(f, fd)
            os.close(f)
        os.chdir(req["cwd"])
        sys.argv = ["framewatch", *req["argv"]]
        try:
            engine.cli.main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def say(msg):
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


children, buf, eof = set(), b"", False
while not (eof and not children):
    ready, _, _ = select.select([] if eof else [0], [], [], 0.02)
    if ready:
        data = os.read(0, 65536)
        eof = not data
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            req = json.loads(line)
            pid = os.fork()
            if pid == 0:
                child(req)
            children.add(pid)
            say({"id": req["id"], "pid": pid})
    while children:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            break
        children.discard(pid)
        say({"pid": pid, "rc": os.waitstatus_to_exitcode(status)})
"""


def _cli_env() -> dict[str, str]:
    return {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}


class _ForkServer:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="framewatch-cli-"))
        self._log = open(self.dir / "server.log", "wb")  # noqa: SIM115 - open for the server's lifetime
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
            cwd=str(REPO), env=_cli_env(),
        )
        self._cond = threading.Condition()
        self._pids: dict[int, int] = {}
        self._rcs: dict[int, int] = {}
        self._next = 0
        self._dead = False
        threading.Thread(target=self._read, name="cli-server", daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            msg = json.loads(line)
            with self._cond:
                if "id" in msg:
                    self._pids[msg["id"]] = msg["pid"]
                else:
                    self._rcs[msg["pid"]] = msg["rc"]
                self._cond.notify_all()
        with self._cond:
            self._dead = True
            self._cond.notify_all()

    def submit(self, argv: list[str], cwd: str) -> tuple[int, Path, Path]:
        with self._cond:
            rid = self._next
            self._next += 1
        out, err = self.dir / f"{rid}.out", self.dir / f"{rid}.err"
        line = json.dumps({"id": rid, "argv": argv, "cwd": cwd, "out": str(out), "err": str(err)}) + "\n"
        with self._cond:
            self.proc.stdin.write(line.encode())
            self.proc.stdin.flush()
        return rid, out, err

    def pid(self, rid: int) -> int | None:
        with self._cond:
            return self._pids.get(rid)

    def wait(self, rid: int, timeout: float) -> int:
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                pid = self._pids.get(rid)
                if pid is not None and pid in self._rcs:
                    return self._rcs.pop(pid)
                if self._dead:
                    raise RuntimeError(f"CLI fork server died: {(self.dir / 'server.log').read_text()[-2000:]}")
                left = end - time.monotonic()
                if left <= 0:
                    if pid is not None:
                        self._rcs.pop(pid, None)
                    raise subprocess.TimeoutExpired(["engine.cli", str(rid)], timeout)
                self._cond.wait(min(left, 0.5))

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
        self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


_server: _ForkServer | None = None
_server_lock = threading.Lock()


def _fork_server() -> _ForkServer:
    global _server
    with _server_lock:
        if _server is None:
            _server = _ForkServer()
            atexit.register(_server.close)
        return _server


class Cli:
    """`framewatch ARGS...` started in the background in a process of its own; `result()` waits for it and
    returns a CompletedProcess (text stdout/stderr). Starting several before waiting on any runs them side
    by side. Default: forked from the warm server above; fresh=True: a new `python -m engine.cli`."""

    def __init__(self, *args: str | Path, timeout: float = 60, cwd: str | Path | None = None, fresh: bool = False) -> None:
        self.argv = [str(a) for a in args]
        self.args = [sys.executable, "-m", "engine.cli", *self.argv]
        self.timeout = timeout
        self._result: subprocess.CompletedProcess | None = None
        self.proc: subprocess.Popen | None = None
        if fresh:
            self.proc = subprocess.Popen(
                self.args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                cwd=str(cwd or REPO), env=_cli_env(),
            )
        else:
            self._server = _fork_server()
            self._rid, self._out, self._err = self._server.submit(self.argv, str(cwd or REPO))

    def kill(self) -> None:
        """Stops the command if it still runs (for fixture teardown)."""
        if self._result is not None:
            return
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.communicate()
            return
        pid = self._server.pid(self._rid)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def result(self) -> subprocess.CompletedProcess:
        if self._result is None:
            if self.proc is not None:
                try:
                    out, err = self.proc.communicate(timeout=self.timeout)
                except subprocess.TimeoutExpired:
                    self.kill()
                    raise
                rc = self.proc.returncode
            else:
                try:
                    rc = self._server.wait(self._rid, self.timeout)
                except subprocess.TimeoutExpired:
                    self.kill()
                    raise
                out = self._out.read_text(encoding="utf-8", errors="replace")
                err = self._err.read_text(encoding="utf-8", errors="replace")
            self._result = subprocess.CompletedProcess(self.args, rc, out, err)
        return self._result


def run_cli(*args: str | Path, timeout: float = 60, cwd: str | Path | None = None, fresh: bool = True) -> subprocess.CompletedProcess:
    """`python -m engine.cli ARGS...` in a new process (stdin closed, stdout/stderr captured as text);
    fresh=False forks it from the warm server instead (seconds faster)."""
    return Cli(*args, timeout=timeout, cwd=cwd, fresh=fresh).result()


def run_check(*args: str | Path, timeout: float = 60, fresh: bool = True) -> subprocess.CompletedProcess:
    """`python -m engine.cli check ARGS...` in a new process."""
    return run_cli("check", *args, timeout=timeout, fresh=fresh)


def json_lines(stdout: str) -> list[dict]:
    """Every non-empty stdout line parsed as one JSON object."""
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def check_json(path: str | Path, *extra: str | Path, timeout: float = 60, fresh: bool = True) -> dict:
    """`check --json PATH EXTRA...` for one file: its report, with the exit code under "_rc" and stderr
    under "_stderr". Fails unless stdout holds exactly one JSON object."""
    proc = run_check("--json", path, *extra, timeout=timeout, fresh=fresh)
    objs = json_lines(proc.stdout)
    assert len(objs) == 1, f"expected one JSON object, got {len(objs)}; rc={proc.returncode} stderr={proc.stderr!r}"
    report = objs[0]
    report["_rc"] = proc.returncode
    report["_stderr"] = proc.stderr
    return report


# -- environment ---------------------------------------------------------------------------------------


def has_ffmpeg() -> bool:
    return shutil.which("ffmpeg") is not None


def samples_dir() -> Path | None:
    """The real sample clips fetched by tests/fetch_samples.sh, or None when they are not there."""
    p = Path(os.environ.get("FRAMEWATCH_SAMPLES", Path.home() / ".cache" / "framewatch" / "samples"))
    return p if p.is_dir() and any(p.iterdir()) else None
