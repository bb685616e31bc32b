#!/usr/bin/env python3
"""CPU benchmark: ``framewatch check`` against the FFmpeg CLI on a generated 1080p30 H.264 + AAC clip.

    .venv/bin/python benchmarks/cpu_vs_ffmpeg.py                      # 60 s clip, 3 runs (make bench)
    .venv/bin/python benchmarks/cpu_vs_ffmpeg.py --seconds 10 --runs 1 --out /tmp/bench.json   # quick try
    .venv/bin/python benchmarks/cpu_vs_ffmpeg.py --skip-full          # leave out blockdetect + blurdetect

Peers, all reading the same file on the same machine in the same invocation:

* ``ffmpeg_decode``      ``ffmpeg -i CLIP -f null -``: decode video and audio, no analysis (the floor; the
                         null muxer still wraps video frames and converts audio to s16, both cheap).
* ``ffmpeg_detect``      (b) blackdetect, freezedetect / silencedetect, ebur128.
* ``ffmpeg_detect_full`` (c) (b) plus blockdetect, blurdetect.
* ``framewatch``         ``framewatch check CLIP --json`` with every detector enabled by default.

Each run of a peer is one whole process, timed from spawn to exit (``time.perf_counter``); its CPU time
(user + sys) and peak RSS come from ``os.wait4`` on that one child, so they are per run, not the
max-so-far of ``RUSAGE_CHILDREN``. Runs are interleaved (every peer's run 1, then every peer's run 2, ...)
so slow drift of the machine hits every peer alike; the reported figures are medians over ``--runs``.

Whole-process frames/s (frames / wall time) includes start-up: FFmpeg probing, framewatch importing torch.
The steady-state rate removes it: every peer also runs on a short clip that is an exact prefix of the long
one (about a third of it, cut at a GOP boundary by stream copy), and
``steady fps = (frames_long - frames_short) / (wall_long - wall_short)`` per run index, whose start-up
terms cancel. Its CPU counterpart, ``steady_cpu_ms_per_frame``, is less disturbed by other load on the
machine. The targets (from the issue) are judged on the steady-state rates:

* framewatch within 1.25x of FFmpeg decode-only: ``decode_steady_fps / framewatch_steady_fps <= 1.25``;
* at least 10x faster than (c): ``framewatch_steady_fps / full_steady_fps >= 10``;
* while running more checks than (c) (framewatch's default detectors against (c)'s filters).

The clip (cached in ``benchmarks/.cache/``, keyed by its generating command and the FFmpeg version) is a
slowly panning 1920x1080 window over a 3840x2160 generated texture (multi-octave noise, a Mandelbrot layer
and colour gradients) with a rotating inset for local motion, encoded with libx264 ``medium`` at ~8 Mbit/s,
fixed GOP 60, yuv420p, plus AAC stereo 48 kHz (a tone over pink noise near -23 LUFS). It holds a 3 s black
stretch, then a 3 s frozen stretch, and a 3 s silent stretch, placed after the short prefix.

Expected time on the 2-core development machine when it is quiet (scales with --seconds and --runs):
generating the 60 s clip once takes ~3-5 min; one run (60 s + 20 s clip) costs about 25 s decode-only,
30 s (b), 4-4.5 min (c) (blockdetect + blurdetect are single-threaded, ~0.1 s of CPU per 1080p frame on
this clip) and 45 s framewatch: ~6 min per run, ~18 min for the default 3 runs, ~5 min with --skip-full.
``--seconds 10 --runs 1`` takes ~1.5 min plus ~1 min to generate its clip.

Output: JSON (default ``benchmarks/results/cpu_vs_ffmpeg.json``, written atomically) with machine facts,
parameters, the clips, every run and the medians per peer, the ratios and the target booleans; a short
table is printed at the end.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(__file__).resolve().parent / ".cache"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "cpu_vs_ffmpeg.json"

FPS = 30
WIDTH, HEIGHT = 1920, 1080
GOP = 60
VIDEO_BITRATE = "8M"
PRESET = "medium"
FAULT_SECONDS = 3.0

# Targets from the issue, on steady-state frames/s.
DECODE_SLOWDOWN_TARGET = 1.25
FULL_SPEEDUP_TARGET = 10.0

# Rough costs on the 2-core development machine (wall seconds per media second, start-up seconds),
# used only to print an estimate before starting.
ROUGH_COST = {"ffmpeg_decode": (0.3, 0.1), "ffmpeg_detect": (0.36, 0.1), "ffmpeg_detect_full": (3.0, 0.1),
              "framewatch": (0.5, 3.0)}


# --------------------------------------------------------------------------------------------- clip


@dataclass(frozen=True)
class Faults:
    """Fault windows in seconds, placed after the short prefix so the prefix stays clean."""

    black: tuple[float, float]
    freeze: tuple[float, float]
    silence: tuple[float, float]

    @classmethod
    def for_length(cls, seconds: float) -> Faults:
        black = 0.35 * seconds
        freeze = black + FAULT_SECONDS + 0.5   # half a second of motion between black and freeze
        silence = 0.5 * seconds
        return cls((black, black + FAULT_SECONDS), (freeze, freeze + FAULT_SECONDS),
                   (silence, silence + FAULT_SECONDS))


def _texture_graph() -> str:
    """One 3840x2160 still with detail at every scale, so the panned 1080p window costs real bits.

    Flat patterns would make H.264 decoding unrealistically cheap (and trip blur detectors): here
    four octaves of noise (upscaled and blurred, then fine grain) give a cloud / stone texture, a
    Mandelbrot layer adds sharp edges, and gradients add colour. Each source renders one frame.
    """
    def octave(size: str) -> str:
        return (f"color=gray:s={size}:d=1:r=1,format=gray,noise=c0s=100:c0f=u,gblur=sigma=1,"
                f"scale=3840x2160:flags=bicubic")

    sources = [
        "gradients=s=3840x2160:n=6:seed=3:d=1:r=1,format=gbrp",
        octave("120x68"), octave("480x270"), octave("1920x1080"),
        "color=gray:s=3840x2160:d=1:r=1,format=gray,noise=c0s=40:c0f=u",
        ("mandelbrot=s=3840x2160:r=1:maxiter=300:start_x=-0.743643887037151:start_y=0.131825904205330:"
         "start_scale=0.02:outer=normalized_iteration_count,format=gray"),
    ]
    chains = [f"{src}[s{i}]" for i, src in enumerate(sources)]
    chains += [
        "[s1][s2]blend=all_mode=overlay[o1]",
        "[o1][s3]blend=all_mode=softlight[o2]",
        "[o2][s4]blend=all_mode=softlight[o3]",
        "[o3][s5]blend=all_mode=overlay:all_opacity=0.6,format=gbrp[lum]",
        "[s0][lum]blend=all_mode=overlay,format=yuv420p[tex]",
    ]
    return ";".join(chains)


def clip_command(seconds: float, out: Path) -> list[str]:
    """The ffmpeg command that renders the benchmark clip (its argv is also the cache key)."""
    f = Faults.for_length(seconds)
    # Every moving part is a function of this clock; holding it still makes the frozen stretch (frames
    # bit-identical before the encoder, as from a stalled feed) and motion resumes where it stopped.
    tt = f"(t-clip(t-{f.freeze[0]:.3f},0,{FAULT_SECONDS:.3f}))"
    video = (
        # Loop the still at 30 fps, pan a 1080p window over it (slow Lissajous path, <= ~5 px/frame)
        # and overlay a rotating tile of it moving the other way: global plus local motion.
        # The texture sources run at r=1 (time base 1 s): settb first, or every t below would be whole
        # seconds and the picture would move once a second.
        f"[tex]loop=loop=-1:size=1:start=0,settb=1/{FPS},setpts=N,split[bg][fg];"
        f"[bg]crop={WIDTH}:{HEIGHT}:x='(iw-ow)/2*(1-cos(2*PI*{tt}/40))':y='(ih-oh)/2*(1-cos(2*PI*{tt}/27))'[pan];"
        f"[fg]crop=640:640:2600:300,format=yuva420p,rotate=a='0.4*{tt}':c=none[tile];"
        f"[pan][tile]overlay=x='(W-w)/2+500*sin(2*PI*{tt}/13)':y='(H-h)/2+150*sin(2*PI*{tt}/7)':format=yuv420,"
        f"drawbox=c=black:t=fill:enable='between(t,{f.black[0]:.3f},{f.black[1] - 0.001:.3f})',"
        f"fps={FPS}[v]"  # timestamps are already 1/30 s apart; this sets the stream rate x264 budgets with
    )
    audio = (
        # A 440 Hz tone over pink noise, near -23 LUFS (EBU R128 target) so no loudness alert fires;
        # digital silence in the silent window.
        "[0][1]amix=inputs=2,pan=stereo|c0=c0|c1=c0,volume=1dB,"
        f"volume=0:enable='between(t,{f.silence[0]:.3f},{f.silence[1]:.3f})'[a]"
    )
    return [
        "ffmpeg", "-nostdin", "-hide_banner", "-v", "error", "-y",
        "-f", "lavfi", "-i", "sine=f=440:r=48000",
        "-f", "lavfi", "-i", "anoisesrc=c=pink:r=48000:a=0.2:seed=5",
        "-filter_complex", f"{_texture_graph()};{video};{audio}",
        "-map", "[v]", "-map", "[a]", "-t", f"{seconds:g}",
        "-c:v", "libx264", "-preset", PRESET, "-profile:v", "high", "-pix_fmt", "yuv420p",
        "-b:v", VIDEO_BITRATE, "-maxrate", VIDEO_BITRATE, "-bufsize", "16M",
        # Fixed GOP (no scene-cut I-frames) so the short prefix can be cut on a GOP boundary.
        "-g", str(GOP), "-keyint_min", str(GOP), "-sc_threshold", "0",
        "-c:a", "aac", "-b:a", "192k", "-ar", "48000", "-ac", "2",
        "-f", "mp4", str(out),
    ]


def probe(path: Path) -> dict[str, Any]:
    """Frame count (video packets, no decoding), duration and bit rates of a clip."""
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-count_packets", "-show_entries",
         "stream=codec_type,codec_name,nb_read_packets,bit_rate:format=duration,bit_rate",
         "-of", "json", str(path)],
        check=True, capture_output=True, text=True).stdout
    info = json.loads(out)
    video = next(s for s in info["streams"] if s["codec_type"] == "video")
    audio = next((s for s in info["streams"] if s["codec_type"] == "audio"), {})
    return {
        "path": str(path), "size_bytes": path.stat().st_size,
        "frames": int(video["nb_read_packets"]), "duration_s": float(info["format"]["duration"]),
        "video_codec": video.get("codec_name"), "video_kbps": int(video.get("bit_rate", 0)) // 1000,
        "audio_codec": audio.get("codec_name"), "audio_kbps": int(audio.get("bit_rate", 0)) // 1000,
    }


def ensure_clips(seconds: float, ffmpeg_version: str) -> tuple[Path, Path, int]:
    """The long clip and its short prefix, generated once per parameter set and reused from the cache."""
    CACHE.mkdir(parents=True, exist_ok=True)
    frames = round(seconds * FPS)
    # A third of the clip, rounded down to whole GOPs: a stream-copy cut there is an exact prefix
    # (closed GOPs), so long and short differ only by the frames after it.
    short_frames = max(GOP, (frames // 3) // GOP * GOP)
    if short_frames >= frames:
        raise SystemExit(f"--seconds {seconds:g} is too short: the clip needs more than one GOP ({GOP} frames) "
                         "beyond the short prefix")
    cmd = clip_command(seconds, Path("OUT"))
    key = hashlib.sha256(json.dumps([cmd, ffmpeg_version]).encode()).hexdigest()[:10]
    stem = f"clip-{seconds:g}s-{HEIGHT}p{FPS}-{key}"
    long_path, short_path = CACHE / f"{stem}.mp4", CACHE / f"{stem}-prefix{short_frames}.mp4"
    if not long_path.exists():
        tmp = long_path.with_name(long_path.name + ".tmp")
        log(f"generating {long_path.name} ({seconds:g} s, libx264 {PRESET}; cached for later runs) ...")
        t0 = time.perf_counter()
        subprocess.run(clip_command(seconds, tmp), check=True)
        os.replace(tmp, long_path)  # never leave a half-written clip under the final name
        log(f"  done in {time.perf_counter() - t0:.0f} s")
    if not short_path.exists():
        tmp = short_path.with_name(short_path.name + ".tmp")
        subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(long_path), "-map", "0", "-c", "copy",
                        # -frames:v counts packets in decode order: exactly the first GOPs (a -t cut alone
                        # keeps a B-frame or two of the next GOP); -t cuts the audio to match.
                        "-frames:v", str(short_frames), "-t", f"{short_frames / FPS:.6f}", "-f", "mp4", str(tmp)],
                       check=True)
        os.replace(tmp, short_path)
    return long_path, short_path, short_frames


# --------------------------------------------------------------------------------------------- peers


@dataclass(frozen=True)
class Peer:
    """One tool under test: how to run it on a clip and what to read from its output."""

    name: str
    checks: tuple[str, ...]                       # the checks it runs (filters or detectors)
    argv: Callable[[Path], list[str]]
    parse: Callable[[str, str], dict[str, Any]]   # (stdout, stderr) -> frames / events / measurements
    ok_codes: tuple[int, ...] = (0,)


_FRAME_RE = re.compile(r"frame=\s*(\d+)")


def parse_ffmpeg(stdout: str, stderr: str) -> dict[str, Any]:
    """Frames from the last progress line, detection counts and summaries from the filters' log lines."""
    frames = _FRAME_RE.findall(stderr)
    starts = {kind: [round(float(x), 3) for x in re.findall(rf"{kind}_start: ?(-?[\d.]+)", stderr)]
              for kind in ("black", "freeze", "silence")}
    starts = {k: v for k, v in starts.items() if v}
    out: dict[str, Any] = {"frames": int(frames[-1]) if frames else None,
                           "events": {k: len(v) for k, v in starts.items()}, "event_starts": starts}
    summary = stderr.rsplit("Summary:", 1)
    if len(summary) == 2 and (m := re.search(r"I:\s*(-?[\d.]+) LUFS", summary[1])):
        out["integrated_lufs"] = float(m.group(1))
    for name in ("block", "blur"):
        if m := re.search(rf"{name} mean: (\S+)", stderr):
            value = float(m.group(1))
            out[f"{name}_mean"] = None if math.isnan(value) else value
    return out


def ffmpeg_peer(name: str, vfilters: tuple[str, ...] = (), afilters: tuple[str, ...] = ()) -> Peer:
    def argv(clip: Path) -> list[str]:
        # Decode-only stays at -v error (nothing to report); detection filters log at info level.
        cmd = ["ffmpeg", "-nostdin", "-hide_banner", "-v", "info" if vfilters or afilters else "error", "-i", str(clip)]
        if vfilters:
            cmd += ["-vf", ",".join(vfilters)]
        if afilters:
            cmd += ["-af", ",".join(afilters)]
        return [*cmd, "-f", "null", "-"]

    return Peer(name, vfilters + afilters, argv, parse_ffmpeg)


def framewatch_command() -> tuple[list[str], str]:
    """framewatch's console script and the interpreter it runs under.

    Prefer the script next to the running interpreter (``.venv/bin/python benchmarks/...``), then the
    repo's .venv, then ``python -m engine.cli``.
    """
    for python in (Path(sys.executable), REPO / ".venv" / "bin" / "python"):
        script = python.parent / "framewatch"
        if script.exists() and python.exists():
            return [str(script)], str(python)
    return [sys.executable, "-m", "engine.cli"], sys.executable


def parse_framewatch(stdout: str, stderr: str) -> dict[str, Any]:
    report = json.loads(stdout.strip().splitlines()[-1])
    starts: dict[str, list[float]] = {}
    for event in report.get("events", []):
        starts.setdefault(event["type"], []).append(round(float(event["start"]), 3))
    return {
        "frames": (report.get("video") or {}).get("frames"),
        "events": report.get("summary", {}),
        "event_starts": starts,
        "integrated_lufs": (report.get("audio") or {}).get("integrated_lufs"),
        "errors": report.get("errors", []),
    }


def framewatch_peer(cmd: list[str], detectors: list[str]) -> Peer:
    # Exit code 1 means "faults found", which the clip is built to produce.
    return Peer("framewatch", tuple(detectors), lambda clip: [*cmd, "check", str(clip), "--json"],
                parse_framewatch, ok_codes=(0, 1))


# --------------------------------------------------------------------------------------------- running


@dataclass
class Run:
    peer: str
    run: int
    clip: str                  # "long" or "short"
    frames: int                # frames in the clip (probed)
    wall_s: float
    user_s: float
    sys_s: float
    max_rss_mib: float
    returncode: int
    loadavg_1m: float          # just before the run: a busy machine shows here
    parsed: dict[str, Any] = field(default_factory=dict)

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s


def run_once(peer: Peer, clip: Path) -> tuple[float, resource.struct_rusage, int, str, str]:
    """Run one process; wall time from spawn to reap, rusage of exactly this child via os.wait4."""
    # Output goes to unnamed temp files, not pipes: nothing has to be read while the child runs,
    # so the parent can block in wait4 and the child never stalls on a full pipe.
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(peer.argv(clip), stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen from waiting again
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if proc.returncode not in peer.ok_codes:
        tail = "\n".join(stderr.strip().splitlines()[-5:])
        raise SystemExit(f"{peer.name} failed (exit {proc.returncode}) on {clip.name}:\n{tail}")
    return wall, usage, proc.returncode, stdout, stderr


def measure(peer: Peer, clip: Path, label: str, frames: int, index: int) -> Run:
    load = os.getloadavg()[0]
    wall, usage, rc, stdout, stderr = run_once(peer, clip)
    run = Run(peer.name, index, label, frames, round(wall, 4), round(usage.ru_utime, 4), round(usage.ru_stime, 4),
              round(usage.ru_maxrss / 1024, 1), rc, round(load, 2), peer.parse(stdout, stderr))
    got = run.parsed.get("frames")
    if got is not None and got != frames:
        log(f"  warning: {peer.name} reported {got} frames, the clip has {frames}")
    log(f"  run {index} {peer.name:<19} {label:<5} {wall:7.2f} s wall {run.cpu_s:7.2f} s cpu "
        f"{frames / wall:7.1f} fps {run.max_rss_mib:7.0f} MiB")
    return run


def summarize(runs: list[Run]) -> dict[str, Any]:
    """Medians over runs; steady state per run index from the long/short pair, then the median."""
    long = {r.run: r for r in runs if r.clip == "long"}
    short = {r.run: r for r in runs if r.clip == "short"}
    steady_fps, steady_cpu = [], []
    for i in sorted(long.keys() & short.keys()):
        a, b = long[i], short[i]
        dframes, dwall, dcpu = a.frames - b.frames, a.wall_s - b.wall_s, a.cpu_s - b.cpu_s
        if dwall > 0:  # a negative difference would be noise, not a rate
            steady_fps.append(dframes / dwall)
        steady_cpu.append(1000 * dcpu / dframes)
    wall_long = statistics.median(r.wall_s for r in long.values())
    frames = next(iter(long.values())).frames
    return {
        "wall_long_s": round(wall_long, 3),
        "wall_short_s": round(statistics.median(r.wall_s for r in short.values()), 3),
        "cpu_long_s": round(statistics.median(r.cpu_s for r in long.values()), 3),
        "max_rss_mib": max(r.max_rss_mib for r in runs),
        "whole_fps": round(frames / wall_long, 2),
        "steady_fps": round(statistics.median(steady_fps), 2) if steady_fps else None,
        "steady_fps_runs": [round(x, 2) for x in steady_fps],
        "steady_cpu_ms_per_frame": round(statistics.median(steady_cpu), 3) if steady_cpu else None,
        # Start-up estimate: what the long run took beyond its frames at the steady rate.
        "startup_s": round(wall_long - frames / statistics.median(steady_fps), 3) if steady_fps else None,
    }


# --------------------------------------------------------------------------------------------- facts


def tool_version(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.splitlines()[0].strip()
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "unknown"


_FW_FACTS = """
import importlib.metadata as md, json, platform
def v(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
import av
from engine.config import FramewatchConfig, resolve_detectors
enabled = sorted(n for n, c in resolve_detectors(FramewatchConfig()).items() if c.enabled)
print(json.dumps({"python": platform.python_version(), "framewatch": v("framewatch"), "torch": v("torch"),
                  "av": v("av"), "numpy": v("numpy"), "av_ffmpeg": getattr(av, "ffmpeg_version_info", None),
                  "detectors": enabled}))
"""


def framewatch_facts(python: str) -> dict[str, Any]:
    """Versions and default detectors as framewatch's own interpreter sees them (it may not be ours)."""
    proc = subprocess.run([python, "-c", _FW_FACTS], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"cannot import framewatch with {python}:\n{proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_facts(ffmpeg_version: str, fw: dict[str, Any]) -> dict[str, Any]:
    return {
        "cpu_model": cpu_model(),
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python_benchmark": platform.python_version(),
        "python_framewatch": fw["python"],
        "framewatch": fw["framewatch"],
        "torch": fw["torch"],
        "numpy": fw["numpy"],
        "av": fw["av"],
        # framewatch decodes with the FFmpeg libraries bundled in PyAV, which need not match the CLI's.
        "av_ffmpeg": fw["av_ffmpeg"],
        "ffmpeg_cli": ffmpeg_version,
        "loadavg_start": list(os.getloadavg()),
    }


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- main


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def print_table(result: dict[str, Any]) -> None:
    peers = result["peers"]
    head = (f"{'peer':<19} {'checks':>6} {'wall s':>8} {'fps':>7} {'steady fps':>10} {'ms/frame cpu':>12} "
            f"{'start s':>7} {'RSS MiB':>7}  events")
    print(f"\n{result['parameters']['seconds']:g} s {HEIGHT}p{FPS} clip ({result['clips']['long']['frames']} frames), "
          f"median of {result['parameters']['runs']} run(s); steady = long minus short "
          f"({result['clips']['short']['frames']} frames)")
    print(head)
    print("-" * len(head))
    for name, p in peers.items():
        m = p["median"]
        events = ", ".join(f"{k} {v}" for k, v in sorted(p["events"].items())) or "-"
        print(f"{name:<19} {p['checks']:>6} {m['wall_long_s']:>8.2f} {m['whole_fps']:>7.1f} "
              f"{_f(m['steady_fps'], 10, 1)} {_f(m['steady_cpu_ms_per_frame'], 12, 2)} {_f(m['startup_s'], 7, 2)} "
              f"{m['max_rss_mib']:>7.0f}  {events}")
    r = result["ratios"]
    print(f"\nslowdown vs decode-only (decode / framewatch steady fps): {_f(r['slowdown_vs_decode'], 0, 2)}"
          f"  target <= {DECODE_SLOWDOWN_TARGET}  -> {_yn(r['meets_decode_target'])}"
          f"   (in CPU time per frame: {_f(r['cpu_slowdown_vs_decode'], 0, 2)})")
    print(f"speedup vs (c) full detection (framewatch / full steady fps): {_f(r['speedup_vs_full'], 0, 2)}"
          f"  target >= {FULL_SPEEDUP_TARGET:g}  -> {_yn(r['meets_full_target'])}"
          f"   (in CPU time per frame: {_f(r['cpu_speedup_vs_full'], 0, 2)})")
    print(f"checks: framewatch {r['framewatch_checks']} vs (c) {r['full_checks']}"
          f" -> more checks: {_yn(r['runs_more_checks_than_full'])}")
    print(f"load average start {result['machine']['loadavg_start'][0]:.2f}, "
          f"end {result['machine']['loadavg_end'][0]:.2f} (nproc {result['machine']['nproc']})")


def _f(x: float | None, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if x is None else f"{x:>{width}.{digits}f}"


def _yn(x: bool | None) -> str:
    return "n/a" if x is None else ("yes" if x else "NO")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0, help="length of the long clip (default 60)")
    ap.add_argument("--runs", type=int, default=3, help="runs per peer and clip, interleaved (default 3)")
    ap.add_argument("--skip-full", action="store_true", help="leave out (c), FFmpeg with blockdetect + blurdetect")
    ap.add_argument("--no-warmup", action="store_true",
                    help="skip the untimed warm-up run of each peer on the short clip")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"result JSON (default {DEFAULT_OUT.relative_to(REPO)})")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be >= 1")
    if args.seconds < 9:
        ap.error("--seconds must be >= 9 (three 3 s faults and a short prefix have to fit)")
    for tool in ("ffmpeg", "ffprobe"):
        if shutil.which(tool) is None:
            ap.error(f"{tool} not found on PATH")

    started = dt.datetime.now(dt.UTC)
    ffmpeg_version = tool_version(["ffmpeg", "-version"])
    fw_cmd, fw_python = framewatch_command()
    fw = framewatch_facts(fw_python)
    machine = machine_facts(ffmpeg_version, fw)

    long_path, short_path, _ = ensure_clips(args.seconds, ffmpeg_version)
    clips = {"long": probe(long_path), "short": probe(short_path)}
    clips["long"]["faults"] = {k: list(v) for k, v in vars(Faults.for_length(args.seconds)).items()}

    basic_v, basic_a = ("blackdetect", "freezedetect"), ("silencedetect", "ebur128")
    peers = [
        ffmpeg_peer("ffmpeg_decode"),
        ffmpeg_peer("ffmpeg_detect", basic_v, basic_a),
        ffmpeg_peer("ffmpeg_detect_full", (*basic_v, "blockdetect", "blurdetect"), basic_a),
        framewatch_peer(fw_cmd, fw["detectors"]),
    ]
    full_checks = len(peers[2].checks)  # counted even with --skip-full, for the "more checks" comparison
    if args.skip_full:
        peers = [p for p in peers if p.name != "ffmpeg_detect_full"]

    media = args.seconds + clips["short"]["duration_s"]
    estimate = sum(args.runs * (ROUGH_COST[p.name][0] * media + 2 * ROUGH_COST[p.name][1]) for p in peers)
    log(f"{len(peers)} peers x {args.runs} run(s) x 2 clips ({args.seconds:g} s + {clips['short']['duration_s']:g} s); "
        f"rough estimate on a quiet 2-core machine: {estimate / 60:.1f} min")

    if not args.no_warmup:
        # One untimed run per peer on the short clip fills the page cache (clip, ffmpeg and Python
        # libraries, torch) so run 1 is not penalised. (c) shares every file with (b) and is the
        # costliest by far, so it gets none.
        for peer in peers:
            if peer.name != "ffmpeg_detect_full":
                log(f"  warm-up {peer.name}")
                run_once(peer, short_path)

    runs: dict[str, list[Run]] = {p.name: [] for p in peers}
    for i in range(1, args.runs + 1):
        # Alternate long/short order per run index so drift within a pair does not bias the difference.
        order = (("long", long_path), ("short", short_path))
        for peer in peers:
            for label, path in order if i % 2 else order[::-1]:
                runs[peer.name].append(measure(peer, path, label, clips[label]["frames"], i))

    result_peers: dict[str, Any] = {}
    for peer in peers:
        rs = runs[peer.name]
        last_long = [r for r in rs if r.clip == "long"][-1]
        result_peers[peer.name] = {
            "argv": peer.argv(Path("CLIP")),
            "checks": len(peer.checks),
            "check_names": list(peer.checks),
            "events": last_long.parsed.get("events", {}),
            "measurements": {k: v for k, v in last_long.parsed.items() if k not in ("events", "frames")},
            "median": summarize(rs),
            "runs": [{**{k: v for k, v in vars(r).items() if k not in ("peer", "parsed")},
                      "cpu_s": round(r.cpu_s, 4), "frames_reported": r.parsed.get("frames")} for r in rs],
        }

    def steady(name: str, key: str = "steady_fps") -> float | None:
        return result_peers[name]["median"][key] if name in result_peers else None

    fw_fps, dec_fps, full_fps = steady("framewatch"), steady("ffmpeg_decode"), steady("ffmpeg_detect_full")
    cpu = "steady_cpu_ms_per_frame"
    fw_cpu, dec_cpu, full_cpu = steady("framewatch", cpu), steady("ffmpeg_decode", cpu), steady("ffmpeg_detect_full", cpu)
    slowdown, speedup = ratio(dec_fps, fw_fps), ratio(fw_fps, full_fps)
    ratios = {
        "framewatch_over_decode_steady_fps": ratio(fw_fps, dec_fps),
        "slowdown_vs_decode": slowdown,
        "speedup_vs_full": speedup,
        "slowdown_vs_decode_whole": ratio(result_peers["ffmpeg_decode"]["median"]["whole_fps"],
                                          result_peers["framewatch"]["median"]["whole_fps"]),
        "speedup_vs_full_whole": ratio(result_peers["framewatch"]["median"]["whole_fps"],
                                       result_peers["ffmpeg_detect_full"]["median"]["whole_fps"])
        if "ffmpeg_detect_full" in result_peers else None,
        # The same two ratios in CPU time per frame: less disturbed by other load, but blind to how
        # well each tool spreads over the cores (FFmpeg's frame threads use both here).
        "cpu_slowdown_vs_decode": ratio(fw_cpu, dec_cpu),
        "cpu_speedup_vs_full": ratio(full_cpu, fw_cpu),
        "decode_target": DECODE_SLOWDOWN_TARGET,
        "full_target": FULL_SPEEDUP_TARGET,
        "meets_decode_target": None if slowdown is None else slowdown <= DECODE_SLOWDOWN_TARGET,
        "meets_full_target": None if speedup is None else speedup >= FULL_SPEEDUP_TARGET,
        "framewatch_checks": result_peers["framewatch"]["checks"],
        "full_checks": full_checks,
        "runs_more_checks_than_full": result_peers["framewatch"]["checks"] > full_checks,
    }
    machine["loadavg_end"] = list(os.getloadavg())
    finished = dt.datetime.now(dt.UTC)
    result = {
        "benchmark": "cpu_vs_ffmpeg",
        "started": started.isoformat(timespec="seconds"),
        "finished": finished.isoformat(timespec="seconds"),
        "elapsed_s": round((finished - started).total_seconds(), 1),
        "machine": machine,
        "parameters": {"seconds": args.seconds, "runs": args.runs, "skip_full": args.skip_full,
                       "warmup": not args.no_warmup, "fps": FPS, "width": WIDTH, "height": HEIGHT, "gop": GOP,
                       "video_bitrate": VIDEO_BITRATE, "x264_preset": PRESET,
                       "order": "interleaved by run index: every peer's long+short pair, then the next run"},
        "clips": clips,
        "peers": result_peers,
        "ratios": ratios,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.out)
    print_table(result)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
