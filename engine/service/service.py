"""`framewatch serve`: the engine as a long-running service whose streams change at run time.

The engine runs in its own thread in this process (frames never leave it); the web API and the mosaic page
(engine.service.app) call into `Service`. Every event passes `AlertHub` on its way to the outputs: it is
stored (history, acks), counted for Prometheus, pushed to the page, then written to the JSONL and webhook
sinks. Streams and alerts live in SQLite (engine.service.store) so a restarted service resumes its streams.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from engine import __version__
from engine.alerts import JsonlSink, MultiSink, ThumbnailWriter
from engine.config import ConfigError, FramewatchConfig, StreamModel, stream_spec
from engine.events import Event, Status, now_iso
from engine.review import ReviewStore
from engine.runner import Engine, StreamRuntime, StreamSpec, db_or_none, json_num
from engine.service.store import AlertQuery, StateStore

log = logging.getLogger("framewatch.service")

ALARM_SEVERITIES = ("critical", "major")
TILE_WIDTH = 320


class StreamRequestError(Exception):
    """A stream body the service refuses: `loc` is the offending field (as in a 422 answer)."""

    def __init__(self, message: str, loc: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.loc = loc
        self.errors: list[dict[str, Any]] = [{"loc": ["body", *loc], "msg": message, "type": "value_error"}]

    @classmethod
    def from_validation(cls, exc: ValidationError) -> StreamRequestError:
        first = exc.errors()[0]
        out = cls(str(first.get("msg", "invalid")).removeprefix("Value error, "), tuple(map(str, first.get("loc", ()))))
        out.errors = [{"loc": ["body", *e.get("loc", ())], "msg": str(e.get("msg", "")).removeprefix("Value error, "),
                       "type": e.get("type", "value_error")} for e in exc.errors()]
        return out


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON merge patch: objects merge key by key, null removes a key, anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


class Broadcast:
    """Fans messages out to the page's SSE connections, from any thread. Each connection has a bounded
    queue; one that falls behind is closed (the browser reconnects and gets a fresh snapshot) instead of
    making the engine wait or memory grow."""

    def __init__(self, maxsize: int = 512) -> None:
        self._subs: dict[asyncio.Queue, asyncio.AbstractEventLoop] = {}
        self._lock = threading.Lock()
        self.maxsize = maxsize
        self.closed = False

    def subscribe(self, loop: asyncio.AbstractEventLoop) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue(self.maxsize)
        with self._lock:
            self._subs[q] = loop
        return q

    def unsubscribe(self, q: asyncio.Queue) -> None:
        with self._lock:
            self._subs.pop(q, None)

    @property
    def listeners(self) -> int:
        return len(self._subs)

    def publish(self, kind: str, data: Any) -> None:
        with self._lock:
            subs = list(self._subs.items())
        for q, loop in subs:
            try:
                loop.call_soon_threadsafe(self._put, q, (kind, data))
            except RuntimeError:  # its loop is gone
                self.unsubscribe(q)

    def _put(self, q: asyncio.Queue, item: tuple[str, Any] | None) -> None:
        try:
            q.put_nowait(item)
        except asyncio.QueueFull:
            self.unsubscribe(q)
            while not q.empty():
                q.get_nowait()
            q.put_nowait(None)  # the end: this connection was too slow

    def close(self) -> None:
        """Ends every connection (shutdown)."""
        self.closed = True
        with self._lock:
            subs = list(self._subs.items())
            self._subs.clear()
        for q, loop in subs:
            try:
                loop.call_soon_threadsafe(q.put_nowait, None)
            except (RuntimeError, asyncio.QueueFull):
                pass


@dataclass
class _Rate:
    t: float
    frames: int
    fps: float = 0.0


class AlertHub:
    """The engine's sink in the service: store, count, push, then hand to the outputs (JSONL, webhooks)."""

    def __init__(self, service: Service, outputs: MultiSink) -> None:
        self.service = service
        self.outputs = outputs

    def emit(self, event: Event) -> None:
        svc = self.service
        if event.status is Status.RESOLVED:
            reason = svc._ending.get(event.stream) or ("shutdown" if svc.stopping else None)
            if reason and "resolution" not in event.details:
                # The fault was not seen to end: monitoring of the stream stopped. Said on the alert, so no
                # receiver reads it as the picture coming back.
                event = replace(event, details={**event.details, "resolution": reason},
                                message=(event.message + f" (resolved: {_REASONS.get(reason, reason)})").strip())
        try:
            svc.store.record(event, svc.run_id)
        except Exception as exc:  # the outputs must still get it
            log.error("alert %s not stored: %s", event.id, exc)
        svc._track(event)
        self.outputs.emit(event)
        svc.broadcast.publish("alert", svc.alert_view(event.id) or event.to_dict())

    def close(self) -> None:
        pass


_REASONS = {
    "shutdown": "monitoring stopped, service shut down",
    "removed": "monitoring stopped, stream removed",
    "changed": "monitoring restarted, stream changed",
    "restart": "monitoring was interrupted; re-raised if the fault persists",
}


class Engines:
    """What the service's streams run on: one engine, or with several devices (`engine.devices`) a GpuPool, one
    engine per device, whose scheduler places each stream and picks its decode tier within the GPUs' NVDEC and
    memory budgets, refuses with a reason what does not fit (and starts it when capacity frees up), and moves
    the streams of a GPU that fails to the others. The service sees the same surface either way."""

    def __init__(self, sink: Any, devices: list[str], models: list | None = None, cpu: Any = None,
                 headroom: float = 0.15, **engine_kwargs: Any) -> None:
        self.pool: Any = None
        self.cpu_only = devices == ["cpu"] and cpu is not None and not models  # (models: simulated GPUs)
        if len(devices) > 1 or cpu is not None:
            from engine.pool import GpuPool

            # A CPU budget (`engine.cpu_cores`) makes the CPU engine the pool's: its scheduler admits streams
            # within the cores, or beside GPUs takes what they cannot (hybrid).
            gpus = [] if self.cpu_only else devices
            self.pool = GpuPool(sink, gpus, models=[] if self.cpu_only else models, cpu=cpu, headroom=headroom,
                                **engine_kwargs)
            self.engines: list[Engine] = self.pool._all_engines()
        else:
            self.engines = [Engine(sink, device=devices[0], **engine_kwargs)]
        self.device = self.engines[0].device
        notes = dict.fromkeys(e.device_note for e in self.engines if e.device_note)
        self.device_note = "; ".join(notes)

    @property
    def streams(self) -> dict[str, StreamRuntime]:
        return self.engines[0].streams if self.pool is None else self.pool.streams

    def refused(self) -> dict[str, str]:
        """Streams the scheduler could not place anywhere, with its reason (never started, retried on changes)."""
        if self.pool is None:
            return {}
        return {sid: p.reason for sid, p in self.pool.placements().items() if not p.admitted}

    def _demand(self, spec: StreamSpec) -> Any:
        # A CPU engine prices a synthetic stream by its own size; GPU pools take the pool's default demand.
        if not self.cpu_only:
            return None
        from engine.pool import cpu_demand

        return cpu_demand(spec)

    def add_stream(self, spec: StreamSpec) -> None:
        if self.pool is None:
            self.engines[0].add_stream(spec)
        else:
            self.pool.add_stream(spec, self._demand(spec))

    def replace_stream(self, spec: StreamSpec) -> None:
        """A changed stream: the old one ends and the new one starts, first in line for the old one's capacity."""
        if self.pool is None:
            self.engines[0].remove_stream(spec.id)
            self.engines[0].add_stream(spec)
        else:
            self.pool.replace_stream(spec, self._demand(spec))

    def remove_stream(self, stream_id: str) -> None:
        if self.pool is None:
            self.engines[0].remove_stream(stream_id)
            return
        try:
            self.pool.remove_stream(stream_id)
        except KeyError:  # never placed (it could not start)
            pass

    def run(self) -> None:
        if self.pool is None:
            self.engines[0].run(until_done=False)
        else:
            self.pool.run(until_done=False)

    def stop(self) -> None:
        (self.pool or self.engines[0]).stop()

    def label(self) -> str:
        return ", ".join(self.pool.label(e) for e in self.pool._all_engines()) if self.pool is not None else str(self.device)

    def device_of(self, stream_id: str) -> str | None:
        if self.pool is None:
            return str(self.device)
        engine = self.pool.engine_of(stream_id)
        if engine is None:
            return None
        # Simulated GPUs (tests) share the device string "cpu", with each other and with a hybrid CPU engine.
        shared = sum(str(e.device) == str(engine.device) for e in self.pool._all_engines()) > 1
        return self.pool.label(engine) if shared else str(engine.device)

    def lost(self) -> list[str]:
        return [e.requested_device for e in self.engines if e.device_lost]

    @property
    def shed(self) -> bool:
        return any(e.shedder is not None and e.shedder.shed for e in self.engines)


def service_devices(cfg: FramewatchConfig) -> list[str]:
    """The devices the service runs on: `engine.devices` (or `engine.device`), less the CUDA devices this
    machine does not have, said in the log (monitoring on the CPU beats no monitoring, as `run` does)."""
    from engine.pool import missing_cuda

    devices = list(cfg.engine.devices or [cfg.engine.device])
    missing, count = missing_cuda(devices)
    if not missing:
        return devices
    log.warning("devices %s not available on this machine (%d GPU(s)); %s", ", ".join(missing), count,
                "their streams run on the CPU" if len(missing) == len(devices) else "the others take their streams")
    kept = [d for d in devices if d not in missing]
    return kept or ["cpu"]


class Service:
    def __init__(self, cfg: FramewatchConfig, *, state_dir: str | Path | None = None, token: str | None = None,
                 external_url: str | None = None, devices: list[str] | None = None, gpu_models: list | None = None
                 ) -> None:
        """`devices` and `gpu_models` replace the config's devices and the detected GPU models (tests simulate
        GPUs with CPU engines)."""
        self.cfg = cfg
        self.state_dir = Path(state_dir or cfg.service.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._lock_file = _lock_state_dir(self.state_dir)
        self.token = token if token is not None else (cfg.service.token or os.environ.get("FRAMEWATCH_TOKEN") or None)
        self.external_url = (external_url if external_url is not None else cfg.service.external_url).rstrip("/")
        self.run_id = now_iso()
        self.stopping = False
        self.started = False
        self.broadcast = Broadcast()
        self._ending: dict[str, str] = {}  # stream id -> why its alerts are being resolved
        self._not_started: dict[str, str] = {}  # stored streams the config could not start -> why
        self._active: dict[str, Event] = {}  # firing alerts by id
        self._active_lock = threading.Lock()
        self._rates: dict[str, _Rate] = {}
        self._tiles: dict[str, tuple[float, int, bytes]] = {}
        self._api_lock = threading.Lock()  # one stream change at a time
        self.alerts_total: dict[str, int] = {}
        self.latency_observer: Callable[[float], None] | None = None
        self.engine_error: str | None = None
        self._stop_sampler = threading.Event()
        self.store = StateStore(self.state_dir / "state.sqlite")
        self.thumbs_dir = self.state_dir / "thumbnails"
        self.outputs = MultiSink()
        self.webhooks: list[Any] = []
        self._open_outputs()
        from engine.pool import cpu_model

        common = {"batch_frames": cfg.engine.batch_frames, "tick": cfg.engine.tick_ms / 1000,
                  "queue_frames": cfg.engine.queue_frames, "torch_threads": cfg.engine.torch_threads,
                  "shed_clicks": cfg.engine.shed_clicks}
        self.engine: Any
        if cfg.engine.workers > 1:
            from engine.service.remote import ServiceWorkers

            # Engine processes per device (the scoring thread and per-stream host work of one process limit it).
            self.engine = ServiceWorkers(
                AlertHub(self, self.outputs), devices or service_devices(cfg), cfg.engine.workers, common,
                thumbnails=str(self.thumbs_dir), review=cfg.output.review, log_level=cfg.output.log_level,
                cpu=cpu_model(cfg.engine.cpu_cores), models=gpu_models, headroom=cfg.engine.headroom)
        else:
            self.engine = Engines(
                AlertHub(self, self.outputs),
                devices or service_devices(cfg),
                gpu_models,
                cpu=cpu_model(cfg.engine.cpu_cores),
                headroom=cfg.engine.headroom,
                thumbnails=ThumbnailWriter(self.thumbs_dir),
                review=ReviewStore(cfg.output.review) if cfg.output.review else None,
                **common,
            )
        self._engine_thread: threading.Thread | None = None
        self._sampler: threading.Thread | None = None

    def _open_outputs(self) -> None:
        out = self.cfg.output
        if out.jsonl:
            self.outputs.add(JsonlSink(out.jsonl))
        if out.webhooks:
            from engine.alerts.webhook import WebhookSink

            for i, w in enumerate(out.webhooks):
                sink = WebhookSink(w.url, self.store.path, name=w.name or f"webhook-{i + 1}", headers=dict(w.headers),
                                   timeout=w.timeout, backoff_max=w.backoff_max, external_url=self.external_url)
                self.webhooks.append(sink)
                self.outputs.add(sink)

    # -- life cycle
    def start(self) -> None:
        """Resolve what a killed predecessor left firing, seed the config's streams, start everything."""
        self._close_leftovers()
        for s in self.cfg.streams:
            self.store.seed_stream(s.id, _body(s))
        for stored in self.store.streams():
            try:
                self._start_stream(self._model(stored.body))
            except (StreamRequestError, ConfigError) as exc:
                # A stream the current config cannot run (a profile since removed): said, shown with its
                # reason (a PATCH that fixes it starts it), and the rest runs.
                log.error("stream %s: not started: %s", stored.id, exc)
                self._not_started[stored.id] = f"not started: {exc}"
        self._engine_thread = threading.Thread(target=self._run_engine, name="engine", daemon=True)
        self._engine_thread.start()
        self._sampler = threading.Thread(target=self._sample_loop, name="sampler", daemon=True)
        self._sampler.start()
        self.started = True

    def _run_engine(self) -> None:
        try:
            self.engine.run()
        except Exception as exc:  # readiness says so; the API stays up to tell the operator
            self.engine_error = f"engine stopped: {exc}"
            log.exception("engine failed")

    def _close_leftovers(self) -> None:
        """Alerts still firing in the store were left by a process that did not shut down cleanly. Their
        faults may or may not still be there; they are resolved as interrupted (with the last media time
        seen), and a fault that persists fires again as a new alert: never the same alert twice."""
        media = {s.id: s.media_time for s in self.store.streams(include_deleted=True)}
        for ev in self.store.open_alerts():
            end = max(ev.start, media.get(ev.stream) or ev.start)
            resolved = ev.resolved(end, resolution="restart")
            resolved = replace(resolved, message=(ev.message + f" (resolved: {_REASONS['restart']})").strip())
            self.store.record(resolved, self.run_id)
            self.outputs.emit(resolved)

    def stop(self, drain_timeout: float | None = None) -> None:
        """Stop sources, resolve open alerts (marked as a shutdown), flush the outbox as far as the receiver
        allows within the drain timeout, and close the database."""
        if self.stopping:
            return
        self.stopping = True
        timeout = self.cfg.service.drain_timeout if drain_timeout is None else drain_timeout
        self.broadcast.close()
        self.engine.stop()
        if self._engine_thread is not None:
            self._engine_thread.join(timeout=60)
        self._stop_sampler.set()
        if self._sampler is not None:
            self._sampler.join(timeout=5)
        self._note_media_times()
        deadline = time.monotonic() + timeout
        for sink in self.webhooks:
            try:
                sink.close(timeout=max(0.0, deadline - time.monotonic()))
            except Exception as exc:
                log.error("webhook %s: close failed: %s", getattr(sink, "name", "?"), exc)
        for sink in self.outputs.sinks:
            if sink not in self.webhooks:
                try:
                    sink.close()
                except Exception as exc:
                    log.error("closing %s failed: %s", type(sink).__name__, exc)
        self.store.close()
        self._lock_file.close()  # the state dir is free for the next service

    # -- streams
    def _model(self, body: dict[str, Any]) -> StreamModel:
        try:
            model = StreamModel.model_validate(body)
        except ValidationError as exc:
            raise StreamRequestError.from_validation(exc) from None
        if model.profile != "default" and model.profile not in self.cfg.profiles:
            from engine.config import _unknown

            raise StreamRequestError(_unknown("profile", model.profile, self.cfg.profiles), ("profile",))
        from engine.sources import SourceError, SourceOptions, open_source

        try:  # a URL no source can take is a bad request, not a stream in error (no I/O happens here)
            open_source(model.url, SourceOptions(), [f.model_dump() for f in model.faults] or None)
        except SourceError as exc:
            raise StreamRequestError(str(exc), ("url",)) from None
        except Exception as exc:
            raise StreamRequestError(f"cannot use this URL: {exc}", ("url",)) from None
        return model

    def _start_stream(self, model: StreamModel) -> None:
        spec = _spec(self.cfg, model)
        self._ending.pop(model.id, None)
        self._tiles.pop(model.id, None)
        self._rates.pop(model.id, None)
        self.engine.add_stream(spec)

    def add_stream(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.stopping:
            raise RuntimeError("the service is shutting down")
        with self._api_lock:
            model = self._model(body)
            stored = self.store.stream(model.id)
            if model.id in self.engine.streams or model.id in self.engine.refused() or (stored is not None and not stored.deleted):
                raise KeyError(model.id)
            _spec(self.cfg, model)  # refused before anything is stored
            # Stored first: a store that cannot write fails the request with nothing running unrecorded.
            self.store.put_stream(model.id, _body(model))
            try:
                self._start_stream(model)
            except BaseException:
                self.store.delete_stream(model.id)
                raise
        return self.stream_status(model.id)

    def update_stream(self, stream_id: str, patch: dict[str, Any]) -> dict[str, Any]:
        """Apply a merge patch; a changed stream is restarted (its open alerts resolve as 'changed')."""
        if self.stopping:
            raise RuntimeError("the service is shutting down")
        if "id" in patch and patch["id"] != stream_id:
            raise StreamRequestError("the id of a stream cannot be changed (remove it and add a new one)", ("id",))
        with self._api_lock:
            stored = self.store.stream(stream_id)
            if stored is None or stored.deleted:
                raise LookupError(stream_id)
            body = merge_patch(stored.body, patch)
            body["id"] = stream_id
            model = self._model(body)
            spec = _spec(self.cfg, model)  # refused before the running stream is stopped for it
            self.store.put_stream(stream_id, _body(model))  # first: a failed write changes nothing
            self._ending[stream_id] = "changed"
            self._not_started.pop(stream_id, None)
            self._tiles.pop(stream_id, None)
            self._rates.pop(stream_id, None)
            try:
                # One step, not a removal and an add: with a scheduler (cpu_cores, GPUs) the capacity a
                # running stream frees would go to a refused one, and the changed stream itself be refused.
                self.engine.replace_stream(spec)
            finally:
                self._ending.pop(stream_id, None)
        return self.stream_status(stream_id)

    def remove_stream(self, stream_id: str) -> None:
        with self._api_lock:
            stored = self.store.stream(stream_id)
            if (stored is None or stored.deleted) and stream_id not in self.engine.streams and stream_id not in self.engine.refused():
                raise LookupError(stream_id)
            self.store.delete_stream(stream_id)  # first: a failed write leaves the stream as it was
            self._ending[stream_id] = "removed"
            self.engine.remove_stream(stream_id)
            self._not_started.pop(stream_id, None)
            self._ending.pop(stream_id, None)
            self._tiles.pop(stream_id, None)
            self._rates.pop(stream_id, None)
        self.broadcast.publish("removed", {"id": stream_id})

    def stream_ids(self) -> list[str]:
        return [s.id for s in self.store.streams()] if not self.stopping else list(self.engine.streams)

    def streams_status(self) -> list[dict[str, Any]]:
        out = []
        for sid in dict.fromkeys([*self.engine.streams, *self.engine.refused(), *self._not_started]):
            try:
                out.append(self.stream_status(sid))
            except LookupError:
                continue  # removed meanwhile
        return out

    def stream_status(self, stream_id: str) -> dict[str, Any]:
        rt = self.engine.streams.get(stream_id)
        if rt is None:
            if stream_id in self._not_started:
                return self._idle_status(stream_id, "error", self._not_started[stream_id])
            refused = self.engine.refused().get(stream_id)
            if refused is None:
                raise LookupError(stream_id)
            return self._idle_status(stream_id, "refused", refused)
        with self._active_lock:
            active = [e for e in self._active.values() if e.stream == stream_id]
        acked = self._acked_ids([e.id for e in active])
        meter = rt.audio.meter
        info = rt.info
        state = self.display_state(rt, active)
        if state in ("error", "no_signal") or any(e.severity.value in ALARM_SEVERITIES for e in active):
            level = "alarm"
        elif active or state in ("starting", "ended"):
            level = "warning"
        else:
            level = "ok"
        rate = self._rates.get(stream_id)
        c = rt.counters
        return {
            "id": rt.id,
            "url": rt.spec.url,
            "profile": rt.spec.profile,
            "state": state,
            "level": level,
            "device": self.engine.device_of(stream_id),
            "decoder": info.decoder if info is not None else None,
            "decoder_note": info.decoder_note if info is not None else "",
            "tier": rt.tier,
            "fps": round(rate.fps, 2) if rate is not None else 0.0,
            "frames": rt.stats.frames_scored,
            "media_time": round(max(rt.stats.media_end, rt.audio_end), 3),
            "errors": rt.errors[-5:],
            "error_count": len(rt.errors),
            "reconnects": c.reconnects,
            "counters": asdict(c),
            "info": None if info is None else {
                "container": info.container, "video_codec": info.video_codec, "width": info.width,
                "height": info.height, "fps": info.fps, "audio_codec": info.audio_codec,
                "audio_channels": info.audio_channels, "live": info.live},
            "loudness": {"momentary": json_num(meter.momentary), "short_term": json_num(meter.short_term),
                         "integrated": json_num(meter.integrated), "range": json_num(meter.loudness_range),
                         "max_true_peak_dbtp": db_or_none(rt.audio.max_true_peak)} if rt.stats.audio_seconds else None,
            "av_sync": _sync(rt),
            "active_alerts": [{"id": e.id, "type": e.type, "severity": e.severity.value, "start": e.start,
                               "message": e.message, "acknowledged": e.id in acked} for e in active],
            "thumbnail": f"/api/streams/{rt.id}/thumbnail.jpg" if rt.last_frame is not None else None,
        }

    def display_state(self, rt: StreamRuntime, active: list[Event] | None = None) -> str:
        """The stream's state as operators see it (API, page, metrics): a running stream with an open
        no_signal alert (a source that stopped sending, a synthetic outage) is no_signal."""
        if active is None:
            with self._active_lock:
                active = [e for e in self._active.values() if e.stream == rt.id]
        if rt.state == "running" and any(e.type == "no_signal" for e in active):
            return "no_signal"
        return rt.state

    def _idle_status(self, stream_id: str, state: str, reason: str) -> dict[str, Any]:
        """A stream that is configured but not monitored: refused (no device has capacity; it starts by itself
        when capacity frees up) or in error (the config cannot run it). Nothing watches it, which is an alarm,
        with the reason as its error."""
        body = self.stream_config(stream_id) or {}
        return {
            "id": stream_id, "url": body.get("url"), "profile": body.get("profile", "default"), "state": state,
            "level": "alarm", "device": None, "decoder": None, "decoder_note": "", "tier": None, "fps": 0.0,
            "frames": 0, "media_time": 0.0, "errors": [reason], "error_count": 1, "reconnects": 0, "counters": None,
            "info": None, "loudness": None, "av_sync": None, "active_alerts": [], "thumbnail": None,
        }

    def stream_config(self, stream_id: str) -> dict[str, Any] | None:
        stored = self.store.stream(stream_id)
        return None if stored is None or stored.deleted else stored.body

    def tile(self, stream_id: str, max_age: float = 1.0) -> bytes | None:
        """The stream's current picture as a small JPEG, rendered when asked (at most once per max_age):
        nothing is spent on pictures nobody looks at."""
        rt = self.engine.streams.get(stream_id)
        if rt is None:
            raise LookupError(stream_id)
        frame = rt.last_frame
        cached = self._tiles.get(stream_id)
        now = time.monotonic()
        if cached is not None and (now - cached[0] < max_age or frame is None or cached[1] == id(frame)):
            return cached[2]
        if frame is None:
            return None
        if hasattr(self.engine, "tile"):  # the picture is in a worker process: rendered there
            data = self.engine.tile(stream_id, TILE_WIDTH)
            if data is not None:
                self._tiles[stream_id] = (now, -1, data)
            return data
        from engine.alerts.thumbnails import tile_jpeg

        data = tile_jpeg(frame, TILE_WIDTH)
        self._tiles[stream_id] = (now, id(frame), data)
        return data

    # -- alerts
    def _track(self, event: Event) -> None:
        with self._active_lock:
            if event.status is Status.FIRING:
                self._active[event.id] = event
                self.alerts_total[event.type] = self.alerts_total.get(event.type, 0) + 1
            else:
                self._active.pop(event.id, None)
        if event.status is Status.FIRING and self.latency_observer is not None:
            latency = self.detection_latency(event)
            if latency is not None:
                self.latency_observer(latency)

    def detection_latency(self, event: Event) -> float | None:
        """Seconds from the fault's onset to the alert: the media that passed since the first faulty moment,
        plus, for live streams, how long ago the newest media arrived (a stream that stopped sending has no
        new media while the wait for no_signal runs)."""
        rt = self.engine.streams.get(event.stream)
        if rt is None:
            return None
        media_now = max(rt.stats.media_end, rt.audio_end)
        latency = max(0.0, media_now - event.start)
        arrival = rt.queue.last_arrival
        if rt.ctx.live and arrival is not None:
            latency += max(0.0, time.time() - arrival)
        return latency

    def active_alerts(self) -> list[Event]:
        with self._active_lock:
            return list(self._active.values())

    def _acked_ids(self, ids: list[str]) -> set[str]:
        if not ids:
            return set()
        return {a["id"] for a in (self.store.alert(i) for i in ids) if a is not None and a["acknowledged"]}

    def alert_view(self, alert_id: str) -> dict[str, Any] | None:
        a = self.store.alert(alert_id)
        if a is None:
            return None
        a["thumbnail_url"] = f"/api/alerts/{alert_id}/thumbnail.jpg" if a.get("thumbnail") else None
        return a

    def alerts(self, q: AlertQuery) -> list[dict[str, Any]]:
        out = self.store.alerts(q)
        for a in out:
            a["thumbnail_url"] = f"/api/alerts/{a['id']}/thumbnail.jpg" if a.get("thumbnail") else None
        return out

    def ack(self, alert_id: str, by: str = "", comment: str = "") -> dict[str, Any]:
        a, changed = self.store.ack(alert_id, by, comment)
        if a is None:
            raise LookupError(alert_id)
        view = self.alert_view(alert_id)
        if changed:  # the page hears of an ack once, however many operators click at the same time
            self.broadcast.publish("ack", view)
        return view or a

    def alert_thumbnail(self, alert_id: str) -> Path | None:
        """The alert's thumbnail file, only from the service's own thumbnail folder (whatever the stored path
        says, nothing outside it is ever served)."""
        a = self.store.alert(alert_id)
        if a is None:
            raise LookupError(alert_id)
        if not a.get("thumbnail"):
            return None
        root = self.thumbs_dir.resolve()
        try:
            p = Path(str(a["thumbnail"])).resolve()
        except (OSError, ValueError):
            return None
        if not p.is_relative_to(root) or not p.is_file() or p.suffix.lower() != ".jpg":
            return None
        return p

    # -- health
    def readiness(self) -> tuple[bool, list[str]]:
        problems = []
        if not self.started:
            problems.append("service not started")
        if self.stopping:
            problems.append("service shutting down")
        if self._engine_thread is None or not self._engine_thread.is_alive():
            problems.append(self.engine_error or "engine not running")
        lost = self.engine.lost()
        if lost and len(lost) == len(self.engine.engines):
            # With several devices a lost one's streams move to the others: degraded (its alerts say so), ready.
            problems.append(f"device {', '.join(lost)} lost")
        refused = self.engine.refused()
        for sid in self.stream_ids() if not self.stopping else []:
            rt = self.engine.streams.get(sid)
            if rt is None and sid in refused:
                continue  # refused for capacity: its status says so; the service itself is ready
            if rt is None:
                problems.append(f"stream {sid} not started")
            elif rt.thread is None and not rt.eof:
                problems.append(f"stream {sid} not started")
        return not problems, problems

    # -- background: frame rates, media times for the store, the page's periodic snapshot
    def purge_history(self, now: float | None = None) -> int:
        """Delete resolved alerts older than the retention, and their thumbnails (only files inside the
        service's own thumbnail folder). Returns how many alerts went."""
        from datetime import UTC, datetime

        cutoff = (now if now is not None else time.time()) - self.cfg.service.retention_days * 86400
        before = datetime.fromtimestamp(cutoff, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        count, paths = self.store.purge(before)
        root = self.thumbs_dir.resolve()
        for p in paths:
            try:
                f = Path(p).resolve()
                if f.is_relative_to(root) and f.is_file():
                    f.unlink()
            except OSError as exc:
                log.warning("thumbnail %s not deleted: %s", p, exc)
        if count:
            log.info("history: %d alert(s) older than %g days deleted", count, self.cfg.service.retention_days)
        return count

    def _sample_loop(self) -> None:
        last_note = time.monotonic()
        last_purge = 0.0
        while not self._stop_sampler.wait(1.0):
            try:
                self._sample()
                if time.monotonic() - last_note > 5:
                    last_note = time.monotonic()
                    self._note_media_times()
                if time.monotonic() - last_purge > 3600:  # history is bounded too (service.retention_days)
                    last_purge = time.monotonic()
                    self.purge_history()
                if self.broadcast.listeners:
                    self.broadcast.publish("streams", self.streams_status())
            except Exception:  # a bad sample must not end sampling
                log.exception("sampler")

    def _sample(self) -> None:
        now = time.monotonic()
        for sid, rt in list(self.engine.streams.items()):
            frames = rt.counters.video_frames
            r = self._rates.get(sid)
            if r is None:
                self._rates[sid] = _Rate(now, frames)
                continue
            dt = now - r.t
            if dt > 0:
                inst = max(0, frames - r.frames) / dt
                r.fps = inst if r.fps == 0 else 0.5 * r.fps + 0.5 * inst
                r.t, r.frames = now, frames

    def _note_media_times(self) -> None:
        try:
            self.store.note_media_times({sid: max(rt.stats.media_end, rt.audio_end)
                                         for sid, rt in list(self.engine.streams.items())})
        except Exception as exc:
            log.error("media times not stored: %s", exc)

    def about(self) -> dict[str, Any]:
        return {"version": __version__, "run": self.run_id, "device": self.engine.label(),
                "device_note": self.engine.device_note}


def _lock_state_dir(state_dir: Path) -> Any:
    """An exclusive lock on the state dir for this process's life: a second service on the same dir would run
    every stream twice and resolve the first one's open alerts as its own leftovers."""
    import fcntl

    f = open(state_dir / "serve.lock", "a+")  # noqa: SIM115 (held open until the service stops)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip()
        f.close()
        raise RuntimeError(f"another framewatch serve uses this state dir{f' (pid {holder})' if holder else ''}") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def _spec(cfg: FramewatchConfig, model: StreamModel) -> StreamSpec:
    """The engine's spec of a stream, or the reason it cannot run, as a bad request."""
    try:
        return stream_spec(cfg, model)
    except ConfigError as exc:
        raise StreamRequestError(str(exc).split(": ", 1)[-1], ()) from None
    except (TypeError, ValueError) as exc:
        raise StreamRequestError(str(exc), ("options",)) from None


def _body(model: StreamModel) -> dict[str, Any]:
    return model.model_dump(mode="json", exclude_defaults=True, exclude={"id"}) | {"id": model.id}


def _sync(rt: StreamRuntime) -> dict[str, Any] | None:
    """The A/V offset as last measured: the content estimate only when it was confident."""
    if hasattr(rt, "remote_sync"):  # a stream in a worker process (engine.service.remote): measured there
        return rt.remote_sync
    det = next((d for d in rt.detectors if d.NAME == "av_sync"), None)
    if det is None:
        return None
    s = det.summary()
    latest = s.get("latest") or {}
    return {"offset": latest.get("offset") if det.last_is_confident else None,
            "confidence": latest.get("confidence"), "timestamp_drift": s["timestamps"]["drift"]}
