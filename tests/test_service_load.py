"""Load: 200 synthetic streams added and removed through the API, five times, while alerts flow. Threads,
file descriptors and memory come back to where they were; every alert fired is resolved and stored."""

from __future__ import annotations

import gc
import os
import threading
import time
import warnings
from pathlib import Path

import pytest

from engine.config import load_config
from engine.service import Service
from engine.service.app import create_app

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

STREAMS = 200
CYCLES = 5


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_200_streams_added_and_removed_without_leaks(tmp_path: Path) -> None:
    cfg = load_config(text="output: {jsonl: null}\nengine: {queue_frames: 16}\n")
    svc = Service(cfg, state_dir=tmp_path)
    samples = []
    with TestClient(create_app(svc)) as c:
        base_threads = threading.active_count()
        for cycle in range(CYCLES):
            t0 = time.monotonic()
            for i in range(STREAMS):
                # Video only at 2 fps: this tests managing streams, not throughput (the two cores of CI keep
                # up with 200 such streams at about 1.3 cores).
                body = {"id": f"s{i:03d}", "url": f"synthetic://load?size=64x64&fps=2&duration=0&seed={i}",
                        "options": {"audio": False}}
                if i % 4 == 0:  # a quarter of them go black at once: alerts flow while streams come and go
                    body["faults"] = [{"kind": "black", "start": 0.2, "duration": 3600}]
                r = c.post("/api/streams", json=body)
                assert r.status_code == 201, r.text
            added = time.monotonic() - t0
            assert len(c.get("/api/streams").json()) == STREAMS
            # Every faulty stream's black alert fires (onset 2 s of media after the fault's start).
            deadline = time.monotonic() + 60
            while len(svc.active_alerts()) < STREAMS // 4 and time.monotonic() < deadline:
                time.sleep(0.25)
            assert len(svc.active_alerts()) == STREAMS // 4, __import__('collections').Counter((e.type, e.stream[-1] in '048') for e in svc.active_alerts())
            assert c.get("/metrics").status_code == 200
            t1 = time.monotonic()
            for i in range(STREAMS):
                assert c.delete(f"/api/streams/s{i:03d}").status_code == 204
            removed = time.monotonic() - t1
            assert c.get("/api/streams").json() == []
            assert svc.active_alerts() == []  # removing a stream resolves its alerts
            gc.collect()
            time.sleep(0.5)
            assert not [t.name for t in threading.enumerate() if t.name.startswith("src-")]  # I/O threads ended
            samples.append({"cycle": cycle, "threads": threading.active_count(), "fds": fds(), "rss_mb": rss_mb(),
                            "add_s": added, "remove_s": removed})
        alerts = c.get("/api/alerts?type=black&limit=1000").json()
    print("load cycles:", samples)
    assert len(alerts) == CYCLES * STREAMS // 4
    assert all(a["status"] == "resolved" and a["details"]["resolution"] == "removed" for a in alerts)
    assert {s["threads"] for s in samples} == {samples[0]["threads"]}, (base_threads, samples)
    assert samples[0]["threads"] <= base_threads + 1  # + the page-feed worker the first request may start
    assert samples[-1]["fds"] <= samples[0]["fds"] + 2, samples
    # The first cycles fill the allocator's pools (the engine keeps up to 512 MB of freed heap for reuse,
    # see engine.runner.tune_allocator) and caches; after that memory must stay flat. Alone, the process
    # measured +0.4 MB over the last three cycles; inside the whole suite (a 2 GB heap left by earlier tests)
    # RSS swings by +-60 MB from cycle to cycle without a trend, so peaks are compared: a leak of the size
    # this test was written for (60-90 MB per cycle) adds well over 100 MB between them.
    first, last = max(s["rss_mb"] for s in samples[:2]), max(s["rss_mb"] for s in samples[-2:])
    assert last - first < 40, samples
