"""Several engine processes: more host cores for the per-stream work, each process on one device.

One Python process drives a GPU's decoders and scoring from one interpreter, and the GPU benchmark showed
the host side, not the GPU, to be the limit there: four processes per H200 gave 0.84 of the HEVC decode
ceiling where one gave 0.61. `ProcessWorkers` spreads the streams over `per_device` worker processes per
device; each runs an ordinary `Engine` and sends its events back to the parent, which hands them to the
parent's sinks, so JSONL files, webhooks and the console see one event stream.

A worker that dies (killed, crashed, or its GPU failed) loses no alert: events it had opened are resolved
by the parent with the reason, each of its streams gets a critical `no_signal` event naming the worker and
device, and the streams are started again in a new worker, on another device when the device failed; the
`no_signal` resolves when the new worker scores the stream's first frame.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import queue as queue_mod
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from engine.alerts import EventSink
from engine.events import Event, Severity, Status

log = logging.getLogger("framewatch")

EVENT_VERSION = "workers-1.0"
RESTARTS = 3  # per stream: a stream that kills its worker again and again is given up with an error


@dataclass
class StreamReport:
    """What the parent knows about a stream at the end (the worker's own numbers, sent when it finishes)."""

    id: str
    state: str = "starting"
    frames: int = 0
    media_end: float = 0.0
    frames_dropped: int = 0
    decode_errors: int = 0
    integrated_lufs: float | None = None
    events: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    decoder: str = ""
    device: str = ""


def report_of(rt: Any, device: str) -> StreamReport:
    """A stream's end-of-run numbers from its runtime (what the summary table shows)."""
    return StreamReport(
        id=rt.id, state=rt.state, frames=rt.stats.frames_scored, media_end=rt.stats.media_end,
        frames_dropped=rt.counters.frames_dropped, decode_errors=rt.counters.decode_errors,
        integrated_lufs=rt.audio.meter.integrated, events=dict(rt.stats.events), errors=list(rt.errors),
        decoder=rt.info.decoder if rt.info is not None else "", device=device,
    )


def _event_from_dict(d: dict[str, Any]) -> Event:
    return Event(**{**d, "status": Status(d["status"]), "severity": Severity(d["severity"])})


def _worker_main(index: int, device: str, engine_kwargs: dict[str, Any], specs: list, out: Any, stop: Any,
                 deadline: float | None, thumbnails: str | None, log_level: str | None = None) -> None:
    """A worker process: one Engine on `device` for `specs`; events and progress go to `out`."""
    _follow_parent()
    if log_level:  # a spawned process starts with Python's logging defaults: the run's level and format
        import sys

        logging.basicConfig(level=getattr(logging, log_level.upper(), logging.WARNING),
                            format="framewatch: %(levelname)s: %(message)s", stream=sys.stderr)
    from engine.alerts import CallbackSink, ThumbnailWriter
    from engine.runner import Engine

    def send(kind: str, payload: Any) -> None:
        out.put((kind, index, payload))

    device_failed: list[str] = []
    engine = Engine(
        CallbackSink(lambda e: send("event", e.to_dict())),
        device=device,
        on_measure=(lambda snap: send("measure", snap)) if "measure_every" in engine_kwargs else None,
        thumbnails=ThumbnailWriter(thumbnails) if thumbnails else None,
        on_device_error=lambda exc: device_failed.append(str(exc).splitlines()[0] if str(exc) else type(exc).__name__),
        **engine_kwargs,
    )
    for spec in specs:
        engine.add_stream(spec)
    last = [0.0]
    started: set[str] = set()

    def progress() -> None:
        # Once a second, and at once when a stream scores its first frame (that ends an outage).
        now = time.monotonic()
        fresh = [rt.id for rt in engine.streams.values() if rt.stats.frames_scored and rt.id not in started]
        if not fresh and now - last[0] < 1.0:
            return
        last[0] = now
        started.update(fresh)
        send("progress", {rt.id: (rt.stats.frames_scored, rt.stats.media_end) for rt in list(engine.streams.values())})

    def watch() -> None:
        # A plain shared flag, polled: a multiprocessing Event's condition variable deadlocks the parent's
        # set() when a process exits while one of its threads is waiting on it.
        while not stop.value:
            time.sleep(0.1)
        engine.stop()

    threading.Thread(target=watch, daemon=True).start()
    try:
        engine.run(until_done=True, deadline=deadline, on_tick=progress)
    finally:
        if device_failed:
            send("device_error", device_failed[0])
        send("done", [asdict(report_of(rt, str(engine.device))) for rt in engine.streams.values()])


def _follow_parent() -> None:
    """The parent decides when a worker stops: SIGTERM and Ctrl-C sent to the whole process group (GNU
    timeout, systemctl stop, a terminal) are left to it, so the worker finishes its streams and resolves its
    alerts when told instead of dying with them open. A worker whose parent is killed outright (SIGKILL, the
    OOM killer) goes with it: nobody is left to receive its events."""
    import os
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):  # not Linux: the watch thread's parent check below still ends it
        pass
    parent = os.getppid()

    def orphaned() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=orphaned, daemon=True).start()


@dataclass
class _Worker:
    index: int
    device: str
    specs: list
    process: Any = None
    done: bool = False
    device_error: str | None = None


class ProcessWorkers:
    """Streams spread over worker processes, `per_device` per device; see the module docstring."""

    def __init__(self, sink: EventSink, devices: list[str], per_device: int = 1, engine_kwargs: dict | None = None,
                 thumbnails: str | None = None, on_measure: Any = None, measure_every: float = 1.0,
                 log_level: str | None = None) -> None:
        if not devices or per_device < 1:
            raise ValueError("ProcessWorkers needs at least one device and one worker per device")
        self.sink = sink
        self.devices = list(devices)
        self.per_device = per_device
        self.engine_kwargs = dict(engine_kwargs or {})
        self.thumbnails = thumbnails
        self.log_level = log_level
        # Measurements come back from the workers like events and go to this callable in the parent.
        self.on_measure = on_measure
        if on_measure is not None:
            self.engine_kwargs["measure_every"] = measure_every
        self._ctx = mp.get_context("spawn")  # CUDA cannot be used in a forked child
        self._out = self._ctx.Queue()
        self._stop = self._ctx.Value("b", 0, lock=False)
        self._workers: list[_Worker] = []
        self._specs: dict[str, Any] = {}
        self._where: dict[str, int] = {}  # stream -> worker index
        self._open: dict[str, dict[str, Event]] = {}  # stream -> firing events not yet resolved
        self._outage: dict[str, Event] = {}  # stream -> the no_signal event of a lost worker
        self._restarts: dict[str, int] = {}
        self._media: dict[str, float] = {}  # stream -> media time of its last scored frame (progress)
        self.scheduler: Any = None
        self._failed_devices: set[str] = set()
        self.reports: dict[str, StreamReport] = {}
        self._deadline: float | None = None
        self._lock = threading.Lock()

    # -- planning
    def add_streams(self, specs: list, models: list | None = None, headroom: float = 0.15) -> list:
        """Place streams before `run`: on GPUs by the scheduler (NVDEC budgets, tiers, refusals with reasons;
        `models` per device, detected for CUDA devices when not given), else round robin over the devices;
        then onto the least-loaded worker of the device. Returns the scheduler's placements (empty without)."""
        for spec in specs:
            if spec.id in self._specs or sum(1 for x in specs if x.id == spec.id) > 1:
                raise ValueError(f"stream {spec.id!r} exists already")
        if models is None and all(d.startswith("cuda") for d in self.devices):
            from engine.pool import _detect_models

            models = _detect_models(self.devices)
        placements: list = []
        if models is not None:
            from engine.pool import default_demand
            from engine.scheduler import Scheduler, Target

            if len(models) != len(self.devices):
                raise ValueError("one GPU model per device is needed")
            self.scheduler = Scheduler(list(models), headroom=headroom)
            plan = self.scheduler.plan([default_demand(s) for s in specs])
            for spec in specs:
                p = plan.placements[spec.id]
                placements.append(p)
                if p.target is not Target.GPU:
                    self._refuse(spec, p.reason)
                    continue
                self._assign(replace(spec, source=replace(spec.source, tier=p.tier.value)), self.devices[p.gpu])
        else:
            for i, spec in enumerate(specs):
                self._assign(spec, self.devices[i % len(self.devices)])
        return placements

    def _refuse(self, spec: Any, reason: str) -> None:
        self._specs[spec.id] = spec
        self.reports[spec.id] = StreamReport(spec.id, state="refused", errors=[reason])
        log.warning("stream %s: %s", spec.id, reason)

    def _assign(self, spec: Any, device: str) -> None:
        self._specs[spec.id] = spec
        self.reports.setdefault(spec.id, StreamReport(spec.id))
        mine = [w for w in self._workers if w.device == device and w.process is None]
        if len(mine) < self.per_device:
            w = _Worker(len(self._workers), device, [])
            self._workers.append(w)
        else:
            w = min(mine, key=lambda x: (len(x.specs), x.index))
        w.specs.append(spec)
        self._where[spec.id] = w.index

    def _start(self, w: _Worker) -> None:
        if not w.specs:
            w.done = True
            return
        # time.monotonic() is one system-wide clock on Linux, so the deadline means the same in the worker.
        w.process = self._ctx.Process(
            target=_worker_main, name=f"framewatch-worker-{w.index}",
            args=(w.index, w.device, self.engine_kwargs, w.specs, self._out, self._stop, self._deadline,
                  self.thumbnails, self.log_level),
            daemon=True,
        )
        w.process.start()

    # -- running
    def run(self, deadline: float | None = None) -> None:
        """Start the workers and relay their events until all have finished, `deadline` (time.monotonic())
        passes or `stop()` is called."""
        self._deadline = deadline
        for w in list(self._workers):
            self._start(w)
        try:
            while not all(w.done for w in self._workers):
                if deadline is not None and time.monotonic() > deadline:
                    self._stop.value = 1
                self._drain(0.2)
                self._check_processes()
        finally:
            self._stop.value = 1
            end = time.monotonic() + 10
            while not all(w.done for w in self._workers) and time.monotonic() < end:
                self._drain(0.2)
                self._check_processes(restart=False)
            for w in self._workers:
                if w.process is not None and w.process.is_alive():
                    w.process.kill()  # workers ignore SIGTERM (left to the parent): after 10 s, the hard way
                    w.process.join(timeout=5)
            self._drain(0.0)
            self._close_open("monitoring stopped before its worker resolved it")

    def _close_open(self, why: str) -> None:
        """At the end of the run, whatever is still open (a worker that died or was ended during the shutdown,
        a worker outage nothing resumed, a stream given up) is resolved with the reason: every alert that
        fired ends, exactly once."""
        for stream, opened in list(self._open.items()):
            for e in list(opened.values()):
                self.sink.emit(e.resolved(max(e.start, self._media.get(stream, e.start)), ended=why))
            opened.clear()
        for stream, outage in list(self._outage.items()):
            self.sink.emit(outage.resolved(outage.start, ended=why))
            del self._outage[stream]

    def stop(self) -> None:
        self._stop.value = 1

    def _drain(self, timeout: float) -> None:
        try:
            item = self._out.get(timeout=timeout) if timeout else self._out.get_nowait()
        except queue_mod.Empty:
            return
        while True:
            self._handle(*item)
            try:
                item = self._out.get_nowait()
            except queue_mod.Empty:
                return

    def _handle(self, kind: str, index: int, payload: Any) -> None:
        w = self._workers[index]
        if kind == "event":
            e = _event_from_dict(payload)
            opened = self._open.setdefault(e.stream, {})
            if e.status is Status.FIRING:
                opened[e.id] = e
            else:
                opened.pop(e.id, None)
            self.sink.emit(e)
        elif kind == "progress":
            for stream, (frames, media_end) in payload.items():
                if self._where.get(stream) != index:
                    continue
                self._media[stream] = media_end
                outage = self._outage.pop(stream, None) if frames else None
                if outage is not None:
                    # Media time restarts with the new worker's source; the outage's length is in wall-clock
                    # time (the two events' wallclock fields).
                    self.sink.emit(outage.resolved(outage.start, resumed_on=w.device))
        elif kind == "measure":
            if self.on_measure is not None and self._where.get(payload.get("stream")) == index:
                self.on_measure(payload)
        elif kind == "device_error":
            self._failed_devices.add(w.device)
            log.error("worker %d: device %s failed: %s", index, w.device, payload)
            w.device_error = payload
        elif kind == "done":
            for r in payload:
                rep = self.reports.get(r["id"])
                if rep is not None and self._where.get(r["id"]) == index:
                    self.reports[r["id"]] = StreamReport(**r)
            w.done = True
            if w.device_error:
                self._lose(w, f"GPU {w.device} failed ({w.device_error})")

    def _check_processes(self, restart: bool = True) -> None:
        for w in self._workers:
            p = w.process
            if w.done or p is None or p.is_alive():
                continue
            self._drain(0.0)  # its last messages, if it sent any
            if w.done:
                continue
            w.done = True
            if bool(self._stop.value) or not restart:
                continue
            self._lose(w, f"worker process {w.index} on {w.device} died (exit code {p.exitcode})")

    def _lose(self, w: _Worker, why: str) -> None:
        """A worker is gone while its streams should still run: resolve what it left open, raise no_signal on
        each stream, and start the streams again elsewhere."""
        if bool(self._stop.value):
            return
        log.error("%s; restarting its %d stream(s)", why, len(w.specs))
        healthy = [d for d in self.devices if d not in self._failed_devices] or ["cpu"]
        again = []
        for spec in w.specs:
            if self._where.get(spec.id) != w.index:
                continue
            for e in list(self._open.pop(spec.id, {}).values()):
                self.sink.emit(e.resolved(max(e.start, self._media.get(spec.id, e.start)), ended=why))
            self._restarts[spec.id] = self._restarts.get(spec.id, 0) + 1
            rep = self.reports[spec.id]
            if self._restarts[spec.id] > RESTARTS:
                rep.state = "error"
                rep.errors.append(f"{why}; given up after {RESTARTS} restarts")
                log.error("stream %s: %s; given up after %d restarts", spec.id, why, RESTARTS)
                continue
            again.append(spec)
        if not again:
            return
        targets = self._targets(w, again, healthy, why)
        for device in dict.fromkeys(d for d in targets.values() if d is not None):
            moved = [spec for spec in again if targets[spec.id] == device]
            nw = _Worker(len(self._workers), device, moved)
            self._workers.append(nw)
            for spec in moved:
                self._where[spec.id] = nw.index
            self._announce(moved, why, device)
            self._start(nw)
        self._announce([spec for spec in again if targets[spec.id] is None], why, None)

    def _targets(self, w: _Worker, specs: list, healthy: list[str], why: str) -> dict[str, str | None]:
        """Where each stream of a lost worker goes: the scheduler's new placement when its GPU failed (None:
        nowhere left), else the least-loaded healthy device."""
        out: dict[str, str | None] = {}
        if self.scheduler is not None and w.device in self._failed_devices:
            from engine.scheduler import Target

            index = self.devices.index(w.device)
            if index not in self.scheduler.failed_gpus:
                self.scheduler.fail_gpu(index)
            for spec in specs:
                p = self.scheduler.placement(spec.id)
                if p.target is Target.GPU:
                    out[spec.id] = self.devices[p.gpu]
                    spec.source = replace(spec.source, tier=p.tier.value)  # the tier it fits in there
                else:
                    out[spec.id] = None
                    self.reports[spec.id].state = "error"
                    self.reports[spec.id].errors.append(f"{why}; {p.reason}")
            return out
        counts = {d: sum(len(x.specs) for x in self._workers if x.device == d and not x.done) for d in healthy}
        device = min(healthy, key=lambda d: (counts[d], healthy.index(d)))
        return {spec.id: device for spec in specs}

    def _announce(self, specs: list, why: str, device: str | None) -> None:
        """The no_signal event for each stream of a lost worker (once per outage)."""
        for spec in specs:
            if spec.id in self._outage:
                continue
            where = f"stream restarted on {device}" if device else "no capacity left to restart it"
            event = Event.outage(spec.id, self._media.get(spec.id, 0.0), f"{why}; {where}", EVENT_VERSION,
                                 {"reason": why, "moved_to": device})
            self._outage[spec.id] = event
            self.sink.emit(event)
