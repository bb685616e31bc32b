"""Every detector finds its fault, with start and end within one frame (video) or 10 ms (audio), and raises
nothing on the clean parts: on decoded synthetic frames, through H.264/AAC in MP4 and MPEG-TS, in the hard
cases of each detector (freezes made before a low bit rate encoder, slow motion, clocks and logos), and for
the onset/recovery rules.

All media is made here: pictures and sound from engine.sources.synthetic.Generator (or small frame makers in
detect_media), encoded with PyAV.
"""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
from detect_media import (
    AUDIO_TOL,
    FAULT_TO_TYPE,
    EngineRun,
    VideoCodec,
    detector_configs,
    encode_clip,
    encode_synthetic,
    ffmpeg_detect,
    ffmpeg_intervals,
    log_timing,
    moving_object,
    remux,
    run_engine,
    slow_pan,
    stream_starts,
    synthetic_frames,
    synthetic_url,
    with_clock,
    with_logo,
)

from engine.sources.synthetic import small_of
from kernels.difference import changed_fraction, mafd

FPS = 25
FRAME = 1.0 / FPS
AUDIO_KINDS = {"silence", "clipping", "loudness", "true_peak", "dropout", "phase", "missing_channel", "dc_offset", "clicks"}


def _tol(kind: str) -> float:
    return AUDIO_TOL if kind in AUDIO_KINDS else FRAME + 1e-6


def _on_grid(t: float) -> float:
    """Media time of the first frame shown at or after t."""
    return math.ceil(t * FPS - 1e-9) / FPS


def _assert_one(run: EngineRun, kind: str, start: float, end: float, case: str, tol: float | None = None) -> None:
    """Exactly one event of `kind`, none of any other type, edges within tolerance."""
    tol = _tol(kind) if tol is None else tol
    assert run.errors == [], run.errors
    # Clipping at full scale is also over the true-peak ceiling, over the same span: a documented companion.
    events = [e for e in run.events if not (kind == "clipping" and e.type == "true_peak")]
    assert [e.type for e in events] == [kind], f"{case}: expected one {kind} event, got {run.table()}"
    e = events[0]
    log_timing(case, kind, e.start - start, e.end - end)
    assert abs(e.start - start) <= tol, f"{case}: {kind} starts at {e.start:.4f}, expected {start:.4f} (±{tol * 1000:.0f} ms)"
    assert abs(e.end - end) <= tol, f"{case}: {kind} ends at {e.end:.4f}, expected {end:.4f} (±{tol * 1000:.0f} ms)"
    assert e.duration == pytest.approx(e.end - e.start, abs=1e-5)


# ================================================================================================
# 1. Decoded synthetic frames: one fault kind per stream
# ================================================================================================
# (fault spec, stream duration, expected start, expected end). Durations follow configs/demo.yaml where a
# fault there gives exactly its own event; audio faults start off the 5 ms analysis grid on purpose.
SYNTHETIC = {
    "black": ("black@2.01:4", 8, _on_grid(2.01), _on_grid(6.01)),
    "freeze": ("freeze@2:5", 9, 2.0, 7.0),  # the frame at 2.00 is the picture that stays: the freeze starts there
    "blocky": ("blocky@2:4", 8, 2.0, 6.0),
    "blur": ("blur@2:4", 7, 2.0, 6.0),
    "glitch": ("glitch@2:0.5", 5, 2.0, 2.4 + FRAME),  # bad frames at 2.0, 2.2, 2.4 (every 0.2 s)
    "silence": ("silence@2.013:5", 9, 2.013, 7.013),
    "clipping": ("clipping@2.0137:1:21", 5, 2.0137, 3.0137),  # a +1 dBFS tone, flat tops from the first peak
    "loudness": ("loudness@2.0021:4:12", 8, 2.0021, 6.0021),
    "nosignal": ("nosignal@2:3", 7, 2.0, 5.0),  # last frame before the gap ends at 2.0, next one at 5.0
    "dropout": ("dropout@2.0131:0.15", 5, 2.0131, 2.1631),
    "phase": ("phase@2.0023:3", 7, 2.0023, 5.0023),
    "mute": ("mute@2.0023:3", 7, 2.0023, 5.0023),
    "dc": ("dc@2.0023:3", 7, 2.0023, 5.0023),
    "clicks": ("clicks@2.0013:0.6", 5, 2.0013, 2.5013 + 1 / 48_000),  # clicks at 2.0013, 2.2513, 2.5013
}


@pytest.mark.parametrize("fault", list(SYNTHETIC))
def test_synthetic_fault_is_found_exactly(fault: str) -> None:
    spec, duration, start, end = SYNTHETIC[fault]
    run = run_engine(synthetic_url([spec], duration=duration))
    _assert_one(run, FAULT_TO_TYPE[fault], start, end, f"synthetic {spec}")
    assert run.frames == round(duration * FPS) - (3 * FPS if fault == "nosignal" else 0)


def test_synthetic_clean_stream_raises_nothing() -> None:
    run = run_engine(synthetic_url([], duration=12))
    assert run.events == [] and run.errors == []
    assert run.frames == 12 * FPS
    assert run.audio_seconds == pytest.approx(12.0, abs=0.006)


def test_long_clipping_is_also_too_loud() -> None:
    # Documented cross-trigger, not a bug: a tone pushed 21 dB into clipping is about -3 LUFS, 20 LU above
    # the target, so clipping that lasts the loudness onset (2 s) also raises loudness, over the same span.
    # The true peak of the clipped tone is over the -1 dBTP ceiling over the same span too.
    run = run_engine(synthetic_url(["clipping@2:3:21"], duration=7))
    assert run.types() == ["clipping", "loudness", "true_peak"], run.table()
    for e in run.events:
        assert abs(e.start - 2.0) <= AUDIO_TOL and abs(e.end - 5.0) <= AUDIO_TOL, run.table()


def test_glitch_burst_raises_only_glitch() -> None:
    run = run_engine(synthetic_url(["glitch@2:2"], duration=6))
    _assert_one(run, "glitch", 2.0, 3.8 + FRAME, "synthetic glitch@2:2")


# ================================================================================================
# 2. Encoded clips: H.264 + AAC in MP4, the same streams in MPEG-TS
# ================================================================================================
# One clip, every fault made on the pictures/sound before the encoder, clean stretches in between.
ENCODED_FAULTS = [
    "black@0.8:2.4",
    "freeze@4:2.4",
    "blocky@7.2:1.6",
    "blur@9.6:3.4",
    "glitch@13.8:0.5",
    "silence@1.0:2.4",
    "clipping@4.6:0.8:21",
    "loudness@8:3:12",
]
ENCODED_DURATION = 15.2
ENCODED_EXPECTED = {  # type -> (start, end) in the timeline of the encoder's input
    "black": (0.8, 3.2),
    "freeze": (4.0, 6.4),
    "blockiness": (7.2, 8.8),
    "blur": (9.6, 13.0),
    "glitch": (13.8, 14.2 + FRAME),
    "silence": (1.0, 3.4),
    "clipping": (4.6, 5.4),
    "true_peak": (4.6, 5.4),  # the clipped tone is over the true-peak ceiling too
    "loudness": (8.0, 11.0),
}


@pytest.fixture(scope="module")
def encoded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[EngineRun, float]]:
    """{container: (engine run, offset)}; offset = where the encoder's time 0 lies in the file's media time
    (MPEG-TS keeps the AAC encoder delay: its audio starts 1024 samples before the video)."""
    d = tmp_path_factory.mktemp("encoded")
    url = synthetic_url(ENCODED_FAULTS, duration=ENCODED_DURATION)
    mp4 = encode_synthetic(d / "faults.mp4", url, VideoCodec.h264(1_500_000, 50))
    ts = remux(mp4, d / "faults.ts", format="mpegts")
    out = {}
    for name, path in (("mp4", mp4), ("ts", ts)):
        starts = stream_starts(path)
        out[name] = (run_engine(path), starts["video"] - starts["origin"])
    return out


def _encoded_cases() -> list:
    cases = []
    for container in ("mp4", "ts"):
        for kind in ENCODED_EXPECTED:
            cases.append(pytest.param(container, kind, id=f"{container}-{kind}"))
    return cases


@pytest.mark.parametrize("container,kind", _encoded_cases())
def test_encoded_fault_is_found_exactly(encoded: dict, container: str, kind: str) -> None:
    run, offset = encoded[container]
    start, end = ENCODED_EXPECTED[kind]
    got = run.of(kind)
    assert len(got) == 1, f"{container}: expected one {kind} event, got {run.table()}"
    e = got[0]
    tol = _tol(kind)
    log_timing(f"{container} h264/aac", kind, e.start - (start + offset), e.end - (end + offset))
    assert abs(e.start - (start + offset)) <= tol, f"{container}: {kind} {e.start:.4f}..{e.end:.4f}, expected {start + offset:.4f}..{end + offset:.4f}"
    assert abs(e.end - (end + offset)) <= tol, f"{container}: {kind} {e.start:.4f}..{e.end:.4f}, expected {start + offset:.4f}..{end + offset:.4f}"


@pytest.mark.parametrize("container", ["mp4", "ts"])
def test_encoded_clip_raises_nothing_else(encoded: dict, container: str) -> None:
    run, offset = encoded[container]
    assert run.errors == [] and run.decode_errors == 0
    assert run.frames == round(ENCODED_DURATION * FPS)
    allowed = set(ENCODED_EXPECTED)
    assert {e.type for e in run.events} <= allowed, run.table()
    assert all(len(run.of(k)) <= 1 for k in allowed), run.table()
    if container == "ts":
        assert offset == pytest.approx(1024 / 48_000, abs=1e-3)  # the AAC encoder delay
    else:
        assert offset == 0.0


# ------------------------------------------------------------------------------------------------
# Freeze made before a low bit rate encoder: key frames refresh the still picture inside the freeze
# ------------------------------------------------------------------------------------------------
# What FFmpeg freezedetect (-60 dB, d=2) reported on these clips when the tests were written (FFmpeg 5.1,
# x264 veryfast, 2 threads): for 300 kb/s GOP 50 freeze@2.4:4 it found 4.0..6.0 only (the P-frames after the
# freeze keep refining the picture, and the key frames at 4.0 and 6.0 start over), i.e. 1.6 s late and
# 0.4 s short; for GOP 25 nothing at all. The test prints what this FFmpeg reports.
LOW_RATE = [
    pytest.param(300_000, 50, 2.4, id="300k-gop50-freeze2.4"),
    pytest.param(300_000, 50, 3.96, id="300k-gop50-freeze-just-before-key"),
    pytest.param(300_000, 25, 2.4, id="300k-gop25-freeze2.4"),
    pytest.param(
        300_000, 25, 4.04, id="300k-gop25-freeze-right-after-key",
        marks=pytest.mark.xfail(strict=True, reason="a freeze starting on the P-frame right after a key frame is "
                                "reported 3 frames late (4.16 for 4.04): the encoder keeps refining the first still "
                                "pictures (4.08 and 4.16 each change ~2 % of the small plane by > 6 against the "
                                "anchor), so the anchor only holds from 4.16 on"),
    ),
    pytest.param(
        200_000, 50, 2.4, id="200k-gop50-freeze2.4",
        marks=pytest.mark.xfail(strict=True, reason="at 200 kb/s the key frame at 4.0 refreshes the still picture "
                                "just beyond the coded-noise limits (0.207 % of the small plane changed by > 6, limit "
                                "0.2 %; MAFD 1.46): it ends the first 1.6 s of freeze, shorter than the 2 s onset, and "
                                "the event starts at the key frame, 1.6 s late"),
    ),
]


@pytest.mark.parametrize("bit_rate,gop,start", LOW_RATE)
def test_freeze_before_low_rate_encoder_found_from_first_frame(tmp_path, bit_rate: int, gop: int, start: float, capsys) -> None:
    duration = 4.0
    url = synthetic_url([f"freeze@{start}:{duration}"], duration=start + duration + 1.6)
    path = encode_synthetic(tmp_path / "freeze.mp4", url, VideoCodec.h264(bit_rate, gop), audio=False)
    keys = [k * gop / FPS for k in range(20) if start < k * gop / FPS < start + duration]
    assert keys, "the clip must have a key frame inside the freeze"
    run = run_engine(path)
    if shutil.which("ffmpeg"):
        theirs = ffmpeg_intervals(ffmpeg_detect(path, vf="freezedetect=d=2"), "freeze")
        with capsys.disabled():
            print(f"\n  [{bit_rate // 1000}k GOP {gop} freeze {start}..{start + duration}] framewatch: {run.table()}; "
                  f"FFmpeg freezedetect: {theirs or 'nothing'}")
    _assert_one(run, "freeze", start, start + duration, f"h264 {bit_rate // 1000}k gop{gop} freeze@{start}")


# ------------------------------------------------------------------------------------------------
# Slow real motion is not a freeze
# ------------------------------------------------------------------------------------------------
def _coded_rule_says_frozen(frames: list[np.ndarray]) -> float:
    """Share of consecutive frame pairs that the coded-noise rule (MAFD <= 1.5 and <= 0.2 % of the small
    plane changed by > 6) would call frozen if it only compared neighbours: the motion is too slow to see
    from one frame to the next."""
    small = torch.stack([small_of(torch.from_numpy(f)) for f in frames])
    d = mafd(small[1:], small[:-1]).numpy()
    c = changed_fraction(small[1:], small[:-1], 6).numpy()
    return float(((d <= 1.5) & (c <= 0.002)).mean())


SLOW = [
    pytest.param("pan", 0.05, id="whole-picture-pan-1.25px-per-s"),
    pytest.param("object", (48, 6), id="48px-object-1px-every-6-frames"),
    pytest.param("object", (32, 2), id="32px-object-1px-every-2-frames"),
]


@pytest.mark.parametrize("what,param", SLOW)
def test_slow_motion_is_not_a_freeze(tmp_path, what: str, param) -> None:
    frame = slow_pan(param) if what == "pan" else moving_object(*param)
    n = 10 * FPS
    frames = [frame(i) for i in range(n)]
    # The hard case: seen frame to frame, the picture looks frozen most of the time.
    assert _coded_rule_says_frozen(frames) >= 0.5
    path = encode_clip(tmp_path / "slow.mp4", lambda i: frames[i], n, FPS, video=VideoCodec.h264(1_500_000, 50))
    run = run_engine(path)
    assert run.errors == []
    assert run.of("freeze") == [], f"slow motion reported as frozen: {run.table()}"
    assert run.events == [], run.table()


# ------------------------------------------------------------------------------------------------
# Region masks: a running clock, a logo
# ------------------------------------------------------------------------------------------------
CLOCK_BOX = (544, 8, 80, 32)  # x, y, w, h in a 640x360 picture: top-right corner
CLOCK_IGNORE = {"x": 0.84, "y": 0.0, "w": 0.16, "h": 0.125}
LOGO_BOX = (512, 0, 128, 54)  # 3 % of the picture: more than blackdetect's 2 % allowance
LOGO_IGNORE = {"x": 0.8, "y": 0.0, "w": 0.2, "h": 0.15}


@pytest.fixture(scope="module")
def clock_clip(tmp_path_factory: pytest.TempPathFactory):
    url = synthetic_url(["freeze@2:3.2"], duration=7)
    base, _, n, fps = synthetic_frames(url)
    path = tmp_path_factory.mktemp("clock") / "clock.mp4"
    return encode_clip(path, with_clock(base, CLOCK_BOX), n, fps, video=VideoCodec.h264(1_500_000, 50))


@pytest.fixture(scope="module")
def logo_clip(tmp_path_factory: pytest.TempPathFactory):
    url = synthetic_url(["black@2:3.2"], duration=7)
    base, _, n, fps = synthetic_frames(url)
    path = tmp_path_factory.mktemp("logo") / "logo.mp4"
    return encode_clip(path, with_logo(base, LOGO_BOX), n, fps, video=VideoCodec.h264(1_500_000, 50))


def test_freeze_behind_a_running_clock_needs_the_ignore_region(clock_clip) -> None:
    plain = run_engine(clock_clip)
    assert plain.of("freeze") == [], f"the clock moves, so the picture is not frozen: {plain.table()}"
    masked = run_engine(clock_clip, detector_configs(freeze={"ignore": [CLOCK_IGNORE]}))
    _assert_one(masked, "freeze", 2.0, 5.2, "freeze behind a clock, clock ignored")


def test_black_under_a_logo_needs_the_ignore_region(logo_clip) -> None:
    plain = run_engine(logo_clip)
    assert plain.of("black") == [], f"97 % black is not black: {plain.table()}"
    masked = run_engine(logo_clip, detector_configs(black={"ignore": [LOGO_IGNORE]}))
    black = masked.of("black")
    assert len(black) == 1, masked.table()
    log_timing("black under a logo, logo ignored", "black", black[0].start - 2.0, black[0].end - 5.2)
    assert abs(black[0].start - 2.0) <= FRAME + 1e-6 and abs(black[0].end - 5.2) <= FRAME + 1e-6, masked.table()


def test_black_under_a_static_logo_is_not_also_a_freeze(logo_clip) -> None:
    masked = run_engine(logo_clip, detector_configs(black={"ignore": [LOGO_IGNORE]}))
    assert masked.types() == ["black"], masked.table()


# ------------------------------------------------------------------------------------------------
# Onset and recovery
# ------------------------------------------------------------------------------------------------
def test_black_shorter_than_onset_raises_nothing() -> None:
    run = run_engine(synthetic_url(["black@2:1.5"], duration=5))
    assert run.events == [], run.table()


@pytest.mark.parametrize(
    "recovery,expected",
    [(0.5, [(2.0, 8.3)]), (0.1, [(2.0, 5.0), (5.3, 8.3)])],
)
def test_two_blacks_and_the_recovery_time(recovery: float, expected: list[tuple[float, float]]) -> None:
    run = run_engine(synthetic_url(["black@2:3", "black@5.3:3"], duration=10), detector_configs(black={"recovery": recovery}))
    assert run.types() == ["black"] * len(expected), run.table()
    got = sorted((e.start, e.end) for e in run.events)
    for (s, e), (es, ee) in zip(got, expected, strict=True):
        assert abs(s - es) <= FRAME + 1e-6 and abs(e - ee) <= FRAME + 1e-6, run.table()


@pytest.mark.parametrize(
    "fault,kind",
    [("black@5:3", "black"), ("freeze@5:3", "freeze"), ("silence@5:3", "silence"), ("loudness@5:3:12", "loudness")],
)
def test_fault_running_at_end_of_input_resolves_there(fault: str, kind: str) -> None:
    run = run_engine(synthetic_url([fault], duration=7.4))
    _assert_one(run, kind, 5.0, 7.4, f"synthetic {fault} until end of input")
