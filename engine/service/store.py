"""The service's state on disk (SQLite): the streams it runs, and every alert with its acknowledgement.

One file, written from the engine thread (events) and the API (streams, acks); WAL mode lets readers go on
while a write is in progress, and every change is one committed transaction, so a killed process leaves
the file consistent. The webhook outbox (engine.alerts.webhook) keeps its own tables in the same file.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.events import Event

SCHEMA = """
CREATE TABLE IF NOT EXISTS streams (
    id TEXT PRIMARY KEY,
    body TEXT NOT NULL,            -- the stream as the config's StreamModel, JSON
    origin TEXT NOT NULL,          -- 'config' (seeded from the config file) or 'api'
    deleted INTEGER NOT NULL DEFAULT 0,  -- removed through the API: the config must not bring it back
    media_time REAL,               -- last media time seen, to close alerts a crash left open
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS alerts (
    id TEXT PRIMARY KEY,
    stream TEXT NOT NULL,
    type TEXT NOT NULL,
    severity TEXT NOT NULL,
    status TEXT NOT NULL,
    fired_at TEXT NOT NULL,        -- wall clock of the firing event (ISO UTC)
    resolved_at TEXT,
    run TEXT NOT NULL,             -- service run the alert belongs to (media times count from its start)
    event TEXT NOT NULL,           -- the latest event of the alert, in the JSONL sink's schema
    acked_at TEXT,
    acked_by TEXT,
    ack_comment TEXT
);
CREATE INDEX IF NOT EXISTS alerts_stream ON alerts (stream, fired_at);
CREATE INDEX IF NOT EXISTS alerts_status ON alerts (status);
CREATE INDEX IF NOT EXISTS alerts_fired ON alerts (fired_at);
"""


@dataclass(frozen=True)
class StoredStream:
    id: str
    body: dict[str, Any]
    origin: str
    deleted: bool
    media_time: float | None


@dataclass(frozen=True)
class AlertQuery:
    stream: str | None = None
    type: str | None = None
    status: str | None = None  # firing | resolved | acknowledged | unacknowledged
    since: str | None = None  # ISO UTC: alerts fired or resolved at or after it
    limit: int = 100


class StateStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
            # A damaged file can open and still fail every other query: found now, at start, not by each
            # request that touches the bad pages (quick_check reads every page, milliseconds for this store).
            check = [str(r[0]) for r in self._db.execute("PRAGMA quick_check(3)").fetchall()]
        if check != ["ok"]:
            self._db.close()
            what = "; ".join(x.strip() for c in check for x in c.splitlines() if x.strip())
            raise sqlite3.DatabaseError(f"{self.path} is damaged ({what[:200]}); move it away to start afresh")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                self._db.close()

    def integrity(self) -> str:
        with self._lock:
            return str(self._db.execute("PRAGMA integrity_check").fetchone()[0])

    # -- streams
    def streams(self, include_deleted: bool = False) -> list[StoredStream]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM streams ORDER BY created, id").fetchall()
        out = [StoredStream(r["id"], json.loads(r["body"]), r["origin"], bool(r["deleted"]), r["media_time"])
               for r in rows]
        return out if include_deleted else [s for s in out if not s.deleted]

    def stream(self, stream_id: str) -> StoredStream | None:
        with self._lock:
            r = self._db.execute("SELECT * FROM streams WHERE id = ?", (stream_id,)).fetchone()
        return None if r is None else StoredStream(r["id"], json.loads(r["body"]), r["origin"], bool(r["deleted"]),
                                                   r["media_time"])

    def seed_stream(self, stream_id: str, body: dict[str, Any]) -> bool:
        """A stream of the config file, unless the store knows the id already (changed or removed through the
        API, which wins over the file). Returns whether it was new."""
        now = time.time()
        with self._tx() as db:
            cur = db.execute("INSERT OR IGNORE INTO streams (id, body, origin, created, updated) VALUES (?, ?, ?, ?, ?)",
                             (stream_id, json.dumps(body), "config", now, now))
            return cur.rowcount == 1

    def put_stream(self, stream_id: str, body: dict[str, Any]) -> None:
        """Add or replace a stream (an API call); a removed id comes back to life."""
        now = time.time()
        with self._tx() as db:
            db.execute(
                "INSERT INTO streams (id, body, origin, created, updated) VALUES (?, ?, 'api', ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET body = excluded.body, deleted = 0, updated = excluded.updated",
                (stream_id, json.dumps(body), now, now))

    def delete_stream(self, stream_id: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE streams SET deleted = 1, updated = ? WHERE id = ?", (time.time(), stream_id))

    def note_media_times(self, times: dict[str, float]) -> None:
        if not times:
            return
        with self._tx() as db:
            db.executemany("UPDATE streams SET media_time = ? WHERE id = ?", [(t, i) for i, t in times.items()])

    # -- alerts
    def record(self, event: Event, run: str) -> None:
        """The latest state of an alert. A resolved event never goes back to firing (a replay of an older
        event is ignored), and the acknowledgement survives."""
        d = event.to_dict()
        blob = event.to_json()
        with self._tx() as db:
            row = db.execute("SELECT status FROM alerts WHERE id = ?", (event.id,)).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO alerts (id, stream, type, severity, status, fired_at, resolved_at, run, event) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (event.id, event.stream, event.type, d["severity"], d["status"],
                     _fired_at(event), event.wallclock if d["status"] == "resolved" else None, run, blob))
            elif not (row["status"] == "resolved" and d["status"] == "firing"):
                db.execute("UPDATE alerts SET status = ?, severity = ?, resolved_at = ?, event = ? WHERE id = ?",
                           (d["status"], d["severity"], event.wallclock if d["status"] == "resolved" else None,
                            blob, event.id))

    def alert(self, alert_id: str) -> dict[str, Any] | None:
        with self._lock:
            r = self._db.execute("SELECT * FROM alerts WHERE id = ?", (alert_id,)).fetchone()
        return None if r is None else _alert_dict(r)

    def alerts(self, q: AlertQuery) -> list[dict[str, Any]]:
        where, args = [], []
        if q.stream:
            where.append("stream = ?")
            args.append(q.stream)
        if q.type:
            where.append("type = ?")
            args.append(q.type)
        if q.status in ("firing", "resolved"):
            where.append("status = ?")
            args.append(q.status)
        elif q.status == "acknowledged":
            where.append("acked_at IS NOT NULL")
        elif q.status == "unacknowledged":
            where.append("acked_at IS NULL")
        if q.since:
            where.append("(fired_at >= ? OR resolved_at >= ?)")
            args += [q.since, q.since]
        sql = "SELECT * FROM alerts" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY fired_at DESC, rowid DESC LIMIT ?"
        args.append(q.limit)
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [_alert_dict(r) for r in rows]

    def open_alerts(self) -> list[Event]:
        """Alerts still firing: at start-up, those a killed process could not resolve."""
        with self._lock:
            rows = self._db.execute("SELECT event FROM alerts WHERE status = 'firing' ORDER BY fired_at").fetchall()
        return [event_from_json(r["event"]) for r in rows]

    def ack(self, alert_id: str, by: str, comment: str) -> tuple[dict[str, Any] | None, bool]:
        """Acknowledge an alert (once: a second ack keeps the first one's time and author). Returns the alert
        and whether this call acknowledged it."""
        from engine.events import now_iso

        with self._tx() as db:
            changed = db.execute("UPDATE alerts SET acked_at = ?, acked_by = ?, ack_comment = ? WHERE id = ? AND acked_at IS NULL",
                                 (now_iso(), by, comment, alert_id)).rowcount
        return self.alert(alert_id), changed > 0

    def purge(self, resolved_before: str) -> tuple[int, list[str]]:
        """Delete alerts resolved before an ISO UTC time; returns how many, and their thumbnail paths (for the
        caller to delete: the store only knows paths). Firing alerts are never purged."""
        with self._tx() as db:
            rows = db.execute("SELECT id, event FROM alerts WHERE status = 'resolved' AND resolved_at < ?",
                              (resolved_before,)).fetchall()
            db.executemany("DELETE FROM alerts WHERE id = ?", [(r["id"],) for r in rows])
        return len(rows), [t for t in (json.loads(r["event"]).get("thumbnail") for r in rows) if t]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) AS n FROM alerts GROUP BY status").fetchall()
        return {r["status"]: int(r["n"]) for r in rows}


def _fired_at(event: Event) -> str:
    """The firing time of an alert first seen resolved (its firing event lost): resolution time − duration."""
    if event.status.value == "firing" or event.duration is None:
        return event.wallclock
    from datetime import datetime, timedelta

    try:
        t = datetime.fromisoformat(event.wallclock.replace("Z", "+00:00")) - timedelta(seconds=event.duration)
        return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    except ValueError:
        return event.wallclock


def event_from_json(blob: str) -> Event:
    from engine.events import Severity, Status

    d = json.loads(blob)
    return Event(**{**d, "status": Status(d["status"]), "severity": Severity(d["severity"])})


def _alert_dict(r: sqlite3.Row) -> dict[str, Any]:
    d = json.loads(r["event"])
    d["fired_at"] = r["fired_at"]
    d["run"] = r["run"]
    d["acknowledged"] = r["acked_at"] is not None
    d["acked_at"] = r["acked_at"]
    d["acked_by"] = r["acked_by"]
    d["ack_comment"] = r["ack_comment"]
    return d
