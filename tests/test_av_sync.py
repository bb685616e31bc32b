"""A/V sync: the flash-and-beep pattern at known offsets, real programme with its audio moved by known
amounts, container timestamps that drift or jump, and the kernels underneath.

Offsets are positive when the audio is late. The content estimate must be within one video frame; on real
programme where the evidence is weak the detector must claim nothing rather than guess.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from detect_media import EngineRun, detector_configs, samples_dir
from media import check_json, flash_and_beep, shift_audio, write_clip

from engine.alerts import MemorySink
from engine.runner import Engine, StreamSpec
from engine.sources import SourceOptions
from kernels import sync as ksync

FPS = 25
FRAME = 1 / FPS
EARLY, LATE = 0.045, 0.125  # BT.1359 defaults


def _run(path: Path, **overrides: dict) -> tuple[EngineRun, dict]:
    sink = MemorySink()
    eng = Engine(sink)
    rt = eng.add_stream(StreamSpec("s", str(path), detector_configs(**overrides), SourceOptions(pace="fast")))
    eng.run()
    det = next(d for d in rt.detectors if d.NAME == "av_sync")
    resolved = [e for e in sink.events if e.status.value == "resolved"]
    run = EngineRun(resolved, list(sink.events), rt.stats.frames_scored, rt.stats.audio_seconds, rt.stats.media_end,
                    list(rt.errors), rt.counters.decode_errors, rt.audio.meter.integrated)
    return run, det.summary()


def _pattern(tmp: Path, offset: float, flash_frames: int = 1, seconds: float = 12.0) -> Path:
    luma, audio = flash_and_beep(offset, fps=FPS, flash_frames=flash_frames)
    return write_clip(tmp / f"sync_{offset:+.3f}_{flash_frames}.mkv", luma_fn=luma, audio_fn=audio, seconds=seconds,
                      fps=FPS, audio_codec="pcm_s16le")


# -- kernels ---------------------------------------------------------------------------------------------


def test_xcorr_finds_the_lag_with_its_sign() -> None:
    rng = np.random.default_rng(3)
    lag, t = 50, 1000
    v = torch.from_numpy((rng.random((3, t + 2 * lag)) > 0.97).astype(np.float64))
    a = torch.stack([v[0, lag - 20 : lag - 20 + t], v[1, lag + 13 : lag + 13 + t], v[2, lag : lag + t]])
    r, ea, ev = ksync.xcorr_terms(a, v, lag)
    idx, peak, rival = ksync.peak_and_rival(ksync.pearson(r, ea, ev), 3)
    assert (idx - lag).tolist() == [20, -13, 0]  # a[t] = v[t - 20]: audio 20 steps late
    assert torch.allclose(peak, torch.ones(3, dtype=torch.float64)) and (rival < 0.3).all()


def test_a_flash_is_one_visual_event_however_long() -> None:
    black = torch.full((1, 40, 64), 16, dtype=torch.uint8)
    white = torch.full((1, 40, 64), 235, dtype=torch.uint8)
    for frames in (1, 2, 3):
        seq = torch.cat([black] * 5 + [white] * frames + [black] * 5)
        nov, _ = ksync.visual_novelty(seq)
        assert nov[5].item() == pytest.approx(219.0)
        assert (nov[:5] == 0).all() and (nov[6:] == 0).all(), (frames, nov.tolist())


def test_visual_novelty_carries_history_across_calls() -> None:
    rng = np.random.default_rng(5)
    seq = torch.from_numpy(rng.integers(0, 255, (12, 36, 64), dtype=np.uint8))
    whole, _ = ksync.visual_novelty(seq)
    first, hist = ksync.visual_novelty(seq[:5])
    second, _ = ksync.visual_novelty(seq[5:], hist)
    assert torch.allclose(torch.cat([first, second]), whole)



def test_novelty_of_many_streams_in_one_pass_equals_each_alone() -> None:
    """The scoring step's novelty family scores all streams of a tick together; each stream's pictures are
    compared only with its own, across ticks, as if it were scored alone; a forgotten stream starts afresh."""
    from engine.detectors.base import MetricRequest
    from engine.media import VideoFrame
    from engine.scoring import ScoringStep, VideoWork

    rng = np.random.default_rng(7)
    seqs = {f"s{i}": torch.from_numpy(rng.integers(0, 255, (n, 36, 64), dtype=np.uint8)) for i, n in enumerate((11, 4, 9))}
    seqs["s1"][2] = seqs["s0"][3]  # equal to another stream's picture: must not make it old
    req = MetricRequest("novelty", (("depth", 8), ("pool", 4)))
    step = ScoringStep("cpu")
    cuts = {"s0": (0, 5, 11), "s1": (0, 1, 4), "s2": (0, 6, 9)}
    got: dict[str, list[float]] = {k: [] for k in seqs}
    for tick in range(2):
        works = []
        for sid, seq in seqs.items():
            a, b = cuts[sid][tick], cuts[sid][tick + 1]
            frames = [VideoFrame(pts=i / 25, duration=0.04, luma=None, small=seq[i]) for i in range(a, b)]
            works.append(VideoWork(sid, frames, None, None, [req]))
        for m in step.score_video(works):
            got[m.stream].extend(m.get(req, "novelty").tolist())
    for sid, seq in seqs.items():
        alone, _ = ksync.visual_novelty(seq)
        np.testing.assert_allclose(got[sid], alone.numpy(), rtol=1e-6, err_msg=sid)
    step.forget("s0")
    again = step.score_video([VideoWork("s0", [VideoFrame(pts=0, duration=0.04, luma=None, small=seqs["s0"][5])], None, None, [req])])
    assert again[0].get(req, "novelty").tolist() == [0.0]  # a stream start: nothing to be new against

def test_audio_onsets_rise_only_and_resume() -> None:
    p = torch.tensor([[1e-6, 1e-6, 1e-2, 1e-2, 1e-6, 1e-2]], dtype=torch.float64)
    rise, last = ksync.audio_onsets(p)
    assert rise[0].tolist() == pytest.approx([0, 0, 4, 0, 0, 4])
    r1, prev = ksync.audio_onsets(p[:, :3])
    r2, _ = ksync.audio_onsets(p[:, 3:], prev)
    assert torch.allclose(torch.cat([r1, r2], 1), rise)


# -- the sync pattern ------------------------------------------------------------------------------------

OFFSETS = [-0.2, -0.1, -0.02, 0.0, 0.06, 0.1, 0.137, 0.2, 0.3]


@pytest.mark.parametrize("offset", OFFSETS)
def test_sync_pattern_offset_within_a_frame(offset: float, tmp_path: Path) -> None:
    run, summary = _run(_pattern(tmp_path, offset))
    print(f"\n  flash/beep {offset * 1000:+.0f} ms: measured {summary['offset']} (confidence {summary['confidence']})")
    assert summary["offset"] is not None and abs(summary["offset"] - offset) <= FRAME, summary
    assert summary["confidence"] > 0.8 and summary["overall"]["matches"] >= 8
    sync = run.of("av_sync")
    if offset < -EARLY or offset > LATE:
        assert len(sync) == 1, run.table()
        assert abs(sync[0].value - offset) <= FRAME and sync[0].details["kind"] == "content"
        assert sync[0].start < 2.0 and sync[0].end == pytest.approx(12.0, abs=FRAME)
    else:
        assert not sync, run.table()


def test_sync_pattern_with_longer_flashes(tmp_path: Path) -> None:
    _, summary = _run(_pattern(tmp_path, 0.2, flash_frames=3))
    assert abs(summary["offset"] - 0.2) <= FRAME, summary


def test_sync_fault_that_starts_mid_stream(tmp_path: Path) -> None:
    # In sync for 12 s, then the audio slips 200 ms late for the rest: the event starts within the window
    # the estimates need to see it, and carries the new offset.
    luma, in_sync = flash_and_beep(0.0, fps=FPS)
    _, late = flash_and_beep(0.2, fps=FPS)
    split = 12 * 48_000

    def audio(a: int, b: int) -> np.ndarray:
        out = np.concatenate([in_sync(a, min(b, split)), late(max(a, split), b)], axis=1)
        return out[:, : b - a]

    path = write_clip(tmp_path / "slip.mkv", luma_fn=luma, audio_fn=audio, seconds=30, fps=FPS, audio_codec="pcm_s16le")
    run, _ = _run(path)
    sync = run.of("av_sync")
    assert len(sync) == 1, run.table()
    assert abs(sync[0].value - 0.2) <= FRAME
    assert 12.0 <= sync[0].start <= 12.0 + 10.0, sync[0]


def test_check_json_reports_offset_and_confidence(tmp_path: Path) -> None:
    report = check_json(_pattern(tmp_path, 0.16))
    sync = report["av_sync"]
    assert abs(sync["offset"] - 0.16) <= FRAME and sync["confidence"] > 0.8, sync
    assert sync["timestamps"]["gaps"] == 0 and abs(sync["timestamps"]["max_drift"]) < 0.002
    assert report["summary"].get("av_sync") == 1  # 160 ms late is beyond the 125 ms default


# -- real programme --------------------------------------------------------------------------------------

REAL = ["Megamind.avi", "cup.mp4", "box.mp4"]


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = {}
    d = tmp_path_factory.mktemp("real")
    for name in REAL:
        src = samples_dir() / name
        if not src.exists():
            continue
        for shift in (0.0, -0.2, 0.15, 0.3):
            out[name, shift] = _run(shift_audio(src, d / f"{name}_{shift:+.2f}.mkv", shift))
    if not out:
        pytest.skip("sample clips not fetched (tests/fetch_samples.sh)")
    return out


@pytest.mark.parametrize("name", REAL)
def test_real_programme_right_or_silent(real_runs: dict, name: str) -> None:
    if (name, 0.0) not in real_runs:
        pytest.skip(f"{name} not fetched")
    for shift in (0.0, -0.2, 0.15, 0.3):
        run, summary = real_runs[name, shift]
        fps_frame = 1 / 23.976 if name == "Megamind.avi" else 1 / 25
        est = summary["overall"]
        print(f"\n  {name} audio moved {shift * 1000:+.0f} ms: estimate {est['offset'] if est else None} "
              f"(confidence {summary['confidence']}, {est['matches'] if est else 0} matches) -> "
              f"{'claimed' if summary['offset'] is not None else 'not claimed'}")
        if summary["offset"] is not None:
            assert abs(summary["offset"] - shift) <= fps_frame, (name, shift, summary)
        for e in run.of("av_sync"):
            assert e.details["kind"] == "content" and abs(e.value - shift) <= fps_frame, (name, shift, run.table())
        if shift == 0.0:
            assert not run.of("av_sync"), run.table()


# -- container timestamps --------------------------------------------------------------------------------

def _ts_clip(tmp: Path, name: str, clock, container: str = ".mkv") -> Path:
    codec = "pcm_s16le" if container == ".mkv" else "aac"
    return write_clip(tmp / f"ts_{name}{container}", seconds=10, audio_codec=codec, audio_clock=clock)


@pytest.mark.parametrize("container", [".mkv", ".ts"])
def test_audio_timestamp_jump_is_an_offset(tmp_path: Path, container: str) -> None:
    # The audio timestamps jump 60 ms ahead at 4 s with no audio missing: from there a player that clocks
    # audio by its samples plays it 60 ms earlier than the timestamps say.
    run, summary = _run(_ts_clip(tmp_path, "jump", lambda t: t + (0.06 if t >= 4 else 0.0), container))
    sync = run.of("av_sync")
    assert len(sync) == 1, run.table()
    e = sync[0]
    assert e.details["kind"] == "timestamps" and e.value == pytest.approx(-0.06, abs=0.002)
    assert abs(e.start - 4.0) <= 0.03 and e.end == pytest.approx(10.0, abs=0.03)
    assert summary["timestamps"]["drift"] == pytest.approx(-0.06, abs=0.002)


def test_audio_timestamp_drift(tmp_path: Path) -> None:
    # Timestamps that run 1 % fast: the sample clock falls behind by 10 ms a second; the event starts when
    # the drift passes 45 ms (4.5 s).
    run, summary = _run(_ts_clip(tmp_path, "drift", lambda t: 1.01 * t, ".ts"))
    (e,) = run.of("av_sync")
    assert e.details["kind"] == "timestamps" and e.value == pytest.approx(-0.1, abs=0.003)
    assert abs(e.start - 4.5) <= 0.05
    assert summary["timestamps"]["max_drift"] == pytest.approx(-0.1, abs=0.003)


def test_audio_only_timestamp_drift_is_measured_not_alerted(tmp_path: Path) -> None:
    # The same drift with no picture: nothing for the sound to be out of step with, so no A/V event (a
    # damaged audio-only file once raised "audio early"); the drift is still measured and reported.
    clip = write_clip(tmp_path / "drift_audio_only.ts", seconds=10, codec=None, audio_codec="aac", audio_clock=lambda t: 1.01 * t)
    run, summary = _run(clip)
    assert run.frames == 0 and run.audio_seconds > 9.9
    assert not run.of("av_sync"), run.table()
    assert summary["timestamps"]["max_drift"] == pytest.approx(-0.1, abs=0.003)


def test_a_real_audio_gap_is_counted_not_an_offset(tmp_path: Path) -> None:
    # 300 ms of audio missing (timestamps jump with no samples): the audio clock re-synchronises, so the
    # samples after the gap play where their timestamps say. A gap, not a sync fault.
    run, summary = _run(_ts_clip(tmp_path, "gap", lambda t: t + (0.3 if t >= 4 else 0.0)))
    assert not run.of("av_sync"), run.table()
    assert summary["timestamps"]["gaps"] == 1 and abs(summary["timestamps"]["max_drift"]) < 0.002


def test_clean_timestamps_raise_nothing(tmp_path: Path) -> None:
    for container in (".mkv", ".ts"):
        run, summary = _run(_ts_clip(tmp_path, "clean", None, container))
        assert not run.of("av_sync") and summary["timestamps"]["gaps"] == 0, run.table()
        assert abs(summary["timestamps"]["max_drift"]) < 0.002


def test_sparse_tier_judges_timestamps_only(tmp_path: Path) -> None:
    sink = MemorySink()
    eng = Engine(sink)
    path = _pattern(tmp_path, 0.3)
    dets = detector_configs(glitch={"enabled": False})
    rt = eng.add_stream(StreamSpec("s", str(path), dets, SourceOptions(pace="fast", tier="keyframes")))
    eng.run()
    det = next(d for d in rt.detectors if d.NAME == "av_sync")
    assert det.summary()["estimates"] == 0  # no content claim from key frames alone
    assert not [e for e in sink.events if e.type == "av_sync"]


@pytest.mark.parametrize("shape,pool", [((40, 180, 320), 4), ((3, 37, 61), 4), ((5, 36, 64), 12), ((2, 3, 3), 4)])
def test_pooled_planes_equal_avg_pool(shape: tuple[int, int, int], pool: int) -> None:
    """The integer pooling gives avg_pool2d's floats exactly, remainders cut off the same way."""
    x = torch.from_numpy(np.random.default_rng(3).integers(0, 256, shape, dtype=np.uint8))
    ref = torch.nn.functional.avg_pool2d(x.to(torch.float32).unsqueeze(1), pool).squeeze(1) if min(shape[1:]) >= pool else None
    got = ksync.pool_planes(x, pool)
    if ref is None:
        assert got.shape == (shape[0], 0, 0)
    else:
        assert torch.equal(got, ref)
