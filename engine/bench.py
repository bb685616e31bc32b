"""`framewatch bench`: throughput on the user's own hardware, decode ceiling and end-to-end in one run.

For each codec and tier it measures, with the same decoder backend:
- the ceiling: decode only, N concurrent streams, nothing else;
- end to end: the engine with every detector the tier allows, N concurrent streams;
and reports frames/s for both, their ratio, streams sustainable in real time, decoder use sampled through
NVML, GPU memory per stream and CPU cores used. JSON plus a table; `--device cpu` measures the CPU path.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import platform
import resource
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

ENCODERS = {"h264": "libx264", "hevc": "libx265"}


@dataclass
class BenchCase:
    codec: str
    tier: str
    streams: int
    procs: int = 1


@dataclass
class BenchResult:
    codec: str
    tier: str
    streams: int
    procs: int
    backend: str
    ceiling_fps: float | None = None
    e2e_fps: float | None = None
    ratio: float | None = None
    realtime_streams: float | None = None  # media seconds analysed per wall second (streams sustainable at 1x)
    streams_at_30fps: float | None = None
    decoder_util_ceiling: float | None = None  # NVML decoder %, mean over the busy samples
    decoder_util_e2e: float | None = None
    gpu_mem_per_stream_mb: float | None = None  # everything the end-to-end run added, over its streams
    # Where that memory goes (memory_breakdown): the decoder sessions alone (the ceiling run's figure), what
    # each worker process holds before its first stream (CUDA context, libraries), and what the engine added
    # per stream after that (sessions, the torch caching allocator's peak, kernels loaded on first use).
    gpu_mem_decoder_per_stream_mb: float | None = None
    gpu_mem_context_per_proc_mb: float | None = None
    gpu_mem_marginal_per_stream_mb: float | None = None
    torch_reserved_peak_mb: float | None = None  # the allocators' peaks, summed over the worker processes
    torch_allocated_peak_mb: float | None = None
    cpu_cores_ceiling: float | None = None
    cpu_cores_e2e: float | None = None
    frames_ceiling: int = 0
    frames_e2e: int = 0
    seconds_ceiling: float = 0.0
    seconds_e2e: float = 0.0
    events: int = 0
    fallbacks: int = 0
    errors: list[str] = field(default_factory=list)


# -- clips


def make_clip(path: Path, codec: str, seconds: float = 10.0, width: int = 1920, height: int = 1080, fps: int = 30,
              bitrate: int = 8_000_000, gop_seconds: float = 2.0) -> Path:
    """A moving, textured clip with B-frames and a fixed GOP, like a contribution feed."""
    import av

    if path.exists() and path.stat().st_size > 0:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part" + path.suffix)
    gop = int(round(gop_seconds * fps))
    with av.open(str(tmp), "w", format="mp4") as c:
        s = c.add_stream(ENCODERS[codec], rate=fps)
        s.width, s.height, s.pix_fmt, s.bit_rate = width, height, "yuv420p", bitrate
        if codec == "h264":
            s.options = {"preset": "veryfast", "g": str(gop), "keyint_min": str(gop), "sc_threshold": "0", "bf": "3"}
        else:
            s.options = {"preset": "ultrafast", "x265-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes=4:log-level=error"}
        rng = np.random.default_rng(7)
        base = rng.integers(16, 235, size=(height // 8 + 8, width // 8 + 8), dtype=np.uint8)
        base = np.kron(base, np.ones((8, 8), np.uint8))  # blocks of texture
        noise = rng.integers(0, 12, size=(4, height, width), dtype=np.uint8)
        chroma = np.full((height // 2, width), 128, np.uint8)
        n = int(seconds * fps)
        for i in range(n):
            dy, dx = (i * 3) % 64, (i * 5) % 64
            y = base[dy : dy + height, dx : dx + width] + noise[i % 4]
            frame = av.VideoFrame.from_ndarray(np.concatenate([y, chroma]), format="yuv420p")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    tmp.rename(path)
    return path


# -- sampling


class Sampler:
    """NVML decoder use and device memory, sampled in the background; CPU time from getrusage."""

    def __init__(self, gpu: int | None, period: float = 0.1) -> None:
        self.gpu = gpu
        self.period = period
        self.dec: list[int] = []
        self.mem: list[int] = []
        self._stop = threading.Event()
        self._handle = None
        if gpu is not None:
            try:
                import pynvml

                pynvml.nvmlInit()
                self._nvml = pynvml
                self._handle = pynvml.nvmlDeviceGetHandleByIndex(gpu)
            except Exception as exc:  # NVML missing: utilisation is reported as unknown, not invented
                log.warning("NVML not available, decoder use not sampled: %s", exc)

    def memory_used(self) -> int | None:
        if self._handle is None:
            return None
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.dec.append(int(self._nvml.nvmlDeviceGetDecoderUtilization(self._handle)[0]))
                self.mem.append(self.memory_used() or 0)
            except Exception:
                return

    def __enter__(self) -> Sampler:
        self._ru = resource.getrusage(resource.RUSAGE_SELF)
        self._ruc = resource.getrusage(resource.RUSAGE_CHILDREN)
        self._t = time.perf_counter()
        if self._handle is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *a: object) -> None:
        self.wall = time.perf_counter() - self._t
        ru = resource.getrusage(resource.RUSAGE_SELF)
        ruc = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (ru.ru_utime - self._ru.ru_utime) + (ru.ru_stime - self._ru.ru_stime)
        cpu += (ruc.ru_utime - self._ruc.ru_utime) + (ruc.ru_stime - self._ruc.ru_stime)
        self.cpu_cores = cpu / max(self.wall, 1e-9)
        self._stop.set()
        if self._handle is not None:
            self._thread.join()

    def decoder_util(self) -> float | None:
        busy = [d for d in self.dec if d > 0]
        # The first and last samples straddle start-up and the tail where streams finish one by one.
        core = busy[1:-1] if len(busy) > 4 else busy
        return round(float(np.mean(core)), 1) if core else None


def memory_breakdown(streams: int, procs: int, base: int | None, ready: int | None, peak: int | None,
                     ceiling_base: int | None = None, ceiling_peak: int | None = None) -> dict[str, float | None]:
    """GPU memory figures (MB) from NVML readings (bytes): `base` before the end-to-end run, `ready` once its
    worker processes hold a CUDA context but no stream, `peak` the highest during it; the ceiling run's base and
    peak hold decoder sessions only. A figure whose readings are missing is None, never a guess."""
    mb = 2.0**20

    def per(a: int | None, b: int | None, n: int) -> float | None:
        return None if a is None or b is None or n <= 0 else round(max(0, b - a) / n / mb, 1)

    return {
        "gpu_mem_per_stream_mb": per(base, peak, streams),
        "gpu_mem_decoder_per_stream_mb": per(ceiling_base, ceiling_peak, streams),
        "gpu_mem_context_per_proc_mb": per(base, ready, procs),
        "gpu_mem_marginal_per_stream_mb": per(ready, peak, streams),
    }


# -- decode-only ceilings


def _ceiling_gpu(path: Path, streams: int, device: str, tier: str, batch: int = 8) -> tuple[int, float]:
    """Frames decoded by `streams` concurrent sessions of the same backend the engine uses, with nothing done
    with the frames."""
    from engine.decode import nvdec

    nvc = nvdec.load()
    gpu = nvdec.gpu_index(device)
    counts: list[int] = []
    barrier = threading.Barrier(streams + 1)

    def threaded() -> None:
        td = nvc.ThreadedDecoder(str(path), buffer_size=batch, gpu_id=gpu, use_device_memory=True, decoder_cache_size=1)
        barrier.wait()
        counts.append(nvdec.drain_count(td, batch))

    def packets() -> None:
        import av

        from engine.decode.tiers import TierFilter

        with av.open(str(path)) as c:
            vs = c.streams.video[0]
            dec = nvdec.NvdecVideoDecoder(vs, 0, device, low_latency=tier == "keyframes")
            tf = TierFilter.for_stream(tier, vs)
            barrier.wait()
            n = sum(dec.decode_only(p) for p in c.demux(vs) if p.size and tf.keep(memoryview(p), p.is_keyframe))
            n += dec.decode_only(None)
        counts.append(n)

    return _timed(threaded if tier == "all" else packets, streams, barrier, counts)


def _timed(fn: Any, streams: int, barrier: threading.Barrier, counts: list[int]) -> tuple[int, float]:
    """Run `fn` in `streams` threads, timed from the moment all are ready (the barrier) to the last one's end."""
    threads = [threading.Thread(target=fn, daemon=True) for _ in range(streams)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return sum(counts), time.perf_counter() - t0


def _ceiling_cpu(path: Path, streams: int, tier: str) -> tuple[int, float]:
    import av

    from engine.decode.tiers import TierFilter

    counts: list[int] = []
    barrier = threading.Barrier(streams + 1)
    threads_each = max(1, (os.cpu_count() or 1) // streams)

    def one() -> None:
        with av.open(str(path)) as c:
            vs = c.streams.video[0]
            vs.thread_type = "AUTO"
            vs.codec_context.thread_count = threads_each
            tf = TierFilter.for_stream(tier, vs)
            barrier.wait()
            n = 0
            for p in c.demux(vs):
                if p.size == 0 or tf.keep(memoryview(p), p.is_keyframe):
                    n += len(vs.codec_context.decode(p if p.size else None))
        counts.append(n)

    return _timed(one, streams, barrier, counts)


# -- end to end


def _engine_run(paths: list[str], device: str, tier: str, decoder: str, batch: int = 8) -> dict[str, Any]:
    """Every detector the tier allows, on `paths` as concurrent streams; runs in this process."""
    import torch

    from engine.alerts import MemorySink
    from engine.config import FramewatchConfig, resolve_detectors
    from engine.detectors import REGISTRY
    from engine.runner import Engine, StreamSpec
    from engine.sources import SourceOptions

    detectors = resolve_detectors(FramewatchConfig())
    if tier != "all":
        detectors = {n: c for n, c in detectors.items() if not REGISTRY[n].NEEDS_EVERY_FRAME}
    sink = MemorySink()
    # GPU frames keep only luma summaries, so longer queues and batches cost little memory and halve the
    # per-tick Python work per frame.
    gpu = device.startswith("cuda")
    if gpu:
        torch.cuda.reset_peak_memory_stats(device)
    engine = Engine(sink, device=device, batch_frames=32 if gpu else 16, queue_frames=64 if gpu else 32, torch_threads=1)
    t0 = time.perf_counter()
    for i, p in enumerate(paths):
        engine.add_stream(StreamSpec(id=f"s{i}", url=p, detectors=detectors,
                                     source=SourceOptions(pace="fast", decoder=decoder, tier=tier, audio=False,
                                                          decode_batch=batch)))
    engine.run()
    wall = time.perf_counter() - t0
    rts = list(engine.streams.values())
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    return {
        "frames": sum(rt.stats.frames_scored for rt in rts),
        "media_seconds": sum(rt.stats.media_end for rt in rts),
        "wall": wall,
        "t0": t0,
        "events": sum(1 for e in sink.events if e.status.value == "firing"),
        "fallbacks": sum(rt.counters.decoder_fallbacks for rt in rts),
        "decoders": sorted({rt.info.decoder for rt in rts if rt.info is not None}),
        "errors": sorted({m for rt in rts for m in rt.errors})[:5],
        "device_note": engine.device_note,
        "torch_reserved": torch.cuda.max_memory_reserved(engine.device) if engine.device.type == "cuda" else None,
        "torch_allocated": torch.cuda.max_memory_allocated(engine.device) if engine.device.type == "cuda" else None,
    }


def _worker(paths: list[str], device: str, tier: str, decoder: str, batch: int, barrier: Any, q: Any) -> None:
    import torch

    if device.startswith("cuda"):
        torch.zeros(1, device=device)  # context first, so start-up is not timed
    barrier.wait()  # every worker holds its context: the parent reads the memory they hold before any stream
    barrier.wait()
    t = time.time()
    res = _engine_run(paths, device, tier, decoder, batch)
    res["start"], res["end"] = t, time.time()
    q.put(res)


def _e2e(path: Path, streams: int, procs: int, device: str, tier: str, decoder: str, batch: int = 8,
         ready: Any = None) -> dict[str, Any]:
    """`ready()` is called once the processes that will run the streams hold their CUDA context, before any
    stream starts (the memory reading that separates contexts from streams)."""
    paths = [str(path)] * streams
    if procs <= 1:
        if device.startswith("cuda"):
            import torch

            torch.zeros(1, device=device)
        if ready is not None:
            ready()
        return _engine_run(paths, device, tier, decoder, batch)
    ctx = mp.get_context("spawn")
    barrier, q = ctx.Barrier(procs + 1), ctx.Queue()
    shares = [paths[i::procs] for i in range(procs)]
    ps = [ctx.Process(target=_worker, args=(s, device, tier, decoder, batch, barrier, q)) for s in shares]
    for p in ps:
        p.start()
    # With a deadline: a worker that dies before it gets here must fail this case, not hang the benchmark.
    barrier.wait(timeout=600)
    if ready is not None:
        ready()
    barrier.wait(timeout=600)
    out = [q.get(timeout=900) for _ in ps]
    for p in ps:
        p.join()
    wall = max(o["end"] for o in out) - min(o["start"] for o in out)
    return {
        "frames": sum(o["frames"] for o in out), "media_seconds": sum(o["media_seconds"] for o in out),
        "wall": wall, "events": sum(o["events"] for o in out), "fallbacks": sum(o["fallbacks"] for o in out),
        "decoders": sorted({d for o in out for d in o["decoders"]}), "errors": sorted({e for o in out for e in o["errors"]})[:5],
        "device_note": out[0]["device_note"],
        "torch_reserved": sum(o["torch_reserved"] for o in out) if all(o["torch_reserved"] is not None for o in out) else None,
        "torch_allocated": sum(o["torch_allocated"] for o in out) if all(o["torch_allocated"] is not None for o in out) else None,
    }


def run_case(case: BenchCase, path: Path, device: str, decoder: str = "auto", clip_seconds: float | None = None,
             decode_batch: int = 8) -> BenchResult:
    gpu = None
    if device.startswith("cuda"):
        import torch

        gpu = torch.device(device).index or 0
    backend = "pyav" if gpu is None else ("nvdec-threaded" if case.tier == "all" else "nvdec")
    res = BenchResult(case.codec, case.tier, case.streams, case.procs, backend)
    ceiling_base = ceiling_peak = None
    try:
        with Sampler(gpu) as s:
            ceiling_base = s.memory_used()
            frames, wall = (_ceiling_gpu(path, case.streams, device, case.tier, decode_batch) if gpu is not None
                            else _ceiling_cpu(path, case.streams, case.tier))
        res.frames_ceiling, res.seconds_ceiling = frames, round(wall, 3)
        res.ceiling_fps = round(frames / wall, 1)
        res.decoder_util_ceiling = s.decoder_util()
        res.cpu_cores_ceiling = round(s.cpu_cores, 2)
        ceiling_peak = max(s.mem) if s.mem else None
    except Exception as exc:
        res.errors.append(f"ceiling: {type(exc).__name__}: {exc}")
    try:
        readings: dict[str, int | None] = {}
        with Sampler(gpu) as s:
            base = s.memory_used()
            e = _e2e(path, case.streams, case.procs, device, case.tier, decoder, decode_batch,
                     ready=lambda: readings.__setitem__("ready", s.memory_used()))
        res.frames_e2e, res.seconds_e2e = e["frames"], round(e["wall"], 3)
        res.e2e_fps = round(e["frames"] / e["wall"], 1)
        media = e["media_seconds"]
        if clip_seconds and res.frames_ceiling and res.frames_e2e == res.frames_ceiling:
            # A sparse tier's last frame stands for the rest of its GOP: the whole clip was watched.
            media = clip_seconds * case.streams
        res.realtime_streams = round(media / e["wall"], 1)
        res.streams_at_30fps = round(res.e2e_fps / 30.0, 1) if case.tier == "all" else res.realtime_streams
        res.decoder_util_e2e = s.decoder_util()
        res.cpu_cores_e2e = round(s.cpu_cores, 2)
        res.events, res.fallbacks = e["events"], e["fallbacks"]
        res.errors.extend(e["errors"])
        if e["device_note"]:
            res.errors.append(e["device_note"])
        for k, v in memory_breakdown(case.streams, case.procs, base, readings.get("ready"), max(s.mem) if s.mem else None,
                                     ceiling_base, ceiling_peak).items():
            setattr(res, k, v)
        for k in ("torch_reserved", "torch_allocated"):
            if e.get(k) is not None:
                setattr(res, f"{k}_peak_mb", round(e[k] / 2**20, 1))
        if res.ceiling_fps:
            res.ratio = round(res.e2e_fps / res.ceiling_fps, 3)
    except Exception as exc:
        res.errors.append(f"end to end: {type(exc).__name__}: {exc}")
    return res


def environment(device: str) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {"device": device, "python": platform.python_version(), "torch": torch.__version__,
                           "cpu_cores": os.cpu_count(), "host": platform.node()}
    if device.startswith("cuda") and torch.cuda.is_available():
        idx = torch.device(device).index or 0
        env["gpu"] = torch.cuda.get_device_name(idx)
        env["gpu_memory_mb"] = torch.cuda.get_device_properties(idx).total_memory // 2**20
        try:
            import PyNvVideoCodec as nvc  # noqa: N813

            env["pynvvideocodec"] = getattr(nvc, "__version__", "?")
        except Exception as exc:
            env["pynvvideocodec"] = f"unavailable: {exc}"
    return env


def clip_duration(path: Path) -> float | None:
    import av

    with av.open(str(path)) as c:
        return c.duration / 1_000_000 if c.duration else None


def run(codecs: list[str], tiers: list[str], streams: int, procs: list[int], device: str, clip_dir: Path,
        clip_seconds: float, decoder: str = "auto", clips: dict[str, Path] | None = None,
        output: Path | None = None, keyframe_streams: int | None = None, decode_batch: int = 8) -> dict[str, Any]:
    """All cases; the report is rewritten after each one, so an interrupted run keeps what it measured."""
    out: dict[str, Any] = {"environment": environment(device), "decode_batch": decode_batch, "clips": {}, "results": []}
    for codec in codecs:
        path = (clips or {}).get(codec) or make_clip(clip_dir / f"bench_{codec}_1080p30_8M_{int(clip_seconds)}s.mp4", codec, clip_seconds)
        seconds = clip_duration(path)
        out["clips"][codec] = {"path": str(path), "bytes": path.stat().st_size, "seconds": seconds}
        for tier in tiers:
            n = keyframe_streams if (tier == "keyframes" and keyframe_streams) else streams
            for p in procs if tier != "skip_nonref" else procs[:1]:
                r = run_case(BenchCase(codec, tier, n, p), path, device, decoder, seconds, decode_batch)
                out["results"].append(asdict(r))
                log.info("%s", r)
                if output is not None:
                    write(out, output)
    return out


def calibration(report: dict[str, Any]) -> dict[str, Any] | None:
    """Per-codec decode ceiling of this GPU for the scheduler, from the tier-all cases."""
    env = report["environment"]
    if "gpu" not in env:
        return None
    best: dict[str, float] = {}
    util: dict[str, float | None] = {}
    for r in report["results"]:
        if r["tier"] == "all" and r["ceiling_fps"]:
            if r["ceiling_fps"] > best.get(r["codec"], 0):
                best[r["codec"]], util[r["codec"]] = r["ceiling_fps"], r["decoder_util_ceiling"]
    return {"gpu": env["gpu"], "gpu_fps_1080p": best, "decoder_util": util, "source": "framewatch bench",
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def table(report: dict[str, Any]) -> list[list[str]]:
    rows = [["codec", "tier", "streams", "procs", "ceiling fps", "e2e fps", "ratio", "dec % ceil/e2e", "streams@30",
             "GPU MB/stream", "MB dec/ctx/marg", "CPU cores", "errors"]]

    def f(v: Any, nd: int = 1) -> str:
        return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))

    for r in report["results"]:
        rows.append([r["codec"], r["tier"], str(r["streams"]), str(r["procs"]), f(r["ceiling_fps"]), f(r["e2e_fps"]),
                     f(r["ratio"], 3), f"{f(r['decoder_util_ceiling'])}/{f(r['decoder_util_e2e'])}", f(r["streams_at_30fps"]),
                     f(r["gpu_mem_per_stream_mb"]),
                     f"{f(r.get('gpu_mem_decoder_per_stream_mb'), 0)}/{f(r.get('gpu_mem_context_per_proc_mb'), 0)}/"
                     f"{f(r.get('gpu_mem_marginal_per_stream_mb'), 0)}",
                     f"{f(r['cpu_cores_ceiling'])}/{f(r['cpu_cores_e2e'])}",
                     str(len(r["errors"]))])
    return rows


def write(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=str))
