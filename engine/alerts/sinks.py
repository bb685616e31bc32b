"""Event sinks. Sinks never drop an event: a failing sink is reported and the others still get it."""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Protocol

from engine.events import Event

log = logging.getLogger(__name__)


class EventSink(Protocol):
    def emit(self, event: Event) -> None: ...

    def close(self) -> None: ...


def open_lines(target: str | Path | IO[str]) -> tuple[IO[str], bool]:
    """A JSON-lines target: '-' is stdout, a path is appended to (folders made), an open file is used as
    is. Returns (file, whether the caller owns it and must close it)."""
    if not isinstance(target, (str, Path)):
        return target, False
    if str(target) == "-":
        return sys.stdout, False
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("a", encoding="utf-8"), True


class LineWriter:
    """Whole lines to a JSON-lines target (see open_lines), flushed per line so a tail -f or a pipe sees
    them as they happen; safe from several threads."""

    def __init__(self, target: str | Path | IO[str] = "-") -> None:
        self._fh, self._own = open_lines(target)
        self._lock = threading.Lock()

    def write_line(self, line: str) -> None:
        with self._lock:
            self._fh.write(line + "\n")
            self._fh.flush()

    def close(self) -> None:
        if self._own:
            self._fh.close()


class JsonlSink(LineWriter):
    """One JSON object per event."""

    def emit(self, event: Event) -> None:
        self.write_line(event.to_json())


class MemorySink:
    """Keeps every event in order (file QC, tests, the end-of-run summary)."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._lock = threading.Lock()

    def emit(self, event: Event) -> None:
        with self._lock:
            self.events.append(event)

    def close(self) -> None:
        pass


class CallbackSink:
    def __init__(self, fn: Callable[[Event], None]) -> None:
        self._fn = fn

    def emit(self, event: Event) -> None:
        self._fn(event)

    def close(self) -> None:
        pass


class MultiSink:
    """Fans an event out to every sink; one sink failing never keeps the event from the others."""

    def __init__(self, sinks: Iterable[EventSink] = ()) -> None:
        self.sinks: list[EventSink] = list(sinks)
        self.failures = 0

    def add(self, sink: EventSink) -> None:
        self.sinks.append(sink)

    def emit(self, event: Event) -> None:
        for sink in self.sinks:
            try:
                sink.emit(event)
            except Exception as exc:  # a broken pipe or full disk must not stop the monitor
                self.failures += 1
                log.error("alert sink %s failed for event %s: %s", type(sink).__name__, event.id, exc)

    def close(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as exc:
                log.error("closing alert sink %s failed: %s", type(sink).__name__, exc)
