"""Alertmanager-compatible webhook delivery from a persistent SQLite outbox.

`emit` only commits a row, so the scoring thread never waits on the network and an alert survives a receiver
that is down, a restart or a kill -9. A delivery thread posts pending rows in `seq` order, head of line: a
batch that fails with a transient error is retried, with exponential backoff, before anything queued after it,
which keeps the order of every alert's firing and resolved notifications. A receiver that refuses a payload
for good (a 4xx other than 408/429) gets the batch again one alert at a time so that only the offending
alert is set aside as `rejected` and the others still go through.

Delivery is at least once: a post that times out may have reached the receiver and is sent again.
Alertmanager and its clones deduplicate on `fingerprint`, which is stable per alert.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from engine.events import Event, Status

log = logging.getLogger(__name__)

# Alertmanager's zero time: "no end known yet" for a firing alert.
ZERO_TIME = "0001-01-01T00:00:00Z"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    sink         TEXT    NOT NULL,
    alert_id     TEXT    NOT NULL,
    status       TEXT    NOT NULL CHECK (status IN ('firing', 'resolved')),
    alert        TEXT    NOT NULL,
    starts_at    TEXT    NOT NULL,
    created_at   REAL    NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT,
    delivered_at REAL,
    state        TEXT    NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivered', 'rejected')),
    UNIQUE (sink, alert_id, status)
);
CREATE INDEX IF NOT EXISTS outbox_by_state ON outbox (sink, state, seq);
"""

# Transient answers: the receiver is overloaded or restarting, not refusing this payload.
_RETRYABLE_4XX = frozenset({408, 429})


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _parse_iso(text: str) -> datetime | None:
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def fingerprint(labels: dict[str, str]) -> str:
    """16 hex digits, a function of the label set only, so firing and resolved of one alert share it."""
    canonical = json.dumps(sorted(labels.items()), separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def derived_starts_at(event: Event) -> str:
    """The firing wall-clock time of a resolved event whose firing event this outbox never saw: the media
    duration of the fault, counted back from the moment it resolved."""
    resolved_at = _parse_iso(event.wallclock)
    if resolved_at is None or event.duration is None:
        return event.wallclock
    return _iso(resolved_at - timedelta(seconds=max(0.0, float(event.duration))))


def alertmanager_alert(event: Event, *, starts_at: str | None = None, generator_url: str = "") -> dict[str, Any]:
    """One alert object of the Alertmanager webhook payload. `starts_at` is the firing event's wall-clock
    time; for a resolved event the caller passes the one it remembered (default: derived from duration)."""
    status = Status(event.status).value
    labels = {
        "alertname": str(event.type),
        "stream": str(event.stream),
        "severity": str(getattr(event.severity, "value", event.severity)),
        "service": "framewatch",
        "alert_id": str(event.id),
    }
    # Alertmanager annotations are strings only; unknown values are left out rather than sent as "None".
    annotations: dict[str, str] = {"summary": event.message or f"{event.type} on {event.stream}"}
    for key, value in (("value", event.value), ("threshold", event.threshold), ("media_start", event.start),
                       ("media_end", event.end), ("thumbnail", event.thumbnail)):
        if value is not None:
            annotations[key] = str(value)
    if event.details:
        annotations["details"] = json.dumps(event.details, separators=(",", ":"), default=str, sort_keys=True)
    if starts_at is None:
        starts_at = event.wallclock if status == "firing" else derived_starts_at(event)
    return {
        "status": status,
        "labels": labels,
        "annotations": annotations,
        "startsAt": starts_at,
        "endsAt": event.wallclock if status == "resolved" else ZERO_TIME,
        "generatorURL": generator_url,
        "fingerprint": fingerprint(labels),
    }


def _common(maps: list[dict[str, str]]) -> dict[str, str]:
    if not maps:
        return {}
    first, rest = maps[0], maps[1:]
    return {k: v for k, v in first.items() if all(m.get(k) == v for m in rest)}


def alertmanager_payload(alerts: list[dict[str, Any]], receiver: str, external_url: str) -> dict[str, Any]:
    """The Alertmanager webhook body (version 4) for a batch of alert objects, in the order given."""
    return {
        "version": "4",
        # No grouping on our side: one stable key per receiver lets a receiver thread notifications together.
        "groupKey": f'{{}}:{{receiver="{receiver}"}}',
        "truncatedAlerts": 0,
        "status": "firing" if any(a.get("status") == "firing" for a in alerts) else "resolved",
        "receiver": receiver,
        "groupLabels": {},
        "commonLabels": _common([a.get("labels", {}) for a in alerts]),
        "commonAnnotations": _common([a.get("annotations", {}) for a in alerts]),
        "externalURL": external_url,
        "alerts": alerts,
    }


@dataclass(frozen=True, slots=True)
class _Row:
    seq: int
    alert_id: str
    alert: dict[str, Any]


@dataclass(frozen=True, slots=True)
class _Outcome:
    kind: str  # "ok" | "retry" | "reject"
    error: str = ""
    retry_after: float | None = None


class _Closed(RuntimeError):
    """The sink was closed while the delivery thread was still posting; it must not touch the DB again."""


class WebhookSink:
    """Queues every event in a SQLite outbox and posts it to an Alertmanager-compatible webhook receiver.

    Several sinks (distinct `name`s) and other components' tables may share one database file; this sink owns
    only the `outbox*` tables and its own rows in them.
    """

    def __init__(
        self,
        url: str,
        db_path: str | Path,
        *,
        name: str = "webhook",
        headers: dict[str, str] | None = None,
        timeout: float = 5.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 60.0,
        batch_max: int = 64,
        external_url: str = "",
        receiver: str = "framewatch",
        generator_url: Callable[[Event], str] | None = None,
        retention: float = 7 * 86400.0,
        idle_poll: float = 2.0,
    ) -> None:
        self.url = url
        self.name = name
        self.timeout = timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = max(backoff_max, backoff_initial)
        self.batch_max = max(1, batch_max)
        self.external_url = external_url.rstrip("/")
        self.receiver = receiver
        self.retention = retention
        self._generator_url = generator_url
        self._headers = dict(headers or {})
        self._idle_poll = idle_poll

        path = Path(db_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit: every statement is its own transaction, so a kill -9 never leaves a half-written row.
        # The busy timeout bounds how long emit can wait for another writer of the shared file.
        conn = sqlite3.connect(str(path), timeout=2.0, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives a process crash; only an OS crash may lose the last commits.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(_SCHEMA)
        self._conn: sqlite3.Connection | None = conn
        self._lock = threading.Lock()

        self._wake = threading.Event()  # new work (emit) or close
        self._stop = threading.Event()
        self._deadline = float("inf")  # monotonic time at which close() gives up on draining
        self._progress = threading.Condition()

        self._consecutive_failures = 0
        self._failures = 0
        self._posts = 0
        self._last_error = ""

        self._thread = threading.Thread(target=self._run, name=f"webhook-{name}", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------------------------------- producer side

    def emit(self, event: Event) -> None:
        """Commits the event to the outbox and returns; delivery happens on the sink's own thread. A replay
        of an event already queued (same alert id and status) is ignored."""
        alert = alertmanager_alert(event, starts_at=event.wallclock, generator_url=self._url_for(event))
        status = alert["status"]
        with self._lock:
            conn = self._require_conn()
            if status == "resolved":
                row = conn.execute(
                    "SELECT starts_at FROM outbox WHERE sink = ? AND alert_id = ? AND status = 'firing'",
                    (self.name, event.id),
                ).fetchone()
                alert["startsAt"] = row[0] if row else derived_starts_at(event)
            cur = conn.execute(
                "INSERT OR IGNORE INTO outbox (sink, alert_id, status, alert, starts_at, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (self.name, event.id, status, json.dumps(alert, separators=(",", ":")), alert["startsAt"],
                 time.time()),
            )
        if cur.rowcount:
            self._wake.set()

    def _url_for(self, event: Event) -> str:
        if self._generator_url is not None:
            try:
                return self._generator_url(event)
            except Exception as exc:  # a broken link builder must not cost the alert
                log.error("webhook %s: generator_url failed for %s: %s", self.name, event.id, exc)
        return f"{self.external_url}/#alert={event.id}"

    def _require_conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise _Closed(f"webhook sink {self.name!r} is closed")
        return self._conn

    # ----------------------------------------------------------------------------------------- control

    def flush(self, timeout: float) -> bool:
        """True once nothing of this sink is pending, False if `timeout` seconds pass first."""
        end = time.monotonic() + timeout
        while True:
            try:
                if self._pending_count() == 0:
                    return True
            except _Closed:
                return False
            remaining = end - time.monotonic()
            if remaining <= 0:
                return False
            with self._progress:
                self._progress.wait(min(remaining, 0.1))

    def close(self, timeout: float = 5.0) -> None:
        """Delivers as much as the receiver accepts within `timeout`, then stops. Undelivered rows stay pending
        in the database for the next WebhookSink on it."""
        with self._lock:
            if self._conn is None:
                return
        self._deadline = time.monotonic() + max(0.0, timeout)
        self._stop.set()
        self._wake.set()
        self._thread.join(max(0.0, self._deadline - time.monotonic()))
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            pending = conn.execute(
                "SELECT COUNT(*) FROM outbox WHERE sink = ? AND state = 'pending'", (self.name,)
            ).fetchone()[0]
            if pending:
                log.warning("webhook %s: %d alert(s) stay in the outbox for the next start%s", self.name,
                            pending, " (a post is still in flight)" if self._thread.is_alive() else "")
            # Keeps the -wal file from growing across restarts; PASSIVE never waits on other connections.
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as exc:
            log.warning("webhook %s: closing the outbox: %s", self.name, exc)
        finally:
            conn.close()
        with self._progress:
            self._progress.notify_all()

    def stats(self) -> dict[str, Any]:
        """Counters for the metrics endpoint. `attempts` counts posts per row as stored (so it survives
        restarts); `failures`, `posts` and `consecutive_failures` are since this sink started."""
        counts = {"pending": 0, "delivered": 0, "rejected": 0}
        attempts = 0
        oldest: float | None = None
        last_error_db = None
        try:
            with self._lock:
                conn = self._require_conn()
                rows = conn.execute(
                    "SELECT state, COUNT(*), COALESCE(SUM(attempts), 0), MIN(created_at) FROM outbox"
                    " WHERE sink = ? GROUP BY state", (self.name,),
                ).fetchall()
                if not self._last_error:
                    found = conn.execute(
                        "SELECT last_error FROM outbox WHERE sink = ? AND last_error IS NOT NULL"
                        " ORDER BY seq DESC LIMIT 1", (self.name,),
                    ).fetchone()
                    last_error_db = found[0] if found else None
        except _Closed:
            rows = []
        for state, count, att, first in rows:
            counts[state] = count
            attempts += att
            if state == "pending":
                oldest = first
        return {
            **counts,
            "attempts": attempts,
            "posts": self._posts,
            "failures": self._failures,
            "consecutive_failures": self._consecutive_failures,
            "last_error": self._last_error or last_error_db or "",
            "oldest_pending_age_s": max(0.0, time.time() - oldest) if oldest is not None else 0.0,
        }

    def _pending_count(self) -> int:
        with self._lock:
            return self._require_conn().execute(
                "SELECT COUNT(*) FROM outbox WHERE sink = ? AND state = 'pending'", (self.name,)
            ).fetchone()[0]

    # ----------------------------------------------------------------------------------------- delivery

    def _run(self) -> None:
        client = httpx.Client(headers=self._headers, timeout=self.timeout, follow_redirects=True)
        next_purge = 0.0
        try:
            while not (self._stop.is_set() and time.monotonic() >= self._deadline):
                try:
                    if time.monotonic() >= next_purge:
                        self._purge()
                        next_purge = time.monotonic() + 3600.0
                    self._wake.clear()
                    rows = self._next_batch()
                    if not rows:
                        if self._stop.is_set():
                            return  # drained
                        self._wake.wait(self._idle_poll)
                        continue
                    delay = self._deliver(client, rows)
                except _Closed:
                    return
                except Exception as exc:  # a DB hiccup (locked, disk full) must not end delivery for good
                    log.exception("webhook %s: delivery loop error", self.name)
                    self._last_error = f"{type(exc).__name__}: {exc}"
                    self._consecutive_failures += 1
                    delay = self._backoff(None)
                if delay > 0:
                    self._sleep(delay)
        finally:
            client.close()

    def _sleep(self, delay: float) -> None:
        if not self._stop.is_set():
            # close() cuts the wait short for one last attempt within its own deadline.
            self._stop.wait(delay)
        else:
            time.sleep(max(0.0, min(delay, self._deadline - time.monotonic())))

    def _backoff(self, retry_after: float | None) -> float:
        n = min(max(self._consecutive_failures - 1, 0), 62)
        delay = min(self.backoff_max, self.backoff_initial * 2**n)
        # Jitter only shortens the wait, so the cap holds and many sinks restarted together spread out.
        delay *= 1.0 - 0.2 * random.random()
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.backoff_max))
        return delay

    def _next_batch(self) -> list[_Row]:
        with self._lock:
            rows = self._require_conn().execute(
                "SELECT seq, alert_id, alert FROM outbox WHERE sink = ? AND state = 'pending'"
                " ORDER BY seq LIMIT ?", (self.name, self.batch_max),
            ).fetchall()
        return [_Row(seq, alert_id, json.loads(alert)) for seq, alert_id, alert in rows]

    def _deliver(self, client: httpx.Client, rows: list[_Row]) -> float:
        """Posts one batch; returns how long to wait before the next post (0: go on at once)."""
        outcome = self._attempt(client, rows)
        if outcome.kind == "ok":
            return 0.0
        if outcome.kind == "retry":
            return self._backoff(outcome.retry_after)
        if len(rows) == 1:
            self._reject(rows[0], outcome.error)
            return 0.0
        # The receiver refused the batch: find the alert(s) it refuses, in order, so the rest still goes out.
        for row in rows:
            one = self._attempt(client, [row])
            if one.kind == "retry":
                return self._backoff(one.retry_after)
            if one.kind == "reject":
                self._reject(row, one.error)
        return 0.0

    def _attempt(self, client: httpx.Client, rows: list[_Row]) -> _Outcome:
        payload = alertmanager_payload([r.alert for r in rows], self.receiver, self.external_url)
        outcome = self._post(client, payload)
        self._posts += 1
        seqs = [r.seq for r in rows]
        if outcome.kind == "ok":
            if self._consecutive_failures:
                log.info("webhook %s: receiver accepts again after %d failed post(s)", self.name,
                         self._consecutive_failures)
            self._consecutive_failures = 0
            self._update(seqs, "UPDATE outbox SET attempts = attempts + 1, state = 'delivered', delivered_at = ?"
                               " WHERE state = 'pending' AND seq IN ({})", (time.time(),))
            return outcome
        self._failures += 1
        self._last_error = outcome.error
        if outcome.kind == "retry":
            self._consecutive_failures += 1
            n = self._consecutive_failures
            if n & (n - 1) == 0:  # 1, 2, 4, 8…: visible without flooding the log during a long outage
                log.warning("webhook %s: post of %d alert(s) failed (%d in a row), retrying: %s", self.name,
                            len(rows), n, outcome.error)
        self._update(seqs, "UPDATE outbox SET attempts = attempts + 1, last_error = ?"
                           " WHERE state = 'pending' AND seq IN ({})", (outcome.error,))
        return outcome

    def _reject(self, row: _Row, error: str) -> None:
        log.error("webhook %s: receiver refused alert %s (%s %s) for good: %s", self.name, row.alert_id,
                  row.alert.get("labels", {}).get("alertname"), row.alert.get("status"), error)
        self._update([row.seq], "UPDATE outbox SET state = 'rejected' WHERE state = 'pending' AND seq IN ({})",
                     ())

    def _update(self, seqs: list[int], sql: str, params: tuple[Any, ...]) -> None:
        with self._lock:
            self._require_conn().execute(sql.format(",".join("?" * len(seqs))), (*params, *seqs))
        with self._progress:
            self._progress.notify_all()

    def _post(self, client: httpx.Client, payload: dict[str, Any]) -> _Outcome:
        """One HTTP post, classified. Never raises; the DB lock is not held here."""
        timeout = self.timeout
        if self._stop.is_set():
            timeout = max(0.05, min(timeout, self._deadline - time.monotonic()))
        try:
            resp = client.post(self.url, json=payload, timeout=timeout)
        except httpx.HTTPError as exc:
            return _Outcome("retry", f"{type(exc).__name__}: {exc}"[:500])
        code = resp.status_code
        if 200 <= code < 300:
            return _Outcome("ok")
        error = f"HTTP {code}: {resp.text[:200]}"
        if code in _RETRYABLE_4XX or code >= 500 or code < 400:
            return _Outcome("retry", error, _retry_after(resp))
        return _Outcome("reject", error)

    def _purge(self) -> None:
        """Drops settled rows past the retention, so the outbox does not grow without bound; a replay older
        than that is queued again."""
        with self._lock:
            self._require_conn().execute(
                "DELETE FROM outbox WHERE sink = ? AND state != 'pending' AND created_at < ?",
                (self.name, time.time() - self.retention),
            )


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # the HTTP-date form is rare for webhooks; plain backoff is good enough
