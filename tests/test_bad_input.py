"""Bad input: missing and unreadable files, truncated and damaged media, bad configs, and broken streams
next to a good one in the same engine. Errors are one line; damaged media is analysed as far as it decodes.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from media import Cli, json_lines, sine

from engine.alerts import MemorySink
from engine.config import FramewatchConfig, resolve_detectors
from engine.runner import Engine, StreamSpec
from engine.sources import SourceOptions

TS_PACKET = 188


def _damage_ts(src, dst, seed: int = 1234, count: int = 40) -> int:
    """Copy an MPEG-TS file, overwriting the payload of `count` 188-byte packets after the first 20 % and
    before the last 10 % of the file with random bytes (headers kept, so the demuxer stays in sync and the
    decoders get damaged data). Returns the number of packets in the file."""
    data = bytearray(src.read_bytes())
    assert len(data) % TS_PACKET == 0 and data[0] == 0x47
    n = len(data) // TS_PACKET
    rng = np.random.default_rng(seed)
    for i in sorted(rng.choice(np.arange(n // 5, n - n // 10), size=count, replace=False)):
        off = int(i) * TS_PACKET + 4
        data[off : off + TS_PACKET - 4] = rng.integers(0, 256, TS_PACKET - 4, dtype=np.uint8).tobytes()
    dst.write_bytes(bytes(data))
    return n


UNREADABLE = [
    ("missing", "no such file: {path}"),
    ("directory", "is a directory, not a media file: {path}"),
    ("text", "not a readable media file (invalid data found when processing input)"),
    ("empty", "not a readable media file (invalid data found when processing input)"),
]


@pytest.fixture(scope="module")
def bad(make_clip, tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "a_directory.mp4").mkdir()
    (d / "text.mp4").write_text("this is a text file, not a video\n" * 20)
    (d / "empty.mp4").write_bytes(b"")
    full = make_clip("trunc_src.mkv", seconds=4.0)
    data = full.read_bytes()
    (d / "truncated.mkv").write_bytes(data[: int(len(data) * 0.6)])
    _damage_ts(make_clip("damage_src.ts", seconds=4.0), d / "damaged.ts")
    (d / "bad.yaml").write_text("engine: {devise: cpu}\n")
    (d / "profiles.yaml").write_text("profiles: {news: {}}\n")
    good = make_clip("clean.mp4", seconds=4.0)
    files = {
        "missing": d / "missing.mp4",
        "directory": d / "a_directory.mp4",
        "text": d / "text.mp4",
        "empty": d / "empty.mp4",
        "truncated": d / "truncated.mkv",
        "damaged": d / "damaged.ts",
    }
    runs = {name: Cli("check", "--json", files[name]) for name, _ in UNREADABLE}
    # all four at once: one line and one report per file
    runs["unreadable"] = Cli("check", "--json", *(files[name] for name, _ in UNREADABLE))
    runs["truncated"] = Cli("check", "--json", files["truncated"])
    runs["damaged"] = Cli("check", "--json", files["damaged"])
    runs["bad_config"] = Cli("check", "--config", d / "bad.yaml", good)
    runs["bad_profile"] = Cli("check", "--config", d / "profiles.yaml", "--profile", "nwes", good)
    yield {"files": files, "runs": runs, "dir": d}
    for r in runs.values():  # nothing left running when a test failed early
        r.kill()


@pytest.mark.parametrize(("name", "reason"), UNREADABLE, ids=[n for n, _ in UNREADABLE])
def test_unreadable_file_exit_2_one_line(bad, name, reason):
    path = bad["files"][name]
    proc = bad["runs"][name].result()
    assert proc.returncode == 2
    message = reason.format(path=path)
    assert proc.stderr.splitlines() == [f"framewatch: error: {path}: {message}"]
    (report,) = json_lines(proc.stdout)
    assert report["file"] == str(path) and report["errors"] == [message]
    assert report["video"] is None and report["audio"] is None and report["events"] == []
    assert report["duration"] == 0.0


def test_unreadable_files_together_one_line_each(bad):
    proc = bad["runs"]["unreadable"].result()
    assert proc.returncode == 2
    expected = [(bad["files"][name], reason.format(path=bad["files"][name])) for name, reason in UNREADABLE]
    assert proc.stderr.splitlines() == [f"framewatch: error: {path}: {message}" for path, message in expected]
    reports = json_lines(proc.stdout)
    assert [(r["file"], r["errors"]) for r in reports] == [(str(path), [message]) for path, message in expected]


def test_truncated_file_is_analysed_as_far_as_it_goes(bad):
    proc = bad["runs"]["truncated"].result()
    assert proc.returncode in (0, 1), proc.stderr
    (report,) = json_lines(proc.stdout)
    assert report["file"] == str(bad["files"]["truncated"])
    frames = report["video"]["frames"]
    assert 0 < frames < 100
    # 60 % of the bytes hold roughly 60 % of the pictures (the clip's bitrate is steady)
    assert 35 <= frames <= 75, frames
    assert report["audio"]["seconds"] == pytest.approx(frames / 25, abs=0.5)
    assert "Traceback" not in proc.stderr


def test_damaged_ts_is_decoded_with_errors_counted(bad):
    proc = bad["runs"]["damaged"].result()
    assert proc.returncode in (0, 1), proc.stderr
    assert "Traceback" not in proc.stderr
    (report,) = json_lines(proc.stdout)
    assert report["file"] == str(bad["files"]["damaged"])
    v = report["video"]
    # FFmpeg conceals what it can; the engine counts what it could not decode and the frames it concealed.
    assert v["decode_errors"] + v["corrupt_frames"] > 0, v
    assert 90 <= v["frames"] <= 100, v
    assert report["audio"]["integrated_lufs"] == pytest.approx(-20.0, abs=0.5)


def test_invalid_config_exit_2_one_line(bad):
    proc = bad["runs"]["bad_config"].result()
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f"framewatch: error: {bad['dir'] / 'bad.yaml'}: engine.devise: unknown key; did you mean 'device'?"
    ]


def test_unknown_profile_exit_2_one_line(bad):
    proc = bad["runs"]["bad_profile"].result()
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == ["framewatch: error: unknown profile 'nwes'; known: news"]


# -- in one engine: broken streams beside a good one --------------------------------------------------


def test_broken_streams_do_not_stop_the_good_one(tmp_path):
    sink = MemorySink()
    engine = Engine(sink)
    detectors = resolve_detectors(FramewatchConfig())
    good = engine.add_stream(
        StreamSpec("good", "synthetic://g?size=320x240&fps=25&duration=4&pace=fast&faults=black@1:2.5", detectors)
    )
    missing = engine.add_stream(StreamSpec("missing", str(tmp_path / "nope.mp4"), detectors, SourceOptions(pace="fast")))
    bogus = engine.add_stream(StreamSpec("bogus", "synthetic://b?duration=4&pace=fast&faults=smoke@1:2", detectors))
    engine.run(deadline=time.monotonic() + 30)  # a safety net: the streams end by themselves in ~1 s

    assert good.state == "ended" and good.errors == []
    assert good.stats.frames_scored == 100
    events = [(e.stream, e.type, e.status.value, e.start, e.end) for e in sink.events]
    assert events == [("good", "black", "firing", 1.0, None), ("good", "black", "resolved", 1.0, 3.52)]

    assert missing.state == "error"
    assert missing.errors == [f"no such file: {tmp_path / 'nope.mp4'}"]
    assert bogus.state == "error"
    assert len(bogus.errors) == 1
    assert bogus.errors[0].startswith("unknown fault kind 'smoke'; known: black, freeze,")
    for rt in (missing, bogus):
        assert rt.stats.frames_scored == 0 and rt.finished
        assert all("\n" not in e for e in rt.errors)


# -- lost audio packets ----------------------------------------------------------------------------------


def test_integrated_loudness_covers_the_whole_file_across_an_audio_gap(make_clip):
    # 5 s at -20 dBFS, 0.5 s of audio packets lost, 2.5 s at -30 dBFS; the video goes on throughout.
    loud, quiet = sine(dbfs=-20), sine(dbfs=-30)
    cut = 5 * 48_000

    def audio(a: int, b: int) -> np.ndarray:
        k = max(0, min(b, cut) - a)
        return np.concatenate([loud(a, b)[:, :k], quiet(a, b)[:, k:]], axis=1)

    path = make_clip("audio_gap.mkv", size=(160, 128), seconds=8.0, audio_codec="pcm_s16le", audio_fn=audio,
                     audio_drop=(5.0, 5.5))
    engine = Engine(MemorySink())
    rt = engine.add_stream(StreamSpec("gap", str(path), resolve_detectors(FramewatchConfig()), SourceOptions(pace="fast")))
    engine.run()
    assert rt.stats.audio_seconds == pytest.approx(7.5, abs=0.05)
    # Both levels are within 10 LU of the mean, so no block is gated out: the mean power of the programme.
    expected = 10 * np.log10((5.0 * 10 ** (-20 / 10) + 2.5 * 10 ** (-30 / 10)) / 7.5)
    assert rt.audio.meter.integrated == pytest.approx(expected, abs=0.3)
