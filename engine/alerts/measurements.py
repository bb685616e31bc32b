"""Continuous measurements: each stream's loudness, true peak, A/V offset and counters, written every
`interval` seconds of media time as JSON lines, whether or not anything is wrong (compliance logs,
dashboards). Prometheus export reads the same snapshots."""

from __future__ import annotations

import json
from typing import Any

from engine.alerts.sinks import LineWriter


class MeasurementLog(LineWriter):
    """JSON lines to a file (appended) or stdout ('-'), flushed per line."""

    def __call__(self, snapshot: dict[str, Any]) -> None:
        self.write_line(json.dumps(snapshot, separators=(",", ":"), allow_nan=False))
