"""Worker news channels (engine.channel): a worker that dies or stops in the middle of a message holds up no
other worker's news and never the parent."""

from __future__ import annotations

import multiprocessing as mp
import os
import struct
import time

from engine.channel import Inbox, Outbox

CTX = mp.get_context("spawn")


def _talk(conn, index: int, count: int) -> None:
    out = Outbox(conn)
    for i in range(count):
        out.put(("n", index, i))
    out.close()


def _half_message(conn, then_sleep: float) -> None:
    """Write the header of a 100 kB message and 10 bytes of it, as a worker killed (or stopped) while writing
    would leave its pipe."""
    os.write(conn.fileno(), struct.pack("!i", 100_000) + b"0123456789")
    if then_sleep:
        time.sleep(then_sleep)
    os._exit(1)


def _start(inbox: Inbox, index: int, target, *args) -> mp.Process:
    conn = inbox.open(index)
    p = CTX.Process(target=target, args=(conn, *args), daemon=True)
    try:
        p.start()
    finally:
        inbox.started(conn)
    return p


def _collect(inbox: Inbox, until, seconds: float = 30.0) -> list[tuple]:
    got: list[tuple] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end and not until(got):
        inbox.drain(lambda *item: got.append(item), 0.2)
    return got


def test_every_message_arrives_in_order_per_worker() -> None:
    inbox = Inbox(CTX)
    opened = time.monotonic()
    procs = [_start(inbox, i, _talk, i, 500) for i in range(2)]
    got = _collect(inbox, lambda g: len(g) == 1000)
    # When each worker was last heard from is taken on arrival (the watchdog's clock), before any handling.
    assert all(opened < inbox.heard(i) <= time.monotonic() for i in range(2)) and inbox.heard(2) is None
    for p in procs:
        p.join(10)
    assert [n for _, i, n in got if i == 0] == list(range(500))
    assert [n for _, i, n in got if i == 1] == list(range(500))


def test_a_worker_dead_in_the_middle_of_a_message_holds_up_nothing() -> None:
    inbox = Inbox(CTX)
    dead = _start(inbox, 0, _half_message, 0.0)
    dead.join(30)
    assert dead.exitcode == 1
    inbox.settle(0, timeout=5)  # its reader saw the pipe end: the half message is dropped, nothing waits on it
    assert 0 not in inbox._readers
    _start(inbox, 1, _talk, 1, 50)
    got = _collect(inbox, lambda g: len(g) == 50)
    assert got == [("n", 1, i) for i in range(50)]


def test_a_worker_stopped_in_the_middle_of_a_message_holds_up_only_itself() -> None:
    inbox = Inbox(CTX)
    stuck = _start(inbox, 0, _half_message, 60.0)
    time.sleep(0.5)
    _start(inbox, 1, _talk, 1, 50)
    got = _collect(inbox, lambda g: len(g) == 50)
    assert got == [("n", 1, i) for i in range(50)]
    assert stuck.is_alive()
    stuck.kill()
    stuck.join(10)
    inbox.settle(0, timeout=5)
    assert 0 not in inbox._readers


def test_a_message_that_cannot_be_pickled_is_lost_alone() -> None:
    r, w = CTX.Pipe(duplex=False)
    out = Outbox(w)
    out.put(("n", 0, 1))
    out.put(("n", 0, lambda: None))  # not picklable
    out.put(("n", 0, 3))
    out.close()
    assert [r.recv(), r.recv()] == [("n", 0, 1), ("n", 0, 3)]
    r.close()
