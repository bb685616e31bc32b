"""Continuous measurements: each stream's loudness, true peak, A/V offset and counters, written every
`interval` seconds of media time as JSON lines, whether or not anything is wrong (compliance logs,
dashboards). Prometheus export reads the same snapshots."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from engine.alerts.sinks import open_lines


class MeasurementLog:
    """JSON lines to a file (appended) or stdout ('-'), flushed per line."""

    def __init__(self, target: str | Path) -> None:
        self._fh, self._own = open_lines(target)
        self._lock = threading.Lock()

    def __call__(self, snapshot: dict[str, Any]) -> None:
        line = json.dumps(snapshot, separators=(",", ":"), allow_nan=False) + "\n"
        with self._lock:
            self._fh.write(line)
            self._fh.flush()

    def close(self) -> None:
        if self._own:
            self._fh.close()
