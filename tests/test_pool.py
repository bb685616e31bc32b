"""The GPU pool: streams placed by the scheduler across engines, and a failing GPU's streams moved to the others.

GPUs are simulated by engines on the CPU with H100 models for the scheduler; a GPU fails when its engine's
scoring starts raising a CUDA error.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace

import pytest
from detect_media import break_scoring_for

from engine.alerts import MemorySink
from engine.config import FramewatchConfig, resolve_detectors
from engine.detectors import REGISTRY
from engine.events import Event, Severity, Status
from engine.pool import EVENT_VERSION, GpuPool, default_demand, is_device_error
from engine.runner import Engine, StreamSpec
from engine.scheduler import KNOWN_MODELS, StreamDemand, Target, Tier, match_model
from engine.sources import SourceOptions

H100 = KNOWN_MODELS["h100"]
CUDA_FAULT = "CUDA error: an illegal memory access was encountered"
DETECTORS = resolve_detectors(FramewatchConfig())
FPS = 25


def spec(name: str, duration: float = 8.0) -> StreamSpec:
    url = f"synthetic://{name}?size=160x120&fps={FPS}&duration={duration:g}&pace=fast"
    return StreamSpec(name, url, DETECTORS, SourceOptions(pace="fast"))


def fail_after(engine: Engine, calls: int, message: str = CUDA_FAULT, once_scored: tuple[str, ...] = ()) -> list[int]:
    """Make `engine`'s video scoring raise `message` from its `calls`-th batch on, and not before every stream
    in `once_scored` has been in a batch (file streams are scored in whole batches, so which streams a tick
    holds depends on timing); returns the call counter."""
    real = engine.scoring.score_video
    count = [0]
    seen: set[str] = set()

    def score_video(works):
        count[0] += 1
        if count[0] >= calls and seen >= set(once_scored):
            raise RuntimeError(message)
        seen.update(w.stream for w in works)
        return real(works)

    engine.scoring.score_video = score_video  # type: ignore[method-assign]
    return count


def record_adds(engine: Engine) -> list[str]:
    real = engine.add_stream
    added: list[str] = []

    def add_stream(s: StreamSpec):
        added.append(s.id)
        return real(s)

    engine.add_stream = add_stream  # type: ignore[method-assign]
    return added


def pool_events(sink: MemorySink, stream: str) -> list[Event]:
    return [e for e in sink.events if e.stream == stream and e.detector_version == EVENT_VERSION]


def wait_for(cond: Callable[[], bool], timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


@pytest.mark.timeout(60)
def test_failed_gpu_streams_move_to_the_other_gpu_and_their_alerts_resolve() -> None:
    sink = MemorySink()
    pool = GpuPool(sink, ["cpu", "cpu"], models=[H100, match_model("NVIDIA H100")], batch_frames=16)
    names = ["s0", "s1", "s2", "s3"]
    placed = {n: pool.add_stream(spec(n)) for n in names}
    # Equal streams, least-loaded fit: alternating, two per GPU, all at full rate.
    assert {n: p.gpu for n, p in placed.items()} == {"s0": 0, "s1": 1, "s2": 0, "s3": 1}
    assert all(p.target is Target.GPU and p.tier is Tier.ALL for p in placed.values())
    assert [pool.engine_of(n) for n in names] == [pool.engines[0], pool.engines[1]] * 2
    healthy = {n: pool.runtime(n) for n in ("s0", "s2")}
    doomed = {n: pool.runtime(n) for n in ("s1", "s3")}
    adds0 = record_adds(pool.engines[0])
    fail_after(pool.engines[1], calls=3, once_scored=("s1", "s3"))

    pool.run(until_done=True)

    assert pool.scheduler.failed_gpus == frozenset({1})
    assert pool.engines[1].device_lost and not pool.engines[0].device_lost
    assert adds0 == ["s1", "s3"]  # the moved streams, and nothing restarted on the healthy GPU
    for n, old in doomed.items():
        assert old is not None and old.finished and old.errors == []
        assert 0 < old.stats.frames_scored < FPS * 8  # it did run on the failed GPU, and not to the end
        new = pool.runtime(n)
        assert new is not old and pool.engine_of(n) is pool.engines[0]
        assert new is not None and new.state == "ended" and new.stats.frames_scored == FPS * 8
        assert pool.placements()[n].gpu == 0
        events = pool_events(sink, n)
        assert [e.status for e in events] == [Status.FIRING, Status.RESOLVED]
        firing, resolved = events
        assert firing.type == "no_signal" and firing.severity is Severity.CRITICAL
        assert firing.message == f"GPU cpu (gpu 1) failed ({CUDA_FAULT}); stream moved to cpu (gpu 0)"
        assert firing.details["device"] == "cpu (gpu 1)" and "moved off failed gpu 1" in str(firing.details["reason"])
        assert resolved.id == firing.id and resolved.details["resumed_on"] == "cpu (gpu 0)"
        assert resolved.end is not None and resolved.end >= firing.start
        assert sink.events.index(firing) < sink.events.index(resolved)
    for n, rt in healthy.items():
        assert pool.runtime(n) is rt and rt is not None
        assert rt.state == "ended" and rt.errors == [] and rt.stats.frames_scored == FPS * 8
        assert pool_events(sink, n) == []
        assert not [e for e in sink.events if e.stream == n and e.type == "no_signal"]


@pytest.mark.timeout(60)
def test_a_stream_with_no_capacity_left_stays_alerted_until_capacity_frees_up() -> None:
    # One NVDEC engine each: two 4K60 streams at full rate fit, a third does not.
    small = replace(H100, name="NVIDIA H100 (one engine)", nvdec_engines=1)
    sink = MemorySink()
    pool = GpuPool(sink, ["cpu", "cpu"], models=[small, small], batch_frames=16)
    uhd = {n: StreamDemand(n, "h264", 3840, 2160, 60) for n in ("a", "b", "c")}
    placed = {n: pool.add_stream(spec(n, duration=20), uhd[n]) for n in ("a", "b", "c")}
    assert {n: p.gpu for n, p in placed.items()} == {"a": 0, "b": 1, "c": 0}
    fail_after(pool.engines[1], calls=3)
    pool.start()
    try:
        wait_for(lambda: bool(pool_events(sink, "b")))
        [firing] = pool_events(sink, "b")
        assert firing.status is Status.FIRING
        assert firing.message.startswith(f"GPU cpu (gpu 1) failed ({CUDA_FAULT}); no capacity left: ")
        assert "needs every frame" in str(firing.details["reason"]) and firing.details["moved_to"] is None
        assert pool.placements()["b"].target is Target.REFUSED and pool.engine_of("b") is None
        assert pool_events(sink, "a") == pool_events(sink, "c") == []

        pool.remove_stream("a")  # frees room on gpu 0: b is admitted and starts there
        assert pool.placements()["b"].gpu == 0 and pool.engine_of("b") is pool.engines[0]
        wait_for(lambda: len(pool_events(sink, "b")) == 2)
    finally:
        pool.stop()
    firing, resolved = pool_events(sink, "b")
    assert resolved.status is Status.RESOLVED and resolved.id == firing.id
    assert resolved.details["resumed_on"] == "cpu (gpu 0)"
    rt = pool.runtime("b")
    assert rt is not None and rt.stats.frames_scored > 0


def test_a_refused_stream_is_not_started_and_says_why() -> None:
    sink = MemorySink()
    pool = GpuPool(sink, ["cpu", "cpu"], models=[H100, H100])
    try:
        p = pool.add_stream(spec("cam-av1"), StreamDemand("cam-av1", "av1", 1920, 1080, 30))
        assert p.target is Target.REFUSED and not p.admitted
        assert "NVIDIA H100 has no AV1 decoder" in p.reason
        assert pool.runtime("cam-av1") is None and pool.engine_of("cam-av1") is None
        assert all("cam-av1" not in e.streams for e in pool.engines)
        assert pool.placements()["cam-av1"] == p
        assert pool.done()
    finally:
        pool.stop()
    assert sink.events == []


def test_a_refused_stream_goes_to_the_cpu_engine_when_it_has_room() -> None:
    pool = GpuPool(MemorySink(), ["cpu"], models=[H100], cpu_decode_fps=100)
    try:
        p = pool.add_stream(spec("cam-av1"), StreamDemand("cam-av1", "av1", 1920, 1080, 30))
        assert p.target is Target.CPU and pool.engine_of("cam-av1") is pool.cpu_engine
    finally:
        pool.stop()


def test_demand_follows_the_detectors() -> None:
    every = sorted(n for n, c in DETECTORS.items() if c.enabled and REGISTRY[n].NEEDS_EVERY_FRAME)
    assert every, "the default config has a detector that needs every frame"
    d = default_demand(spec("x"))
    assert (d.codec, d.width, d.height, d.fps) == ("h264", 1920, 1080, 30.0)
    assert d.needs_every_frame and all(f"'{n}'" in d.every_frame_reason for n in every)
    cheap = {n: replace(c, enabled=not REGISTRY[n].NEEDS_EVERY_FRAME) for n, c in DETECTORS.items()}
    assert not default_demand(StreamSpec("y", "synthetic://y", cheap)).needs_every_frame
    with pytest.raises(ValueError, match="not 'x'"):
        default_demand(spec("x"), StreamDemand("other", "h264", 1280, 720, 25))


def test_a_stream_with_the_corruption_detector_is_costed_for_the_cnn() -> None:
    """On a CPU the CNN reads 5 pictures a second (and every key frame) at 72.3 ms a 1080p picture with the
    shipped model's two views: 0.40 cores more than the same stream without it, all on the scoring thread, whose
    budget (0.85 of one core) then holds one such 1080p30 stream where it holds four without the detector."""
    from engine.detectors.corruption import CorruptionConfig
    from engine.pool import cpu_model, plan_cpu

    def live(i: int, **corruption) -> StreamSpec:
        detectors = {**DETECTORS, "corruption": replace(CorruptionConfig(), **corruption)}
        return StreamSpec(f"s{i}", f"udp://239.0.0.1:{5000 + i}", detectors, SourceOptions(tier="all"))

    off, on, every = default_demand(live(0)), default_demand(live(1, enabled=True)), default_demand(live(2, enabled=True, fps=0))
    assert (off.corruption_fps, on.corruption_fps, every.corruption_fps) == (None, 5.0, 0.0)
    assert default_demand(live(3, enabled=True, fps=2.5)).corruption_fps == 2.5
    cpu = cpu_model(2.0)
    assert cpu is not None
    # 5 a second plus a key frame every 2 s (the planned GOP), every decoded picture with fps 0.
    assert cpu.cost(on, Tier.ALL) - cpu.cost(off, Tier.ALL) == pytest.approx(5.5 * 0.0723)
    assert cpu.scoring_cost(on, Tier.ALL) - cpu.scoring_cost(off, Tier.ALL) == pytest.approx(5.5 * 0.0723)
    assert cpu.cost(every, Tier.ALL) - cpu.cost(off, Tier.ALL) == pytest.approx(30 * 0.0723)
    assert cpu.cost(on, Tier.KEYFRAMES) - cpu.cost(off, Tier.KEYFRAMES) == pytest.approx(0.5 * 0.0723)  # no more than decoded
    small = default_demand(live(4, enabled=True), StreamDemand("s4", "h264", 960, 540, 25.0))
    assert small.analysed_fps(Tier.ALL) == 5.5 and cpu.scoring_cost(small, Tier.ALL) == pytest.approx(
        (25 * 0.8 + 77 + 5.5 * 72.3 / 4) / 1000)  # audio with clicks (the defaults); the CNN's work scales with pixels
    assert len(plan_cpu([live(10 + i) for i in range(4)], cpu)[0]) == 4
    admitted, refused = plan_cpu([live(20 + i, enabled=True) for i in range(4)], cpu)
    assert len(admitted) == 1 and len(refused) == 3, refused


def test_an_audio_only_stream_costs_its_audio_alone() -> None:
    """`video: false` decodes no picture: a live radio stream costs its audio analysis (77 ms a second with
    clicks), not the 1080p30 H.264 assumed of a stream without `expect` (0.383 cores): on one core 11 of them
    are admitted, not 2."""
    from engine.pool import cpu_model, plan_cpu

    radio = [StreamSpec(f"r{i}", f"udp://239.0.0.1:{5000 + i}", DETECTORS, SourceOptions(video=False))
             for i in range(12)]
    cpu = cpu_model(1.0)
    assert cpu is not None
    assert cpu.cost(default_demand(radio[0]), Tier.ALL) == pytest.approx(0.077)
    admitted, refused = plan_cpu(radio, cpu)
    assert len(admitted) == 11 and len(refused) == 1
    assert "needs 0.077 at full rate" in next(iter(refused.values())), refused


@pytest.mark.parametrize(
    ("exc", "device"),
    [
        (RuntimeError(CUDA_FAULT), True),
        (RuntimeError("CUDA error: device-side assert triggered"), True),
        (RuntimeError("CUDA error: unspecified launch failure"), True),
        (RuntimeError("GPU is lost"), True),
        (RuntimeError("CUDA error: uncorrectable ECC error encountered"), True),
        (RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm`"), True),
        (ValueError("wrapped"), False),
        (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), False),
        (RuntimeError("Expected all tensors to be on the same device, but found cuda:0 and cpu!"), False),
        (RuntimeError("cannot score this frame"), False),
        (KeyError("black"), False),
    ],
)
def test_is_device_error(exc: BaseException, device: bool) -> None:
    assert is_device_error(exc) is device


def test_is_device_error_follows_the_cause() -> None:
    try:
        try:
            raise RuntimeError(CUDA_FAULT)
        except RuntimeError as inner:
            raise ValueError("scoring failed") from inner
    except ValueError as outer:
        assert is_device_error(outer)


@pytest.mark.timeout(60)
def test_an_ordinary_scoring_error_still_ends_only_its_stream() -> None:
    sink = MemorySink()
    lost: list[BaseException] = []
    engine = Engine(sink, on_device_error=lost.append)
    break_scoring_for(engine, "bad")
    good = engine.add_stream(spec("good", duration=5))
    bad = engine.add_stream(spec("bad", duration=5))
    engine.run()
    assert lost == [] and not engine.device_lost
    assert bad.state == "error" and bad.errors == ["scoring failed: cannot score this frame"]
    assert good.state == "ended" and good.errors == [] and good.stats.frames_scored == FPS * 5


@pytest.mark.timeout(60)
def test_a_device_error_stops_the_engine_once_without_failing_streams_one_by_one() -> None:
    lost: list[BaseException] = []
    engine = Engine(MemorySink(), on_device_error=lost.append)
    count = fail_after(engine, calls=2)
    streams = [engine.add_stream(spec(n, duration=20)) for n in ("p", "q")]
    done = threading.Event()
    threading.Thread(target=lambda: (engine.run(), done.set()), daemon=True).start()
    assert done.wait(20), "the engine did not stop"
    assert len(lost) == 1 and str(lost[0]) == CUDA_FAULT and engine.device_lost
    assert count[0] == 2  # the lost device is not tried again, neither batched nor stream by stream
    for rt in streams:
        assert rt.errors == [] and rt.finished and rt.stats.frames_scored < FPS * 20


@pytest.mark.timeout(60)
def test_without_a_handler_a_device_error_is_an_ordinary_scoring_error() -> None:
    engine = Engine(MemorySink())
    fail_after(engine, calls=2)
    rt = engine.add_stream(spec("p", duration=5))
    engine.run()
    assert rt.state == "error" and rt.errors == [f"scoring failed: {CUDA_FAULT}"]
