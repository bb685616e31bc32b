"""The alert event: what every detector emits and every sink receives."""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum


class Status(StrEnum):
    FIRING = "firing"
    RESOLVED = "resolved"


class Severity(StrEnum):
    CRITICAL = "critical"
    MAJOR = "major"
    WARNING = "warning"
    INFO = "info"


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_event_id() -> str:
    return uuid.uuid4().hex[:16]


@dataclass(frozen=True, slots=True)
class Event:
    """One state change of one alert. A firing event and its resolved event share `id`.

    Times `start`, `end` and `duration` are media seconds from the stream start: `start` is the first faulty
    frame or sample, `end` the moment the fault stopped (None while firing).
    """

    id: str
    stream: str
    type: str
    status: Status
    start: float
    end: float | None
    duration: float | None
    wallclock: str
    value: float | None
    threshold: float | None
    severity: Severity
    detector_version: str
    thumbnail: str | None = None
    message: str = ""
    details: dict[str, object] = field(default_factory=dict)

    @classmethod
    def outage(cls, stream: str, start: float, message: str, version: str, details: dict[str, object]) -> Event:
        """A critical no_signal raised by the engine itself rather than by a detector: the GPU or the worker
        process that monitored the stream was lost. It resolves when the stream is scored again elsewhere."""
        return cls(
            id=new_event_id(), stream=stream, type="no_signal", status=Status.FIRING, start=round(start, 6),
            end=None, duration=None, wallclock=now_iso(), value=None, threshold=None, severity=Severity.CRITICAL,
            detector_version=version, message=message, details=details,
        )

    def resolved(self, end: float, value: float | None = None, **details: object) -> Event:
        return replace(
            self,
            status=Status.RESOLVED,
            end=round(end, 6),
            duration=round(max(0.0, end - self.start), 6),
            wallclock=now_iso(),
            value=self.value if value is None else value,
            details={**self.details, **details},
        )

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["status"] = self.status.value
        d["severity"] = self.severity.value
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), default=_json_default)


def _json_default(o: object) -> object:
    if isinstance(o, float):
        return o
    if hasattr(o, "item"):
        return o.item()  # numpy / torch scalars
    return str(o)
