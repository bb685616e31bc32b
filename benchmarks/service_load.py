#!/usr/bin/env python3
"""Service benchmark: what `framewatch serve` costs per live stream, whether it keeps up, and how fast its API
answers while it works; against FFmpeg run the way users run it (one process per stream).

    .venv/bin/python benchmarks/service_load.py                    # 10, 20, 40 streams, 20 s each (~3 min)
    .venv/bin/python benchmarks/service_load.py --streams 50,100,200 --video-only --size 128x72 --fps 10

framewatch: one service (uvicorn on 127.0.0.1, the engine in the same process, as `framewatch serve` runs)
with N channels, each an H.264/AAC MPEG-TS clip (a Mandelbrot zoom and tone, made with the ffmpeg CLI)
read at its own pace, so decoded, scored and judged as it plays, with every default detector; a quarter of
them go black 3 s in.
Measured over S seconds after a warm-up: process CPU (cores), resident memory, how far each stream's scored
media got against the wall clock (kept up: >= 0.95), frames dropped, the black alerts' detection latency
(fault onset to firing, from /metrics), and the API's latency (GET /api/streams/ID, GET /metrics, GET
/api/alerts, each polled by a client thread ten times a second) as p50 / p95 / max.

Peer: `ffmpeg -re -i CLIP -vf blackdetect,freezedetect -af ebur128,silencedetect,astats -f null -` per
stream (the same clip, decoded the same way, and the checks FFmpeg has), min(N, --peer-procs) processes at
once for S seconds, CPU from RUSAGE_CHILDREN. FFmpeg's checks give
scores, not alerts, and fewer of them (no glitch, blockiness, blur, true peak, clicks, phase, A/V sync);
the figure is what operators pay today for a per-stream process, not a like-for-like count of work.

Output: JSON (default benchmarks/results/service_load.json) and a short table last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from waiting import free_tcp_port, wait_until  # noqa: E402

from engine.config import load_config  # noqa: E402


def rss_mb(pid: int | str = "self") -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:  # a worker that ended meanwhile
        return 0.0
    return float("nan")


def worker_pids(svc: object) -> list[int]:
    """The engine worker processes of a service with engine.workers > 1 (none otherwise)."""
    procs = getattr(svc.engine, "_procs", [])  # type: ignore[attr-defined]
    return [p.process.pid for p in procs if p.process is not None and p.process.is_alive()]


def cpu_s(pids: list[int]) -> float:
    """CPU seconds of this process and of the given live children (os.times counts children once reaped)."""
    t = os.times()
    total = t.user + t.system
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except OSError:
            pass
    return total


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def make_clips(folder: Path, seconds: float, size: str, fps: float) -> tuple[Path, Path]:
    """Two H.264/AAC MPEG-TS clips of a moving picture (a Mandelbrot zoom: no test-card grid to look blocky) and tone, one going black at 3 s."""
    clips = []
    for name, vf in (("clean", "null"), ("black", "drawbox=c=black:t=fill:enable='gte(t,3)'")):
        path = folder / f"{name}.ts"
        subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                        f"mandelbrot=size={size}:rate={fps:g}", "-f", "lavfi", "-i",
                        "sine=frequency=1000:sample_rate=48000", "-t", f"{seconds:g}", "-vf", vf,
                        "-c:v", "libx264", "-preset", "veryfast", "-b:v", "1500k", "-g", f"{int(2 * fps)}",
                        "-pix_fmt", "yuv420p", "-c:a", "aac", "-ac", "2", "-b:a", "128k", str(path)], check=True)
        clips.append(path)
    return clips[0], clips[1]


def run_framewatch(n: int, seconds: float, clips: tuple[Path, Path], video_only: bool, off: list[str],
                   workers: int = 1) -> dict:
    import uvicorn

    from engine.service import Service
    from engine.service.app import create_app

    state = tempfile.mkdtemp(prefix="fw-bench-")
    disabled = ", ".join(f"{d}: {{enabled: false}}" for d in off)
    cfg = load_config(text=f"output: {{jsonl: null}}\nengine: {{workers: {workers}}}\ndetectors: {{{disabled}}}\n")
    svc = Service(cfg, state_dir=state)
    port = free_tcp_port()
    server = uvicorn.Server(uvicorn.Config(create_app(svc), host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="on", timeout_graceful_shutdown=2))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    base = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=base, timeout=30)
    wait_until(lambda: _ok(client, "/readyz"), timeout=60)
    if workers > 1:  # the baseline includes the worker processes once they have their engine (torch loaded)
        wait_until(lambda: len(worker_pids(svc)) == workers and all(rss_mb(p) > 200 for p in worker_pids(svc)),
                   timeout=60)
        time.sleep(1.0)
    rss0 = rss_mb() + sum(rss_mb(pid) for pid in worker_pids(svc))
    for i in range(n):
        # A clip read at its own pace is a live channel to the engine: decoded, scored and judged as it plays.
        body: dict = {"id": f"ch{i:03d}", "url": str(clips[1] if i % 4 == 0 else clips[0]), "pace": "realtime"}
        if video_only:
            body["options"] = {"audio": False}
        r = client.post("/api/streams", json=body)
        if r.status_code != 201:
            raise SystemExit(f"stream {body['id']} refused: {r.text}")
    warm = 4.0
    time.sleep(warm)
    lat: dict[str, list[float]] = {"stream": [], "metrics": [], "alerts": []}
    stop = threading.Event()

    def poll() -> None:
        c = httpx.Client(base_url=base, timeout=30)
        paths = {"stream": "/api/streams/ch001", "metrics": "/metrics", "alerts": "/api/alerts?limit=50"}
        while not stop.is_set():
            for k, p in paths.items():
                t = time.perf_counter()
                c.get(p).raise_for_status()
                lat[k].append((time.perf_counter() - t) * 1000)
            stop.wait(0.1)
        c.close()

    poller = threading.Thread(target=poll, daemon=True)
    media0 = {s["id"]: s["media_time"] for s in client.get("/api/streams").json()}
    pids = worker_pids(svc)
    c0, w0 = cpu_s(pids), time.monotonic()
    poller.start()
    time.sleep(seconds)
    stop.set()
    poller.join()
    c1, w1 = cpu_s(pids), time.monotonic()
    rss = rss_mb() + sum(rss_mb(pid) for pid in pids)
    streams = client.get("/api/streams").json()
    wall = w1 - w0
    cpu = c1 - c0
    kept = [(s["media_time"] - media0.get(s["id"], 0.0)) / wall for s in streams]
    metrics = client.get("/metrics").text
    lat_sum = _metric(metrics, "framewatch_detection_latency_seconds_sum")
    lat_count = _metric(metrics, "framewatch_detection_latency_seconds_count")
    black = [a for a in client.get("/api/alerts?type=black&limit=1000").json()]
    dropped = sum(s["counters"]["frames_dropped"] for s in streams)
    false_alarms = [a["type"] + "@" + a["stream"] for a in client.get("/api/alerts?limit=1000").json()
                    if a["type"] != "black"]
    out = {
        "streams": n, "workers": workers, "seconds": round(wall, 2), "cpu_cores": round(cpu / wall, 3),
        "cpu_s_per_stream_hour": round(cpu / (n * wall / 3600), 1),
        "rss_mb": round(rss, 1), "rss_mb_per_stream": round((rss - rss0) / n, 2),
        "kept_up_min": round(min(kept), 3), "kept_up_mean": round(statistics.mean(kept), 3),
        "streams_kept_up": sum(k >= 0.95 for k in kept), "frames_dropped": dropped,
        "black_alerts": len(black), "black_expected": (n + 3) // 4,
        "detection_latency_mean_s": round(lat_sum / lat_count, 3) if lat_count else None,
        "other_alerts": false_alarms[:20], "other_alert_count": len(false_alarms),
        "api_ms": {k: {"p50": round(pct(v, 0.5), 1), "p95": round(pct(v, 0.95), 1), "max": round(max(v), 1),
                       "n": len(v)} for k, v in lat.items() if v},
    }
    svc.broadcast.close()
    server.should_exit = True
    th.join(timeout=60)
    client.close()
    shutil.rmtree(state, ignore_errors=True)
    return out


def _ok(client: httpx.Client, path: str) -> bool:
    try:
        return client.get(path).status_code == 200
    except httpx.HTTPError:
        return False


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def run_ffmpeg(n: int, seconds: float, clip: Path, video_only: bool) -> dict:
    cmd = ["ffmpeg", "-nostdin", "-nostats", "-loglevel", "error", "-re", "-i", str(clip), "-t", f"{seconds:g}",
           "-vf", "blackdetect=d=2,freezedetect=d=2", "-map", "0:v"]
    if not video_only:
        cmd += ["-map", "0:a", "-af", "ebur128=peak=true,silencedetect=d=2,astats=metadata=0"]
    cmd += ["-f", "null", "-"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(n)]
    for p in procs:
        p.wait()
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"processes": n, "seconds": round(wall, 2), "cpu_s_per_stream_hour": round(cpu / (n * seconds / 3600), 1),
            "kept_up": round(seconds / wall, 3), "command": " ".join(cmd)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", default="10,20,40")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--size", default="384x216", help="WxH, width a multiple of 16, height of 8")
    ap.add_argument("--fps", type=float, default=25.0)
    ap.add_argument("--video-only", action="store_true", help="no audio (video detectors only)")
    ap.add_argument("--off", default="", help="detectors to disable, comma-separated (e.g. clicks)")
    ap.add_argument("--peer-procs", type=int, default=4, help="FFmpeg processes at once for the peer figure (0: no peer)")
    ap.add_argument("--workers", default="1", help="engine.workers values to run each count with, e.g. 1,2")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "service_load.json"))
    args = ap.parse_args()
    counts = [int(x) for x in args.streams.split(",") if x.strip()]
    if shutil.which("ffmpeg") is None:
        raise SystemExit("this benchmark needs the ffmpeg CLI (apt-get install ffmpeg): it makes the clips and is the peer")
    folder = Path(tempfile.mkdtemp(prefix="fw-clips-"))
    clips = make_clips(folder, args.seconds + 12, args.size, args.fps)
    rows = []
    for n in counts:
        peer = run_ffmpeg(min(n, args.peer_procs), args.seconds, clips[0], args.video_only) if args.peer_procs else None
        for w in [int(x) for x in args.workers.split(",") if x.strip()]:
            fw = run_framewatch(n, args.seconds, clips, args.video_only, [d for d in args.off.split(",") if d], w)
            ratio = round(fw["cpu_s_per_stream_hour"] / peer["cpu_s_per_stream_hour"], 2) if peer else None
            rows.append({"framewatch": fw, "ffmpeg": peer, "cpu_ratio_framewatch_over_ffmpeg": ratio})
    shutil.rmtree(folder, ignore_errors=True)
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "params": vars(args), "runs": rows,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    print(f"\nservice load ({args.size} @ {args.fps:g} fps{', video only' if args.video_only else ', video + audio'}, "
          f"{args.seconds:g} s{', off: ' + args.off if args.off else ''}; results in {out})")
    print(f"{'streams':>7} {'procs':>5} {'cores':>6} {'cpu s/h':>8} {'ffmpeg':>8} {'ratio':>6} {'kept up':>8} {'min':>6} "
          f"{'drops':>6} {'black':>6} {'lat s':>6} {'false':>6} {'api p50/p95 ms':>15} {'MB/str':>7}")
    for r in rows:
        f, p = r["framewatch"], r["ffmpeg"]
        api = f["api_ms"].get("stream", {})
        print(f"{f['streams']:>7} {f['workers']:>5} {f['cpu_cores']:>6.2f} {f['cpu_s_per_stream_hour']:>8.0f} "
              f"{(p or {}).get('cpu_s_per_stream_hour', float('nan')):>8.0f} {r['cpu_ratio_framewatch_over_ffmpeg'] or float('nan'):>6.2f} "
              f"{f['streams_kept_up']:>4}/{f['streams']:<3} {f['kept_up_min']:>6.2f} {f['frames_dropped']:>6} "
              f"{f['black_alerts']:>3}/{f['black_expected']:<2} {f['detection_latency_mean_s'] or float('nan'):>6.2f} "
              f"{f['other_alert_count']:>6} {api.get('p50', float('nan')):>7.1f}/{api.get('p95', float('nan')):<7.1f} "
              f"{f['rss_mb_per_stream']:>7.2f}")


if __name__ == "__main__":
    main()
