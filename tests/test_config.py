"""Config loading: the demo config, unknown keys with suggestions, type and range errors, override layering."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from engine.config import (
    ConfigError,
    FramewatchConfig,
    json_schema,
    load_config,
    resolve_detectors,
    stream_specs,
)
from engine.detectors import REGISTRY
from engine.events import Severity

REPO = Path(__file__).resolve().parent.parent
ALL_DETECTORS = {"black", "freeze", "blockiness", "blur", "glitch", "silence", "clipping", "loudness", "no_signal", "corruption",
                 "av_sync", "channel_silence", "clicks", "dc_offset", "dropout", "missing_channel", "phase", "true_peak"}


def _error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(text=textwrap.dedent(text))
    return str(info.value)


def test_registry_has_the_ten_detectors():
    assert set(REGISTRY) == ALL_DETECTORS


def test_demo_config_resolves_four_streams_with_every_detector():
    cfg = load_config(REPO / "configs" / "demo.yaml")
    specs = stream_specs(cfg)
    assert [s.id for s in specs] == ["news-1", "sport-2", "movies-3", "kids-4"]
    for spec in specs:
        assert set(spec.detectors) == ALL_DETECTORS
        assert all(c.enabled for n, c in spec.detectors.items() if n != "corruption"), spec.id
        assert not spec.detectors["corruption"].enabled  # opt-in (README: corruption model)
        assert spec.url.startswith("synthetic://")
    assert specs[0].faults == [
        {"kind": "black", "start": 4.0, "duration": 4.0, "param": None},
        {"kind": "silence", "start": 16.0, "duration": 5.0, "param": None},
    ]
    assert cfg.duration == 40


# -- unknown keys: the path of the key and the close match --------------------------------------------

UNKNOWN_KEYS = [
    ("streemz: []", "streemz: unknown key; did you mean 'streams'?"),
    ("engine: {devise: cpu}", "engine.devise: unknown key; did you mean 'device'?"),
    ("streams: [{id: a, url: 'synthetic://a', profil: x}]", "streams.0.profil: unknown key; did you mean 'profile'?"),
    (
        "streams: [{id: a, url: 'synthetic://a', detectors: {frezee: {onset: 1}}}]",
        "streams.0.detectors.frezee: unknown key; did you mean 'freeze'?",
    ),
    (
        "streams: [{id: a, url: 'synthetic://a', detectors: {freeze: {onsett: 1}}}]",
        "streams.0.detectors.freeze.onsett: unknown key; did you mean 'onset'?",
    ),
    (
        "profiles: {x: {detectors: {black: {pic_thh: 0.5}}}}",
        "profiles.x.detectors.black.pic_thh: unknown key; did you mean 'pic_th'?",
    ),
    ("output: {jsonll: a.jsonl}", "output.jsonll: unknown key; did you mean 'jsonl'?"),
]


@pytest.mark.parametrize(("text", "expected"), UNKNOWN_KEYS, ids=[e.split(":")[0] for _, e in UNKNOWN_KEYS])
def test_unknown_key_names_its_path_and_suggests(text, expected):
    assert _error(text) == f"<config>: {expected}"


def test_every_unknown_key_is_reported_on_its_own_line(tmp_path):
    path = tmp_path / "two.yaml"
    path.write_text("streams:\n  - {id: a, url: 'synthetic://a', detectors: {frezee: {}, black: {onsett: 2}}}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert sorted(str(info.value).splitlines()) == sorted(
        [
            f"{path}: streams.0.detectors.frezee: unknown key; did you mean 'freeze'?",
            f"{path}: streams.0.detectors.black.onsett: unknown key; did you mean 'onset'?",
        ]
    )


def test_unknown_source_option_and_detector_in_only_are_suggested():
    msg = _error("streams: [{id: a, url: 'synthetic://a', options: {read_timeut: 1}}]")
    assert msg == "<config>: streams.0.options: unknown source option 'read_timeut'; did you mean 'read_timeout'?"
    msg = _error("profiles: {r: {only: [silense]}}")
    assert msg == "<config>: profiles.r.only: unknown detector 'silense'; did you mean 'silence'?"


# -- types and ranges -----------------------------------------------------------------------------------

BAD_VALUES = [
    # (yaml, text that must appear: the field's path and what is wrong)
    ("streams: [{id: a, url: 'synthetic://a', detectors: {freeze: {onset: -1}}}]", ["streams.a", "detectors.freeze", "onset", ">= 0"]),
    ("detectors: {black: {pic_th: x}}", ["detectors.black.pic_th", "valid number"]),
    ("engine: {device: gpu7}", ["engine.device", "'cpu', 'cuda' or 'cuda:N'"]),
    ("engine: {batch_frames: 0}", ["engine.batch_frames", "greater than or equal to 1"]),
    ("streams: [{id: a, url: 'synthetic://a'}, {id: a, url: 'synthetic://b'}]", ["stream id 'a' appears twice"]),
    (
        "profiles: {news: {}}\nstreams: [{id: a, url: 'synthetic://a', profile: nwes}]",
        ["stream 'a'", "unknown profile 'nwes'; did you mean 'news'?"],
    ),
    ("streams: [{id: 'a b', url: 'synthetic://a'}]", ["streams.0.id", "stream id must be"]),
    ("streams: [{id: a, url: '  '}]", ["streams.0.url", "url must not be empty"]),
    ("detectors: {black: {ignore: [{x: 0, y: 0, w: 0, h: 0.1}]}}", ["detectors.black.ignore.0.w", "greater than 0"]),
    ("detectors: {black: {ignore: [{x: 1.5, y: 0, w: 0.1, h: 0.1}]}}", ["detectors.black.ignore.0.x", "less than or equal to 1"]),
    ("streams: [{id: a, url: 'synthetic://a', faults: [{kind: smoke, start: 1, duration: 1}]}]", ["streams.0.faults.0.kind"]),
    ("streams: [{id: a, url: 'synthetic://a', pace: turbo}]", ["streams.0.pace"]),
]


@pytest.mark.parametrize(("text", "needles"), BAD_VALUES, ids=[n[0] for _, n in BAD_VALUES])
def test_bad_value_is_reported_with_its_field(text, needles):
    msg = _error(text)
    assert msg.startswith("<config>: ")
    assert len(msg.splitlines()) == 1, msg
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_bad_detector_value_without_streams_is_rejected():
    msg = _error("detectors: {freeze: {onset: -1}}")
    assert "detectors.freeze" in msg and "onset" in msg


def test_not_yaml_is_one_line_with_the_position():
    msg = _error("streams: [a, b\n")
    assert msg == "<config>: not valid YAML at line 2, column 1: expected ',' or ']', but got '<stream end>'"


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_top_level_must_be_a_mapping(text):
    assert _error(text) == "<config>: the top level must be a mapping (engine, output, detectors, profiles, streams)"


def test_missing_file_is_one_line(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: no such config file"


def test_empty_file_is_the_default_config(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    cfg = load_config(path)
    assert cfg.streams == [] and cfg.engine.device == "cpu" and cfg.engine.queue_frames == 64


# -- override layering ------------------------------------------------------------------------------------

LAYERED = """
detectors:
  freeze: {onset: 3}
profiles:
  news:
    detectors:
      black: {pix_th: 0.2, ignore: [{x: 0.85, y: 0.0, w: 0.15, h: 0.12}]}
  radio:
    only: [silence]
    detectors:
      silence: {onset: 4}
streams:
  - {id: plain, url: "synthetic://a"}
  - {id: news-1, url: "synthetic://b", profile: news, detectors: {freeze: {onset: 5}}}
  - {id: news-2, url: "synthetic://c", profile: news}
  - {id: radio-1, url: "synthetic://d", profile: radio, detectors: {black: {pic_th: 0.5}}}
"""


@pytest.fixture(scope="module")
def layered() -> dict:
    cfg = load_config(text=LAYERED)
    return {s.id: s.detectors for s in stream_specs(cfg)}


def test_config_wide_override_applies_to_every_stream(layered):
    assert layered["plain"]["freeze"].onset == 3.0
    assert layered["news-2"]["freeze"].onset == 3.0
    # untouched values keep the detector's defaults
    assert layered["plain"]["black"].pix_th == 0.10
    assert layered["plain"]["black"].pic_th == 0.98
    assert layered["plain"]["freeze"].recovery == 0.0
    assert layered["plain"]["black"].ignore == ()


def test_profile_override_applies_to_its_streams_only(layered):
    assert layered["news-1"]["black"].pix_th == 0.2
    assert layered["news-2"]["black"].pix_th == 0.2
    region = layered["news-1"]["black"].ignore
    assert len(region) == 1 and (region[0].x, region[0].y, region[0].w, region[0].h) == (0.85, 0.0, 0.15, 0.12)
    assert layered["plain"]["black"].pix_th == 0.10


def test_stream_override_wins_over_profile_and_config(layered):
    assert layered["news-1"]["freeze"].onset == 5.0
    assert layered["news-1"]["black"].pic_th == 0.98
    assert layered["news-1"]["black"].severity == Severity.CRITICAL


def test_profile_only_disables_the_other_detectors(layered):
    radio = layered["radio-1"]
    assert set(radio) == ALL_DETECTORS
    assert {n for n, c in radio.items() if c.enabled} == {"silence"}
    assert radio["silence"].onset == 4.0
    # a stream override does not re-enable a detector its profile leaves out
    assert radio["black"].pic_th == 0.5 and radio["black"].enabled is False
    assert all(c.enabled for n, c in layered["plain"].items() if n != "corruption")


def test_resolve_detectors_for_a_profile_without_streams():
    cfg = load_config(text=LAYERED)
    dets = resolve_detectors(cfg, "news")
    assert dets["black"].pix_th == 0.2 and dets["freeze"].onset == 3.0
    assert resolve_detectors(FramewatchConfig())["freeze"].onset == 2.0


def test_source_options_and_pace_reach_the_stream_spec():
    cfg = load_config(text="streams: [{id: a, url: 'udp://127.0.0.1:1', pace: realtime, options: {read_timeout: 1.5, reconnect: false}}]")
    (spec,) = stream_specs(cfg)
    assert spec.source.pace == "realtime"
    assert spec.source.read_timeout == 1.5
    assert spec.source.reconnect is False
    assert spec.source.backoff_initial == 0.5
    assert spec.faults is None


# -- schema ----------------------------------------------------------------------------------------------


def test_json_schema_is_json_and_names_detector_options():
    schema = json_schema()
    text = json.dumps(schema)
    assert json.loads(text) == schema
    assert schema["type"] == "object"
    assert set(schema["properties"]) == {"engine", "output", "detectors", "profiles", "streams", "service", "duration"}
    for option in ("pic_th", "pix_th", "coded_mafd", "noise_db", "onset", "recovery", "ignore"):
        assert f'"{option}"' in text, option
    for name in ALL_DETECTORS:
        assert f'"{name}"' in text, name


@pytest.mark.parametrize(("text", "line"), [
    ("detectors: {black: {onset: .nan}}", "<config>: detectors.black: onset must be a finite number, not nan"),
    ("detectors: {freeze: {onset: .inf}}", "<config>: detectors.freeze: onset must be a finite number, not inf"),
    ("detectors: {loudness: {target: -.inf}}", "<config>: detectors.loudness: target must be a finite number, not -inf"),
    ("detectors: {no_signal: {onset: 0}}", "<config>: detectors.no_signal: onset must be at least 0.1 s, not 0.0"),
    ("detectors: {corruption: {weights: /nonexistent/model.pt}}",
     "<config>: detectors.corruption: weights file /nonexistent/model.pt not found"),
    ('streams: [{id: a, url: "synthetic://a?size=320x180"}]',
     "<config>: streams.0.url: synthetic size must be 64x64 to 8K (7680x4320 pixels) with width a multiple of 16, height of 8"),
    ('streams: [{id: a, url: "synthetic://a?tone=nan"}]',
     "<config>: streams.0.url: synthetic tone must be 1..23000 Hz, level and noise -150..0 dBFS, seed >= 0"),
    ('streams: [{id: a, url: "synthetic://a", options: {backoff_initial: 0}}]',
     "<config>: streams.0.options: source option backoff_initial must be within 0.01..3600 s, not 0"),
    ('streams: [{id: a, url: "synthetic://a", options: {read_timeout: .nan}}]',
     "<config>: streams.0.options: source option read_timeout must be within 0.1..3600 s, not nan"),
    ('streams: [{id: a, url: "synthetic://a", options: {video: false, audio: false}}]',
     "<config>: streams.0.options: source options video and audio cannot both be false: nothing would be monitored"),
    ('streams: [{id: "a\\n", url: "synthetic://a"}]',
     "<config>: streams.0.id: stream id must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"),
    ('streams: [{id: a, url: "gopher://host/x"}]', "<config>: streams.0.url: unsupported URL scheme 'gopher' in 'gopher://host/x'"),
    ('streams: [{id: a, url: "udp://999.1.1.1:5000"}]', "<config>: streams.0.url: bad IPv4 address '999.1.1.1' in 'udp://999.1.1.1:5000'"),
    ('streams: [{id: a, url: "tcp://127.0.0.1:99999"}]',
     "<config>: streams.0.url: bad port in 'tcp://127.0.0.1:99999': Port out of range 0-65535"),
])
def test_values_that_would_silently_break_detection_are_refused(text, line):
    """NaN and infinity pass every range check and then switch a detector off; an onset of 0 makes no_signal
    fire between every two pictures; a missing weights file or a URL no source takes failed only at run time."""
    assert _error(text).splitlines() == [line]


def test_every_bad_detector_value_is_its_own_line_said_once():
    text = """
    detectors: {black: {onset: -2}, silence: {onset: -1}, clipping: {min_run: -3}}
    profiles: {news: {detectors: {freeze: {onset: .nan}}}}
    streams: [{id: a, url: "synthetic://a", profile: news}]
    """
    assert _error(text).splitlines() == [
        "<config>: detectors.black: onset and recovery must be >= 0 seconds",
        "<config>: detectors.clipping: min_run must be >= 1, not -3",
        "<config>: detectors.silence: onset and recovery must be >= 0 seconds",
        "<config>: profiles.news: detectors.freeze: onset must be a finite number, not nan",
    ]


def test_a_directory_is_not_a_config_file(tmp_path):
    with pytest.raises(ConfigError, match="is a directory, not a config file"):
        load_config(tmp_path)


@pytest.mark.parametrize("value", ["0", "-1", ".nan", ".inf", "lots", "5000"])
def test_cpu_cores_must_be_auto_or_a_positive_number(value):
    with pytest.raises(ConfigError) as info:
        load_config(text=f"engine: {{cpu_cores: {value}}}\n")
    assert "cpu_cores" in str(info.value)


def test_cpu_cores_auto_is_this_machines_cores():
    import os

    from engine.pool import cpu_model

    cfg = load_config(text="engine: {cpu_cores: auto, headroom: 0.2}\n")
    assert cfg.engine.cpu_cores == "auto" and cfg.engine.headroom == 0.2
    assert cpu_model(cfg.engine.cpu_cores).cores == len(os.sched_getaffinity(0))
    assert cpu_model(load_config(text="engine: {cpu_cores: 1.5}\n").engine.cpu_cores, processes=3).scoring_threads == 3
    assert cpu_model(load_config(text="{}\n").engine.cpu_cores) is None
