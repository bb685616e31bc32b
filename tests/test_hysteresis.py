"""engine.detectors.base.Hysteresis: the onset/recovery state machine every detector shares, on plain arrays."""

from __future__ import annotations

import numpy as np
import pytest

from engine.detectors.base import Hysteresis
from engine.events import Event, Severity, Status

DT = 0.04  # one frame at 25 fps


def _make_event(start: float, value: float | None) -> Event:
    return Event(
        id=f"e{start:.6f}",
        stream="s",
        type="test",
        status=Status.FIRING,
        start=round(start, 6),
        end=None,
        duration=None,
        wallclock="",
        value=value,
        threshold=None,
        severity=Severity.WARNING,
        detector_version="t",
    )


def _machine(onset: float, recovery: float, higher_is_worse: bool = True) -> tuple[Hysteresis, list[Event]]:
    out: list[Event] = []
    return Hysteresis(onset, recovery, _make_event, out.append, higher_is_worse=higher_is_worse), out


def _frames(flags: str, dt: float = DT, t0: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """'..XXX..' -> per-frame start, end and faulty arrays (X = faulty)."""
    faulty = np.array([c == "X" for c in flags])
    start = t0 + dt * np.arange(len(flags))
    return start, start + dt, faulty


def _feed(h: Hysteresis, flags: str, values: np.ndarray | None = None, cuts: list[int] | None = None, dt: float = DT) -> None:
    start, end, faulty = _frames(flags, dt)
    bounds = [0, *(cuts or []), len(flags)]
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        h.update(start[a:b], end[a:b], faulty[a:b], None if values is None else values[a:b])


def _pairs(events: list[Event]) -> list[tuple[str, float, float | None]]:
    return [(e.status.value, round(e.start, 6), None if e.end is None else round(e.end, 6)) for e in events]


# ------------------------------------------------------------------------------------------------ onset
def test_onset_exactly_met_fires_at_the_first_faulty_frame() -> None:
    # 50 faulty frames of 40 ms = exactly 2.000 s (accumulated in floating point) -> fires.
    h, out = _machine(onset=2.0, recovery=0.5)
    _feed(h, "." * 10 + "X" * 50 + "." * 20)
    assert _pairs(out) == [("firing", 0.4, None), ("resolved", 0.4, 2.4)]
    assert out[0].id == out[1].id
    assert not h.active


def test_one_frame_short_of_onset_raises_nothing() -> None:
    h, out = _machine(onset=2.0, recovery=0.5)
    _feed(h, "." * 10 + "X" * 49 + "." * 20)
    h.finish()
    assert out == []


def test_onset_zero_fires_on_a_single_frame() -> None:
    h, out = _machine(onset=0.0, recovery=1.0)
    _feed(h, "..X" + "." * 30)
    assert _pairs(out) == [("firing", 0.08, None), ("resolved", 0.08, 0.12)]


def test_fires_as_soon_as_onset_is_reached_not_at_the_end_of_the_fault() -> None:
    h, out = _machine(onset=1.0, recovery=0.5)
    _feed(h, "X" * 25, cuts=[10, 24])  # 1.00 s reached only with frame 25
    assert _pairs(out) == [("firing", 0.0, None)]
    assert h.active


# ------------------------------------------------------------------------------------------------ recovery
@pytest.mark.parametrize(
    "gap,recovery,expected",
    [
        # gap shorter than recovery: one event from the first run's start to the second run's end
        (7, 0.5, [(0.4, 3.68)]),  # 0.28 s gap < 0.5 s
        # gap longer than recovery: two events, the first ending where the gap began
        (7, 0.2, [(0.4, 1.6), (1.88, 3.68)]),  # 0.28 s gap > 0.2 s
        # gap exactly the recovery: the fault is gone for `recovery` -> resolved, two events
        (5, 0.2, [(0.4, 1.6), (1.8, 3.6)]),
    ],
)
def test_gap_against_recovery(gap: int, recovery: float, expected: list[tuple[float, float]]) -> None:
    flags = "." * 10 + "X" * 30 + "." * gap + "X" * 45 + "." * 40
    h, out = _machine(onset=1.0, recovery=recovery)
    _feed(h, flags)
    resolved = [(round(e.start, 6), round(e.end, 6)) for e in out if e.status == Status.RESOLVED]
    assert resolved == expected
    assert [e.status for e in out] == [Status.FIRING, Status.RESOLVED] * len(expected)


def test_short_fault_inside_recovery_keeps_event_open_and_end_moves() -> None:
    # A fault, a short gap, a blip shorter than onset: the blip belongs to the open event.
    flags = "X" * 30 + "..." + "XX" + "." * 30
    h, out = _machine(onset=1.0, recovery=0.5)
    _feed(h, flags)
    assert _pairs(out) == [("firing", 0.0, None), ("resolved", 0.0, 1.4)]


def test_recovery_zero_resolves_on_the_first_clear_frame() -> None:
    h, out = _machine(onset=1.0, recovery=0.0)
    _feed(h, "X" * 30 + "." + "X" * 30 + ".")
    assert _pairs(out) == [("firing", 0.0, None), ("resolved", 0.0, 1.2), ("firing", 1.24, None), ("resolved", 1.24, 2.44)]


def test_value_is_the_worst_over_the_event_and_nan_is_ignored() -> None:
    flags = "." * 5 + "X" * 40 + "." * 20
    values = np.full(len(flags), 0.1)
    values[5:45] = np.linspace(0.5, 0.9, 40)
    values[20] = 3.0  # the worst frame
    values[30] = np.nan
    h, out = _machine(onset=1.0, recovery=0.5)
    _feed(h, flags, values, cuts=[12, 33])
    assert out[-1].status == Status.RESOLVED and out[-1].value == pytest.approx(3.0)
    h2, out2 = _machine(onset=1.0, recovery=0.5, higher_is_worse=False)
    _feed(h2, flags, values)
    assert out2[-1].value == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------------ batches
PATTERN = (
    "." * 7 + "X" * 60 + "." * 5 + "X" * 20 + "." * 30  # one event bridged over a 0.2 s gap: 0.28..3.68
    + "X" * 20 + "." * 15  # 0.8 s, then a 0.6 s gap >= recovery: dropped
    + "X" * 15 + "." * 3 + "X" * 12  # 0.6 s + 0.12 s gap + 0.48 s: a pending fault bridges it, 6.28..7.48
    + "." * 13 + "X" * 40 + "." * 9  # 0.52 s gap > recovery: a new event 8.0..9.6, still recovering at the end
)


def _run(cuts: list[int] | None) -> list[tuple[str, float, float | None, float | None]]:
    """Resolved events (with their worst value) and the firing events' starts for PATTERN fed in batches."""
    values = np.sin(np.arange(len(PATTERN)) * 0.37) + 2
    h, out = _machine(onset=1.0, recovery=0.5)
    _feed(h, PATTERN, values, cuts)
    h.finish()
    # A firing event carries the worst value seen *so far*, which depends on where the batches end; the
    # resolved event carries the worst over the whole event, which must not.
    return [(s, a, b, e.value if s == "resolved" else None) for (s, a, b), e in zip(_pairs(out), out, strict=True)]


def test_batches_reference() -> None:
    ref = _run(None)
    assert [(s, a, b) for s, a, b, _ in ref] == [
        ("firing", 0.28, None), ("resolved", 0.28, 3.68),
        ("firing", 6.28, None), ("resolved", 6.28, 7.48),
        ("firing", 8.0, None), ("resolved", 8.0, 9.6),
    ]
    values = np.sin(np.arange(len(PATTERN)) * 0.37) + 2
    assert ref[1][3] == pytest.approx(values[7:92].max())


@pytest.mark.parametrize("seed", range(6))
def test_runs_split_across_batches_give_the_same_events(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = len(PATTERN)
    if seed == 0:
        cuts = list(range(1, n))  # one frame per update()
    else:
        cuts = sorted(set(rng.integers(1, n, size=int(rng.integers(3, 40))).tolist()))
    assert _run(cuts) == _run(None)


def test_pending_fault_survives_a_gap_shorter_than_recovery() -> None:
    # 0.6 s fault, 0.2 s gap, 0.6 s fault: onset (1 s) counts from the first faulty frame across the gap.
    h, out = _machine(onset=1.0, recovery=0.5)
    _feed(h, "." * 5 + "X" * 15 + "." * 5 + "X" * 15 + "." * 20)
    assert _pairs(out) == [("firing", 0.2, None), ("resolved", 0.2, 1.6)]


def test_pending_fault_is_dropped_after_a_gap_of_recovery() -> None:
    h, out = _machine(onset=1.0, recovery=0.2)
    _feed(h, "." * 5 + "X" * 15 + "." * 5 + "X" * 15 + "." * 20)  # 0.2 s gap = recovery
    h.finish()
    assert out == []


def test_onset_reached_only_across_batches() -> None:
    # Neither batch alone holds 1 s of fault; together they do. The start is the first faulty frame of the
    # first batch.
    h, out = _machine(onset=1.0, recovery=0.5)
    _feed(h, "." * 5 + "X" * 15 + "X" * 15 + "." * 20, cuts=[20])
    assert _pairs(out) == [("firing", 0.2, None), ("resolved", 0.2, 1.4)]


def test_recovery_reached_only_across_batches() -> None:
    h, out = _machine(onset=1.0, recovery=0.5)
    _feed(h, "X" * 30 + "." * 7 + "." * 7 + "X" * 5, cuts=[37])
    assert _pairs(out) == [("firing", 0.0, None), ("resolved", 0.0, 1.2)]


def test_empty_batches_change_nothing() -> None:
    h, out = _machine(onset=1.0, recovery=0.5)
    h.update(np.array([]), np.array([]), np.array([], dtype=bool))
    _feed(h, "X" * 30, cuts=[10, 10, 20])
    h.update(np.array([]), np.array([]), np.array([], dtype=bool))
    assert _pairs(out) == [("firing", 0.0, None)]


# ------------------------------------------------------------------------------------------------ finish
def test_finish_with_an_open_fault_resolves_at_end_of_input() -> None:
    h, out = _machine(onset=1.0, recovery=0.5)
    _feed(h, "." * 5 + "X" * 40)
    h.finish()  # end of input = end of the last frame seen
    assert _pairs(out) == [("firing", 0.2, None), ("resolved", 0.2, 1.8)]
    assert not h.active


def test_finish_with_an_explicit_end_time() -> None:
    h, out = _machine(onset=1.0, recovery=0.5)
    _feed(h, "." * 5 + "X" * 40)
    h.finish(2.5)
    assert _pairs(out)[-1] == ("resolved", 0.2, 2.5)


def test_finish_while_recovering_resolves_where_the_fault_stopped() -> None:
    h, out = _machine(onset=1.0, recovery=0.5)
    _feed(h, "X" * 30 + "." * 5)  # 0.2 s clear, recovery not reached
    assert _pairs(out) == [("firing", 0.0, None)]
    h.finish()
    assert _pairs(out)[-1] == ("resolved", 0.0, 1.2)


def test_finish_with_a_pending_fault_shorter_than_onset_raises_nothing() -> None:
    h, out = _machine(onset=1.0, recovery=0.5)
    _feed(h, "." * 5 + "X" * 20)  # 0.8 s pending at end of input
    h.finish()
    assert out == []
    assert h.pending_start is None and not h.active


def test_finish_with_a_pending_fault_that_reaches_onset_by_the_end_time() -> None:
    # The last frame seen ends at 1.0 s; the input ends at 1.6 s with the fault still there (0.2..1.6 s).
    h, out = _machine(onset=1.0, recovery=0.5)
    _feed(h, "." * 5 + "X" * 20)
    h.finish(1.6)
    assert _pairs(out) == [("firing", 0.2, None), ("resolved", 0.2, 1.6)]


def test_finish_with_a_pending_fault_that_already_went_away() -> None:
    # 0.8 s of fault, then 0.2 s clear (< recovery) when the input ends at 1.6 s: the fault ended at 1.0 s,
    # so it never lasted its onset, however late the input ends.
    h, out = _machine(onset=1.0, recovery=0.5)
    _feed(h, "." * 5 + "X" * 20 + "." * 5)
    h.finish(1.6)
    assert out == []


def test_finish_twice_emits_nothing_more() -> None:
    h, out = _machine(onset=1.0, recovery=0.5)
    _feed(h, "X" * 40)
    h.finish()
    n = len(out)
    h.finish()
    assert len(out) == n == 2
