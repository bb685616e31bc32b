"""CPU per picture of the engine's scoring thread (the serial part: one thread scores every stream) and of
the whole process (decoding included), for N copies of a generated H.264/AAC clip read as fast as possible.

The scoring thread is what limits a CPU engine under load; the rest (libavcodec, the source threads) spreads
over the cores. Compare commits by running this on each on the same machine in a row:

    python benchmarks/engine_cpu.py [--streams 8] [--size 384x216] [--seconds 20] [--off clicks]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.alerts import MemorySink  # noqa: E402
from engine.config import StreamModel, load_config, stream_spec  # noqa: E402
from engine.runner import Engine  # noqa: E402


def git_commit() -> str | None:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parent)
    return r.stdout.strip() or None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--size", default="384x216", help="WxH, width a multiple of 16, height of 8")
    ap.add_argument("--fps", type=float, default=25.0)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--off", default="clicks", help="detectors to disable, comma-separated ('' for none)")
    ap.add_argument("--repeat", type=int, default=2, help="runs; the lowest figures are reported")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "engine_cpu.json"))
    a = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from service_load import make_clips

    folder = Path(tempfile.mkdtemp(prefix="fw-engine-cpu-"))
    clip, _ = make_clips(folder, a.seconds, a.size, a.fps)
    off = [d for d in a.off.split(",") if d]
    disabled = ", ".join(f"{d}: {{enabled: false}}" for d in off)
    cfg = load_config(text=f"output: {{jsonl: null}}\ndetectors: {{{disabled}}}\n")
    runs = []
    for _ in range(a.repeat):
        eng = Engine(MemorySink())
        for i in range(a.streams):
            eng.add_stream(stream_spec(cfg, StreamModel(id=f"s{i}", url=str(clip))))
        c0, t0, w0 = time.process_time(), time.thread_time(), time.monotonic()
        eng.run(until_done=True)  # this thread is the scoring thread
        frames = sum(rt.stats.frames_scored for rt in eng.streams.values())
        runs.append({"frames": frames, "wall_s": round(time.monotonic() - w0, 2),
                     "scoring_thread_ms_per_picture": round((time.thread_time() - t0) / frames * 1000, 3),
                     "process_ms_per_picture": round((time.process_time() - c0) / frames * 1000, 3)})
    best = {k: min(r[k] for r in runs) for k in ("scoring_thread_ms_per_picture", "process_ms_per_picture")}
    result = {"commit": git_commit(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": {"cpus": __import__("os").cpu_count(), "platform": platform.platform()},
              "params": vars(a), "runs": runs, "best": best}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"{a.streams} streams {a.size}@{a.fps:g}, off: {off or 'none'}: scoring thread "
          f"{best['scoring_thread_ms_per_picture']:.2f} ms/picture, process {best['process_ms_per_picture']:.2f} ms/picture "
          f"({a.out})")


if __name__ == "__main__":
    main()
