"""Several engine processes: more host cores for the per-stream work, each process on one device.

One Python process drives a GPU's decoders and scoring from one interpreter, and the GPU benchmark showed
the host side, not the GPU, to be the limit there: four processes per H200 gave 0.84 of the HEVC decode
ceiling where one gave 0.61. `ProcessWorkers` spreads the streams over `per_device` worker processes per
device; each runs an ordinary `Engine` and sends its events back to the parent, which hands them to the
parent's sinks, so JSONL files, webhooks and the console see one event stream.

A worker that dies (killed, crashed, or its GPU failed) loses no alert: each of its streams gets a critical
`no_signal` event naming the worker and device, and the streams are started again in a new worker, on
another device when the device failed. A live stream restarts from now: the alerts it had open are resolved
by the parent with the reason, and the `no_signal` resolves when the new worker scores its first picture
(or audio). A file (anything not live, synthetic:// too) is read again from its start, and the parent keeps
what the replay says from being reported twice (see `_Replay`): an alert still open at the death stays open
and ends once, when the replay sees its fault end; the `no_signal` resolves when the replay is back where the
lost worker had got. Either way the outage's `start` is the stream's media time when its worker was lost and
its `duration` (also its `value`) the seconds it went unmonitored, wall clock, with `end` = start +
duration, as the in-process pool (engine.pool) reports a failed GPU: a restarted stream's media clock starts
afresh (live) or goes over what was done already (files), so media time cannot measure the outage.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from engine.alerts import EventSink
from engine.channel import Inbox, Outbox
from engine.events import Event, Severity, Status

log = logging.getLogger("framewatch")

EVENT_VERSION = "workers-1.0"
RESTARTS = 3  # per stream: a stream that kills its worker again and again is given up with an error
# A replayed file's event is the one reported before the death when it is of the same type and starts within
# this many seconds (nearest first): the replay decodes the same pictures and samples, so its events come out
# the same (tests/test_workers.py); the margin is for a score that lands on the other side of a threshold by
# a rounding difference, a frame or an audio window away.
MATCH = 0.1
STOP_WAIT = 10.0  # seconds the workers get to end their streams once the run stops, before they are killed


@dataclass
class StreamReport:
    """What the parent knows about a stream at the end: the worker's own numbers, sent when it finishes (or
    its last progress, for a worker that died), merged over the stream's workers when it was restarted (see
    `ProcessWorkers._merged`); `events` counts the alerts the sinks received for the stream."""

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


def _worker_main(index: int, device: str, engine_kwargs: dict[str, Any], specs: list, conn: Any, stop: Any,
                 deadline: float | None, thumbnails: str | None, log_level: str | None = None,
                 resume: dict[str, tuple[float, float]] | None = None) -> None:
    """A worker process: one Engine on `device` for `specs`; events and progress go to the parent over `conn`
    (its own pipe, see engine.channel). `resume`: for files read again after a worker died, the media time
    (pictures, audio) that worker had got to: progress goes out at once when the stream gets back there (that
    ends its outage)."""
    _follow_parent()
    out = Outbox(conn)
    if log_level:  # a spawned process starts with Python's logging defaults: the run's level and format
        import sys

        logging.basicConfig(level=getattr(logging, log_level.upper(), logging.WARNING),
                            format="framewatch: %(levelname)s: %(message)s", stream=sys.stderr)
    from engine.alerts import CallbackSink, ThumbnailWriter
    from engine.runner import Engine

    def send(kind: str, payload: Any) -> None:
        out.put((kind, index, payload))

    def event(e: Any) -> None:
        # With the media time the stream had reached (pictures, audio) when it said so: the parent learns how
        # far a worker got from its events too, not only from the progress messages sent once a second.
        rt = engine.streams.get(e.stream)
        at = (rt.stats.media_end, rt.audio_end) if rt is not None else (0.0, 0.0)
        send("event", {"event": e.to_dict(), "at": at})

    device_failed: list[str] = []
    engine = Engine(
        CallbackSink(event),
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
    behind = dict(resume or {})

    def progress() -> None:
        # Once a second, and at once when a stream scores its first frame or a replayed file gets back to
        # where its lost worker was (either ends an outage).
        now = time.monotonic()
        rts = list(engine.streams.values())
        fresh = [rt.id for rt in rts if (rt.stats.frames_scored or rt.audio_end) and rt.id not in started]
        back = [rt.id for rt in rts if rt.id in behind
                and rt.stats.media_end >= behind[rt.id][0] and rt.audio_end >= behind[rt.id][1]]
        if not fresh and not back and now - last[0] < 1.0:
            return
        last[0] = now
        started.update(fresh)
        for sid in back:
            del behind[sid]
        send("progress", {rt.id: (rt.stats.frames_scored, rt.stats.media_end, rt.audio_end, rt.counters.frames_dropped,
                                  rt.counters.decode_errors) for rt in rts})

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
        out.close()


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
    started: float = 0.0  # time.monotonic() at its start


@dataclass
class _Replay:
    """A file whose worker died, read again from its start by a new worker.

    Why read it again rather than seek to where the lost worker was: the detectors' state (a black picture
    that began before that point, the loudness windows, the picture a freeze is measured against) is only
    rebuilt by going over the media again, and a seek lands on a key frame anyway, so a seek would report
    faults that were going on with a later start, or miss those not long enough yet. Read again, the file
    gives the same pictures and samples, so the same events, and the parent passes on only what was not
    reported before: each firing event of the replay is matched with a firing event reported for the stream
    (same type, start within MATCH, nearest first). A match is not reported again; its resolved event is
    passed on, under the first id, only when the first is still open (the fault was going on when the worker
    died: the alert fires once and ends once, at the fault's real end). Whatever else the replay says is new
    and goes out as it comes. The price is going over the part done already, at the file's pace (one paced
    in real time takes as long again), with the stream's `no_signal` open meanwhile."""

    reached: tuple[float, float]  # media time (pictures, audio) the lost worker had got to
    why: str  # why its worker was lost
    pending: list[Event]  # the stream's firing events reported so far, not yet matched by the replay
    ids: dict[str, str] = field(default_factory=dict)  # the replay's event id -> the id reported before
    back: bool = False  # the replay has got back to `reached`


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
        self._inbox = Inbox(self._ctx)
        self._stop = self._ctx.Value("b", 0, lock=False)
        self._workers: list[_Worker] = []
        self._specs: dict[str, Any] = {}
        self._where: dict[str, int] = {}  # stream -> worker index
        self._open: dict[str, dict[str, Event]] = {}  # stream -> firing events not yet resolved
        self._outage: dict[str, Event] = {}  # stream -> the no_signal event of a lost worker
        self._outage_since: dict[str, float] = {}  # stream -> time.monotonic() when its worker was lost
        self._lost_at: dict[str, float] = {}  # stream -> its media time when its worker was last lost
        self._restarts: dict[str, int] = {}
        # stream -> media time (pictures, audio) its current worker has got to, from its progress and events
        self._reached: dict[str, list[float]] = {}
        self._files: dict[str, bool] = {}  # stream -> not live: read again from its start after a worker died
        self._history: dict[str, list[Event]] = {}  # file stream -> the firing events reported for it
        self._replays: dict[str, _Replay] = {}
        self._now: dict[str, StreamReport] = {}  # stream -> its current worker's numbers (done, else progress)
        self._past: dict[str, list[StreamReport]] = {}  # stream -> the numbers of the workers it lost
        self._fired: dict[str, dict[str, int]] = {}  # stream -> alerts reported, per type
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
        from engine.sources.media import is_live_url

        self._specs[spec.id] = spec
        self._files[spec.id] = not is_live_url(spec.url)
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
        resume = {s.id: self._replays[s.id].reached for s in w.specs if s.id in self._replays}
        conn = self._inbox.open(w.index)
        # time.monotonic() is one system-wide clock on Linux, so the deadline means the same in the worker.
        w.process = self._ctx.Process(
            target=_worker_main, name=f"framewatch-worker-{w.index}",
            args=(w.index, w.device, self.engine_kwargs, w.specs, conn, self._stop, self._deadline,
                  self.thumbnails, self.log_level, resume),
            daemon=True,
        )
        w.started = time.monotonic()
        try:
            w.process.start()
        finally:
            self._inbox.started(conn)

    # -- running
    def run(self, deadline: float | None = None) -> None:
        """Start the workers and relay their events until all have finished, `deadline` (time.monotonic())
        passes or `stop()` is called."""
        self._deadline = deadline
        for w in list(self._workers):
            self._start(w)
        try:
            # Past the deadline or after stop(), the wait for the workers is bounded (below): one that does not
            # stop (hung in a decoder, stopped by a debugger) must not keep the run, and its alerts, open.
            while not all(w.done for w in self._workers) and not self._stop.value:
                if deadline is not None and time.monotonic() > deadline:
                    break
                self._drain(0.2)
                self._check_processes()
        finally:
            self._stop.value = 1
            end = time.monotonic() + STOP_WAIT
            while not all(w.done for w in self._workers) and time.monotonic() < end:
                self._drain(0.2)
                self._check_processes(restart=False)
            for w in self._workers:
                if w.process is not None and w.process.is_alive():
                    w.process.kill()  # workers ignore SIGTERM (left to the parent): after the wait, the hard way
                    w.process.join(timeout=5)
                if w.process is not None:
                    self._inbox.settle(w.index, timeout=0.5)
            self._drain(0.0)
            self._close_open("monitoring stopped before its worker resolved it")
            for sid in list(self._now):  # a last worker that died in the shutdown sent only its progress
                self.reports[sid] = self._merged(sid)

    def _close_open(self, why: str) -> None:
        """At the end of the run, whatever is still open (a worker that died or was ended during the shutdown,
        a worker outage nothing resumed, a stream given up) is resolved with the reason: every alert that
        fired ends, exactly once."""
        for stream, opened in list(self._open.items()):
            for e in list(opened.values()):
                self.sink.emit(e.resolved(max(e.start, self._position(stream)), ended=why))
            opened.clear()
        for stream in list(self._outage):
            self._resume(stream, ended=why)

    def _position(self, stream: str) -> float:
        """The furthest media time the stream is known to have been analysed to, over its workers."""
        replay = self._replays.get(stream)
        return max(*self._reached.get(stream, (0.0, 0.0)), *(replay.reached if replay is not None else ()))

    def _resume(self, stream: str, **details: object) -> None:
        """Resolve the stream's worker outage, if it has one open: its duration is the wall-clock seconds
        since its worker was lost (see the module docstring), also its value, as engine.pool does."""
        outage = self._outage.pop(stream, None)
        if outage is None:
            return
        out = round(time.monotonic() - self._outage_since.pop(stream), 3)
        self.sink.emit(outage.resolved(outage.start + out, out, **details))

    def stop(self) -> None:
        self._stop.value = 1

    def _drain(self, timeout: float) -> None:
        self._inbox.drain(self._handle, timeout)

    def _handle(self, kind: str, index: int, payload: Any) -> None:
        w = self._workers[index]
        if kind == "event":
            e = _event_from_dict(payload["event"])
            mine = self._where.get(e.stream) == index
            if mine:
                self._advance(e.stream, payload["at"])
            replay = self._replays.get(e.stream) if mine else None
            out = self._replayed(e, replay) if replay is not None else e
            if out is not None:
                self._report(out)
        elif kind == "progress":
            for stream, values in payload.items():
                if self._where.get(stream) != index:
                    continue
                # (frames, pictures' media time, audio's, frames dropped, decode errors)
                frames, video, *more = values
                audio = more[0] if more else 0.0
                self._advance(stream, (video, audio))
                dropped, errors = (*more[1:3], 0, 0)[:2]
                base = self._now.get(stream) or self.reports[stream]
                self._now[stream] = replace(base, frames=frames, media_end=video, frames_dropped=dropped,
                                            decode_errors=errors, errors=list(base.errors), events=dict(base.events))
                replay = self._replays.get(stream)
                if replay is not None:
                    if not replay.back and video >= replay.reached[0] and audio >= replay.reached[1]:
                        self._back(stream, replay, w.device)
                elif frames or audio:
                    self._resume(stream, resumed_on=w.device)
        elif kind == "measure":
            sid = payload.get("stream")
            replay = self._replays.get(sid)
            if replay is not None and not replay.back and payload.get("t", 0.0) <= max(replay.reached):
                return  # a replay's measurements of media measured before the death: written already
            if self.on_measure is not None and self._where.get(sid) == index:
                self.on_measure(payload)
        elif kind == "device_error":
            self._failed_devices.add(w.device)
            log.error("worker %d: device %s failed: %s", index, w.device, payload)
            w.device_error = payload
        elif kind == "done":
            for r in payload:
                if r["id"] in self.reports and self._where.get(r["id"]) == index:
                    self._now[r["id"]] = StreamReport(**r)
                    self.reports[r["id"]] = self._merged(r["id"])
                    if not w.device_error:
                        self._ended(r["id"], w.device)
            w.done = True
            if w.device_error:
                self._lose(w, f"GPU {w.device} failed ({w.device_error})")

    def _advance(self, stream: str, at: Any) -> None:
        reached = self._reached.setdefault(stream, [0.0, 0.0])
        reached[0], reached[1] = max(reached[0], at[0]), max(reached[1], at[1])

    def _count(self, e: Event) -> None:
        fired = self._fired.setdefault(e.stream, {})
        fired[e.type] = fired.get(e.type, 0) + 1

    def _report(self, e: Event) -> None:
        """Pass a worker's event on to the sinks, keeping account of what is open."""
        opened = self._open.setdefault(e.stream, {})
        if e.status is Status.FIRING:
            opened[e.id] = e
            if self._files.get(e.stream):
                self._history.setdefault(e.stream, []).append(e)
            self._count(e)
        else:
            opened.pop(e.id, None)
        self.sink.emit(e)

    def _replayed(self, e: Event, replay: _Replay) -> Event | None:
        """What of a replay's event is to be reported (see `_Replay`): None for what was reported already."""
        if e.status is Status.FIRING:
            same = [c for c in replay.pending if c.type == e.type and abs(c.start - e.start) <= MATCH]
            if not same:
                return e
            first = min(same, key=lambda c: abs(c.start - e.start))
            replay.pending.remove(first)
            replay.ids[e.id] = first.id
            return None
        first_id = replay.ids.pop(e.id, None)
        if first_id is None:
            return e
        first = self._open.get(e.stream, {}).get(first_id)
        if first is None:
            return None  # it had ended before the death, and was reported so
        return first.resolved(e.end if e.end is not None else first.start, e.value, **e.details)

    def _back(self, stream: str, replay: _Replay, device: str) -> None:
        """A replayed file has got back to where its lost worker was: from here on it is news, the outage
        ends. An alert open at the death that the replay did not raise again by then is resolved with the
        reason (it will not be: the replay saw no such fault), so it cannot stay open."""
        replay.back = True
        self._drop_carried(stream, replay, f"{replay.why}; not seen again when the stream was read again")
        self._resume(stream, resumed_on=device)

    def _drop_carried(self, stream: str, replay: _Replay, why: str) -> None:
        opened = self._open.get(stream, {})
        for e in replay.pending:
            if e.id in opened:
                self._report(e.resolved(max(e.start, *replay.reached), ended=why))

    def _ended(self, stream: str, device: str) -> None:
        """The stream ended on its current worker (end of input, an error, the run stopping): a replay that did
        not get back to where its lost worker was leaves nothing open, nor does an outage."""
        replay = self._replays.get(stream)
        if replay is not None and not replay.back:
            self._drop_carried(stream, replay, f"{replay.why}; its stream ended before it was read that far again")
        self._resume(stream, ended=f"stream ended on {device} before it was monitored again")

    def _merged(self, sid: str) -> StreamReport:
        """The stream's numbers over its workers. A file is read again from its start after a death, so its
        last worker counts the part done before once more: each count is the largest of its workers' (the
        frames, media seconds and decode errors of the file, of the worker that got furthest). A live stream's
        workers each saw another stretch of it, so their counts add up (media seconds: time monitored).
        Loudness, state, decoder and device are the last worker's (a live stream's integrated loudness is
        since its last restart), errors all of them; `events` counts the alerts the sinks received for the
        stream, each once, worker outages included."""
        runs = [*self._past.get(sid, []), *([self._now[sid]] if sid in self._now else [])]
        rep = replace(runs[-1], events=dict(self._fired.get(sid, {})),
                      errors=list(dict.fromkeys(x for r in runs for x in r.errors)))
        if len(runs) > 1:
            add = max if self._files.get(sid, False) else sum
            for name in ("frames", "media_end", "frames_dropped", "decode_errors"):
                setattr(rep, name, add(getattr(r, name) for r in runs))
        return rep

    def _check_processes(self, restart: bool = True) -> None:
        for w in self._workers:
            p = w.process
            if w.done or p is None:
                continue
            hung = None
            if p.is_alive():
                # A worker alive but silent (deadlocked, stopped) monitors nothing while looking healthy: past
                # engine.channel.WATCHDOG it is killed and handled as dead.
                hung = None if not restart or bool(self._stop.value) else self._inbox.hung(w.index, w.started)
                if hung is None:
                    continue
                p.kill()
                p.join(timeout=5)
            self._inbox.settle(w.index)
            self._drain(0.0)  # its last messages, if it sent any
            if w.done:
                continue
            w.done = True
            if bool(self._stop.value) or not restart:
                continue
            why = (f"worker process {w.index} on {w.device} died (exit code {p.exitcode})" if hung is None else
                   f"worker process {w.index} on {w.device} sent nothing for {hung:.0f} s and was killed")
            self._lose(w, why)

    def _lose(self, w: _Worker, why: str) -> None:
        """A worker is gone while its streams should still run: resolve what it left open, raise no_signal on
        each stream, and start the streams again elsewhere."""
        if bool(self._stop.value):
            return
        log.error("%s; restarting its %d stream(s)", why, len(w.specs))
        healthy = [d for d in self.devices if d not in self._failed_devices] or ["cpu"]
        again = []
        mine = [spec for spec in w.specs if self._where.get(spec.id) == w.index]
        for spec in mine:
            # What the lost worker did stays in the report: its end numbers, or its last progress.
            self._past.setdefault(spec.id, []).append(
                self._now.pop(spec.id, None) or StreamReport(spec.id, state=self.reports[spec.id].state))
            rep = self.reports[spec.id] = self._merged(spec.id)
            self._restarts[spec.id] = self._restarts.get(spec.id, 0) + 1
            if self._restarts[spec.id] > RESTARTS:
                rep.state = "error"
                rep.errors.append(f"{why}; given up after {RESTARTS} restarts")
                log.error("stream %s: %s; given up after %d restarts", spec.id, why, RESTARTS)
                continue
            again.append(spec)
        targets = self._targets(w, again, healthy, why) if again else {}
        for spec in mine:
            self._settle(spec.id, why, replay=self._files.get(spec.id, False) and targets.get(spec.id) is not None)
        for device in dict.fromkeys(d for d in targets.values() if d is not None):
            moved = [spec for spec in again if targets[spec.id] == device]
            nw = _Worker(len(self._workers), device, moved)
            self._workers.append(nw)
            for spec in moved:
                self._where[spec.id] = nw.index
            self._announce(moved, why, device)
            self._start(nw)
        self._announce([spec for spec in again if targets[spec.id] is None], why, None)

    def _settle(self, sid: str, why: str, replay: bool) -> None:
        """What a lost worker left of a stream: the media time it had got to (the furthest its progress or its
        events said: it may have gone on for up to a second after its last progress), and its open alerts,
        resolved now with the reason, unless the stream is a file to be read again (`_Replay`)."""
        reached = self._reached.pop(sid, [0.0, 0.0])
        old = self._replays.pop(sid, None)
        if old is not None and not old.back:  # a replay lost before it got back: an earlier worker got further
            reached = [max(a, b) for a, b in zip(reached, old.reached, strict=True)]
        self._lost_at[sid] = max(reached)
        if replay:
            self._replays[sid] = _Replay((reached[0], reached[1]), why, list(self._history.get(sid, [])))
            return
        for e in list(self._open.pop(sid, {}).values()):
            self.sink.emit(e.resolved(max(e.start, *reached), ended=why))

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
            event = Event.outage(spec.id, self._lost_at.get(spec.id, 0.0), f"{why}; {where}", EVENT_VERSION,
                                 {"reason": why, "moved_to": device})
            self._outage[spec.id] = event
            self._outage_since[spec.id] = time.monotonic()
            self._count(event)
            self.sink.emit(event)
