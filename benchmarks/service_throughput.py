#!/usr/bin/env python3
"""Service throughput: how many frames per second `framewatch serve` scores with every detector on, in one
engine process against `engine.workers` processes per device, on the same clips in the same run.

    python benchmarks/service_throughput.py --device cuda --clip /tmp/framewatch-clips/bench_h264_1080p30_8M_10s.mp4
    python benchmarks/service_throughput.py --device cpu --streams 4 --workers 1,2      # a generated small clip

N copies of the clip are added to one service (the API's code path, without HTTP) and read as fast as they
decode (`pace: fast`), so the figure is the service's ceiling, not a live load: frames scored by all streams
over the wall time from the first stream added to the last one ended, with the worker processes already up
(their start, loading torch and CUDA, is not counted). `framewatch bench` measures the same engines outside
the service (its `e2e` column, `--procs`); this says whether the service's worker processes reach it.
Output: JSON (--json) and a short table last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from service_load import rss_mb, worker_pids  # noqa: E402

from engine.config import load_config  # noqa: E402


def one(clip: Path, streams: int, workers: int, device: str, timeout: float) -> dict:
    from engine.service import Service

    state = tempfile.mkdtemp(prefix="fw-svc-tp-")
    cfg = load_config(text=f"output: {{jsonl: null}}\nengine: {{device: {device}, workers: {workers}}}\n")
    svc = Service(cfg, state_dir=state)
    svc.start()
    try:
        if workers > 1:
            end = time.monotonic() + 120
            while time.monotonic() < end and not (len(worker_pids(svc)) == workers * 1
                                                  and all(rss_mb(p) > 200 for p in worker_pids(svc))):
                time.sleep(0.2)
            time.sleep(2.0)  # CUDA contexts and the first allocations
        t0 = time.monotonic()
        for i in range(streams):
            svc.add_stream({"id": f"s{i:03d}", "url": str(clip), "pace": "fast"})
        done = False
        while time.monotonic() - t0 < timeout:
            rts = list(svc.engine.streams.values())
            if len(rts) == streams and all(rt.state in ("ended", "error") for rt in rts):
                done = True
                break
            time.sleep(0.1)
        wall = time.monotonic() - t0
        rts = list(svc.engine.streams.values())
        frames = sum(rt.stats.frames_scored for rt in rts)
        return {"workers": workers, "streams": streams, "device": device, "frames": frames,
                "wall_s": round(wall, 2), "fps": round(frames / wall, 1), "finished": done,
                "errors": sorted({e for rt in rts for e in rt.errors})[:5],
                "decoders": sorted({rt.info.decoder for rt in rts if rt.info is not None}),
                "label": svc.engine.label()}
    finally:
        svc.stop(drain_timeout=1)
        shutil.rmtree(state, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clip", default="", help="media file (default: a generated 320x180 H.264 clip, 10 s)")
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--workers", default="1,4", help="engine.workers values, e.g. 1,4")
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds one run may take")
    ap.add_argument("--json", default=str(Path(__file__).resolve().parent / "results" / "service_throughput.json"))
    a = ap.parse_args()
    folder = None
    clip = Path(a.clip) if a.clip else None
    if clip is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from media import write_clip

        folder = Path(tempfile.mkdtemp(prefix="fw-clip-"))
        clip = write_clip(folder / "clip.mp4", size=(320, 180), fps=25, seconds=10.0)
    runs = [one(clip, a.streams, int(w), a.device, a.timeout) for w in a.workers.split(",") if w.strip()]
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
    base = runs[0]["fps"] if runs else 0.0
    for r in runs:
        r["ratio_to_first"] = round(r["fps"] / base, 3) if base else None
    out = {"benchmark": "service_throughput", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "clip": str(clip),
           "params": vars(a), "runs": runs}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    print(f"service throughput ({a.device}, {a.streams} streams of {clip.name}; {a.json})")
    print(f"{'workers':>7} {'frames':>8} {'wall s':>7} {'fps':>8} {'x first':>7} {'done':>5}  decoders")
    for r in runs:
        print(f"{r['workers']:>7} {r['frames']:>8} {r['wall_s']:>7.1f} {r['fps']:>8.1f} {r['ratio_to_first'] or 0:>7.2f} "
              f"{str(r['finished']):>5}  {','.join(r['decoders'])}{'  errors: ' + '; '.join(r['errors']) if r['errors'] else ''}")


if __name__ == "__main__":
    main()
