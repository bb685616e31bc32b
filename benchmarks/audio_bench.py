#!/usr/bin/env python3
"""Audio benchmark: what framewatch's audio scoring costs per stream-hour against the FFmpeg CLI, and how
accurately its A/V sync detector measures known offsets.

    .venv/bin/python benchmarks/audio_bench.py                  # 16 streams x 60 s, full sync table (~2.5 min)
    .venv/bin/python benchmarks/audio_bench.py --quick          # 4 streams x 20 s, fewer sync cases (~40 s)
    .venv/bin/python benchmarks/audio_bench.py --device cuda    # kernels on the GPU (wall time counts there)

Part 1, cost. Programme audio (the soundtrack of the Megamind.avi sample, stereo 48 kHz, tiled with short
crossfades to the length needed; generated programme-like noise when the sample is missing) is fed as
100 ms chunks to N streams at once: one ``ScoringStep.score_audio`` call per chunk round with every stream
batched (each stream its own ``AudioState``), then the metrics go to one instance per stream of every
default-enabled audio detector (``MEDIA`` "audio" or "av"). av_sync gets audio only: its onset bookkeeping
is counted, its correlation (which needs pictures) is not. CPU time (``time.process_time``, the whole
process) and wall time are taken around the kernels and around the detectors of every round, so the
figures are steady state: no interpreter start, no imports, and an untimed warm-up round first. This is
done twice, with the click analysis on (``AudioState.clicks`` and the clicks detector) and off.

The peer is what users run per stream: ``ffmpeg -nostats -i WAV -af ebur128=peak=true,silencedetect=d=2,
astats=metadata=0 -f null -`` on a pcm_s16le WAV of the same S seconds (stream 0's audio), one process per
stream, run min(N, 4) times in sequence, its CPU time from ``RUSAGE_CHILDREN`` deltas. Whole-process
figures include FFmpeg's start-up; a run on a 1 s prefix gives the start-up alone, so a steady figure is
reported too. Both tools' integrated loudness and true peak of that audio are recorded as a cross-check.
Cost is CPU seconds per stream-hour = cpu_s / (N * S / 3600); ratios are framewatch / FFmpeg (lower is
better for framewatch).

Part 2, A/V offset accuracy. The flash-and-beep pattern (tests/media.py) at known offsets, 25 fps, 12 s,
pcm_s16le in Matroska, plus one 30 s clip for the sliding (latest 20 s window) estimate; and the real
samples Megamind.avi, cup.mp4, box.mp4 with their audio moved by known amounts (``shift_audio``). Each runs
through the engine as tests/test_av_sync.py does; recorded per clip: the true and measured offset, its
confidence and matches, the error, whether it is within one frame, whether an av_sync event fired and
whether it should have (offset outside -45 / +125 ms, BT.1359). Real programme may claim nothing, but a
claim must be right.

Output: JSON (default ``benchmarks/results/audio_bench.json``, written atomically) with machine facts,
parameters, every measurement and the summaries; a short table is printed last.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import wave
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # tests/media.py: the clip helpers the A/V sync tests use
sys.path.insert(0, str(REPO / "benchmarks"))

from cpu_vs_ffmpeg import cpu_model  # noqa: E402
from media import decoded_audio, flash_and_beep, shift_audio, write_clip  # noqa: E402

from engine.alerts import MemorySink  # noqa: E402
from engine.config import FramewatchConfig, resolve_detectors  # noqa: E402
from engine.detectors import REGISTRY  # noqa: E402
from engine.detectors.base import StreamContext  # noqa: E402
from engine.media import AUDIO_CHUNK, AUDIO_RATE  # noqa: E402
from engine.runner import Engine, StreamSpec  # noqa: E402
from engine.scoring import AudioState, AudioWork, ScoringStep  # noqa: E402
from engine.sources import SourceOptions  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "audio_bench.json"

FFMPEG_FILTERS = "ebur128=peak=true,silencedetect=d=2,astats=metadata=0"
FFMPEG_SHORT_S = 1.0  # the prefix that measures FFmpeg's start-up
CROSSFADE = 960  # 20 ms: tiled programme must not click at its joins (the click detector is measured)

SYNC_FPS = 25
SYNC_SECONDS = 12.0
SLIDING_SECONDS = 30.0
SLIDING_OFFSET = 0.2
GRID_OFFSETS = (-0.2, -0.1, -0.045, 0.0, 0.06, 0.125, 0.2, 0.3, 0.137)
QUICK_GRID_OFFSETS = (-0.2, 0.0, 0.137, 0.3)
REAL_CLIPS = ("Megamind.avi", "cup.mp4", "box.mp4")
REAL_SHIFTS = (-0.2, 0.0, 0.15, 0.3)
QUICK_REAL_SHIFTS = (0.0, 0.3)
EARLY, LATE = 0.045, 0.125  # the av_sync defaults (BT.1359 detectability)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def samples_dir() -> Path:
    return Path(os.environ.get("FRAMEWATCH_SAMPLES", Path.home() / ".cache" / "framewatch" / "samples"))


# --------------------------------------------------------------------------------------------- facts


def tool_version(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.splitlines()[0].strip()
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "unknown"


def machine_facts(device: torch.device, threads: int) -> dict[str, Any]:
    import av

    facts: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": threads,
        "numpy": np.__version__,
        "av": av.__version__,
        "ffmpeg_cli": tool_version(["ffmpeg", "-version"]),
        "device": str(device),
        "loadavg_start": list(os.getloadavg()),
    }
    if device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
        facts["cuda"] = torch.version.cuda
    return facts


# --------------------------------------------------------------------------------------------- programme


def tile(x: np.ndarray, n: int) -> np.ndarray:
    """x repeated to n samples, each join a short linear crossfade."""
    if x.shape[1] >= n:
        return np.ascontiguousarray(x[:, :n])
    ramp = np.linspace(0.0, 1.0, CROSSFADE, dtype=np.float32)
    out = x
    while out.shape[1] < n:
        joined = out[:, -CROSSFADE:] * (1 - ramp) + x[:, :CROSSFADE] * ramp
        out = np.concatenate([out[:, :-CROSSFADE], joined, x[:, CROSSFADE:]], axis=1)
    return np.ascontiguousarray(out[:, :n])


def programme_noise(n: int, seed: int = 7) -> np.ndarray:
    """Stereo pink noise with a syllabic (~4 Hz) envelope and phrase pauses, about -26 dBFS RMS: the loudness,
    spectrum and dynamics of speech-led programme, so the kernels and detectors do their ordinary work."""
    rng = np.random.default_rng(seed)
    spec = np.fft.rfft(rng.standard_normal((2, n)), axis=1)
    f = np.fft.rfftfreq(n, 1 / AUDIO_RATE)
    f[0] = f[1]
    pink = np.fft.irfft(spec / np.sqrt(f), n=n, axis=1)
    stereo = np.stack([pink[0] + 0.6 * pink[1], pink[1] + 0.6 * pink[0]])  # partly correlated, like a mix
    t = np.arange(n) / AUDIO_RATE
    env = 0.55 + 0.45 * np.sin(2 * np.pi * 4.0 * t + 2 * np.sin(2 * np.pi * 0.3 * t))
    env *= np.where((t % 7.0) > 6.4, 0.05, 1.0)  # a short pause every 7 s
    x = stereo * env
    x *= 0.05 / np.sqrt(np.mean(x**2))
    return np.clip(x, -0.99, 0.99).astype(np.float32)


def programme(n: int, force_noise: bool) -> tuple[np.ndarray, str, dict[str, Any]]:
    src = samples_dir() / "Megamind.avi"
    if not force_noise and src.is_file() and src.stat().st_size:
        x, layout = decoded_audio(src)
        info = {"kind": "real", "file": str(src), "layout": layout, "channels": int(x.shape[0]),
                "rate": AUDIO_RATE, "source_seconds": round(x.shape[1] / AUDIO_RATE, 3),
                "tiled": x.shape[1] < n, "crossfade_ms": 1000 * CROSSFADE / AUDIO_RATE}
        return tile(x, n), layout, info
    why = "--noise asked for" if force_noise else f"{src} is missing (tests/fetch_samples.sh fetches it)"
    log(f"programme audio: generated noise, {why}")
    return programme_noise(n), "stereo", {"kind": "generated noise", "why": why, "layout": "stereo", "channels": 2,
                                          "rate": AUDIO_RATE}


# --------------------------------------------------------------------------------------------- part 1: cost


def audio_detector_configs(clicks: bool) -> dict[str, Any]:
    cfgs = resolve_detectors(FramewatchConfig())
    return {n: c for n, c in cfgs.items()
            if c.enabled and REGISTRY[n].MEDIA in ("audio", "av") and (clicks or n != "clicks")}


class Streams:
    """N streams' states and detector instances, and the events they raise."""

    def __init__(self, n: int, clicks: bool) -> None:
        self.events: Counter[str] = Counter()
        cfgs = audio_detector_configs(clicks)
        self.detector_names = sorted(cfgs)
        self.states: list[AudioState] = []
        self.detectors: list[list[Any]] = []
        for i in range(n):
            st = AudioState()
            st.clicks = clicks
            clip = cfgs.get("clipping")
            if clip is not None:  # as StreamRuntime sets them: they key the kernel batch
                st.clip_level = float(clip.level)
                st.clip_min_run = int(clip.min_run)
            self.states.append(st)
            ctx = StreamContext(stream=f"s{i}", emit=self._emit)
            self.detectors.append([REGISTRY[name](cfg, ctx) for name, cfg in cfgs.items()])

    def _emit(self, event: Any) -> None:
        if event.status.value == "firing":
            self.events[event.type] += 1


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def framewatch_cost(prog: torch.Tensor, layout: str, n: int, seconds: float, shift: int, device: torch.device,
                    clicks: bool) -> dict[str, Any]:
    rounds = round(seconds * AUDIO_RATE / AUDIO_CHUNK)
    step = ScoringStep(device)
    streams = Streams(n, clicks)

    def works(r: int, st: Streams) -> list[AudioWork]:
        t0 = r * AUDIO_CHUNK / AUDIO_RATE
        # Each chunk its own contiguous tensor, as a decoder hands it over.
        return [AudioWork(f"s{i}", t0, prog[:, i * shift + r * AUDIO_CHUNK: i * shift + (r + 1) * AUDIO_CHUNK].contiguous(),
                          layout, st.states[i]) for i in range(n)]

    # Untimed warm-up on throwaway states: first-call costs (allocator, lazy kernel set-up, CUDA context) are
    # paid once per process, not per stream-hour.
    warm = Streams(n, clicks)
    for r in range(3):
        step.score_audio(works(r, warm))
    sync_device(device)

    k_cpu = k_wall = d_cpu = d_wall = 0.0
    c_start, w_start = time.process_time(), time.perf_counter()
    for r in range(rounds):
        batch = works(r, streams)
        sync_device(device)
        c0, w0 = time.process_time(), time.perf_counter()
        metrics = step.score_audio(batch)
        sync_device(device)
        c1, w1 = time.process_time(), time.perf_counter()
        for m, dets in zip(metrics, streams.detectors, strict=True):
            for det in dets:
                det.on_audio(m)
        c2, w2 = time.process_time(), time.perf_counter()
        k_cpu += c1 - c0
        k_wall += w1 - w0
        d_cpu += c2 - c1
        d_wall += w2 - w1
    total_cpu, total_wall = time.process_time() - c_start, time.perf_counter() - w_start
    end = rounds * AUDIO_CHUNK / AUDIO_RATE
    for dets in streams.detectors:
        for det in dets:
            det.finish(end)

    hours = n * seconds / 3600
    st0 = streams.states[0]

    def per_hour(s: float) -> float:
        return round(s / hours, 3)

    return {
        "clicks": clicks,
        "streams": n,
        "seconds": seconds,
        "rounds": rounds,
        "detectors": streams.detector_names,
        "cpu_s": {"kernels": round(k_cpu, 4), "detectors": round(d_cpu, 4), "total": round(total_cpu, 4),
                  # Building each round's chunks and works: what the engine's batcher does, outside both.
                  "batching": round(total_cpu - k_cpu - d_cpu, 4)},
        "wall_s": {"kernels": round(k_wall, 4), "detectors": round(d_wall, 4), "total": round(total_wall, 4)},
        "cpu_s_per_stream_hour": {"kernels": per_hour(k_cpu), "detectors": per_hour(d_cpu), "total": per_hour(total_cpu)},
        "wall_s_per_stream_hour": {"kernels": per_hour(k_wall), "detectors": per_hour(d_wall), "total": per_hour(total_wall)},
        # How many such streams one core keeps up with in real time.
        "streams_per_core": round(3600 / (total_cpu / hours), 1) if total_cpu > 0 else None,
        "events": dict(sorted(streams.events.items())),
        "stream0_integrated_lufs": _round(st0.meter.integrated, 2),
        "stream0_true_peak_dbtp": _round(20 * math.log10(st0.max_true_peak), 2) if st0.max_true_peak > 0 else None,
    }


def _round(x: float | None, digits: int) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), digits)


def write_wav(path: Path, x: np.ndarray) -> Path:
    pcm = (np.clip(x, -1.0, 32767 / 32768) * 32768).round().astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(x.shape[0])
        w.setsampwidth(2)
        w.setframerate(AUDIO_RATE)
        w.writeframes(pcm.T.tobytes())
    return path


def ffmpeg_argv(wav: Path) -> list[str]:
    return ["ffmpeg", "-nostats", "-i", str(wav), "-af", FFMPEG_FILTERS, "-f", "null", "-"]


def ffmpeg_once(wav: Path) -> dict[str, Any]:
    # stdin closed so ffmpeg cannot wait on a terminal; its log goes to a file, not a pipe, so nothing has to be
    # read while it runs (ebur128 logs a line per 100 ms).
    with tempfile.TemporaryFile() as err:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        w0 = time.perf_counter()
        proc = subprocess.run(ffmpeg_argv(wav), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        wall = time.perf_counter() - w0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    if proc.returncode != 0:
        tail = "\n".join(stderr.strip().splitlines()[-5:])
        raise SystemExit(f"audio_bench: ffmpeg failed (exit {proc.returncode}):\n{tail}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    out: dict[str, Any] = {"cpu_s": round(cpu, 4), "wall_s": round(wall, 4),
                           "silences": len(re.findall(r"silence_start", stderr))}
    summary = stderr.rsplit("Summary:", 1)
    if len(summary) == 2:
        if m := re.search(r"I:\s*(-?[\d.]+) LUFS", summary[1]):
            out["integrated_lufs"] = float(m.group(1))
        if m := re.search(r"Peak:\s*(-?[\d.]+|-inf) dBFS", summary[1]):
            out["true_peak_dbtp"] = float(m.group(1))
    return out


def ffmpeg_cost(x: np.ndarray, seconds: float, runs: int, tmp: Path) -> dict[str, Any]:
    long_wav = write_wav(tmp / "stream0.wav", x[:, : round(seconds * AUDIO_RATE)])
    short_wav = write_wav(tmp / "stream0_prefix.wav", x[:, : round(FFMPEG_SHORT_S * AUDIO_RATE)])
    ffmpeg_once(short_wav)  # untimed: fills the page cache with ffmpeg's libraries
    long_runs, short_runs = [], []
    for i in range(runs):
        long_runs.append(ffmpeg_once(long_wav))
        short_runs.append(ffmpeg_once(short_wav))
        log(f"  ffmpeg run {i + 1}/{runs}: {long_runs[-1]['cpu_s']:.3f} s CPU for {seconds:g} s, "
            f"{short_runs[-1]['cpu_s']:.3f} s for the {FFMPEG_SHORT_S:g} s prefix")
    cpu = float(np.mean([r["cpu_s"] for r in long_runs]))
    wall = float(np.mean([r["wall_s"] for r in long_runs]))
    startup = float(np.mean([r["cpu_s"] for r in short_runs]))
    hours = seconds / 3600
    steady = (cpu - startup) / ((seconds - FFMPEG_SHORT_S) / 3600) if seconds > FFMPEG_SHORT_S else None
    return {
        "argv": ffmpeg_argv(Path("STREAM.wav")),
        "wav": {"seconds": seconds, "codec": "pcm_s16le", "rate": AUDIO_RATE, "channels": int(x.shape[0])},
        "processes": runs,
        "runs": long_runs,
        "prefix_runs": short_runs,
        "cpu_s_per_stream_hour": round(cpu / hours, 3),
        "wall_s_per_stream_hour": round(wall / hours, 3),
        "startup_cpu_s": round(startup, 4),
        "steady_cpu_s_per_stream_hour": None if steady is None else round(steady, 3),
        "streams_per_core": round(3600 / (cpu / hours), 1) if cpu > 0 else None,
        "integrated_lufs": long_runs[-1].get("integrated_lufs"),
        "true_peak_dbtp": long_runs[-1].get("true_peak_dbtp"),
    }


# --------------------------------------------------------------------------------------------- part 2: A/V sync


def engine_sync(path: Path, device: str, threads: int) -> tuple[dict[str, Any], list[Any], list[str], float]:
    sink = MemorySink()
    eng = Engine(sink, device=device, torch_threads=threads)
    rt = eng.add_stream(StreamSpec("s", str(path), resolve_detectors(FramewatchConfig()), SourceOptions(pace="fast")))
    w0 = time.perf_counter()
    eng.run()
    wall = time.perf_counter() - w0
    det = next(d for d in rt.detectors if d.NAME == "av_sync")
    fired = [e for e in sink.events if e.type == "av_sync" and e.status.value == "firing"]
    return det.summary(), fired, list(rt.errors), wall


def frame_seconds(path: Path) -> float:
    import av

    with av.open(str(path)) as c:
        rate = c.streams.video[0].average_rate or c.streams.video[0].guessed_rate
    return float(1 / rate)


def sync_case(kind: str, clip: str, path: Path, truth: float, frame: float, device: str, threads: int) -> dict[str, Any]:
    summary, fired, errors, wall = engine_sync(path, device, threads)
    overall = summary.get("overall") or {}
    latest = summary.get("latest") or {}
    measured = summary["offset"]
    claimed = measured is not None
    err = None if not claimed else measured - truth
    within = claimed and abs(err) <= frame + 1e-9
    should = truth < -EARLY or truth > LATE
    values_ok = all(abs(e.value - truth) <= frame + 1e-9 for e in fired)
    row = {
        "kind": kind,
        "clip": clip,
        "true_offset_s": truth,
        "measured_offset_s": measured,
        "estimate_offset_s": overall.get("offset"),  # the best lag even when too weak to claim
        "confidence": summary["confidence"],
        "correlation": summary["correlation"],
        "matches": overall.get("matches"),
        "events_rarer_kind": overall.get("events"),
        "claimed": claimed,
        "error_ms": None if err is None else round(1000 * err, 2),
        "frame_ms": round(1000 * frame, 3),
        "within_one_frame": bool(within),
        "correct_when_claimed": bool(within) if claimed else None,
        "latest_offset_s": latest.get("offset"),
        "latest_error_ms": None if latest.get("offset") is None else round(1000 * (latest["offset"] - truth), 2),
        "latest_span_s": [latest.get("start"), latest.get("end")] if latest else None,
        "estimates": summary["estimates"],
        "confident_estimates": summary["confident_estimates"],
        "event_fired": bool(fired),
        "event_should_fire": should,
        # Offsets on a threshold itself are formally in sync; a measurement a hair beyond it fires.
        "on_threshold": abs(truth + EARLY) < 1e-9 or abs(truth - LATE) < 1e-9,
        # Real programme may stay silent on a fault it cannot see (a miss, counted apart); a pattern may not.
        "event_ok": (bool(fired) == should or (kind == "real" and not fired)) and values_ok,
        "event_missed": should and not fired,
        "events": [{"value": e.value, "kind": e.details.get("kind"), "start": e.start} for e in fired],
        "engine_wall_s": round(wall, 3),
        "errors": errors,
    }
    log(f"  {kind:9} {clip:14} true {truth * 1000:+6.0f} ms -> "
        f"{'-' if measured is None else f'{measured * 1000:+7.1f} ms'} "
        f"(conf {summary['confidence']}, {overall.get('matches')} matches) "
        f"event {'yes' if fired else 'no'}{'' if row['event_ok'] else ' (WRONG)'}")
    if errors:
        log(f"    engine errors: {errors}")
    return row


def sync_accuracy(grid: tuple[float, ...], shifts: tuple[float, ...], device: str, threads: int,
                  tmp: Path) -> dict[str, Any]:
    generated, real, skipped = [], [], []
    frame = 1 / SYNC_FPS
    cases = [(o, SYNC_SECONDS, "generated") for o in grid] + [(SLIDING_OFFSET, SLIDING_SECONDS, "sliding")]
    for offset, seconds, kind in cases:
        luma, audio = flash_and_beep(offset, fps=SYNC_FPS)
        path = write_clip(tmp / f"sync_{offset:+.3f}_{seconds:g}s.mkv", luma_fn=luma, audio_fn=audio, seconds=seconds,
                          fps=SYNC_FPS, audio_codec="pcm_s16le")
        row = sync_case(kind, f"flash_beep_{seconds:g}s", path, offset, frame, device, threads)
        row["clip_seconds"] = seconds
        generated.append(row)
        path.unlink()
    for name in REAL_CLIPS:
        src = samples_dir() / name
        if not src.is_file() or not src.stat().st_size:
            skipped.append({"clip": name, "why": f"not in {samples_dir()} (tests/fetch_samples.sh fetches it)"})
            continue
        frame = frame_seconds(src)
        for shift in shifts:
            path = shift_audio(src, tmp / f"{Path(name).stem}_{shift:+.2f}.mkv", shift)
            real.append(sync_case("real", name, path, shift, frame, device, threads))
            path.unlink()
    return {"generated": generated, "real": real, "skipped": skipped, "summary": sync_summary(generated, real, skipped)}


def sync_summary(generated: list[dict], real: list[dict], skipped: list[dict]) -> dict[str, Any]:
    errs = [abs(r["error_ms"]) for r in generated if r["error_ms"] is not None]
    sliding = next((r for r in generated if r["kind"] == "sliding"), None)
    wrong_events_gen = [r for r in generated if not r["event_ok"]]
    real_errs = [abs(r["error_ms"]) for r in real if r["error_ms"] is not None]
    return {
        "generated": {
            "total": len(generated),
            "claimed": sum(r["claimed"] for r in generated),
            "within_one_frame": sum(r["within_one_frame"] for r in generated),
            "max_abs_error_ms": max(errs) if errs else None,
            "mean_abs_error_ms": round(float(np.mean(errs)), 2) if errs else None,
            "event_decisions_right": sum(r["event_ok"] for r in generated),
            # A pattern exactly on -45 / +125 ms is formally in sync, but an estimate a hair beyond it fires.
            "event_decisions_wrong_off_threshold": sum(1 for r in wrong_events_gen if not r["on_threshold"]),
            "event_decisions_wrong": [{"true_offset_s": r["true_offset_s"], "measured_offset_s": r["measured_offset_s"],
                                       "fired": r["event_fired"], "on_threshold": r["on_threshold"]}
                                      for r in wrong_events_gen],
            "sliding_latest_error_ms": sliding["latest_error_ms"] if sliding else None,
        },
        "real": {
            "total": len(real),
            "claimed": sum(r["claimed"] for r in real),
            "wrong_claims": sum(1 for r in real if r["claimed"] and not r["correct_when_claimed"]),
            "max_abs_error_ms_when_claimed": max(real_errs) if real_errs else None,
            "false_events_unshifted": sum(len(r["events"]) for r in real if r["true_offset_s"] == 0.0),
            # An event fired on a shifted clip whose value is more than a frame off the true shift.
            "wrong_value_events": sum(1 for r in real for e in r["events"]
                                      if abs(e["value"] - r["true_offset_s"]) > r["frame_ms"] / 1000 + 1e-9),
            "faults_alerted": sum(1 for r in real if r["event_should_fire"] and r["event_fired"]),
            "faults_present": sum(1 for r in real if r["event_should_fire"]),
            "skipped_clips": [s["clip"] for s in skipped],
        },
    }


# --------------------------------------------------------------------------------------------- output


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def _f(x: float | None, width: int, digits: int = 1) -> str:
    return f"{'-':>{width}}" if x is None else f"{x:>{width}.{digits}f}"


def print_table(result: dict[str, Any]) -> None:
    cost = result.get("cost")
    if cost:
        p = result["parameters"]
        src = cost["programme"]
        what = Path(src["file"]).name if src["kind"] == "real" else "generated noise"
        print(f"\nAudio cost: {p['streams']} streams x {p['seconds']:g} s ({what}), device {p['device']}, "
              f"{p['threads']} torch thread(s); per stream-hour")
        head = f"{'':34} {'kernels':>8} {'detect.':>8} {'total':>8} {'wall':>8} {'streams/core':>12} {'x ffmpeg':>9}"
        print(head)
        print("-" * len(head))
        for label, key in (("framewatch, clicks on  (CPU s)", "clicks_on"), ("framewatch, clicks off (CPU s)", "clicks_off")):
            r = cost["framewatch"][key]
            c, w = r["cpu_s_per_stream_hour"], r["wall_s_per_stream_hour"]
            print(f"{label:34} {c['kernels']:8.1f} {c['detectors']:8.1f} {c['total']:8.1f} {w['total']:8.1f} "
                  f"{_f(r['streams_per_core'], 12)} {_f(cost['ratios'][f'{key}_over_ffmpeg'], 9, 2)}")
        f = cost["ffmpeg"]
        if "skipped" in f:
            print(f"  ffmpeg peer left out: {f['skipped']}")
    if cost and "skipped" not in cost["ffmpeg"]:
        f = cost["ffmpeg"]
        print(f"{'ffmpeg ebur128+silencedet.+astats':34} {'':8} {'':8} {f['cpu_s_per_stream_hour']:8.1f} "
              f"{f['wall_s_per_stream_hour']:8.1f} {_f(f['streams_per_core'], 12)} {1:9.2f}")
        print(f"  ffmpeg without its start-up ({f['startup_cpu_s']:.3f} s CPU/process): "
              f"{_f(f['steady_cpu_s_per_stream_hour'], 0)} CPU s/stream-hour; framewatch/ffmpeg steady: clicks on "
              f"{_f(cost['ratios']['clicks_on_over_ffmpeg_steady'], 0, 2)}, off "
              f"{_f(cost['ratios']['clicks_off_over_ffmpeg_steady'], 0, 2)}")
        fw = cost["framewatch"]["clicks_on"]
        print(f"  cross-check, stream 0: integrated {fw['stream0_integrated_lufs']} / {f['integrated_lufs']} LUFS, "
              f"true peak {fw['stream0_true_peak_dbtp']} / {f['true_peak_dbtp']} dBTP (framewatch / ffmpeg)")
    sync = result.get("av_sync")
    if sync:
        g, r = sync["summary"]["generated"], sync["summary"]["real"]
        print("\nA/V offset accuracy")
        print(f"  generated: {g['within_one_frame']}/{g['total']} within one frame (40 ms), max |error| "
              f"{_f(g['max_abs_error_ms'], 0)} ms, mean {_f(g['mean_abs_error_ms'], 0)} ms; event decisions right "
              f"{g['event_decisions_right']}/{g['total']} ({g['event_decisions_wrong_off_threshold']} wrong off the "
              f"-45/+125 ms thresholds); 30 s sliding estimate error {_f(g['sliding_latest_error_ms'], 0)} ms")
        print(f"  real:      claimed {r['claimed']}/{r['total']}, wrong claims {r['wrong_claims']}, false events on "
              f"unshifted clips {r['false_events_unshifted']}, shifted faults alerted {r['faults_alerted']}/"
              f"{r['faults_present']}" + (f"; skipped {', '.join(r['skipped_clips'])}" if r["skipped_clips"] else ""))
        print(f"  {'clip':14} {'true ms':>8} {'measured':>9} {'err ms':>7} {'conf':>5} {'match':>5} {'event':>6}"
              "   (measured '-': nothing claimed; miss: a fault with no event; !: wrong event decision)")
        for row in sync["generated"] + sync["real"]:
            m = row["measured_offset_s"]
            ev = ("yes" if row["event_fired"] else "miss" if row["event_missed"] else "no") + ("" if row["event_ok"] else "!")
            name = row["clip"] if row["kind"] == "real" else row["clip"].replace("flash_beep_", "pattern ")
            print(f"  {name:14} {row['true_offset_s'] * 1000:+8.0f} {_f(None if m is None else m * 1000, 9)} "
                  f"{_f(row['error_ms'], 7)} {_f(row['confidence'], 5, 2)} {row['matches'] if row['matches'] is not None else '-':>5} "
                  f"{ev:>6}")
    print(f"\nelapsed {result['elapsed_s']:.0f} s; wrote {result['out']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, help="streams batched per chunk round (default 16; 4 with --quick)")
    ap.add_argument("--seconds", type=float, help="seconds of audio per stream (default 60; 20 with --quick)")
    ap.add_argument("--device", default="cpu", help="torch device for the kernels and the sync runs (default cpu)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as Engine sets)")
    ap.add_argument("--ffmpeg-runs", type=int, help="FFmpeg processes run in sequence (default min(streams, 4))")
    ap.add_argument("--quick", action="store_true",
                    help="4 streams x 20 s, sync offsets " + ", ".join(f"{o:+g}" for o in QUICK_GRID_OFFSETS)
                    + " s and real shifts " + ", ".join(f"{s:+g}" for s in QUICK_REAL_SHIFTS) + " s")
    ap.add_argument("--noise", action="store_true", help="use generated programme noise even if the sample is there")
    ap.add_argument("--skip-cost", action="store_true", help="leave out part 1 (cost)")
    ap.add_argument("--skip-sync", action="store_true", help="leave out part 2 (A/V offset accuracy)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"result JSON (default {DEFAULT_OUT.relative_to(REPO)})")
    args = ap.parse_args(argv)
    n = args.streams if args.streams is not None else (4 if args.quick else 16)
    seconds = args.seconds if args.seconds is not None else (20.0 if args.quick else 60.0)
    runs = args.ffmpeg_runs if args.ffmpeg_runs is not None else min(n, 4)
    if n < 1 or runs < 0 or args.threads < 1:
        ap.error("--streams and --threads must be >= 1, --ffmpeg-runs >= 0")
    # A GPU machine may have no FFmpeg CLI: the peer is then left out, said so in the JSON, not faked.
    no_peer = "--ffmpeg-runs 0" if runs == 0 else None if shutil.which("ffmpeg") else "no ffmpeg CLI on this machine"
    if seconds <= FFMPEG_SHORT_S or abs(seconds * 10 - round(seconds * 10)) > 1e-9:
        ap.error(f"--seconds must be a multiple of 0.1 (whole 100 ms chunks) and more than {FFMPEG_SHORT_S:g}")
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        ap.error(f"--device {args.device}: {exc}")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"audio_bench: --device {args.device}: no CUDA device available (torch.cuda.is_available() is False)")
    if device.type not in ("cpu", "cuda"):
        ap.error("--device must be cpu or cuda[:N]")
    torch.set_num_threads(args.threads)

    started = dt.datetime.now(dt.UTC)
    result: dict[str, Any] = {
        "benchmark": "audio_bench",
        "started": started.isoformat(timespec="seconds"),
        "machine": machine_facts(device, args.threads),
        "parameters": {"streams": n, "seconds": seconds, "chunk_samples": AUDIO_CHUNK, "rate": AUDIO_RATE,
                       "device": str(device), "threads": args.threads, "ffmpeg_runs": runs, "quick": args.quick,
                       "ffmpeg_filters": FFMPEG_FILTERS},
    }
    with tempfile.TemporaryDirectory(prefix="audio_bench-") as tmpdir:
        tmp = Path(tmpdir)
        if not args.skip_cost:
            # Stream i starts 0.7 s later in the programme than stream i-1, so the batch is not N copies.
            shift = round(0.7 * AUDIO_RATE / AUDIO_CHUNK) * AUDIO_CHUNK
            total = round(seconds * AUDIO_RATE) + (n - 1) * shift
            x, layout, info = programme(total, args.noise)
            prog = torch.from_numpy(x)
            fw = {}
            for clicks in (True, False):
                log(f"framewatch: {n} streams x {seconds:g} s, clicks {'on' if clicks else 'off'} ...")
                fw["clicks_on" if clicks else "clicks_off"] = r = framewatch_cost(prog, layout, n, seconds, shift, device, clicks)
                log(f"  {r['cpu_s_per_stream_hour']['total']:.1f} CPU s / stream-hour "
                    f"(kernels {r['cpu_s_per_stream_hour']['kernels']:.1f}, detectors {r['cpu_s_per_stream_hour']['detectors']:.1f})")
            if no_peer:
                log(f"ffmpeg: left out ({no_peer})")
                ff = {"skipped": no_peer}
                ff_cpu = ff_steady = None
            else:
                log(f"ffmpeg: {runs} process(es) x {seconds:g} s ...")
                ff = ffmpeg_cost(x, seconds, runs, tmp)
                ff_cpu, ff_steady = ff["cpu_s_per_stream_hour"], ff["steady_cpu_s_per_stream_hour"]
            result["cost"] = {
                "programme": info,
                "stream_offset_s": shift / AUDIO_RATE,
                "framewatch": fw,
                "ffmpeg": ff,
                "ratios": {
                    "clicks_on_over_ffmpeg": _ratio(fw["clicks_on"]["cpu_s_per_stream_hour"]["total"], ff_cpu),
                    "clicks_off_over_ffmpeg": _ratio(fw["clicks_off"]["cpu_s_per_stream_hour"]["total"], ff_cpu),
                    "clicks_on_over_ffmpeg_steady": _ratio(fw["clicks_on"]["cpu_s_per_stream_hour"]["total"], ff_steady),
                    "clicks_off_over_ffmpeg_steady": _ratio(fw["clicks_off"]["cpu_s_per_stream_hour"]["total"], ff_steady),
                    "kernels_clicks_on_over_ffmpeg": _ratio(fw["clicks_on"]["cpu_s_per_stream_hour"]["kernels"], ff_cpu),
                    "kernels_clicks_off_over_ffmpeg": _ratio(fw["clicks_off"]["cpu_s_per_stream_hour"]["kernels"], ff_cpu),
                },
                "notes": [
                    "framewatch figures are steady state inside one process (no interpreter start or imports); the "
                    "ffmpeg figure is a whole process per stream, as users run it, and its steady figure removes "
                    "the start-up measured on a 1 s prefix.",
                    "av_sync is fed audio only: its audio-side work is counted, its correlation (needs video) is not.",
                    "framewatch runs more checks than the ffmpeg filters: "
                    + ", ".join(fw["clicks_on"]["detectors"]) + ".",
                    "process_time is the whole process's CPU; on CUDA it includes the host's launch and wait time.",
                ],
            }
        if not args.skip_sync:
            grid = QUICK_GRID_OFFSETS if args.quick else GRID_OFFSETS
            shifts = QUICK_REAL_SHIFTS if args.quick else REAL_SHIFTS
            log("A/V sync accuracy ...")
            result["av_sync"] = {
                "parameters": {"fps": SYNC_FPS, "clip_seconds": SYNC_SECONDS, "grid_offsets_s": list(grid),
                               "sliding": {"offset_s": SLIDING_OFFSET, "seconds": SLIDING_SECONDS},
                               "real_clips": list(REAL_CLIPS), "real_shifts_s": list(shifts),
                               "early_s": EARLY, "late_s": LATE,
                               "within_one_frame": "|measured - true| <= one frame of the clip (1/fps)"},
                **sync_accuracy(grid, shifts, str(device), args.threads, tmp),
            }
    finished = dt.datetime.now(dt.UTC)
    result["finished"] = finished.isoformat(timespec="seconds")
    result["elapsed_s"] = round((finished - started).total_seconds(), 1)
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_name(args.out.name + ".tmp")
    tmp_out.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp_out, args.out)
    result["out"] = str(args.out)
    print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
