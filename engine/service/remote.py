"""The service's streams in worker processes: `engine.workers` engine processes per device.

One engine process scores every stream on one thread, and on a GPU its host side, not the GPU, limits it
(`run` with four processes per H200 reached 0.88 of the HEVC decode ceiling where one reached 0.57). With
`engine.workers` above 1, `serve` runs that many engine processes per device and keeps the API, the store and
the outputs in the service process: each worker runs an ordinary `Engine`, takes stream commands (add, remove,
a picture for the mosaic) from its own queue, and sends back its events and, twice a second, a snapshot of
each stream's state, which the service reads through `RemoteRuntime` as it reads a local runtime.

Placement: with a CPU budget (`engine.cpu_cores`, the CPU as device) or GPUs the scheduler decides whether a
stream fits and at which tier (its CPU model counts one scoring thread per process); then the stream goes to
the worker of its device with the fewest streams. A worker that dies (killed, crashed, its GPU failed) loses
no alert: what its streams had open is resolved with the reason, each gets a critical `no_signal`, and they
start again in a new worker (another device when the GPU failed), the `no_signal` resolving at their first
picture or sound there.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing as mp
import queue as queue_mod
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from types import SimpleNamespace
from typing import Any

import torch

from engine.channel import Inbox, Outbox
from engine.events import Event, Status
from engine.media import StreamCounters, StreamInfo
from engine.runner import StreamSpec, StreamStats
from engine.workers import _event_from_dict

log = logging.getLogger("framewatch")

EVENT_VERSION = "service-workers-1.0"
RESTARTS = 3  # a stream whose worker dies more often than this within RESTART_WINDOW is given up, alerted
RESTART_WINDOW = 600.0  # seconds: deaths spread over months (a driver hiccup a week) never add up to that
SNAPSHOT_EVERY = 0.5  # seconds between a worker's stream snapshots
REMOVE_WAIT = 10.0  # seconds a removal waits for the worker to finish the stream (its alerts resolved)
TILE_WAIT = 2.0


# --- the worker process -----------------------------------------------------------------------------------------


def _snapshot(rt: Any) -> dict[str, Any]:
    """What the service reads of a stream's runtime, as plain data."""
    from engine.service.service import _sync

    m = rt.audio.meter
    return {
        "state": rt.state, "errors": list(rt.errors), "tier": rt.tier,
        "info": asdict(rt.info) if rt.info is not None else None,
        "stats": asdict(rt.stats), "audio_end": rt.audio_end, "counters": asdict(rt.counters),
        "meter": {"momentary": m.momentary, "short_term": m.short_term, "integrated": m.integrated,
                  "loudness_range": m.loudness_range},
        "max_true_peak": rt.audio.max_true_peak, "has_frame": rt.last_frame is not None,
        "last_arrival": rt.queue.last_arrival, "live": rt.ctx.live, "thread": rt.thread is not None,
        "eof": rt.eof, "finished": rt.finished, "sync": _sync(rt),
    }


def _tile(engine: Any, stream_id: str, width: int) -> bytes | None:
    from engine.alerts.thumbnails import tile_jpeg

    rt = engine.streams.get(stream_id)
    frame = rt.last_frame if rt is not None else None
    return tile_jpeg(frame, width) if frame is not None else None


def _worker_main(index: int, device: str, engine_kwargs: dict[str, Any], commands: Any, conn: Any, stop: Any,
                 thumbnails: str | None, review: str | None, log_level: str | None) -> None:
    from engine.workers import _follow_parent

    _follow_parent()
    out = Outbox(conn)  # its own pipe to the parent (engine.channel)
    if log_level:
        import sys

        logging.basicConfig(level=getattr(logging, log_level.upper(), logging.WARNING),
                            format="framewatch: %(levelname)s: %(message)s", stream=sys.stderr)
    from engine.alerts import CallbackSink, ThumbnailWriter
    from engine.review import ReviewStore
    from engine.runner import Engine

    def send(kind: str, payload: Any) -> None:
        out.put((kind, index, payload))

    failed: list[str] = []

    def device_error(exc: BaseException) -> None:
        failed.append(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        send("device_error", failed[0])

    def event(e: Any) -> None:
        # With where the stream was when it said so: the service measures detection latency from that, not
        # from a snapshot up to a tick old (seconds, on a loaded worker).
        rt = engine.streams.get(e.stream)
        at = (rt.stats.media_end, rt.audio_end, rt.queue.last_arrival) if rt is not None else None
        send("event", (e.to_dict(), at))

    engine = Engine(CallbackSink(event), device=device,
                    thumbnails=ThumbnailWriter(thumbnails) if thumbnails else None,
                    review=ReviewStore(review) if review else None, on_device_error=device_error, **engine_kwargs)
    send("hello", {"device": str(engine.device), "device_note": engine.device_note})

    def serve_commands() -> None:
        while True:
            try:
                cmd = commands.get(timeout=0.2)
            except queue_mod.Empty:
                if stop.value:
                    engine.stop()
                    return
                continue
            kind = cmd[0]
            try:
                if kind == "add":
                    engine.add_stream(cmd[1])
                    gens[cmd[1].id] = cmd[2]
                elif kind == "remove":
                    engine.remove_stream(cmd[1])
                    send("removed", cmd[1])  # after the events of its end: its one pipe keeps the order
                elif kind == "tile":
                    send("tile", (cmd[1], _tile(engine, cmd[2], cmd[3])))
                elif kind == "stop":
                    engine.stop()
                    return
            except Exception as exc:  # one bad command fails its stream, not the worker
                log.exception("worker %d: %s failed", index, kind)
                if kind in ("add", "remove"):
                    sid = cmd[1].id if kind == "add" else cmd[1]
                    send("failed", (sid, f"{kind} failed in worker {index}: {exc}"))

    # Which add each stream's snapshot belongs to: a stream changed in place (same id, same worker) must not
    # show the old one's figures from a snapshot taken before the change.
    gens: dict[str, int] = {}
    threading.Thread(target=serve_commands, name="commands", daemon=True).start()
    last = [0.0]

    def tick() -> None:
        now = time.monotonic()
        if now - last[0] < SNAPSHOT_EVERY:
            return
        last[0] = now
        shed = engine.shedder is not None and engine.shedder.shed
        send("status", ({rt.id: {**_snapshot(rt), "gen": gens.get(rt.id)} for rt in list(engine.streams.values())},
                        shed))

    try:
        engine.run(until_done=False, on_tick=tick)
    finally:
        send("status", ({rt.id: {**_snapshot(rt), "gen": gens.get(rt.id)} for rt in list(engine.streams.values())},
                        False))
        send("done", failed[0] if failed else None)
        out.close()


# --- the service side -------------------------------------------------------------------------------------------


class RemoteRuntime:
    """A stream running in a worker process, as the service reads a `StreamRuntime`: the latest snapshot."""

    def __init__(self, spec: StreamSpec) -> None:
        self.spec = spec
        self.id = spec.id
        self.state = "starting"
        self.errors: list[str] = []
        self.tier = spec.source.tier
        self.info: StreamInfo | None = None
        self.stats = StreamStats()
        self.audio_end = 0.0
        self.counters = StreamCounters()
        self.audio = SimpleNamespace(meter=SimpleNamespace(momentary=float("nan"), short_term=float("nan"),
                                                           integrated=float("nan"), loudness_range=float("nan")),
                                     max_true_peak=float("nan"))
        self.last_frame: object | None = None
        self.queue = SimpleNamespace(last_arrival=None)
        self.ctx = SimpleNamespace(live=False)
        self.thread: object | None = True  # asked to start: readiness waits for news, not for a thread here
        self.eof = False
        self.finished = False
        self.detectors: list[Any] = []
        self.remote_sync: dict[str, Any] | None = None

    def update(self, snap: dict[str, Any]) -> None:
        self.state = snap["state"]
        self.errors = snap["errors"]
        self.tier = snap["tier"]
        self.info = StreamInfo(**snap["info"]) if snap["info"] is not None else None
        self.stats = StreamStats(**snap["stats"])
        self.audio_end = snap["audio_end"]
        self.counters = StreamCounters(**snap["counters"])
        self.audio.meter = SimpleNamespace(**snap["meter"])
        self.audio.max_true_peak = snap["max_true_peak"]
        self.last_frame = True if snap["has_frame"] else None
        self.queue.last_arrival = snap["last_arrival"]
        self.ctx.live = snap["live"]
        self.thread = True if snap["thread"] else None
        self.eof = snap["eof"]
        self.finished = snap["finished"]
        self.remote_sync = snap["sync"]


@dataclass
class _Proc:
    index: int
    device: str
    process: Any = None
    commands: Any = None
    streams: set[str] = field(default_factory=set)
    removing: set[str] = field(default_factory=set)  # removals it has not confirmed yet
    done: bool = False
    lost: bool = False
    started: float = 0.0  # time.monotonic() at its start


@dataclass
class _Stream:
    spec: StreamSpec
    worker: int | None  # None: refused
    runtime: RemoteRuntime
    reason: str = ""
    gen: int = 0  # the add command its current runtime comes from
    demand: Any = None  # what the scheduler was told it asks for
    opened: int = 0  # the gen whose opening was looked at (re-planned once per add)


class ServiceWorkers:
    """`engine.workers` engine processes per device behind the surface the service uses (`Engines`'): see
    the module docstring. `cpu` (a CpuModel) or `models` (GPU models, one per device) put a scheduler in
    front of the placement; without either, every stream is taken."""

    def __init__(self, sink: Any, devices: list[str], per_device: int, engine_kwargs: dict[str, Any],
                 thumbnails: str | None = None, review: str | None = None, log_level: str | None = None,
                 cpu: Any = None, models: list | None = None, headroom: float = 0.15) -> None:
        if not devices or per_device < 1:
            raise ValueError("service workers need at least one device and one worker per device")
        self.sink = sink
        self.devices = list(devices)
        self.per_device = per_device
        self.engine_kwargs = dict(engine_kwargs)
        self.thumbnails = thumbnails
        self.review = review
        self.log_level = log_level
        self._ctx = mp.get_context("spawn")  # CUDA cannot be used in a forked child
        self._inbox = Inbox(self._ctx)
        self._stop = self._ctx.Value("b", 0, lock=False)
        self._lock = threading.RLock()
        self._procs: list[_Proc] = []
        for d in self.devices:
            for _ in range(per_device):
                self._new_proc(d)
        self._streams: dict[str, _Stream] = {}
        self._open: dict[str, dict[str, Event]] = {}  # stream -> its firing alerts
        self._outage: dict[str, tuple[Event, float]] = {}  # stream -> (worker-outage no_signal, since)
        self._restarts: dict[str, list[float]] = {}  # stream -> when its workers died (monotonic)
        self._removing: dict[str, threading.Event] = {}
        self._tiles: dict[int, list[Any]] = {}  # request -> [done, jpeg]
        self._requests = itertools.count(1)
        self._gens = itertools.count(1)
        self._failed_devices: set[str] = set()
        self._shed: dict[int, bool] = {}
        self._running = False
        self._closing = False
        self.device = torch.device("cpu") if self.devices[0] == "cpu" else torch.device(self.devices[0])
        self.device_note = ""
        self.engines: list[Any] = [SimpleNamespace(device=torch.device("cpu"), requested_device=d) for d in self.devices]
        self.scheduler: Any = None
        if models is None and all(d.startswith("cuda") for d in self.devices):
            from engine.pool import _detect_models

            models = _detect_models(self.devices)
        if models is not None and all(d.startswith("cuda") for d in self.devices):
            from engine.scheduler import Scheduler

            # Beside GPUs, cpu_cores is hybrid decode: CPU worker processes (made when a stream goes there).
            self.scheduler = Scheduler(list(models), headroom=headroom,
                                       cpu=replace(cpu, scoring_threads=per_device) if cpu is not None else None)
        elif cpu is not None and self.devices == ["cpu"]:
            from engine.scheduler import Scheduler

            self.scheduler = Scheduler([], headroom=headroom, cpu=replace(cpu, scoring_threads=per_device))
        self.cpu_only = self.scheduler is not None and not self.scheduler.gpus

    # -- the surface the service uses
    @property
    def streams(self) -> dict[str, RemoteRuntime]:
        with self._lock:
            return {sid: s.runtime for sid, s in self._streams.items() if s.worker is not None}

    def refused(self) -> dict[str, str]:
        with self._lock:
            return {sid: s.reason for sid, s in self._streams.items() if s.worker is None}

    def add_stream(self, spec: StreamSpec) -> None:
        with self._lock:
            if self._closing:
                raise RuntimeError("the engine is stopping")
            if spec.id in self._streams:
                raise ValueError(f"stream {spec.id!r} exists already")
            s = _Stream(spec, None, RemoteRuntime(spec))
            self._streams[spec.id] = s
            if self.scheduler is None:
                self._place(s, self._least_loaded(self._healthy()))
                return
            s.demand = self._demand(spec)
            self._apply_placement(s, self.scheduler.add(s.demand))

    def _demand(self, spec: StreamSpec) -> Any:
        from engine.pool import cpu_demand, default_demand

        return cpu_demand(spec) if self.cpu_only else default_demand(spec)

    def remove_stream(self, stream_id: str) -> None:
        self._remove(stream_id, None)

    def replace_stream(self, spec: StreamSpec) -> None:
        """A changed stream: the old one ends in its worker, then the new one starts, first in line for the old
        one's capacity (a removal and an add would hand it to a refused stream)."""
        self._remove(spec.id, spec)

    def _remove(self, stream_id: str, replacement: StreamSpec | None) -> None:
        with self._lock:
            s = self._streams.pop(stream_id, None)
            if s is None:
                if replacement is not None:
                    self.add_stream(replacement)
                return
            self._end_outage(stream_id, "stream removed")
            self._restarts.pop(stream_id, None)  # a new stream, or none: the restarts are the old one's
            done = threading.Event()
            proc = self._procs[s.worker] if s.worker is not None and not self._closing else None
            if proc is not None and (proc.done or proc.lost):
                proc = None  # gone: nothing to wait for
            if proc is not None:
                proc.streams.discard(stream_id)
                proc.removing.add(stream_id)
                self._removing[stream_id] = done
                proc.commands.put(("remove", stream_id))
            changes = self.scheduler.remove(stream_id) if self.scheduler is not None and replacement is None else []
        if proc is not None and self._running:
            # Its end (the detectors resolving what they had open) comes back before the answer.
            if not done.wait(REMOVE_WAIT):
                log.warning("stream %s: worker %d did not confirm its removal within %g s", stream_id, proc.index,
                            REMOVE_WAIT)
        with self._lock:
            self._removing.pop(stream_id, None)
            self._close_stream(stream_id, "stream removed", self._media(s))
            if replacement is not None:
                new = self._streams[stream_id] = _Stream(replacement, None, RemoteRuntime(replacement))
                if self.scheduler is None:
                    self._place(new, self._least_loaded(self._healthy()))
                else:
                    new.demand = self._demand(replacement)
                    changes = self.scheduler.replace(new.demand)
            for p in changes:
                other = self._streams.get(p.stream_id)
                if other is not None:
                    self._apply_placement(other, p)

    def tile(self, stream_id: str, width: int) -> bytes | None:
        with self._lock:
            s = self._streams.get(stream_id)
            if s is None or s.worker is None:
                raise LookupError(stream_id)
            proc = self._procs[s.worker]
            if self._closing or proc.done:
                return None
            req = next(self._requests)
            slot = self._tiles[req] = [threading.Event(), None]
            proc.commands.put(("tile", req, stream_id, width))
        slot[0].wait(TILE_WAIT)
        with self._lock:
            self._tiles.pop(req, None)
        return slot[1]

    def run(self) -> None:
        """Start the workers and relay their news until `stop()`; then end every stream (alerts resolved)."""
        with self._lock:
            self._running = True
            for proc in self._procs:
                if proc.process is None and not proc.done:
                    self._start(proc)
        try:
            while not self._stop.value:
                self._drain(0.2)
                self._check()
        finally:
            with self._lock:
                self._closing = True
                for proc in self._procs:
                    if proc.process is not None and not proc.done:
                        proc.commands.put(("stop",))
            end = time.monotonic() + 15
            while any(p.process is not None and not p.done for p in self._procs) and time.monotonic() < end:
                self._drain(0.2)
                self._check(restart=False)
            for proc in self._procs:
                if proc.process is not None and proc.process.is_alive():
                    proc.process.kill()  # workers leave SIGTERM to the parent: after the wait, the hard way
                    proc.process.join(timeout=5)
            self._drain(0.0)
            with self._lock:
                for sid in list(self._open):
                    self._close_stream(sid, "monitoring stopped before its worker resolved it",
                                       self._media(self._streams.get(sid)))
                for sid in list(self._outage):
                    self._end_outage(sid, "service stopped")
                for proc in self._procs:  # their feeder threads and semaphores go now, not at interpreter exit
                    proc.commands.cancel_join_thread()
                    proc.commands.close()

    def stop(self) -> None:
        self._stop.value = 1

    def label(self) -> str:
        return ", ".join(f"{d} ({self.per_device} worker processes)" for d in self.devices)

    def device_of(self, stream_id: str) -> str | None:
        with self._lock:
            s = self._streams.get(stream_id)
            if s is None or s.worker is None:
                return None
            proc = self._procs[s.worker]
            return f"{proc.device} (worker {proc.index})"

    def lost(self) -> list[str]:
        return sorted(self._failed_devices)

    @property
    def shed(self) -> bool:
        return any(self._shed.values())

    # -- placement (callers hold the lock)
    def _healthy(self) -> list[str]:
        return [d for d in self.devices if d not in self._failed_devices] or ["cpu"]

    def _new_proc(self, device: str) -> _Proc:
        proc = _Proc(len(self._procs), device, commands=self._ctx.Queue())
        self._procs.append(proc)
        return proc

    def _least_loaded(self, devices: list[str]) -> _Proc:
        live = [p for p in self._procs if p.device in devices and not p.done and not p.lost]
        best = min(live, key=lambda p: (len(p.streams), p.index)) if live else None
        if best is None or (best.streams and sum(p.device == best.device for p in live) < self.per_device):
            # Processes for a device nothing ran on yet (hybrid CPU decode, the CPU after every GPU failed) are
            # made as streams arrive, up to engine.workers.
            best = self._new_proc(best.device if best is not None else devices[0])
        return best

    def _place(self, s: _Stream, proc: _Proc, tier: str | None = None) -> None:
        spec = s.spec if tier is None else replace(s.spec, source=replace(s.spec.source, tier=tier))
        s.spec, s.worker, s.reason = spec, proc.index, ""
        s.runtime = RemoteRuntime(spec)
        s.gen = next(self._gens)
        proc.streams.add(spec.id)
        proc.commands.put(("add", spec, s.gen))
        if self._running and proc.process is None:
            self._start(proc)

    def _apply_placement(self, s: _Stream, p: Any) -> None:
        from engine.scheduler import Target

        if s.worker is not None:  # a placement change restarts the stream (its tier is fixed at open)
            old = self._procs[s.worker]
            old.streams.discard(s.spec.id)
            if not old.done:
                old.commands.put(("remove", s.spec.id))
            s.worker = None
        if p.target is Target.REFUSED:
            s.reason = p.reason
            log.warning("stream %s not started: %s", s.spec.id, p.reason)
            return
        device = self._device_of_placement(p)
        assert p.tier is not None
        self._place(s, self._least_loaded([device]), p.tier.value)
        log.info("stream %s: %s", s.spec.id, p.reason)

    def _start(self, proc: _Proc) -> None:
        conn = self._inbox.open(proc.index)
        proc.started = time.monotonic()
        proc.process = self._ctx.Process(
            target=_worker_main, name=f"framewatch-serve-worker-{proc.index}",
            args=(proc.index, proc.device, self.engine_kwargs, proc.commands, conn, self._stop,
                  self.thumbnails, self.review, self.log_level),
            daemon=True,
        )
        try:
            proc.process.start()
        finally:
            self._inbox.started(conn)

    # -- news from the workers
    def _drain(self, timeout: float) -> None:
        def handle(*item: Any) -> None:
            with self._lock:
                self._handle(*item)

        self._inbox.drain(handle, timeout)

    def _mine(self, stream_id: str, index: int) -> _Stream | None:
        s = self._streams.get(stream_id)
        return s if s is not None and s.worker == index else None

    def _handle(self, kind: str, index: int, payload: Any) -> None:
        proc = self._procs[index]
        if kind == "event":
            e = _event_from_dict(payload[0])
            mine = self._mine(e.stream, index)
            if mine is None and e.stream not in self._removing:
                # A stream moved or removed meanwhile: its old worker's late news, already accounted for.
                if e.status is Status.FIRING or e.id not in self._open.get(e.stream, {}):
                    return
            if mine is not None and payload[1] is not None:
                rt = mine.runtime
                rt.stats.media_end, rt.audio_end, rt.queue.last_arrival = payload[1]
            opened = self._open.setdefault(e.stream, {})
            if e.status is Status.FIRING:
                opened[e.id] = e
            else:
                opened.pop(e.id, None)
            self.sink.emit(e)
        elif kind == "status":
            snaps, shed = payload
            self._shed[index] = shed
            for sid, snap in snaps.items():
                s = self._mine(sid, index)
                if s is None:
                    continue
                if snap.get("gen") != s.gen:
                    continue  # taken before the stream was changed
                s.runtime.update(snap)
                if s.runtime.info is not None and s.opened != s.gen:
                    s.opened = s.gen
                    self._replan(s)
                if sid in self._outage and (snap["stats"]["frames_scored"] or snap["stats"]["audio_seconds"]):
                    self._end_outage(sid, None, resumed_on=f"{proc.device} (worker {index})")
        elif kind == "removed":
            proc.removing.discard(payload)
            done = self._removing.get(payload)
            if done is not None:
                done.set()
        elif kind == "tile":
            slot = self._tiles.get(payload[0])
            if slot is not None:
                slot[1] = payload[1]
                slot[0].set()
        elif kind == "hello":
            if payload["device_note"] and not self.device_note:
                self.device_note = payload["device_note"]
        elif kind == "failed":
            s = self._mine(payload[0], index)
            if s is not None:
                s.runtime.errors.append(payload[1])
                s.runtime.state = "error"
        elif kind == "device_error":
            log.error("worker %d: device %s failed: %s", index, proc.device, payload)
            if proc.device != "cpu":
                self._failed_devices.add(proc.device)
            self._lose(proc, f"GPU {proc.device} failed ({payload})")
        elif kind == "done":
            proc.done = True
            self._unblock_removals(proc)
            if not self._closing and not self._stop.value:
                # A worker's engine ends only when the service stops it: one that ended by itself (an exception
                # out of its run) left its streams unmonitored, as a death would.
                self._lose(proc, f"worker process {index} on {proc.device} ended unexpectedly")

    def _replan(self, s: _Stream) -> None:
        """A stream has opened: tell the scheduler what it really is, where that differs from its plan, and make
        the changes real (as engine.pool does for one process: `GpuPool._replan_opened`)."""
        from engine.pool import opened_demand

        if self.scheduler is None or s.demand is None:
            return
        actual = opened_demand(s.demand, s.runtime.info)
        if actual is None or actual == s.demand:
            return
        s.demand = actual
        changes = self.scheduler.update(actual)
        for p in changes:
            other = self._streams.get(p.stream_id)
            if other is None:
                continue
            if other.worker is not None and p.admitted and p.tier is not None and other.spec.source.tier == p.tier.value \
                    and self._device_of_placement(p) == self._procs[other.worker].device:
                continue  # same place, same tier: only its cost changed
            if p.stream_id == s.spec.id and not p.admitted:
                log.warning("stream %s stopped: %s", p.stream_id, p.reason)
            self._apply_placement(other, p)

    def _device_of_placement(self, p: Any) -> str:
        from engine.scheduler import Target

        return "cpu" if p.target is Target.CPU else self.devices[p.gpu]

    def _check(self, restart: bool = True) -> None:
        with self._lock:
            for proc in self._procs:
                p = proc.process
                if proc.done or proc.lost or p is None:
                    continue
                hung = None
                if p.is_alive():
                    # Alive but silent (a snapshot goes out twice a second): hung, killed and replaced as if it
                    # had died (engine.channel.WATCHDOG).
                    hung = None if not restart or self._stop.value else self._inbox.hung(proc.index, proc.started)
                    if hung is None:
                        continue
                    p.kill()
                    p.join(timeout=5)
                self._inbox.settle(proc.index)
                self._drain(0.0)  # what it sent before it went: its events first, then the loss
                proc.done = True
                self._unblock_removals(proc)
                if restart and not self._stop.value:
                    self._lose(proc, f"worker process {proc.index} on {proc.device} died (exit code {p.exitcode})"
                               if hung is None else
                               f"worker process {proc.index} on {proc.device} sent nothing for {hung:.0f} s and was killed")

    def _unblock_removals(self, proc: _Proc) -> None:
        """A worker that is gone confirms nothing: a removal waiting on it goes on at once (its alerts are resolved
        here) rather than holding the API, and every other stream change, for REMOVE_WAIT."""
        for sid in proc.removing:
            done = self._removing.get(sid)
            if done is not None:
                done.set()
        proc.removing.clear()

    def _lose(self, proc: _Proc, why: str) -> None:
        """A worker is gone while its streams should run: resolve what they had open, raise no_signal on each,
        and start them again in another worker (another device when its GPU failed)."""
        if proc.lost or self._stop.value:
            return
        proc.lost = True
        if proc.process is not None and proc.process.is_alive():
            proc.process.kill()  # a worker whose GPU failed cannot be trusted with anything more
        self._unblock_removals(proc)
        moving = sorted(proc.streams)
        proc.streams.clear()
        if proc.device not in self._failed_devices:  # the device is fine: a new process takes the dead one's place
            fresh = self._new_proc(proc.device)
            if self._running:
                self._start(fresh)
        if moving:
            log.error("%s; restarting its %d stream(s)", why, len(moving))
        if self.scheduler is not None and proc.device in self._failed_devices and proc.device in self.devices:
            gpu = self.devices.index(proc.device)
            if gpu not in self.scheduler.failed_gpus:
                for p in self.scheduler.fail_gpu(gpu):
                    s = self._streams.get(p.stream_id)
                    if s is not None and s.worker is not None and self._procs[s.worker].device == proc.device:
                        self._restart(s, why, p)
            return
        for sid in moving:
            s = self._streams.get(sid)
            if s is not None:
                self._restart(s, why, None)

    def _restart(self, s: _Stream, why: str, placement: Any) -> None:
        sid = s.spec.id
        self._close_stream(sid, why, self._media(s))
        now = time.monotonic()
        deaths = self._restarts[sid] = [t for t in self._restarts.get(sid, []) if now - t < RESTART_WINDOW] + [now]
        media = max(s.runtime.stats.media_end, s.runtime.audio_end)
        if len(deaths) > RESTARTS:
            given_up = f"given up after {RESTARTS} restarts within {RESTART_WINDOW / 60:g} minutes"
            s.runtime.state = "error"
            s.runtime.errors.append(f"{why}; {given_up}")
            log.error("stream %s: %s; %s", sid, why, given_up)
            # Nothing watches it any more: that is an alert too (it was silent: every alert resolved, none
            # open), open until the stream is changed, removed, or the service stops.
            where, message = None, f"{why}; {given_up}"
        else:
            s.worker = None
            if placement is not None:
                self._apply_placement(s, placement)
            else:
                self._place(s, self._least_loaded(self._healthy()))
            where = self.device_of(sid)
            message = f"{why}; stream restarted on {where}" if where else f"{why}; {s.reason or 'no capacity left'}"
        if sid not in self._outage:
            event = Event.outage(sid, media, message, EVENT_VERSION, {"reason": why, "moved_to": where})
            self._outage[sid] = (event, time.monotonic())
            self.sink.emit(event)

    def _close_stream(self, stream_id: str, why: str, media: float = 0.0) -> None:
        """Resolve whatever the stream's worker left open (a removal whose worker did not answer, a lost worker,
        the end of the service), once, at the media time the stream had reached."""
        for e in list(self._open.pop(stream_id, {}).values()):
            self.sink.emit(e.resolved(max(e.start, media), ended=why))

    @staticmethod
    def _media(s: _Stream | None) -> float:
        return 0.0 if s is None else max(s.runtime.stats.media_end, s.runtime.audio_end)

    def _end_outage(self, stream_id: str, why: str | None, **details: object) -> None:
        item = self._outage.pop(stream_id, None)
        if item is None:
            return
        event, since = item
        out = round(time.monotonic() - since, 3)
        if why is not None:
            details = {**details, "ended": why}
        # A restarted stream's media clock starts afresh: the outage is measured in wall seconds.
        self.sink.emit(event.resolved(event.start + out, out, **details))
