"""Agreement with FFmpeg's own detectors on clips whose decoded frames and samples are exactly the ones made.

A lossless clip (H.264 qp 0, PCM audio, in Matroska) carries a black stretch, a freeze (exactly repeated
frames), a silence and level changes. FFmpeg's blackdetect / freezedetect / silencedetect (d=2) and ebur128
run on it once; `framewatch check --json` once; their intervals must agree within one frame (video) or 10 ms
(audio), integrated loudness within 0.2 LU. The same loudness check runs on Megamind.avi's real soundtrack.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from detect_media import (
    AUDIO_TOL,
    VideoCodec,
    decoded_luma,
    encode_synthetic,
    ffmpeg_detect,
    ffmpeg_integrated_lufs,
    ffmpeg_intervals,
    log_timing,
    needs_ffmpeg,
    run_check_cli,
    sample_or_skip,
    sample_reports,
    synthetic_frames,
    synthetic_url,
)

pytestmark = [pytest.mark.ffmpeg, needs_ffmpeg]

FPS = 25
FRAME = 1.0 / FPS
FAULTS = [
    "black@2:3",
    "freeze@6.5:3",  # off the frame grid: the first repeated picture is the frame at 6.52
    "silence@3.0123:3",  # off the 5 ms analysis grid
    "loudness@10:2:12",  # level changes for the integrated loudness: +12 dB for 2 s ...
    "loudness@12.5:1.5:-12",  # ... and -12 dB for 1.5 s
]
DURATION = 14.5
LU_TOL = 0.1  # the agreement target with ebur128


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("peer")
    url = synthetic_url(FAULTS, duration=DURATION)
    path = encode_synthetic(d / "lossless.mkv", url, VideoCodec.h264_lossless(), audio_codec="pcm_s16le")
    log = ffmpeg_detect(path, vf="blackdetect=d=2,freezedetect=d=2", af="silencedetect=d=2,ebur128")
    rc, reports, stderr = run_check_cli(path)
    assert len(reports) == 1, stderr
    return {"url": url, "path": path, "log": log, "rc": rc, "report": reports[0]}


def _ours(peer: dict, kind: str) -> list[tuple[float, float]]:
    return sorted((e["start"], e["end"]) for e in peer["report"]["events"] if e["type"] == kind)


def test_clip_is_lossless(peer: dict) -> None:
    frame, _, n, _ = synthetic_frames(peer["url"])
    keep = (0, 49, 50, 124, 125, 162, 163, 200, 237, 238, n - 1)  # clean, black and freeze edges, ...
    count, decoded = decoded_luma(peer["path"], keep)
    assert count == n
    for i in keep:
        np.testing.assert_array_equal(decoded[i], frame(i))


@pytest.mark.parametrize("kind,tol", [("black", FRAME + 1e-6), ("freeze", FRAME + 1e-6), ("silence", AUDIO_TOL)])
def test_intervals_match_ffmpeg(peer: dict, kind: str, tol: float) -> None:
    theirs = ffmpeg_intervals(peer["log"], kind)
    if kind == "freeze":
        # freezedetect also calls the black stretch frozen (identical black frames); framewatch leaves flat
        # pictures to the black detector by design. Compare the real freeze only.
        blacks = ffmpeg_intervals(peer["log"], "black")
        theirs = [iv for iv in theirs if not any(abs(iv[0] - b[0]) < tol and abs((iv[1] or 0) - b[1]) < tol for b in blacks)]
    ours = _ours(peer, kind)
    assert len(theirs) == 1 and theirs[0][1] is not None, f"FFmpeg {kind}: {theirs}"
    assert len(ours) == 1, f"framewatch {kind}: {ours}; all events: {peer['report']['events']}"
    (s, e), (fs, fe) = ours[0], theirs[0]
    log_timing("vs FFmpeg (lossless clip)", kind, s - fs, e - fe)
    assert abs(s - fs) <= tol and abs(e - fe) <= tol, f"{kind}: framewatch {s:.4f}..{e:.4f}, FFmpeg {fs:.4f}..{fe:.4f}"


def test_ffmpeg_sees_the_faults_where_they_were_made(peer: dict) -> None:
    # The reference itself: FFmpeg finds the faults exactly where the frames/samples were changed.
    assert ffmpeg_intervals(peer["log"], "black") == [(2.0, 5.0)]
    s, e = ffmpeg_intervals(peer["log"], "silence")[0]
    assert s == pytest.approx(3.0123, abs=2e-5) and e == pytest.approx(6.0123, abs=2e-5)


def test_only_the_made_faults_are_reported(peer: dict) -> None:
    report = peer["report"]
    assert report["errors"] == []
    assert peer["rc"] == 1  # faults found
    # The +12 dB stretch is also a loudness fault (-8 LUFS against a -17 LUFS limit); nothing else is there.
    assert sorted(report["summary"].items()) == [("black", 1), ("freeze", 1), ("loudness", 1), ("silence", 1)]


def test_integrated_loudness_matches_ebur128_on_level_changes(peer: dict) -> None:
    ours = peer["report"]["audio"]["integrated_lufs"]
    theirs = ffmpeg_integrated_lufs(peer["log"])
    print(f"\n  integrated loudness, generated signal: framewatch {ours} LUFS, FFmpeg ebur128 {theirs} LUFS")
    assert ours is not None
    assert abs(ours - theirs) <= LU_TOL


@pytest.mark.samples
def test_integrated_loudness_matches_ebur128_on_megamind() -> None:
    path = sample_or_skip("Megamind.avi")
    report = sample_reports()["reports"].get("Megamind.avi")
    if report is None:  # pragma: no cover - sample_reports runs every present clip
        _, reports, _ = run_check_cli(path)
        report = reports[0]
    ours = report["audio"]["integrated_lufs"]
    theirs = ffmpeg_integrated_lufs(ffmpeg_detect(Path(path), af="ebur128"))
    print(f"\n  integrated loudness, Megamind.avi: framewatch {ours} LUFS, FFmpeg ebur128 {theirs} LUFS")
    assert ours is not None
    assert abs(ours - theirs) <= LU_TOL
