"""The command line as a user runs it, each command in a process of its own.

The `cli` fixture starts this file's commands at once (tests.media.Cli: forked from a server that imported
engine.cli once, and `run` as a fresh `python -m engine.cli`); the tests then wait on the one they look at.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from media import Cli, MovingPattern, json_lines, with_black

REPO = Path(__file__).resolve().parent.parent

FPS = 25
REPORT_KEYS = {"file", "duration", "video", "audio", "av_sync", "events", "summary", "errors", "device"}
DETECTORS = ["av_sync", "black", "blockiness", "blur", "channel_silence", "clicks", "clipping", "corruption", "dc_offset", "dropout",
             "freeze", "glitch", "loudness", "missing_channel", "no_signal", "phase", "silence", "true_peak"]
# BS.1770: a 0 dBFS 1 kHz sine in one channel reads -3.01 LUFS (mean square 1/2, and the K-weighting gain at
# 1 kHz is cancelled by the -0.691 dB constant); a second identical channel adds 10*log10(2) = +3.01 dB.
# So a -20 dBFS sine in both channels of a stereo clip is -20.0 LUFS (not -23).
SINE_LUFS = -20.0 + 10 * math.log10(0.5) + 10 * math.log10(2)
BLACK = (1.0, 4.0)  # seconds of black in the 5 s clip: frames 25..99

RUN_CONFIG = """\
output: {jsonl: null, thumbnails: null, summary: true}
streams:
  - id: t1
    url: "synthetic://t?size=320x240&fps=25&duration=4&pace=fast&faults=black@1:2.5"
"""

BAD_CONFIG = """\
streams:
  - id: a
    url: "synthetic://a"
    detectors: {frezee: {onset: 1}}
"""

PROFILE_CONFIG = """\
profiles:
  lenient:
    detectors:
      black: {onset: 5}
"""


@pytest.fixture(scope="module")
def files(make_clip, tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    (d / "run.yaml").write_text(RUN_CONFIG)
    (d / "bad.yaml").write_text(BAD_CONFIG)
    (d / "profile.yaml").write_text(PROFILE_CONFIG)
    return {
        "dir": d,
        "clean": make_clip("clean.mp4", seconds=4.0),
        "black": make_clip("black5s.mp4", seconds=5.0, luma_fn=with_black(MovingPattern((320, 240)), FPS, *BLACK)),
    }


@pytest.fixture(scope="module")
def cli(files):
    d = files["dir"]
    runs = {
        "clean": Cli("check", "--json", files["clean"]),
        "black": Cli("check", "--json", files["black"]),
        "two": Cli("check", "--json", files["black"], files["clean"]),
        "profile": Cli("check", "--json", "--config", d / "profile.yaml", "--profile", "lenient", files["black"]),
        "validate_good": Cli("config", "validate", d / "run.yaml"),
        "validate_bad": Cli("config", "validate", d / "bad.yaml"),
        "schema": Cli("config", "schema"),
        "detectors": Cli("detectors"),
        # a real `python -m engine.cli`, once: the module entry point itself works
        "run": Cli("run", d / "run.yaml", "--jsonl", d / "events.jsonl", cwd=d, fresh=True),
    }
    yield runs
    for r in runs.values():  # nothing left running when a test failed early
        r.kill()


def test_check_clean_clip(cli):
    proc = cli["clean"].result()
    assert proc.returncode == 0, proc.stderr
    (report,) = json_lines(proc.stdout)
    assert set(report) == REPORT_KEYS
    assert report["file"].endswith("clean.mp4")
    assert report["duration"] == pytest.approx(4.0, abs=0.05)
    v, a = report["video"], report["audio"]
    assert (v["codec"], v["width"], v["height"], v["fps"]) == ("h264", 320, 240, 25.0)
    assert v["frames"] == 100
    assert v["decode_errors"] == 0 and v["corrupt_frames"] == 0
    assert (a["codec"], a["channels"], a["sample_rate"]) == ("aac", 2, 48000)
    assert a["seconds"] == pytest.approx(4.0, abs=0.05)
    assert a["integrated_lufs"] == pytest.approx(SINE_LUFS, abs=0.3)
    assert a["max_momentary_lufs"] == pytest.approx(SINE_LUFS, abs=0.3)
    assert report["events"] == [] and report["summary"] == {} and report["errors"] == []


def test_check_two_files_one_line_each_and_worst_exit_code(cli, files):
    proc = cli["two"].result()
    # The black clip comes first: the exit code must be the worst, not the last file's.
    assert proc.returncode == 1, proc.stderr
    black, clean = json_lines(proc.stdout)
    assert len(proc.stdout.strip().splitlines()) == 2
    assert black["file"] == str(files["black"]) and clean["file"] == str(files["clean"])
    assert set(black) == REPORT_KEYS and set(clean) == REPORT_KEYS
    assert clean["events"] == [] and clean["video"]["frames"] == 100


def _without_ids(report: dict) -> dict:
    return {**report, "events": [{**e, "id": "", "wallclock": ""} for e in report["events"]]}


def test_check_black_clip_exit_1(cli):
    proc = cli["black"].result()
    assert proc.returncode == 1, proc.stderr
    (report,) = json_lines(proc.stdout)
    assert report["summary"] == {"black": 1}
    # the same report as when it is checked together with another file
    two, _ = json_lines(cli["two"].result().stdout)
    assert _without_ids(report) == _without_ids(two)


def test_check_finds_the_black_section(cli):
    black, _ = json_lines(cli["two"].result().stdout)
    assert black["video"]["frames"] == 125
    assert black["summary"] == {"black": 1}
    (event,) = black["events"]
    assert event["type"] == "black" and event["status"] == "resolved"
    assert event["start"] == pytest.approx(BLACK[0], abs=1 / FPS)
    assert event["end"] == pytest.approx(BLACK[1], abs=1 / FPS)
    assert event["duration"] == pytest.approx(BLACK[1] - BLACK[0], abs=2 / FPS)
    assert event["value"] == pytest.approx(1.0, abs=0.01) and event["threshold"] == 0.98
    assert event["severity"] == "critical" and event["stream"] == "black5s.mp4"
    assert re.fullmatch(r"[0-9a-f]{16}", event["id"])


def test_check_profile_from_config(cli):
    # The profile raises black's onset to 5 s: the 3 s of black are no fault any more.
    proc = cli["profile"].result()
    assert proc.returncode == 0, proc.stderr
    (report,) = json_lines(proc.stdout)
    assert report["events"] == [] and report["video"]["frames"] == 125


def test_config_validate_good(cli, files):
    proc = cli["validate_good"].result()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.strip() == f"{files['dir'] / 'run.yaml'}: valid (1 stream(s), 0 profile(s))"


def test_config_validate_bad(cli, files):
    proc = cli["validate_bad"].result()
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"framewatch: error: {files['dir'] / 'bad.yaml'}: streams.0.detectors.frezee: unknown key; did you mean 'freeze'?"
    ]


def test_config_schema_prints_json(cli):
    proc = cli["schema"].result()
    assert proc.returncode == 0, proc.stderr
    schema = json.loads(proc.stdout)
    assert set(schema["properties"]) == {"engine", "output", "detectors", "profiles", "streams", "service", "duration"}
    assert "pic_th" in proc.stdout and "coded_mafd" in proc.stdout


def test_detectors_lists_all_ten(cli):
    proc = cli["detectors"].result()
    assert proc.returncode == 0, proc.stderr
    # table rows: | name | version | media | defaults |; wrapped defaults continue with an empty name cell
    cells = [[c.strip() for c in line.split("│")] for line in proc.stdout.splitlines()]
    names = [row[1] for row in cells if len(row) >= 4 and row[1] and re.fullmatch(r"\d+\.\d+", row[2])]
    assert names == DETECTORS, proc.stdout
    assert "pic_th=0.98" in proc.stdout and "pix_th=0.1" in proc.stdout


def test_run_writes_firing_and_resolved_events(cli, files):
    proc = cli["run"].result()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""  # --jsonl FILE: nothing on stdout
    events = [json.loads(line) for line in (files["dir"] / "events.jsonl").read_text().splitlines()]
    assert [(e["type"], e["status"]) for e in events] == [("black", "firing"), ("black", "resolved")]
    firing, resolved = events
    assert firing["id"] == resolved["id"]
    assert firing["stream"] == resolved["stream"] == "t1"
    # black@1:2.5 at 25 fps: frames 25 (1.00 s) to 87 (3.48 s) are black, frame 88 (3.52 s) is not.
    assert firing["start"] == resolved["start"] == pytest.approx(1.0, abs=1e-6)
    assert firing["end"] is None and firing["duration"] is None
    assert resolved["end"] == pytest.approx(3.52, abs=1e-6)
    assert resolved["duration"] == pytest.approx(2.52, abs=1e-6)
    # the human-readable lines and the summary go to stderr
    assert "FIRING critical t1 black" in proc.stderr
    assert "resolved t1 black" in proc.stderr
    assert not (files["dir"] / "framewatch-out").exists()



def test_cli_edges_found_by_an_adversarial_pass(tmp_path):
    """Each of these once ended in a traceback, a silent no-op or a misleading success."""
    syn = "synthetic://a?size=128x72&fps=10&duration=5"
    cfg = tmp_path / "one.yaml"
    cfg.write_text(f'output: {{jsonl: null}}\nstreams: [{{id: a, url: "{syn}", faults: [{{kind: black, start: 0.5, duration: 3}}]}}]\n')
    for bad in ("0", "-5", "nan"):
        r = Cli("run", cfg, "--duration", bad, "-q").result()
        assert r.returncode == 2 and r.stderr.strip() == f"framewatch: error: --duration must be a number of seconds above 0, not {float(bad)}"
    r = Cli("config", "schema", "-o", tmp_path / "missing" / "s.json").result()
    assert r.returncode == 2 and r.stderr.startswith("framewatch: error: cannot write the schema to ") and "Traceback" not in r.stderr
    # A measurements target that stops taking lines: the alerts still go out, the run does not end as a success.
    full = tmp_path / "full.yaml"
    full.write_text(cfg.read_text().replace("output: {jsonl: null}", f"output: {{jsonl: {tmp_path / 'ev.jsonl'}, measurements: /dev/full}}"))
    r = Cli("run", full, "-q").result()
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("framewatch: error: ") and "measurement line(s) not written" in r.stderr
    events = [json.loads(x) for x in (tmp_path / "ev.jsonl").read_text().splitlines()]
    assert [(e["type"], e["status"]) for e in events] == [("black", "firing"), ("black", "resolved")]


def test_label_and_promote_edges(tmp_path):
    store = tmp_path / "review"
    r = Cli("label", "--list", "--review", store).result()
    assert r.returncode == 2 and r.stderr.strip() == f"framewatch: error: no review store at {store}"
    (store / "abc1").mkdir(parents=True)
    (store / "abc1" / "record.json").write_text('{"alert_id": "abc1", "surprise": 1}')
    r = Cli("label", "--list", "--review", store).result()
    assert r.returncode == 0 and "Traceback" not in r.stderr  # the bad record is skipped, said in the log
    r = Cli("label", "abc1", "--true", "--review", store).result()
    assert r.returncode == 2 and "is not a review record" in r.stderr and "Traceback" not in r.stderr
    bom = tmp_path / "verdicts.csv"
    bom.write_bytes("\ufeffzz99,true\n".encode("utf-8"))  # as a spreadsheet saves it
    r = Cli("label", "--file", bom, "--review", store).result()
    assert "no corruption alert zz99" in r.stderr and "\\ufeff" not in r.stderr
    utf16 = tmp_path / "u16.csv"
    utf16.write_bytes("zz99,true\n".encode("utf-16"))
    r = Cli("label", "--file", utf16, "--review", store).result()
    assert r.returncode == 2 and r.stderr.strip() == f"framewatch: error: {utf16}: not a UTF-8 CSV file (UnicodeDecodeError)"
    shipped = REPO / "models" / "weights" / "corruption.pt"
    r = Cli("promote", shipped, "--current", tmp_path).result()
    assert r.returncode == 2 and r.stderr.strip() == f"framewatch: error: --current {tmp_path} is a directory, not a weights file"
    r = Cli("promote", shipped, "--current", tmp_path / "nowhere" / "w.pt").result()
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = Cli("eval", shipped, "--against", tmp_path / "missing.pt", timeout=60).result()
    assert r.returncode == 2 and r.stderr.strip() == f"framewatch: error: weights file {tmp_path / 'missing.pt'} not found"


def test_run_admits_live_streams_within_cpu_cores(tmp_path):
    """engine.cpu_cores: the streams that fit run, the others are reported refused with the reason (a 128x72
    stream at 10 fps with every default detector costs 0.087 cores; 0.25 cores less 15 % head room take two)."""
    streams = "".join(f'\n  - {{id: {n}, url: "synthetic://{n}?size=128x72&fps=10&duration=2&seed={i}"}}'
                      for i, n in enumerate("abc"))
    cfg = tmp_path / "cpu.yaml"
    cfg.write_text(f"engine: {{cpu_cores: 0.25}}\noutput: {{jsonl: null, summary: true}}\nstreams:{streams}\n")
    r = Cli("run", cfg).result()
    assert r.returncode == 0, r.stderr
    assert ("stream c not started: refused: the CPU has 0.038 of 0.212 cores free and the stream needs 0.087 at "
            "full rate") in r.stderr
    rows = {line.split("│")[1].strip(): line for line in r.stderr.splitlines() if line.count("│") > 5}
    assert "ended" in rows["a"] and "ended" in rows["b"] and "refused" in rows["c"], r.stderr
    # A GPU this machine lacks: the engine runs on the CPU, and the CPU budget applies to it.
    cfg.write_text(f"engine: {{device: cuda, cpu_cores: 0.25}}\noutput: {{jsonl: null}}\nstreams:{streams}\n")
    r = Cli("run", cfg, "-q").result()
    assert r.returncode == 0 and "stream c not started: refused: the CPU has 0.038 of 0.212 cores" in r.stderr, r.stderr
    cfg.write_text(f"engine: {{cpu_cores: 0.05}}\noutput: {{jsonl: null}}\nstreams:{streams}\n")
    r = Cli("run", cfg, "-q").result()
    assert r.returncode == 2 and "framewatch: error: no stream fits in 0.05 CPU cores (engine.cpu_cores): a: refused: " in r.stderr


def test_check_cut_short_still_reports_what_it_saw():
    """Ctrl-C (or SIGTERM) during a check: the report of what was checked comes out, its open alert resolved
    where the check stopped, marked interrupted; exit code 130. (An endless synthetic stream read as fast as it
    goes: only a signal ends it.)"""
    import signal
    import time

    url = "synthetic://x?size=320x176&fps=25&duration=0&faults=black@2:600"
    # A CI job started in the background runs with SIGINT ignored, and an ignored signal stays ignored in the
    # processes it starts (that check would read on forever). A handled one is reset to the default when a
    # process starts, as in a terminal.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        procs = {sig: Cli("check", "--json", url, fresh=True) for sig in (signal.SIGINT, signal.SIGTERM)}
    finally:
        signal.signal(signal.SIGINT, previous)
    time.sleep(8)  # start-up (torch) and a few seconds of checking
    for sig, c in procs.items():
        c.proc.send_signal(sig)
    for sig, c in procs.items():
        r = c.result()
        assert r.returncode == 130, (sig, r.stderr)
        report = json.loads(r.stdout)
        assert report["interrupted"] is True and report["duration"] > 3
        assert report["errors"] == [f"interrupted at {report['duration']:.2f} s: the rest was not checked"]
        (black,) = report["events"]
        assert (black["type"], black["status"], black["start"]) == ("black", "resolved", 2.0)
        assert black["end"] == pytest.approx(report["duration"], abs=0.05)
        assert r.stderr.rstrip().endswith("framewatch: interrupted")
