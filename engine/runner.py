"""The engine: many streams in one process, I/O and decoding in a thread per stream, one batched scoring
step per device tick across all streams, detectors per stream, events to the sinks."""

from __future__ import annotations

import ctypes
import gc
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from engine.alerts import EventSink, ThumbnailWriter
from engine.batch import StreamQueue
from engine.detectors import REGISTRY
from engine.detectors.base import Detector, DetectorConfig, MetricRequest, StreamContext, TimestampNote
from engine.events import Event
from engine.media import AUDIO_WINDOW, AudioChunk, StreamCounters, StreamInfo, VideoFrame
from engine.overload import LoadShedder
from engine.review import ReviewStore
from engine.scoring import AudioState, AudioWork, ScoringStep, VideoWork
from engine.sources import Source, SourceError, SourceOptions, open_source

log = logging.getLogger("framewatch")

_MALLOC_TUNED = False


def tune_allocator() -> None:
    """Process settings for a long-running frame pipeline, applied once.

    Large tensor buffers stay on the heap instead of fresh mmaps: with glibc's default threshold every
    per-frame tensor above 128 KiB costs a few hundred page faults, which on a CPU doubles the cost of
    light per-frame kernels. The objects created by importing torch are moved out of the garbage
    collector's sight (gc.freeze): otherwise every full collection walks them again, which took a
    quarter of the scoring thread's time."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED = True
    gc.collect()
    gc.freeze()
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 256 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 512 << 20)  # M_TRIM_THRESHOLD
        # Every I/O thread would otherwise get its own malloc arena (up to 8 per core), each keeping its own
        # freed memory: with hundreds of streams coming and going that looked like a leak (+60-90 MB per
        # 200 streams added and removed through the API), with four arenas it stays flat.
        libc.mallopt(-8, 4)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_usage() -> tuple[int, int] | None:
    """(bytes in use, bytes freed but still held) of the C heap over all malloc arenas; None off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        m = libc.mallinfo2()
    except (OSError, AttributeError):
        return None
    return int(m.uordblks + m.hblkhd), int(m.fordblks)


def release_free_heap(min_free: int = 128 << 20) -> bool:
    """Give the C heap's freed pages back to the system when more than `min_free` bytes of it are held.

    The settings of tune_allocator keep freed memory for reuse, and every malloc arena keeps its own: when
    streams come and go the resident size then grows with each arena's high-water mark although the memory
    in use does not (measured: 200 streams added and removed 8 times, in use 122 MB after every round,
    held free 600 -> 816 MB, resident 1183 -> 1402 MB). malloc_trim returns whole free pages in place; it
    takes ~50 ms for ~600 MB and runs without the GIL (ctypes releases it)."""
    usage = heap_usage()
    if usage is not None and usage[1] < min_free:
        return False
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


def resolve_device(device: str | torch.device) -> tuple[torch.device, str]:
    """The device to score on, and a note when it is not the one asked for (a GPU that is not there):
    monitoring goes on on the CPU and the fallback is said out loud, never silent."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return dev, ""
    if not torch.cuda.is_available():
        return torch.device("cpu"), f"device {device} requested but no CUDA device is available; scoring on the CPU"
    index = dev.index if dev.index is not None else 0
    if index >= torch.cuda.device_count():
        return torch.device("cpu"), (
            f"device {device} requested but only {torch.cuda.device_count()} CUDA device(s) exist; scoring on the CPU")
    return torch.device("cuda", index), ""


# What a lost or broken accelerator says, as opposed to a bug in a kernel or a frame no kernel can digest. Out
# of memory is left out on purpose: it is a capacity problem, and scoring streams one by one (smaller batches)
# is the right answer to it, not writing the GPU off.
_DEVICE_ERROR = re.compile(
    r"cuda (?:error|failure|driver|runtime error)|cuda kernel errors|cublas_status|cudnn_status|cufft_internal|"
    r"device-side|illegal (?:memory access|address|instruction)|device (?:lost|is lost|has been lost)|"
    r"gpu (?:is lost|lost|has fallen off)|fallen off the bus|unspecified launch failure|launch timed out|"
    r"uncorrectable ecc|ecc error|nvml_error|xid \d+",
    re.IGNORECASE,
)
# torch.AcceleratorError is newer than the oldest torch supported.
_DEVICE_EXC: tuple[type[BaseException], ...] = tuple(
    t for t in (getattr(torch, "AcceleratorError", None), torch.cuda.CudaError) if t is not None)


def is_device_error(exc: BaseException) -> bool:
    """Whether an exception means the device itself failed (lost, hung, memory faults, a device-side assert),
    after which nothing more can be scored on it, rather than one batch being bad."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower():
            return False
        if isinstance(e, _DEVICE_EXC):
            return True
        if isinstance(e, RuntimeError) and _DEVICE_ERROR.search(str(e)):
            return True
        e = e.__cause__ or e.__context__
    return False


def json_num(v: float | None, digits: int = 2) -> float | None:
    import math

    return None if v is None or math.isnan(v) or math.isinf(v) else round(float(v), digits)


def db_or_none(linear: float) -> float | None:
    import math

    return None if not linear > 0 else round(20 * math.log10(linear), 2)


@dataclass
class StreamSpec:
    """One stream as the engine runs it: resolved detector configs and source options."""

    id: str
    url: str
    detectors: dict[str, DetectorConfig]
    source: SourceOptions = field(default_factory=SourceOptions)
    faults: list[dict] | None = None
    profile: str = "default"
    # What the operator says the stream carries (codec, width, height, fps, gop_seconds), for the scheduler's
    # decode budget before the stream is opened; None: assumed 1080p30 H.264.
    expect: dict[str, Any] | None = None


@dataclass
class StreamStats:
    frames_scored: int = 0
    audio_seconds: float = 0.0
    media_end: float = 0.0
    events: dict[str, int] = field(default_factory=dict)


def _needs_native_luma(requests: list[MetricRequest]) -> bool:
    """Whether a GPU decoder must keep whole luma planes: the summaries it keeps otherwise (histogram and the
    default sampled rows) cannot exclude ignored regions or give another row count."""
    from kernels.luma_summary import ROWS

    for r in requests:
        if r.family == "corruption":  # the CNN reads the whole picture (halved)
            return True
        if r.family in ("black", "spatial") and r.ignore:
            return True
        if r.family == "spatial" and int(r.param("rows", ROWS)) != ROWS:
            return True
    return False


class StreamRuntime:
    def __init__(self, spec: StreamSpec, engine: Engine) -> None:
        self.spec = spec
        self.id = spec.id
        self.counters = StreamCounters()
        self.errors: list[str] = []
        self.state = "starting"
        self.info: StreamInfo | None = None
        self.stats = StreamStats()
        self.source: Source | None = None
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.eof = False
        self.finished = False
        self.held: VideoFrame | None = None
        self.prev: VideoFrame | None = None
        self.last_frame: VideoFrame | None = None
        self.audio = AudioState()
        self.audio_end = 0.0  # media time the scored audio reaches
        self.next_measure = 0.0
        self.ticked = 0.0  # wall clock of the detectors' last on_tick
        self._audio_buf: list[torch.Tensor] = []
        self._audio_len = 0
        self._audio_t0: float | None = None
        self._audio_layout = "stereo"
        self._restart = False
        # Timing news of the chunks taken in, handed to the audio detectors with the next scored piece.
        self._ts_notes: list[TimestampNote] = []
        clicks = spec.detectors.get("clicks")
        self.audio.clicks = self.clicks_wanted = clicks is not None and clicks.enabled
        clip = spec.detectors.get("clipping")
        if clip is not None:
            self.audio.clip_level = float(getattr(clip, "level", 0.891))
            self.audio.clip_min_run = int(getattr(clip, "min_run", 3))
        # Frames go where the engine scores them; the stream's tier decides which frames are decoded at all.
        spec.source = replace(spec.source, device=str(engine.device))
        if any(cfg.enabled and REGISTRY[name].NEEDS_PACKETS for name, cfg in spec.detectors.items()):
            # The threaded NVDEC file reader sees no packets, so its pictures carry no key flag and no loss
            # evidence: such files are demuxed by PyAV and decoded by packet-level NVDEC instead.
            spec.source = replace(spec.source, threaded=False)
        self.tier = spec.source.tier
        try:
            self.source = open_source(spec.url, spec.source, spec.faults)
        except SourceError as exc:
            self.fail(str(exc))
        live = bool(self.source is not None and self.source.realtime)
        self.ctx = StreamContext(stream=spec.id, emit=engine._emit, thumbnail=self._thumbnail, live=live, tier=self.tier,
                                 extra=engine.detector_extras())
        self._writer = engine.thumbnails
        self.detectors: list[Detector] = []
        for name, cfg in spec.detectors.items():
            if not cfg.enabled:
                continue
            if self.tier != "all" and REGISTRY[name].NEEDS_EVERY_FRAME:
                # Config validation refuses this; a stream added through the API is told, not half-checked.
                log.warning("stream %s: detector %s needs every frame and is off in tier %s", spec.id, name, self.tier)
                continue
            self.detectors.append(REGISTRY[name](cfg, self.ctx))
        # "av" detectors (A/V sync) see both: the pictures' changes and the sound's.
        self.video_detectors = [d for d in self.detectors if d.MEDIA in ("video", "stream", "av")]
        self.audio_detectors = [d for d in self.detectors if d.MEDIA in ("audio", "av")]
        self.requests: list[MetricRequest] = list(dict.fromkeys(r for d in self.detectors for r in d.requests()))
        if self.source is not None and _needs_native_luma(self.requests):
            self.source.options = replace(self.source.options, keep_luma=True)
        self.queue = StreamQueue(
            self.counters,
            max_video=engine.queue_frames,
            block=self.source is not None and not self.source.realtime,
            wakeup=engine.wakeup,
            wake_at=engine.batch_frames,
        )

    def measurements(self, media_time: float) -> dict[str, Any]:
        """What this stream measures right now (see engine.alerts.measurements): JSON-safe, NaN as null."""
        from dataclasses import asdict

        from engine.events import now_iso

        meter = self.audio.meter
        sync = next((d for d in self.detectors if d.NAME == "av_sync"), None)
        snap: dict[str, Any] = {
            "stream": self.id, "t": round(media_time, 3), "wallclock": now_iso(), "state": self.state,
            "loudness": {
                "momentary": json_num(meter.momentary), "short_term": json_num(meter.short_term),
                "integrated": json_num(meter.integrated), "lra": json_num(meter.loudness_range),
                "true_peak_dbtp": db_or_none(self.audio.take_interval_true_peak()),
                "max_true_peak_dbtp": db_or_none(self.audio.max_true_peak),
            } if self.stats.audio_seconds else None,
            "counters": asdict(self.counters),
        }
        if sync is not None:
            s = sync.summary()
            latest = s["latest"] or {}
            snap["av_sync"] = {"offset": latest.get("offset") if latest and sync.last_is_confident else None,
                               "confidence": latest.get("confidence"), "timestamp_drift": s["timestamps"]["drift"]}
        return snap

    last_disconnect = ""  # why the input was last lost or could not be opened (live inputs)

    def fail(self, message: str) -> None:
        line = f"stream {self.id}: {message}"
        self.errors.append(message)
        self.state = "error"
        log.error(line)

    def _thumbnail(self, event_id: str) -> str | None:
        if self._writer is None or self.last_frame is None:
            return None
        return self._writer.write(self.id, event_id, self.last_frame)

    def start(self) -> None:
        if self.source is None:
            self.eof = True
            return

        def body() -> None:
            try:
                self.source.run(self.queue, self.stop)
            except Exception as exc:  # a source bug must end this stream, never the process
                from engine.media import SourceStatus

                self.queue.put_status(SourceStatus("error", f"source failed: {exc}", time.time()))
                self.queue.put_status(SourceStatus("eof", "", time.time()))

        self.thread = threading.Thread(target=body, name=f"src-{self.id}", daemon=True)
        self.thread.start()

    # -- audio accumulation into whole 5 ms windows
    def add_audio(self, chunk: AudioChunk) -> list[tuple[float, torch.Tensor, bool]]:
        out: list[tuple[float, torch.Tensor, bool]] = []
        if chunk.drift is not None or chunk.jump or chunk.reset:
            if len(self._ts_notes) >= 4096:  # bounded even if nothing is scored for a long while
                del self._ts_notes[: len(self._ts_notes) // 2]
            self._ts_notes.append(TimestampNote(chunk.pts, chunk.drift, chunk.jump, chunk.reset))
        c = chunk.samples.shape[0]
        if self._audio_t0 is not None:
            expected = self._audio_t0 + self._audio_len / 48_000
            channels_changed = bool(self._audio_buf) and self._audio_buf[0].shape[0] != c
            if abs(chunk.pts - expected) > 0.002 or channels_changed:
                out.extend(self.flush_audio(pad=True))
                self._restart = True  # applies to the first piece after the gap, once scored in order
        if self._audio_t0 is None or not self._audio_buf:
            self._audio_t0 = chunk.pts
            self._audio_len = 0
        self._audio_layout = chunk.layout
        self._audio_buf.append(chunk.samples)
        self._audio_len += chunk.samples.shape[-1]
        return out

    def take_ready(self) -> list[tuple[float, torch.Tensor, bool]]:
        """Everything buffered that fills whole 5 ms windows."""
        usable = self._audio_len // AUDIO_WINDOW * AUDIO_WINDOW
        return self._take(usable) if usable else []

    def _take(self, n: int) -> list[tuple[float, torch.Tensor, bool]]:
        data = torch.cat(self._audio_buf, dim=1) if len(self._audio_buf) > 1 else self._audio_buf[0]
        head, tail = data[:, :n], data[:, n:]
        t0 = self._audio_t0
        self._audio_t0 = t0 + n / 48_000
        self._audio_buf = [tail] if tail.shape[-1] else []
        self._audio_len = tail.shape[-1]
        restart, self._restart = self._restart, False
        return [(t0, head, restart)]

    def flush_audio(self, pad: bool) -> list[tuple[float, torch.Tensor, bool]]:
        if not self._audio_buf or self._audio_len == 0:
            return []
        data = torch.cat(self._audio_buf, dim=1)
        rem = (-data.shape[-1]) % AUDIO_WINDOW
        if rem and pad:
            data = torch.cat([data, torch.zeros(data.shape[0], rem)], dim=1)
        t0 = self._audio_t0
        self._audio_buf, self._audio_len, self._audio_t0 = [], 0, None
        usable = data.shape[-1] // AUDIO_WINDOW * AUDIO_WINDOW
        if not usable:
            return []
        restart, self._restart = self._restart, False
        return [(t0, data[:, :usable], restart)]


class Engine:
    IDLE_TICK = 0.1  # seconds between detector timer checks of a stream that received nothing
    TRIM_EVERY = 30.0  # seconds between checks of the C heap's held free memory (release_free_heap)

    def __init__(
        self,
        sink: EventSink,
        device: str = "cpu",
        batch_frames: int = 32,
        tick: float = 0.02,
        queue_frames: int = 64,
        thumbnails: ThumbnailWriter | None = None,
        review: ReviewStore | None = None,
        torch_threads: int | None = 1,
        on_status: Callable[[StreamRuntime, str, str], None] | None = None,
        on_device_error: Callable[[BaseException], None] | None = None,
        on_measure: Callable[[dict[str, Any]], None] | None = None,
        measure_every: float = 1.0,
        shed_clicks: bool = True,
        load_shedder: LoadShedder | None = None,
    ) -> None:
        tune_allocator()
        # Behind its live streams, the engine pauses their click analysis (engine.overload) until it catches up.
        self.shedder = (load_shedder or LoadShedder()) if shed_clicks else None
        # Each stream's measurements go here every `measure_every` seconds of its media time.
        self.on_measure = on_measure
        self.measure_every = measure_every
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.sink = sink
        self.requested_device = str(device)
        self.device, self.device_note = resolve_device(device)
        if self.device_note:
            log.warning(self.device_note)
        self.scoring = ScoringStep(self.device)
        self.batch_frames = batch_frames
        # Audio chunks (20-40 ms each) per stream per tick: about as much audio as a full batch of pictures
        # lasts, and never the whole queue (5-10 s of audio per stream) in one tick when the scoring is behind.
        self.batch_audio = max(16, 2 * batch_frames)
        self.tick = tick
        self.queue_frames = queue_frames
        self.thumbnails = thumbnails
        self.review = review
        self.wakeup = threading.Event()
        self.streams: dict[str, StreamRuntime] = {}
        self._lock = threading.Lock()
        # Held for a whole tick: a stream removed from another thread (the service's API) is finished only
        # between ticks, never while the tick is still feeding its detectors.
        self._tick_lock = threading.RLock()
        # Streams removed while run() ticks are finished by the engine thread at the end of its tick: waiting
        # for the tick lock instead starved the remover (the engine thread takes it again at once), and a
        # DELETE of one of 200 busy streams took ~450 ms.
        self._removals: list[tuple[str, StreamRuntime | None, threading.Event]] = []
        self._running = False
        self._run_thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.on_status = on_status
        # Set: a device error ends the whole engine and is handed over once (the owner moves the streams
        # elsewhere); unset: device errors are handled like any other scoring error, stream by stream.
        self.on_device_error = on_device_error
        self.device_lost = False

    # -- stream management (safe to call while running)
    def add_stream(self, spec: StreamSpec) -> StreamRuntime:
        with self._lock:
            if spec.id in self.streams:
                raise ValueError(f"stream {spec.id!r} exists already")
            rt = StreamRuntime(spec, self)
            self.streams[spec.id] = rt
            if self.shedder is not None and self.shedder.shed and rt.ctx.live and rt.clicks_wanted:
                rt.audio.clicks = False
                rt.counters.clicks_paused += 1
        rt.start()
        return rt

    def detector_extras(self) -> dict[str, Any]:
        """What detectors may use beyond their stream: the review store, the corruption model's version, and a
        way to mark a region on an alert's thumbnail."""
        from engine.alerts.thumbnails import mark_box

        family = self.scoring.families.get("corruption")

        def model_version(weights: str | None = None) -> str | None:
            slot = family.slot(weights) if family is not None else None
            return slot.loaded.meta.version if slot is not None and slot.loaded is not None else None

        return {"review": self.review, "corruption_model": model_version, "mark_thumbnail": mark_box}

    REMOVE_WAIT = 10.0  # seconds a remover waits for the engine thread before finishing the stream itself

    def remove_stream(self, stream_id: str) -> None:
        """Stop a stream and finish it (its detectors resolve their open alerts) before returning."""
        with self._lock:
            rt = self.streams.pop(stream_id, None)
        if rt is not None:
            # Outside the tick lock, and briefly: the queue is closed, so nothing the I/O thread still makes
            # reaches anyone, and a thread stuck in a stalled network read (up to its read timeout) must not
            # hold up the caller (an API request, another stream's change).
            self._shutdown(rt, wait=0.5)
        item = (stream_id, rt, threading.Event())
        with self._lock:
            # From the engine thread itself (a device-failure handler moving streams away, inside a tick) the
            # tick lock is its own: finish at once rather than wait for a tick end that cannot come.
            queued = self._running and threading.current_thread() is not self._run_thread
            if queued:
                self._removals.append(item)
        if queued:
            self.wakeup.set()
            if item[2].wait(self.REMOVE_WAIT):
                return
            with self._lock:  # a tick that hangs: take the removal back, unless the engine has it already
                queued = item in self._removals
                if queued:
                    self._removals.remove(item)
            if not queued:
                item[2].wait()
                return
        with self._tick_lock:
            self._finish_removed(stream_id, rt)

    def _finish_removed(self, stream_id: str, rt: StreamRuntime | None) -> None:
        self.scoring.forget(stream_id)
        if rt is not None:
            self._finish(rt)

    def _finish_removals(self) -> None:
        """Under the tick lock, once the tick no longer feeds the removed streams."""
        with self._lock:
            items, self._removals = self._removals, []
        for stream_id, rt, done in items:
            try:
                self._finish_removed(stream_id, rt)
            finally:
                done.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def _shutdown(self, rt: StreamRuntime, wait: float = 5.0) -> None:
        rt.stop.set()
        rt.queue.close()
        if rt.thread is not None:
            rt.thread.join(timeout=wait)

    def stop(self) -> None:
        self._stopping.set()
        self.wakeup.set()

    def _emit(self, event: Event) -> None:
        rt = self.streams.get(event.stream)
        if rt is not None and event.status.value == "firing":
            rt.stats.events[event.type] = rt.stats.events.get(event.type, 0) + 1
        self.sink.emit(event)

    # -- the device tick
    def run(
        self, until_done: bool = True, deadline: float | None = None, on_tick: Callable[[], None] | None = None
    ) -> None:
        """Run ticks until every stream has ended (until_done), the deadline passes or stop() is called."""
        trimmed = time.monotonic()
        with self._lock:
            self._running = True
            self._run_thread = threading.current_thread()
        try:
            while not self._stopping.is_set():
                if time.monotonic() - trimmed > self.TRIM_EVERY:
                    trimmed = time.monotonic()
                    release_free_heap()
                # Real-time streams are scored every tick for latency; files read as fast as possible wake
                # the tick when a whole batch is ready (or they end), so waiting longer costs nothing.
                with self._lock:
                    realtime = any(rt.ctx.live for rt in self.streams.values() if not rt.finished)
                self.wakeup.wait(self.tick if realtime else 0.25)
                self.wakeup.clear()
                busy = self.step()
                if on_tick is not None:
                    on_tick()
                with self._lock:
                    live = [rt for rt in self.streams.values() if not rt.finished]
                if until_done and not live:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    break
                if busy:
                    self.wakeup.set()  # more may be queued already: go again without waiting
        finally:
            with self._lock:
                self._running = False
                rest = list(self.streams.values())
            for rt in rest:
                self._shutdown(rt)
            with self._tick_lock:
                self.step(final=True)
                for rt in rest:
                    self._finish(rt)

    def step(self, final: bool = False) -> bool:
        """One tick: drain the queues, score all frames in one batch, feed the detectors.

        Streams read faster than real time (files) are drained only once a whole batch (or news such as the
        end of input) is waiting: a tick woken by one stream would otherwise take a few frames from every
        other stream, and the per-stream work of scoring and detectors is paid per tick, not per frame. That
        per-tick work, not the GPU, limited the GPU path. Real-time streams are drained every tick, for
        latency. `final` drains everything."""
        with self._tick_lock:
            return self._step(final)

    def _step(self, final: bool) -> bool:
        t_start = time.monotonic()
        live_work = False
        with self._lock:
            runtimes = list(self.streams.values())
        vworks: list[tuple[StreamRuntime, VideoWork]] = []
        aworks: list[tuple[int, StreamRuntime, AudioWork]] = []
        busy = False
        whole = min(self.batch_frames, self.queue_frames)
        touched: set[str] = set()
        for rt in runtimes:
            if rt.finished:
                continue
            if not (final or rt.ctx.live or rt.eof or rt.queue.ready(whole)):
                continue
            if not (final or rt.eof) and rt.queue.empty():
                # Live streams are looked at every tick, but most ticks bring a stream nothing: with hundreds
                # of streams the per-stream work of an empty tick, not the frames, used the CPU.
                continue
            touched.add(rt.id)
            live_work = live_work or rt.ctx.live
            d = rt.queue.drain(self.batch_frames, self.batch_audio)
            if len(d.video) >= self.batch_frames or len(d.audio) >= self.batch_audio:
                busy = True
            for st in d.status:
                self._status(rt, st.kind, st.message, st.info)
            if rt.queue.last_arrival is not None:
                rt.ctx.extra["last_arrival"] = rt.queue.last_arrival
            frames = d.video
            scored: list[VideoFrame] = []
            if frames:
                scored = ([rt.held] if rt.held is not None else []) + frames[:-1]
                rt.held = frames[-1]
            if rt.eof and rt.held is not None:
                scored.append(rt.held)
                rt.held = None
            if scored:
                vworks.append((rt, VideoWork(rt.id, scored, rt.prev, rt.held, rt.requests)))
                rt.prev = scored[-1]
            pieces: list[tuple[float, torch.Tensor, bool]] = []
            for chunk in d.audio:
                pieces.extend(rt.add_audio(chunk))
            pieces.extend(rt.take_ready())
            if rt.eof:
                pieces.extend(rt.flush_audio(pad=True))
            for i, (t0, samples, restart) in enumerate(pieces):
                work = AudioWork(rt.id, t0, samples, rt._audio_layout, rt.audio, restart)
                if i == 0:
                    work.timestamps, rt._ts_notes = rt._ts_notes, []
                aworks.append((i, rt, work))
        if vworks:
            self._dispatch_video(vworks)
        # A stream's audio pieces carry filter state from one to the next, so each round takes at most one
        # piece per stream (almost always a single round).
        for r in range(max((i for i, _, _ in aworks), default=-1) + 1):
            self._dispatch_audio([(rt, w) for i, rt, w in aworks if i == r])
        wall = time.time()
        for rt in runtimes:
            if rt.finished:
                continue
            # Timers (no_signal, recoveries) need no finer steps than IDLE_TICK on a stream that got nothing.
            if rt.id not in touched and wall - rt.ticked < self.IDLE_TICK:
                continue
            rt.ticked = wall
            if rt.queue.last_arrival is not None:
                # As of now, not as of this tick's drain: a tick that took long (a burst of new streams, an
                # overloaded CPU) is the engine's delay, not the input's, and must not look like no signal.
                rt.ctx.extra["last_arrival"] = rt.queue.last_arrival
            arrived = rt.held.pts + rt.held.duration if rt.held is not None else rt.stats.media_end
            # The final drain comes after the inputs were stopped (joining them takes a while): wall-clock
            # timers would read that as the signal going away and raise no_signal at every shutdown.
            for det in rt.detectors if not final else ():
                try:
                    det.on_tick(wall, arrived)
                except Exception as exc:
                    rt.fail(f"detector {det.NAME} failed: {exc}")
            if self.on_measure is not None:
                self._measure(rt)
            if rt.eof and rt.held is None and rt.queue.pending() == 0:
                self._finish(rt)
        if self.shedder is not None and live_work and not final:
            now = time.monotonic()
            # Under the streams lock, so that a stream added meanwhile sees the same decision (add_stream).
            with self._lock:
                change = self.shedder.update(now - t_start, now)
                live = self._shed_clicks(change) if change is not None else []
            if change is not None:
                self._say_shed(change, now - t_start, len(live))
        self._finish_removals()
        return busy

    def _shed_clicks(self, pause: bool) -> list[StreamRuntime]:
        live = [rt for rt in self.streams.values() if rt.ctx.live and rt.clicks_wanted and not rt.finished]
        for rt in live:
            if pause and rt.audio.clicks:
                rt.audio.clicks = False
                rt.counters.clicks_paused += 1
            elif not pause and not rt.audio.clicks:
                rt.audio.clicks = True
                rt.audio.impulse = None  # the analysis restarts from here, not from where it paused
        return live

    def _say_shed(self, pause: bool, took: float, n: int) -> None:
        assert self.shedder is not None
        if pause:
            log.warning("engine behind its live streams (ticks of %.1f s or more, the last %.1f s): click analysis "
                        "paused on %d live stream(s) until ticks are fast for %.0f s", self.shedder.slow_tick, took, n,
                        self.shedder.wait)
        else:
            log.warning("engine caught up: click analysis resumed on %d live stream(s)", n)

    def _measure(self, rt: StreamRuntime) -> None:
        t = max(rt.stats.media_end, rt.audio_end)
        if t < rt.next_measure:
            return
        rt.next_measure = t + self.measure_every
        try:
            self.on_measure(rt.measurements(t))
        except Exception as exc:  # a broken measurement log must not stop monitoring
            log.error("stream %s: measurements not written: %s", rt.id, exc)

    def _scored(self, works: list, score: Callable[[list], list]) -> list[tuple]:
        """Score the whole batch; if that fails, stream by stream, so that one stream's odd frames end only
        that stream (reported on it) and the others go on. A lost device (with on_device_error set) is not
        retried stream by stream: every stream would fail the same way."""
        if self.device_lost:
            return []
        try:
            return list(zip(works, score([w for _, w in works]), strict=True))
        except Exception as exc:
            if self._lose_device(exc):
                return []
            log.exception("batched scoring failed; scoring streams one by one")
        out = []
        for item in works:
            try:
                out.append((item, score([item[1]])[0]))
            except Exception as exc:
                if self._lose_device(exc):
                    # The handler has taken the streams away already: nothing scored here may reach them.
                    return []
                item[0].fail(f"scoring failed: {exc}")
                self._shutdown(item[0])
                self._finish(item[0])
        return out

    def _lose_device(self, exc: BaseException) -> bool:
        """Whether `exc` ends this engine: a device error with a handler to give it to (once)."""
        if self.on_device_error is None or not is_device_error(exc):
            return False
        if not self.device_lost:
            self.device_lost = True
            log.error("device %s failed: %s; engine stopping", self.requested_device, exc)
            self.stop()
            self.on_device_error(exc)
        return True

    def _dispatch_video(self, works: list[tuple[StreamRuntime, VideoWork]]) -> None:
        scored = self._scored(works, self.scoring.score_video)
        # Detectors that compute on the GPU (freeze compares small planes) run on the scoring stream too:
        # one stream orders every read of the tick's tensors before their memory can be reused.
        with self.scoring.on_stream():
            self._feed_video(scored)

    def _feed_video(self, scored: list) -> None:
        for (rt, _), m in scored:
            rt.last_frame = m.last
            st = rt.stats
            st.frames_scored += len(m.pts)
            st.media_end = float(m.pts[-1] + m.duration[-1])
            if rt.state in ("starting", "no_signal"):
                rt.state = "running"
            for det in rt.video_detectors:
                try:
                    det.on_video(m)
                except Exception as exc:  # a detector bug is reported for its stream, others go on
                    log.exception("stream %s: detector %s failed", rt.id, det.NAME)
                    rt.fail(f"detector {det.NAME} failed: {exc}")

    def _dispatch_audio(self, works: list[tuple[StreamRuntime, AudioWork]]) -> None:
        for (rt, _), m in self._scored(works, self.scoring.score_audio):
            rt.stats.audio_seconds += m.peak.shape[-1] * m.window
            rt.audio_end = m.t0 + m.peak.shape[-1] * m.window
            for det in rt.audio_detectors:
                try:
                    det.on_audio(m)
                except Exception as exc:
                    log.exception("stream %s: detector %s failed", rt.id, det.NAME)
                    rt.fail(f"detector {det.NAME} failed: {exc}")

    def _status(self, rt: StreamRuntime, kind: str, message: str, info: StreamInfo | None) -> None:
        if kind == "connected":
            rt.info = info or rt.info
            # Whether pictures are due at all: a file whose video track stops early (or never decodes) is
            # told apart from an audio-only one at its end (no_signal).
            rt.ctx.extra["video_expected"] = bool(rt.info is not None and rt.info.video_codec and rt.spec.source.video)
            if rt.state == "starting":
                rt.state = "running"
        elif kind == "disconnected":
            rt.state = "no_signal"
            rt.last_disconnect = message
            log.warning("stream %s: %s", rt.id, message)
        elif kind == "error":
            rt.fail(message)
        elif kind == "eof":
            rt.eof = True
        if self.on_status is not None:
            self.on_status(rt, kind, message)

    def _finish(self, rt: StreamRuntime) -> None:
        if rt.finished:
            return
        rt.finished = True
        self.scoring.forget(rt.id)  # what the scoring families kept of it between ticks
        end = max(rt.stats.media_end, rt.audio_end)  # an audio-only stream has no frames to end on
        # A picture fault open at the end lasts to the last picture, a sound fault to the last sample: the
        # two may end apart (AAC padding, or a video track that stops early, which no_signal reports).
        ends = {"video": rt.stats.media_end if rt.stats.frames_scored else end,
                "audio": rt.audio_end if rt.stats.audio_seconds else end}
        for det in rt.detectors:
            try:
                det.finish(ends.get(det.MEDIA, end))
            except Exception as exc:
                rt.fail(f"detector {det.NAME} failed at end of input: {exc}")
        if rt.state != "error":
            rt.state = "ended"
