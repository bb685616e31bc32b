"""How worker processes send their news to the parent: one pipe per worker, never a queue they all share.

A `multiprocessing.Queue` shared by every worker has one write lock across the processes and one pipe the
parent also holds open. A worker killed while it writes (SIGKILL, the OOM killer, a GPU failure the parent
answers with kill()) can leave that lock taken for good, so every other worker's messages wait forever and
each of them hangs at exit flushing them; or leave half a message in the pipe, which the parent then waits
to read the rest of, forever. Either way one death stopped every stream's alerts. Here each worker writes to
a pipe of its own whose other end only the parent holds (after `Inbox.started`): a death mid-message ends
that pipe with EOF, the half message is dropped, and the other workers never notice.
"""

from __future__ import annotations

import logging
import queue as queue_mod
import threading
import time
from typing import Any

log = logging.getLogger("framewatch")

# A running worker sends news at least once a second (progress, snapshots); one silent this long is hung (a
# deadlock, a stopped process) and its parent kills it and handles it as dead. STARTUP: before its first message,
# which waits for imports and the device. Generous: a first step on a cold GPU compiles kernels (cupy, NVRTC).
WATCHDOG = 90.0
STARTUP = 300.0

_CLOSE = object()


class Outbox:
    """The worker's end. `put` never waits: a thread of its own writes to the pipe (as a Queue's feeder did),
    so an engine is not held up by a parent busy with a slow sink. `close` sends what is left and waits for it
    to be written: call it last, or the final messages ("done") may be lost when the process exits."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._items: queue_mod.SimpleQueue = queue_mod.SimpleQueue()
        self._thread = threading.Thread(target=self._feed, name="outbox", daemon=True)
        self._thread.start()

    def put(self, item: Any) -> None:
        self._items.put(item)

    def _feed(self) -> None:
        while True:
            item = self._items.get()
            if item is _CLOSE:
                return
            try:
                self._conn.send(item)
            except (BrokenPipeError, EOFError, ConnectionError):  # the parent is gone: nobody to tell
                return
            except Exception:  # a message that cannot be pickled is lost alone, not the ones after it
                log.exception("a message to the parent could not be sent")

    def close(self, timeout: float | None = 30.0) -> None:
        self._items.put(_CLOSE)
        self._thread.join(timeout)
        try:
            self._conn.close()
        except OSError:
            pass


class Inbox:
    """The parent's end: a pipe per worker, each read by a thread of its own into one local queue, in each
    worker's own order. A worker stopped in the middle of a message (a debugger, SIGSTOP) then holds up only
    its own reader, not the parent."""

    def __init__(self, ctx: Any) -> None:
        self._ctx = ctx
        self._items: queue_mod.SimpleQueue = queue_mod.SimpleQueue()
        self._readers: dict[int, threading.Thread] = {}
        # worker -> time.monotonic() when its last message arrived: taken on arrival, so a parent slow to handle
        # its queue (a sink that blocks) never makes a worker look silent.
        self._heard: dict[int, float] = {}

    def heard(self, index: int) -> float | None:
        """When worker `index`'s last message arrived (time.monotonic()), None before its first."""
        return self._heard.get(index)

    def hung(self, index: int, started: float) -> float | None:
        """The seconds worker `index` (started at `started`, time.monotonic()) has been silent, when that is past
        WATCHDOG (STARTUP before its first message); None while it is not hung."""
        heard = self._heard.get(index)
        silent = time.monotonic() - (heard if heard is not None else started)
        return silent if silent > (WATCHDOG if heard is not None else STARTUP) else None

    def open(self, index: int) -> Any:
        """A new pipe for worker `index`: returns the end to hand to its process; pass it to `started` once
        the process has started (or failed to)."""
        self._readers = {i: t for i, t in self._readers.items() if t.is_alive()}
        reader, writer = self._ctx.Pipe(duplex=False)
        thread = threading.Thread(target=self._read, args=(index, reader), name=f"inbox-{index}", daemon=True)
        self._readers[index] = thread
        thread.start()
        return writer

    @staticmethod
    def started(writer: Any) -> None:
        """The parent's copy of a worker's end is closed, so that the worker's death ends its pipe (EOF)."""
        writer.close()

    def _read(self, index: int, reader: Any) -> None:
        with reader:
            while True:
                try:
                    item = reader.recv()
                    self._heard[index] = time.monotonic()
                except (EOFError, OSError):  # the worker is gone; half a message it left is dropped
                    return
                except Exception:  # one message that cannot be unpickled; the pipe stays in step
                    log.exception("a message from a worker could not be read")
                    continue
                self._items.put(item)

    def settle(self, index: int, timeout: float = 2.0) -> None:
        """Wait (up to `timeout`) until everything a finished worker wrote is on the queue: its reader ends at
        the pipe's EOF."""
        thread = self._readers.get(index)
        if thread is not None:
            thread.join(timeout)
            if not thread.is_alive():
                del self._readers[index]

    def drain(self, handle: Any, timeout: float) -> None:
        """Hand every message waiting to `handle(kind, index, payload)`, waiting up to `timeout` seconds for
        the first (0: none)."""
        try:
            item = self._items.get(timeout=timeout) if timeout else self._items.get_nowait()
        except queue_mod.Empty:
            return
        while True:
            handle(*item)
            try:
                item = self._items.get_nowait()
            except queue_mod.Empty:
                return
