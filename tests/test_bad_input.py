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


def _tones(channels: int, silent: int | None = None):
    """A different tone on every channel (-20 dBFS), `silent` left at digital zero."""

    def fn(a: int, b: int) -> np.ndarray:
        t = np.arange(a, b) / 48000
        x = np.stack([0.1 * np.sin(2 * np.pi * (300 + 100 * c) * t) for c in range(channels)]).astype(np.float32)
        if silent is not None:
            x[silent] = 0
        return x

    return fn


@pytest.mark.parametrize("channels, silent, name", [(8, 5, "BR"), (16, None, None)])
def test_audio_of_8_and_16_channels_is_analysed(make_clip, channels, silent, name):
    """7.1 and 16-channel audio (ordinary in broadcast): PyAV's planar frames of 8 or more channels once crashed
    the whole process; now every channel is analysed and the silent one (7.1's back right) is named."""
    clip = make_clip(f"ch{channels}.wav", channels=channels, seconds=3.0, audio_fn=_tones(channels, silent))
    proc = Cli("check", "--json", clip).result()
    assert proc.returncode in (0, 1) and "Traceback" not in proc.stderr, proc.stderr
    (report,) = json_lines(proc.stdout)
    assert report["errors"] == [] and report["audio"]["channels"] == channels
    assert report["audio"]["seconds"] == pytest.approx(3.0, abs=0.01)
    missing = [(e["start"], e["end"], e["details"]["channel"]) for e in report["events"] if e["type"] == "missing_channel"]
    assert missing == ([(0.0, 3.0, name)] if silent is not None else [])


def test_an_audio_sample_rate_change_midway_does_not_end_the_analysis(make_clip, tmp_path):
    """Two programmes spliced into one TS, the second at 44.1 kHz instead of 48 kHz and black: the black is
    found and every picture analysed (the resampler once refused the new rate and ended the file there)."""
    a = make_clip("splice_a.ts", seconds=3.0, audio_rate=48000)
    b = make_clip("splice_b.ts", seconds=3.0, audio_rate=44100, start=3.0, luma_fn=lambda n: np.full((240, 320), 16, np.uint8))
    spliced = tmp_path / "spliced.ts"
    spliced.write_bytes(a.read_bytes() + b.read_bytes())
    proc = Cli("check", "--json", spliced).result()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    (report,) = json_lines(proc.stdout)
    assert report["video"]["frames"] == 150
    assert report["audio"]["seconds"] == pytest.approx(6.0, abs=0.1)  # AAC priming and padding of both parts
    black = [(e["start"], e["end"]) for e in report["events"] if e["type"] == "black"]
    assert len(black) == 1 and black[0][0] == pytest.approx(3.0, abs=0.041) and black[0][1] == pytest.approx(6.0, abs=0.041)
    assert not [e for e in report["events"] if e["type"] in ("silence", "dropout", "no_signal")]


def _remux(src, dst, change, fmt: str = "mpegts", options: dict | None = None, title: str | None = None) -> None:
    """Copy `src`'s packets to `dst`, each video packet passed through change(packet, index) first (it returns
    the packet to write, changed or not, or None to leave it out); audio as it is."""
    import av

    with av.open(str(src)) as i, av.open(str(dst), "w", format=fmt, options=options or {}) as o:
        vi, ai = i.streams.video[0], i.streams.audio[0]
        vo, ao = o.add_stream_from_template(vi), o.add_stream_from_template(ai)
        if title is not None:
            o.metadata["title"] = title
        n = 0
        for pkt in i.demux():
            if pkt.dts is None:
                continue
            if pkt.stream is vi:
                out = change(pkt, n)
                n += 1
                if out is None:
                    continue
                out.stream = vo
                o.mux(out)
            else:
                pkt.stream = ao
                o.mux(pkt)


def _one_garbage_pts(src, dst, index: int, seconds: float) -> None:
    """`src` with the presentation time of its `index`-th video packet moved `seconds` on, as a damaged
    packet's header can (decode timestamps and everything else untouched)."""

    def change(pkt, n):
        if n == index:
            pkt.pts += int(seconds / pkt.time_base)
        return pkt

    _remux(src, dst, change)


def test_one_garbage_timestamp_in_a_file_is_ignored_and_counted(make_clip, tmp_path):
    """A lone presentation time 18.6 hours on (a damaged packet) once moved every later picture there: a
    no_signal of 18.6 h and the black at 5 s reported at 67,000 s. A file's jump is a gap only when the next
    timestamp agrees."""
    src = make_clip("late_black.ts", seconds=8.0, luma_fn=lambda n: np.full((240, 320), 16 if n >= 125 else 120, np.uint8))
    bad = tmp_path / "garbage_pts.ts"
    _one_garbage_pts(src, bad, 40, 67_000.0)
    proc = Cli("check", "--json", bad).result()
    assert "Traceback" not in proc.stderr, proc.stderr
    (report,) = json_lines(proc.stdout)
    assert report["video"]["frames"] == 200 and report["video"]["timestamp_outliers"] == 1
    kinds = sorted({e["type"] for e in report["events"]})
    assert kinds == ["black"], report["events"]
    (black,) = report["events"]
    assert black["start"] == pytest.approx(5.0, abs=0.041) and black["end"] == pytest.approx(8.0, abs=0.041)


def _zeroed(pkt, n):
    import av

    # A start code (the TS muxer checks for one) and then NAL units of an unspecified type: nothing decodes.
    out = av.Packet(b"\x00\x00\x00\x01" + b"\x7f" * (pkt.size - 4))
    out.pts, out.dts, out.time_base, out.is_keyframe = pkt.pts, pkt.dts, pkt.time_base, pkt.is_keyframe
    return out


@pytest.mark.parametrize("case", ["stops_at_1s", "never_decodes"])
def test_a_video_track_that_stops_early_or_never_decodes_is_no_signal(make_clip, tmp_path, case):
    """Sound for 6 s with pictures for only the first second, or with a video track whose every packet is
    garbage: both once passed as clean files. The missing pictures are a no_signal to the end of the sound."""
    src = make_clip("six_seconds.ts", seconds=6.0)
    dst = tmp_path / f"{case}.ts"
    _remux(src, dst, (lambda pkt, n: pkt if n < 25 else None) if case == "stops_at_1s" else _zeroed)
    proc = Cli("check", "--json", dst).result()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    (report,) = json_lines(proc.stdout)
    assert report["video"]["frames"] == (25 if case == "stops_at_1s" else 0)
    (ev,) = [e for e in report["events"] if e["type"] == "no_signal"]
    assert ev["start"] == pytest.approx(1.0 if case == "stops_at_1s" else 0.0, abs=0.041)
    assert ev["end"] == pytest.approx(report["audio"]["seconds"], abs=0.05) and report["audio"]["seconds"] > 5.9
    # A clean file with both tracks to the end: nothing of the kind.
    clean = Cli("check", "--json", src).result()
    assert clean.returncode == 0 and json_lines(clean.stdout)[0]["events"] == []


def test_a_truncated_file_whose_header_promises_more_is_not_clean(make_clip, tmp_path):
    """An MP4 with its index first (faststart), cut at 30 %: the header says 4 s, about a second decodes. It was
    once reported with no fault at all. Cut at 5 %, nothing decodes: an error, like an unreadable file."""
    full = tmp_path / "faststart.mp4"
    _remux(make_clip("clean4.mp4", seconds=4.0), full, lambda pkt, n: pkt, fmt="mp4", options={"movflags": "faststart"})
    data = full.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) * 3 // 10])
    proc = Cli("check", "--json", cut).result()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    (report,) = json_lines(proc.stdout)
    assert report["duration"] == pytest.approx(4.0, abs=0.05) and 0 < report["video"]["frames"] < 60
    (msg,) = report["errors"]
    assert msg.startswith("media ends at ") and msg.endswith(" of the 4.00 s the container gives (truncated or damaged)")
    assert proc.stderr.splitlines()[0] == f"framewatch: warning: {cut}: {msg}"
    whole = json_lines(Cli("check", "--json", full).result().stdout)[0]
    assert whole["errors"] == [] and whole["video"]["frames"] == 100

    stub = tmp_path / "stub.mp4"
    stub.write_bytes(data[: len(data) // 20])
    proc = Cli("check", "--json", stub).result()
    message = "nothing could be decoded of the 4.00 s the container gives (truncated or damaged)"
    assert proc.returncode == 2 and proc.stderr.splitlines() == [f"framewatch: error: {stub}: {message}"]
    assert json_lines(proc.stdout)[0]["errors"] == [message]


def test_a_title_tag_that_is_not_utf8_does_not_make_the_file_unreadable(make_clip, tmp_path):
    """A Latin-1 title ("café" as 63 61 66 E9): the file once failed with Python's decode error as its reason."""
    tagged = tmp_path / "tagged.mp4"
    _remux(make_clip("clean4.mp4", seconds=4.0), tagged, lambda pkt, n: pkt, fmt="mp4", title="cafX-framewatch")
    data = tagged.read_bytes()
    assert data.count(b"cafX-framewatch") == 1
    latin1 = tmp_path / "latin1.mp4"
    latin1.write_bytes(data.replace(b"cafX-framewatch", b"caf\xe9-framewatch"))
    proc = Cli("check", "--json", latin1).result()
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    (report,) = json_lines(proc.stdout)
    assert report["errors"] == [] and report["video"]["frames"] == 100
