#!/usr/bin/env python3
"""Overload benchmark: an engine given more live streams than its CPU can score, with and without shedding the
click analysis (engine/overload.py).

    .venv/bin/python benchmarks/overload.py                      # 32 live 384x216 streams, 60 s per run
    .venv/bin/python benchmarks/overload.py --streams 16 --seconds 30

Each run starts N real-time synthetic streams (moving picture, programme-like tone and noise on stereo audio,
every default detector, clicks on) in one engine and lets it run for S seconds. Measured: tick durations
(between consecutive ticks, i.e. how long live media waits to be scored), pictures and audio chunks scored
and dropped (a live queue that is full drops), and when the click analysis paused. The two runs (shedding off,
then on) are the peers, measured in the same process one after the other. Output: JSON
(benchmarks/results/overload.json) and a short table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from engine.alerts import MemorySink  # noqa: E402
from engine.config import FramewatchConfig, resolve_detectors  # noqa: E402
from engine.runner import Engine, StreamSpec  # noqa: E402
from engine.sources import SourceOptions  # noqa: E402


def run_once(streams: int, seconds: float, size: str, fps: int, shed: bool) -> dict[str, Any]:
    dets = resolve_detectors(FramewatchConfig())
    eng = Engine(MemorySink(), shed_clicks=shed)
    ticks: list[float] = []
    last = [time.monotonic()]
    paused_at: list[float] = []
    t0 = time.monotonic()

    def on_tick() -> None:
        now = time.monotonic()
        ticks.append(now - last[0])
        last[0] = now
        if eng.shedder is not None and eng.shedder.shed and not paused_at:
            paused_at.append(now - t0)
        if now - t0 >= seconds:
            eng.stop()

    url = f"synthetic://t?size={size}&fps={fps}&duration={seconds + 30:g}&noise=-30"
    rts = [eng.add_stream(StreamSpec(f"s{i}", url, dets, SourceOptions(pace="realtime"))) for i in range(streams)]
    cpu0 = time.process_time()
    runner = threading.Thread(target=eng.run, kwargs={"until_done": False, "on_tick": on_tick}, daemon=True)
    runner.start()
    runner.join(seconds + 120)
    wall = time.monotonic() - t0
    cpu = time.process_time() - cpu0
    for rt in rts:
        rt.stop.set()
    t = np.asarray(ticks[1:] or [0.0])
    decoded = sum(rt.counters.video_frames for rt in rts)
    scored = sum(rt.stats.frames_scored for rt in rts)
    return {
        "shed_clicks": shed,
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "ticks": len(ticks),
        "tick_s": {"median": round(float(np.median(t)), 3), "p90": round(float(np.percentile(t, 90)), 3),
                   "max": round(float(t.max()), 3)},
        "media_offered_s": round(streams * wall, 1),
        "pictures_decoded": decoded,
        "pictures_scored": scored,
        "pictures_dropped": sum(rt.counters.frames_dropped for rt in rts),
        "audio_chunks": sum(rt.counters.audio_chunks for rt in rts),
        "audio_dropped": sum(rt.counters.audio_dropped for rt in rts),
        "audio_scored_s": round(sum(rt.stats.audio_seconds for rt in rts), 1),
        "clicks_paused_at_s": round(paused_at[0], 1) if paused_at else None,
        "streams_paused": sum(1 for rt in rts if rt.counters.clicks_paused),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--size", default="384x216")
    ap.add_argument("--fps", type=int, default=25)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "overload.json")
    args = ap.parse_args(argv)
    runs = [run_once(args.streams, args.seconds, args.size, args.fps, shed) for shed in (False, True)]
    result = {"benchmark": "overload", "cpu_cores": os.cpu_count(), "streams": args.streams, "seconds": args.seconds,
              "size": args.size, "fps": args.fps, "runs": runs,
              "loadavg_end": list(os.getloadavg())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.streams} live {args.size}@{args.fps} streams for {args.seconds:g} s on {os.cpu_count()} cores")
    print(f"{'shed clicks':12} {'tick median':>11} {'p90':>7} {'max':>7} {'audio scored s':>15} {'audio dropped':>14} "
          f"{'pics scored':>12} {'pics dropped':>13} {'paused at s':>12}")
    for r in runs:
        print(f"{str(r['shed_clicks']):12} {r['tick_s']['median']:11.3f} {r['tick_s']['p90']:7.3f} {r['tick_s']['max']:7.3f} "
              f"{r['audio_scored_s']:15.1f} {r['audio_dropped']:14d} {r['pictures_scored']:12d} {r['pictures_dropped']:13d} "
              f"{'-' if r['clicks_paused_at_s'] is None else r['clicks_paused_at_s']:>12}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
