"""Many GPUs in one process: one engine (and worker thread) per GPU, streams placed by the scheduler, and the
streams of a GPU that fails moved to the others.

The scheduler decides where each stream goes and at which decode tier; the pool makes that so (starts the
stream on the chosen engine with that tier) and keeps the two in step when a stream is removed or a GPU fails.
A GPU failure is visible to the user: every stream on it gets a critical `no_signal` event naming the GPU,
which resolves when the moved stream's first frame has been scored on its new engine.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any
from urllib.parse import parse_qs, urlparse

import torch

from engine.alerts import EventSink
from engine.corruption import CPU_FPS
from engine.detectors import REGISTRY
from engine.events import Event
from engine.runner import Engine, StreamRuntime, StreamSpec, is_device_error
from engine.scheduler import (
    CPU_CODEC_FACTOR,
    CpuModel,
    GpuModel,
    Placement,
    Scheduler,
    StreamDemand,
    Target,
    Tier,
    model_for_device,
    normalize_codec,
)

log = logging.getLogger("framewatch")

__all__ = ["EVENT_VERSION", "GpuPool", "default_demand", "is_device_error"]

EVENT_VERSION = "pool-1.0"
"""`detector_version` of the events the pool itself emits (GPU failures)."""


def default_demand(spec: StreamSpec, demand: StreamDemand | None = None) -> StreamDemand:
    """The decode demand of a stream: `demand` (1080p30 H.264 when not given), with every-frame set when an
    enabled detector needs every frame, so the scheduler never picks a tier that would switch it off."""
    if demand is None:
        expect = {"codec": "h264", "width": 1920, "height": 1080, "fps": 30.0, **(spec.expect or {})}
        demand = StreamDemand(spec.id, **expect)
    d = demand
    if spec.source.tier != "all" and d.allowed_tiers != (Tier(spec.source.tier),):
        # The operator chose the tier: the scheduler may admit the stream in it or refuse it, nothing else.
        d = replace(d, allowed_tiers=(Tier(spec.source.tier),))
    if d.id != spec.id:
        raise ValueError(f"demand is for stream {d.id!r}, not {spec.id!r}")
    clicks = spec.detectors.get("clicks")
    corruption = spec.detectors.get("corruption")
    # A CPU engine reads `fps` pictures a second with the CNN (engine.corruption.CPU_FPS when not said).
    corruption_fps = None if corruption is None or not corruption.enabled else \
        float(CPU_FPS if getattr(corruption, "fps", None) is None else corruption.fps)
    # video: false decodes no picture: costed by its audio alone, not as the 1080p30 H.264 assumed of it.
    d = replace(d, audio=bool(spec.source.audio), clicks=bool(clicks is not None and clicks.enabled),
                paced=is_paced(spec), video=bool(spec.source.video), corruption_fps=corruption_fps)
    every = sorted(n for n, cfg in spec.detectors.items() if cfg.enabled and REGISTRY[n].NEEDS_EVERY_FRAME)
    if every and not d.needs_every_frame:
        names = ", ".join(f"'{n}'" for n in every)
        why = f"detector {names} needs every frame" if len(every) == 1 else f"detectors {names} need every frame"
        d = replace(d, needs_every_frame=True, every_frame_reason=why)
    return d


def is_paced(spec: StreamSpec) -> bool:
    """Whether the stream is read in real time (live, or told to), so it takes CPU time at its rate for as long
    as it runs; a file read as fast as it can be is not."""
    from engine.sources.media import is_live_url

    pace = spec.source.pace
    if urlparse(spec.url).scheme.lower() == "synthetic":  # generated at its rate unless told "fast"
        if pace == "auto":
            pace = parse_qs(urlparse(spec.url).query).get("pace", ["auto"])[-1]
        return pace != "fast"
    return pace == "realtime" or (pace == "auto" and is_live_url(spec.url))


def cpu_demand(spec: StreamSpec) -> StreamDemand:
    """`default_demand` for a CPU engine: a synthetic stream's own size and rate when nothing is expected of it
    (what it generates is as dear as decoding H.264 of that size, roughly)."""
    if spec.expect is None and urlparse(spec.url).scheme.lower() == "synthetic":
        from engine.sources.synthetic import parse_spec

        try:
            s = parse_spec(spec.url, spec.faults)
            return default_demand(spec, StreamDemand(spec.id, "h264", s.width, s.height, s.fps))
        except Exception:  # the source itself says what is wrong with it, when it starts
            pass
    return default_demand(spec)


def cpu_model(cores: float | str | None, processes: int = 1) -> CpuModel | None:
    """The CPU budget of `engine.cpu_cores` (None: no admission control): 'auto' is the cores this process may
    run on; `processes` engine processes have a scoring thread each."""
    if cores is None:
        return None
    if cores == "auto":
        import os

        cores = float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
    return CpuModel(cores=float(cores), scoring_threads=max(1, processes))


def opened_demand(planned: StreamDemand, info: Any) -> StreamDemand | None:
    """What a stream that has opened really asks for (its StreamInfo's codec, size and rate, or its audio alone
    when it has no pictures), or None when the plan's guess must stand: a generated `synthetic://` stream
    (it decodes nothing), a rate the container does not state, a codec the budgets do not know (MJPEG, raw)."""
    if info.container == "synthetic":
        return None
    if not info.video_codec and info.audio_codec:
        return replace(planned, video=False)  # a radio channel: its audio is all it costs
    if not (info.video_codec and info.width and info.height and info.fps):
        return None
    if normalize_codec(info.video_codec) not in CPU_CODEC_FACTOR:
        return None
    try:
        return replace(planned, codec=info.video_codec, width=info.width, height=info.height, fps=float(info.fps),
                       video=True)
    except ValueError:
        return None


def plan_cpu(specs: list[StreamSpec], cpu: CpuModel, headroom: float = 0.15) -> tuple[list[StreamSpec], dict[str, str]]:
    """Admission for a run on the CPU, decided at its start: the streams to start (each at the tier the plan
    gives it, every stream admitted before any is decoded in full) and those refused, with the reason. Each
    decision is logged."""
    plan = Scheduler([], headroom=headroom, cpu=cpu).plan([cpu_demand(s) for s in specs])
    admitted: list[StreamSpec] = []
    refused: dict[str, str] = {}
    for spec in specs:
        p = plan.placements[spec.id]
        if not p.admitted:
            refused[spec.id] = p.reason
            log.warning("stream %s not started: %s", spec.id, p.reason)
            continue
        assert p.tier is not None
        admitted.append(replace(spec, source=replace(spec.source, tier=p.tier.value)))
        (log.warning if p.downgraded else log.info)("stream %s: %s", spec.id, p.reason)
    return admitted, refused


def missing_cuda(devices: list[str]) -> tuple[list[str], int]:
    """The CUDA devices of `devices` this machine does not have, and how many it has."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [d for d in devices if d.startswith("cuda") and int(d.partition(":")[2] or 0) >= count], count


def _detect_models(devices: list[str]) -> list[GpuModel]:
    out: list[GpuModel] = []
    for name in devices:
        dev = torch.device(name)
        if dev.type != "cuda" or not torch.cuda.is_available():
            raise ValueError(f"cannot tell the GPU model of device {name!r}: pass models= for it")
        props = torch.cuda.get_device_properties(dev.index or 0)
        out.append(model_for_device(props.name, props.total_memory / 2**20))
    return out


class _LockedSink:
    """Engines emit from their own threads and the pool from whichever thread saw the failure; a sink is not
    required to be thread-safe."""

    def __init__(self, sink: EventSink) -> None:
        self.sink = sink
        self._lock = threading.Lock()

    def emit(self, event: Event) -> None:
        with self._lock:
            self.sink.emit(event)

    def close(self) -> None:
        with self._lock:
            self.sink.close()


@dataclass
class _Outage:
    event: Event  # the firing no_signal event
    since: float  # time.monotonic() at the failure


@dataclass
class _Member:
    spec: StreamSpec  # as added (its tier is replaced by each placement's)
    demand: StreamDemand
    placement: Placement
    engine: Engine | None = None  # where it runs now; None while refused
    runtime: StreamRuntime | None = None  # the latest runtime, kept after it ends for its stats


class GpuPool:
    """One `Engine` per device, each run by a worker thread, with a `Scheduler` deciding where streams go.

    `devices` are device strings ("cuda:0", "cuda:1"; tests simulate GPUs with "cpu"); `models` the GPU model
    of each for the scheduler (default: detected from the CUDA device). With `cpu` (a `CpuModel`; or the older
    `cpu_decode_fps` > 0) an extra CPU engine takes the streams the scheduler places on spare CPU capacity; with
    no devices at all that engine is the pool, and the scheduler its admission control. `engine_kwargs` go to
    every engine. All methods are thread-safe.
    """

    def __init__(
        self,
        sink: EventSink,
        devices: list[str],
        models: list[GpuModel] | None = None,
        headroom: float = 0.15,
        cpu_decode_fps: float = 0.0,
        cpu: CpuModel | None = None,
        **engine_kwargs: Any,
    ) -> None:
        self.devices = [str(d) for d in devices]
        models = list(models) if models is not None else _detect_models(self.devices)
        if len(models) != len(self.devices):
            raise ValueError(f"{len(models)} GPU models given for {len(self.devices)} devices")
        if not self.devices and cpu is None and cpu_decode_fps <= 0:
            raise ValueError("a pool needs a device or CPU capacity")
        self.sink = _LockedSink(sink)
        self.scheduler = Scheduler(models, headroom=headroom, cpu_decode_fps=cpu_decode_fps, cpu=cpu)
        # Simulated GPUs share one device string; the index keeps them apart in messages.
        unique = len(set(self.devices)) == len(self.devices)
        self.labels = [d if unique else f"{d} (gpu {i})" for i, d in enumerate(self.devices)]
        # What a stream really is (codec, size, rate) is known once it opens: the scheduler is told then.
        self._user_on_status = engine_kwargs.pop("on_status", None)
        self._opened: dict[str, tuple[StreamRuntime, Any]] = {}
        self._opened_lock = threading.Lock()
        self.engines = [
            Engine(self.sink, device=d, on_device_error=partial(self._device_failed, i), on_status=self._on_status,
                   **engine_kwargs)
            for i, d in enumerate(self.devices)
        ]
        self.cpu_engine = (Engine(self.sink, device="cpu", on_status=self._on_status, **engine_kwargs)
                           if self.scheduler.cpu is not None else None)
        # Reentrant: an engine's on_status callback (engine_kwargs) may call back into the pool.
        self._lock = threading.RLock()
        self._members: dict[str, _Member] = {}
        self._outages: dict[str, _Outage] = {}
        self._threads: list[threading.Thread] = []
        self._closing = threading.Event()

    # -- streams
    def add_stream(self, spec: StreamSpec, demand: StreamDemand | None = None) -> Placement:
        """Place a stream and start it where the scheduler says, at the tier it says. A refused stream is not
        started (the scheduler keeps it and admits it when capacity frees up); its placement says why."""
        d = default_demand(spec, demand)
        with self._lock:
            if self._closing.is_set():
                raise RuntimeError("the pool is stopped")
            if spec.id in self._members:
                raise ValueError(f"stream {spec.id!r} exists already")
            p = self.scheduler.add(d)
            m = _Member(replace(spec), d, p)
            self._members[spec.id] = m
            if p.admitted:
                self._start(m, p)
                log.info("stream %s: %s", spec.id, p.reason)
            else:
                log.warning("stream %s not started: %s", spec.id, p.reason)
            return p

    def remove_stream(self, stream_id: str) -> None:
        """Stop a stream and use its capacity: refused streams the scheduler now admits are started (and
        streams it upgrades in place restart at their new tier). KeyError for an unknown stream."""
        with self._lock:
            m = self._members.pop(stream_id)
            self._stop(m)
            self._end_outage(stream_id, "stream removed")
            changes = self.scheduler.remove(stream_id)
            self._apply(changes)

    def replace_stream(self, spec: StreamSpec, demand: StreamDemand | None = None) -> Placement:
        """Restart a stream with a new spec (a change through the API): the old one stops, the new one has the
        first claim on the capacity it had (`Scheduler.replace`), and what it no longer takes goes to refused
        streams. An unknown stream is added."""
        d = default_demand(spec, demand)
        with self._lock:
            m = self._members.get(spec.id)
            if m is None:
                return self.add_stream(spec, demand)
            self._stop(m)
            self._end_outage(spec.id, "stream changed")
            changes = self.scheduler.replace(d)
            p = changes[0]
            m = self._members[spec.id] = _Member(replace(spec), d, p)
            if p.admitted:
                self._start(m, p)
                log.info("stream %s: %s", spec.id, p.reason)
            else:
                log.warning("stream %s not started: %s", spec.id, p.reason)
            self._apply(changes[1:])
            return p

    def placements(self) -> dict[str, Placement]:
        return dict(self.scheduler.snapshot().placements)

    @property
    def streams(self) -> dict[str, StreamRuntime]:
        """The runtimes of the streams placed on an engine (running, or ended there), by id: what an engine's
        `streams` is for one engine. Refused streams are not among them (`placements` says why)."""
        with self._lock:
            return {sid: m.runtime for sid, m in self._members.items() if m.engine is not None and m.runtime is not None}

    def runtime(self, stream_id: str) -> StreamRuntime | None:
        """The stream's current runtime (its last one when it is not running), None when it never ran."""
        with self._lock:
            return self._members[stream_id].runtime

    def engine_of(self, stream_id: str) -> Engine | None:
        """The engine the stream runs on, None when it is refused."""
        with self._lock:
            return self._members[stream_id].engine

    def _all_engines(self) -> list[Engine]:
        return [*self.engines, *([self.cpu_engine] if self.cpu_engine is not None else [])]

    def label(self, engine: Engine | None) -> str:
        if engine is None:
            return "nowhere"
        if engine is self.cpu_engine:
            return "cpu (hybrid decode)" if self.engines else "cpu"
        return self.labels[self.engines.index(engine)]

    # -- running
    def start(self) -> None:
        """Start a worker thread per engine (once)."""
        with self._lock:
            if self._threads or self._closing.is_set():
                return
            for engine in self._all_engines():
                t = threading.Thread(target=self._work, args=(engine,), name=f"pool-{self.label(engine)}", daemon=True)
                self._threads.append(t)
                t.start()

    def run(self, until_done: bool = True, poll: float = 0.05) -> None:
        """Start, then wait until every started stream has ended (until_done) or stop() is called; stops."""
        self.start()
        try:
            while not self._closing.wait(poll):
                if until_done and self.done():
                    break
        finally:
            self.stop()

    def done(self) -> bool:
        """Whether every stream that runs has ended (refused streams do not run)."""
        with self._lock:
            return all(m.engine is None or m.runtime is None or m.runtime.finished for m in self._members.values())

    def stop(self) -> None:
        """Stop every engine (their streams end, detectors finish) and wait for the workers."""
        with self._lock:
            # Under the lock: a GPU failure being handled finishes its moves before any engine is stopped.
            self._closing.set()
            threads = list(self._threads)
        for engine in self._all_engines():
            engine.stop()
        for t in threads:
            t.join()
        if not threads:
            # Never started: a run that finds its engine stopped only ends the streams (sources, detectors).
            for engine in self._all_engines():
                engine.run(until_done=False)
        with self._lock:
            # A moved stream's first frame may have been scored in a worker's last tick.
            self._check_resumed(None)
            for sid in list(self._outages):
                self._end_outage(sid, "pool stopped")

    def join(self, timeout: float | None = None) -> None:
        for t in list(self._threads):
            t.join(timeout)

    def _work(self, engine: Engine) -> None:
        try:
            engine.run(until_done=False, on_tick=partial(self._after_tick, engine))
        except Exception:
            log.exception("engine on %s crashed; its streams are stopped", self.label(engine))

    def _after_tick(self, engine: Engine) -> None:
        self._check_resumed(engine)
        self._replan_opened()

    def _on_status(self, rt: StreamRuntime, kind: str, message: str) -> None:
        # Inside the engine's tick: noted here, acted on after it (a re-plan may stop or restart streams).
        if kind == "connected" and rt.info is not None:
            with self._opened_lock:
                self._opened[rt.id] = (rt, rt.info)
        if self._user_on_status is not None:
            self._user_on_status(rt, kind, message)

    def _replan_opened(self) -> None:
        """Tell the scheduler what the streams that opened since the last tick really are (codec, size, rate)
        where that differs from their plan, and make its changes real: a stream that turned out dearer than
        planned and no longer fits where it is goes to a cheaper tier or elsewhere, or is refused; one that
        turned out cheaper frees capacity for refused and downgraded streams. Generated `synthetic://` streams
        are left as planned (they decode nothing)."""
        if not self._opened:
            return  # the usual case, read without the lock
        with self._opened_lock:
            opened, self._opened = self._opened, {}
        with self._lock:
            if self._closing.is_set():
                return
            for sid, (rt, info) in opened.items():
                m = self._members.get(sid)
                if m is None or m.runtime is not rt:
                    continue
                actual = opened_demand(m.demand, info)
                if actual is None or actual == m.demand:
                    continue
                m.demand = actual
                changes = self.scheduler.update(actual)
                if changes and changes[0].stream_id == sid and not changes[0].admitted:
                    log.warning("stream %s stopped: %s", sid, changes[0].reason)
                self._apply(changes)

    # -- placement made real (callers hold the lock)
    def _engine_for(self, p: Placement) -> Engine | None:
        if p.target is Target.GPU:
            assert p.gpu is not None
            return self.engines[p.gpu]
        if p.target is Target.CPU:
            return self.cpu_engine
        return None

    def _start(self, m: _Member, p: Placement) -> None:
        engine = self._engine_for(p)
        m.placement = p
        if engine is None:
            return
        assert p.tier is not None
        spec = replace(m.spec, source=replace(m.spec.source, tier=p.tier.value))
        m.runtime = engine.add_stream(spec)
        m.engine = engine

    def _stop(self, m: _Member) -> None:
        if m.engine is not None:
            m.engine.remove_stream(m.spec.id)
        m.engine = None

    def _apply(self, changes: Iterable[Placement]) -> None:
        """Make the scheduler's changed placements real: start admitted streams, restart moved or re-tiered
        ones (a stream's tier is fixed when its source opens)."""
        for p in changes:
            m = self._members.get(p.stream_id)
            if m is None:
                continue
            target = self._engine_for(p)
            running_tier = m.runtime.tier if m.runtime is not None and m.engine is not None else None
            if target is not None and target is m.engine and p.tier is not None and running_tier == p.tier.value:
                m.placement = p
                continue
            was = self.label(m.engine)
            self._stop(m)
            self._start(m, p)
            log.info("stream %s: from %s to %s: %s", p.stream_id, was, self.label(m.engine), p.reason)

    # -- GPU failure
    def _device_failed(self, index: int, exc: BaseException) -> None:
        """Engine `index` lost its device (called once, from its worker thread, with that engine stopping)."""
        device = self.labels[index]
        error = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        with self._lock:
            moved = self.scheduler.fail_gpu(index)
            if self._closing.is_set():
                log.error("GPU %s failed (%s) while the pool stops; its streams end there", device, error)
                return
            log.error("GPU %s failed (%s); moving %d streams", device, error, len(moved))
            for p in moved:
                m = self._members.get(p.stream_id)
                if m is not None:
                    self._move(m, p, device, error, str(exc))

    def _move(self, m: _Member, p: Placement, device: str, error: str, full_error: str) -> None:
        sid = m.spec.id
        old = m.runtime if m.engine is not None else None
        if old is not None and old.finished:
            m.placement = p  # it ended before the failure: nothing to move
            return
        target = self._engine_for(p)
        if target is not None:
            message = f"GPU {device} failed ({error}); stream moved to {self.label(target)}"
            log.warning("stream %s: %s", sid, message)
        else:
            message = f"GPU {device} failed ({error}); no capacity left: {p.reason}"
            log.error("stream %s: %s", sid, message)
        # The alert goes out first, so nothing the stream's detectors say on either engine comes before it; a
        # stream still out from an earlier failure keeps the alert that is open already.
        if sid not in self._outages:
            details: dict[str, object] = {
                "device": device,
                "reason": p.reason,
                "error": full_error,
                "moved_to": self.label(target) if target is not None else None,
                "tier": p.tier.value if p.tier is not None and target is not None else None,
            }
            start = old.stats.media_end if old is not None else 0.0
            event = Event.outage(sid, start, message, EVENT_VERSION, details)
            self._outages[sid] = _Outage(event, time.monotonic())
            self.sink.emit(event)
        self._stop(m)  # its detectors finish on the failed engine
        self._start(m, p)

    def _check_resumed(self, engine: Engine | None) -> None:
        """Resolve the failure alert of each moved stream whose first frame has been scored on its new engine
        (`engine`'s streams only, from its worker after each tick; every engine's when None)."""
        if not self._outages:
            return  # the usual case, read without the lock: a new outage is seen at the next tick
        with self._lock:
            for sid, outage in list(self._outages.items()):
                m = self._members.get(sid)
                rt = m.runtime if m is not None and m.engine is not None else None
                if rt is None or (engine is not None and m.engine is not engine) or rt.stats.frames_scored == 0:
                    continue
                del self._outages[sid]
                out = time.monotonic() - outage.since
                # The new source's media clock starts afresh, so the outage is measured in wall seconds.
                where = self.label(m.engine)
                self.sink.emit(outage.event.resolved(outage.event.start + out, round(out, 3), resumed_on=where))
                log.info("stream %s: resumed on %s after %.1f s", sid, where, out)

    def _end_outage(self, sid: str, why: str) -> None:
        """Like a detector at the end of input: an alert still open resolves when monitoring of it ends."""
        outage = self._outages.pop(sid, None)
        if outage is not None:
            out = time.monotonic() - outage.since
            self.sink.emit(outage.event.resolved(outage.event.start + out, round(out, 3), ended=why))
