"""Continuous measurements: each stream's loudness, true peak, A/V offset and counters, written every
`interval` seconds of media time as JSON lines, whether or not anything is wrong (compliance logs,
dashboards). Prometheus export reads the same snapshots."""

from __future__ import annotations

import json
import logging
from typing import Any

from engine.alerts.sinks import LineWriter

log = logging.getLogger(__name__)


class MeasurementLog(LineWriter):
    """JSON lines to a file (appended) or stdout ('-'), flushed per line. A target that stops taking lines (a
    full disk, /dev/full) is logged and counted (`failures`), never raised into the monitor: measurements are
    a record, the alerts matter more."""

    failures = 0

    def __call__(self, snapshot: dict[str, Any]) -> None:
        try:
            self.write_line(json.dumps(snapshot, separators=(",", ":"), allow_nan=False))
        except (OSError, ValueError) as exc:
            self.failures += 1
            if self.failures == 1 or self.failures % 1000 == 0:
                log.error("measurements not written (%d so far): %s", self.failures, exc)

    def close(self) -> None:
        try:
            super().close()
        except OSError as exc:  # the last buffered lines of a full disk
            self.failures += 1
            log.error("measurements not written at close: %s", exc)
