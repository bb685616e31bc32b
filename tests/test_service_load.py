"""Load: 200 synthetic streams added and removed through the API, five times, while alerts flow. Threads,
file descriptors and memory in use come back to where they were; every alert fired is resolved and stored."""

from __future__ import annotations

import gc
import os
import threading
import time
import warnings
from collections import Counter
from pathlib import Path

import pytest

from engine.config import load_config
from engine.runner import heap_usage, release_free_heap
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
    """Run in a fresh process: inside the whole suite the heap that earlier tests left (2 GB) makes the
    resident size swing by up to 175 MB from one round to the next, which says nothing about this code."""
    import json
    import subprocess
    import sys

    here = Path(__file__).resolve().parent
    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(tmp_path)], capture_output=True, text=True,
                       timeout=900, cwd=here.parent, env={**os.environ, "PYTHONPATH": os.pathsep.join([str(here), str(here.parent)])})
    assert r.returncode == 0, r.stderr[-3000:]
    samples = json.loads(r.stdout.strip().splitlines()[-1])
    print("load cycles:", samples)
    assert {s["threads"] for s in samples} == {samples[0]["threads"]}, samples
    assert samples[-1]["fds"] <= samples[0]["fds"] + 2, samples
    # Memory in use (the C heap over all arenas: tensors, Python objects, SQLite) is the leak measure: it
    # must come back to the same level after every round.
    heap = [s["heap_mb"] for s in samples]
    assert heap[-1] - heap[1] < 10 and heap[-1] - heap[0] < 20, heap
    # The resident size: freed memory is held for reuse by each malloc arena and handed back by the engine
    # every TRIM_EVERY seconds when over 128 MB is held (release_free_heap), so it may sit up to that much
    # above what is in use but must not grow round after round. Before that release, on the clean CI
    # checkout it grew 28-50 MB in every round (1505 -> 1670 MB over 4 rounds) with nothing leaking.
    # Read after a release (load_cycles): read at any moment it failed on idle 2-core VMs with the heap in use
    # flat at 128 MB (876 -> 1518 -> 1457 -> 1469 -> 1446 MB, 2026-12-07); after one, 634-724 MB in ten rounds.
    rss = [s["rss_mb"] for s in samples]
    steps = [b - a for a, b in zip(rss, rss[1:], strict=False)]
    assert rss[-1] - rss[0] < 150 and min(steps) < 15, rss


def load_cycles(tmp_path: Path) -> list[dict]:
    cfg = load_config(text="output: {jsonl: null}\nengine: {queue_frames: 16}\n")
    svc = Service(cfg, state_dir=tmp_path)
    svc.engine.TRIM_EVERY = 2.0  # the engine's own release of held heap, often enough to show in the samples
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
            kinds = Counter(e.type for e in svc.active_alerts())
            assert kinds == {"black": STREAMS // 4}, kinds  # and no false alarm (no_signal under load)
            assert c.get("/metrics").status_code == 200
            t1 = time.monotonic()
            for i in range(STREAMS):
                assert c.delete(f"/api/streams/s{i:03d}").status_code == 204
            removed = time.monotonic() - t1
            assert c.get("/api/streams").json() == []
            assert svc.active_alerts() == []  # removing a stream resolves its alerts
            gc.collect()
            time.sleep(2.5)
            # Freed memory given back before the resident size is read (what the engine does every TRIM_EVERY
            # when over 128 MB is held): a sample at an arbitrary moment caught the arenas before or after the
            # engine's release, ±450 MB round to round with the heap in use flat (1072, 657, 1097, 704, 1145 MB),
            # which hid what a leak would add. What cannot be given back is what a leak grows.
            release_free_heap(0)
            assert not [t.name for t in threading.enumerate() if t.name.startswith("src-")]  # I/O threads ended
            samples.append({"cycle": cycle, "threads": threading.active_count(), "fds": fds(), "rss_mb": rss_mb(),
                            "heap_mb": heap_usage()[0] / 2**20, "held_mb": heap_usage()[1] / 2**20,
                            "add_s": added, "remove_s": removed})
        alerts = c.get("/api/alerts?type=black&limit=1000").json()
    assert len(alerts) == CYCLES * STREAMS // 4
    assert all(a["status"] == "resolved" and a["details"]["resolution"] == "removed" for a in alerts)
    assert samples[0]["threads"] <= base_threads + 1  # + the page-feed worker the first request may start
    return samples


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(load_cycles(Path(sys.argv[1]))))
