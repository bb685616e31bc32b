"""Packing streams onto GPUs by NVDEC budget: the plan, incremental changes, GPU failure and rebalancing.

A plan takes streams largest first (first-fit decreasing). Each goes to the GPU that would be least loaded
after taking it ("least-loaded fit"), which keeps GPUs balanced without a separate pass, at the best tier that
still leaves enough capacity for the streams not yet placed at their cheapest tier: monitoring every stream at
all comes before decoding some of them in full. A tier is tried on every GPU and then on spare CPU decode
capacity before the next cheaper tier, because a stream decoded in full on the CPU is worth more to the user
than the same stream reduced to keyframes on a GPU.

Incremental operations never move a stream that does not have to move: `add` only places the new stream,
`remove` only admits refused streams and upgrades streams in place (same GPU), `fail_gpu` moves only the
failed GPU's streams. Moving streams to even out load is `rebalance`'s job, and it moves as few as it can.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from enum import StrEnum

from engine.scheduler.capacity import (
    CPU_CODEC_FACTOR,
    TIER_ORDER,
    TURING_PER_ENGINE_FPS,
    CpuModel,
    GpuModel,
    StreamDemand,
    Tier,
    codec_display,
    cpu_cost,
    engine_cost,
    stream_memory_mb,
    tier_words,
)

log = logging.getLogger(__name__)

_EPS = 1e-9


class Target(StrEnum):
    GPU = "gpu"
    CPU = "cpu"
    REFUSED = "refused"


@dataclass(frozen=True, slots=True)
class Placement:
    """One decision about one stream.

    `cost` is in the target's unit: engine units on a GPU, cores on the CPU (`CpuModel.cost`), and
    for a refused stream the engine units it would need at its cheapest tier (0 when no GPU decodes its
    codec). `memory_mb` is charged to the GPU only when the target is a GPU.
    """

    stream_id: str
    target: Target
    gpu: int | None
    tier: Tier | None
    cost: float
    memory_mb: float
    reason: str

    @property
    def admitted(self) -> bool:
        return self.target is not Target.REFUSED

    @property
    def downgraded(self) -> bool:
        return self.admitted and self.tier is not Tier.ALL

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["target"] = self.target.value
        d["tier"] = self.tier.value if self.tier else None
        return d


@dataclass(frozen=True, slots=True)
class GpuLoad:
    index: int
    name: str
    usable: bool
    streams: int
    load_units: float
    budget_units: float
    memory_mb: float
    memory_budget_mb: float

    @property
    def load_fraction(self) -> float:
        return self.load_units / self.budget_units if self.budget_units > 0 else 0.0

    @property
    def memory_fraction(self) -> float:
        return self.memory_mb / self.memory_budget_mb if self.memory_budget_mb > 0 else 0.0


def _imbalance(fractions: list[float]) -> float:
    if len(fractions) < 2:
        return 0.0
    mean = sum(fractions) / len(fractions)
    return (max(fractions) - min(fractions)) / mean if mean > 0 else 0.0


@dataclass(frozen=True)
class Plan:
    """A snapshot of where every stream is decoded and how loaded each GPU is."""

    placements: Mapping[str, Placement]
    gpus: tuple[GpuLoad, ...]
    cpu_load_cores: float = 0.0
    cpu_budget_cores: float = 0.0
    cpu_scoring_cores: float = 0.0
    cpu_scoring_budget_cores: float = 0.0

    @property
    def gpu_load(self) -> list[float]:
        """Engine units in use on each GPU."""
        return [g.load_units for g in self.gpus]

    @property
    def gpu_load_fraction(self) -> list[float]:
        """Load of each GPU as a fraction of its engine budget."""
        return [g.load_fraction for g in self.gpus]

    @property
    def gpu_memory_mb(self) -> list[float]:
        return [g.memory_mb for g in self.gpus]

    def on_gpu(self, index: int) -> list[Placement]:
        return [p for p in self.placements.values() if p.target is Target.GPU and p.gpu == index]

    def refused(self) -> list[Placement]:
        return [p for p in self.placements.values() if p.target is Target.REFUSED]

    def downgraded(self) -> list[Placement]:
        return [p for p in self.placements.values() if p.downgraded]

    def imbalance(self, include_idle: bool = False) -> float:
        """(max - min) / mean load fraction over GPUs that have streams (with `include_idle`, over every
        usable GPU, so an empty one counts as 0 load)."""
        return _imbalance(
            [g.load_fraction for g in self.gpus if (g.streams > 0 or (include_idle and g.usable))]
        )

    def summary(self) -> dict[str, object]:
        ps = list(self.placements.values())
        tiers = {t.value: sum(1 for p in ps if p.admitted and p.tier is t) for t in TIER_ORDER}
        return {
            "streams": len(ps),
            "on_gpu": sum(1 for p in ps if p.target is Target.GPU),
            "on_cpu": sum(1 for p in ps if p.target is Target.CPU),
            "refused": sum(1 for p in ps if p.target is Target.REFUSED),
            "downgraded": sum(1 for p in ps if p.downgraded),
            "tiers": tiers,
            "imbalance": round(self.imbalance(), 4),
            "gpus": [
                {
                    "index": g.index,
                    "name": g.name,
                    "usable": g.usable,
                    "streams": g.streams,
                    "load_units": round(g.load_units, 4),
                    "budget_units": round(g.budget_units, 4),
                    "load_pct": round(100 * g.load_fraction, 1),
                    "memory_mb": round(g.memory_mb, 1),
                    "memory_budget_mb": round(g.memory_budget_mb, 1),
                }
                for g in self.gpus
            ],
            "cpu": {"load_cores": round(self.cpu_load_cores, 3), "budget_cores": round(self.cpu_budget_cores, 3),
                    "scoring_cores": round(self.cpu_scoring_cores, 3),
                    "scoring_budget_cores": round(self.cpu_scoring_budget_cores, 3)},
        }


def _demand_words(s: StreamDemand) -> str:
    if not s.video:
        return "audio only"
    return f"{s.width}x{s.height} {codec_display(s.codec)} at {s.fps:g} fps"


def _cores(x: float) -> str:
    # Fractions of a core need three decimals: a 128x72 stream costs 0.087.
    return f"{x:.1f}" if x >= 10 else f"{x:.2f}" if x >= 1 else f"{x:.3f}"


def _units(x: float, other: float) -> str:
    # Two decimals, or three when two would print a shortfall as "needs 0.04, free 0.04".
    return f"{x:.3f}" if f"{x:.2f}" == f"{other:.2f}" else f"{x:.2f}"


@dataclass(slots=True)
class _Reserve:
    """What the streams of a batch not yet placed need at their cheapest tier: all of them, and the ones that
    can be downgraded (`flex_*`), whose cheapest tier costs a fraction of full rate."""

    units: float = 0.0
    memory_mb: float = 0.0
    streams: int = 0
    flex_units: float = 0.0
    flex_memory_mb: float = 0.0
    flex_streams: int = 0
    # Cores owed to the streams no GPU can take (a CPU-only engine: all of them).
    cpu: float = 0.0
    flex_cpu: float = 0.0
    cpu_streams: int = 0
    flex_cpu_streams: int = 0

    def take(self, units: float, memory_mb: float, flexible: bool, cpu: float = 0.0) -> None:
        self.units -= units
        self.memory_mb -= memory_mb
        self.streams -= 1
        if cpu:
            self.cpu -= cpu
            self.cpu_streams -= 1
        if flexible:
            self.flex_units -= units
            self.flex_memory_mb -= memory_mb
            self.flex_streams -= 1
            if cpu:
                self.flex_cpu -= cpu
                self.flex_cpu_streams -= 1


class Scheduler:
    """Places streams on GPUs (and spare CPU decode capacity) within NVDEC and memory budgets.

    `headroom` is the fraction of each GPU's engines and memory kept free, and of the CPU's cores. `cpu` is
    what a CPU engine may take (a `CpuModel`: cores and scoring threads, costs in cores; None: nothing goes to
    the CPU). With no GPUs at all it is the admission control of a CPU engine; beside GPUs it is hybrid decode.
    `cpu_decode_fps` is the older way to state hybrid capacity, as 1080p-H.264 frames/s of decoding alone
    (`CpuModel.decode_only`, codecs weighed by `cpu_codec_factor`). All methods are thread-safe and
    deterministic: ties go to the lower GPU index, and streams of equal cost are taken in id order.
    """

    def __init__(
        self,
        gpus: list[GpuModel],
        headroom: float = 0.15,
        cpu_decode_fps: float = 0.0,
        cpu_codec_factor: Mapping[str, float] = CPU_CODEC_FACTOR,
        cpu: CpuModel | None = None,
    ) -> None:
        if not 0.0 <= headroom < 1.0:
            raise ValueError(f"headroom must be in [0, 1), got {headroom}")
        if not cpu_decode_fps >= 0:
            raise ValueError(f"cpu_decode_fps must be >= 0, got {cpu_decode_fps}")
        if cpu is not None and cpu_decode_fps > 0:
            raise ValueError("give cpu or cpu_decode_fps, not both")
        self.gpus: tuple[GpuModel, ...] = tuple(gpus)
        self.headroom = headroom
        self._cpu_factor = dict(cpu_codec_factor)
        if cpu is None and cpu_decode_fps > 0:
            # Stated as spare already: no head room comes off it.
            cpu = CpuModel.decode_only(cpu_decode_fps)
            cpu = replace(cpu, cores=cpu.cores / (1.0 - headroom), codec_factor=self._cpu_factor)
        self.cpu = cpu
        self._cpu_budget = cpu.budget(headroom) if cpu else 0.0
        self._cpu_scoring_budget = cpu.scoring_budget(headroom) if cpu else 0.0
        self._budget = [g.engine_budget(headroom) for g in self.gpus]
        self._mem_budget = [g.memory_budget_mb(headroom) for g in self.gpus]
        self._lock = threading.RLock()
        self._failed: set[int] = set()
        self._reset()

    # --- state ---------------------------------------------------------------------------------------------

    def _reset(self) -> None:
        self._streams: dict[str, StreamDemand] = {}
        self._placements: dict[str, Placement] = {}
        self._members: list[set[str]] = [set() for _ in self.gpus]
        self._load = [0.0] * len(self.gpus)
        self._mem = [0.0] * len(self.gpus)
        self._cpu_load = 0.0
        self._cpu_scoring = 0.0

    def _commit(self, s: StreamDemand, p: Placement) -> Placement:
        self._streams[s.id] = s
        self._placements[s.id] = p
        if p.target is Target.GPU:
            assert p.gpu is not None
            self._members[p.gpu].add(s.id)
            self._load[p.gpu] += p.cost
            self._mem[p.gpu] += p.memory_mb
        elif p.target is Target.CPU:
            assert p.tier is not None and self.cpu is not None
            self._cpu_load += p.cost
            self._cpu_scoring += self.cpu.scoring_cost(s, p.tier)
        return p

    def _release(self, stream_id: str) -> Placement:
        p = self._placements.pop(stream_id)
        if p.target is Target.GPU:
            assert p.gpu is not None
            self._members[p.gpu].discard(stream_id)
            # Summed afresh rather than subtracted, so float error cannot build up over many changes.
            self._load[p.gpu] = sum(self._placements[i].cost for i in self._members[p.gpu])
            self._mem[p.gpu] = sum(self._placements[i].memory_mb for i in self._members[p.gpu])
        elif p.target is Target.CPU:
            self._cpu_load, self._cpu_scoring = self._cpu_sums()
        return p

    def _cpu_sums(self) -> tuple[float, float]:
        # Summed afresh, like the GPUs' load (CPU placements exist only with a CpuModel).
        on_cpu = [(self._streams[sid], p) for sid, p in self._placements.items() if p.target is Target.CPU]
        if self.cpu is None or not on_cpu:
            return 0.0, 0.0
        return (sum(p.cost for _, p in on_cpu),
                sum(self.cpu.scoring_cost(s, p.tier) for s, p in on_cpu if p.tier is not None))

    def _usable(self) -> list[int]:
        return [i for i in range(len(self.gpus)) if i not in self._failed]

    def _frac(self, i: int, extra: float = 0.0) -> float:
        return (self._load[i] + extra) / self._budget[i] if self._budget[i] > 0 else float("inf")

    def _gpu_label(self, i: int) -> str:
        return f"gpu {i} ({self.gpus[i].name})"

    def _fits(self, i: int, cost: float, mem: float) -> bool:
        return (
            self._load[i] + cost <= self._budget[i] + _EPS
            and self._mem[i] + mem <= self._mem_budget[i] + _EPS
        )

    def _cpu_free(self) -> float:
        return max(0.0, self._cpu_budget - self._cpu_load)

    def _cpu_need(self, s: StreamDemand, tier: Tier) -> tuple[float, float]:
        assert self.cpu is not None
        return self.cpu.cost(s, tier), self.cpu.scoring_cost(s, tier)

    def _cpu_fits(self, s: StreamDemand, tier: Tier) -> bool:
        if self.cpu is None:
            return False
        need, scoring = self._cpu_need(s, tier)
        return (self._cpu_load + need <= self._cpu_budget + _EPS
                and self._cpu_scoring + scoring <= self._cpu_scoring_budget + _EPS)

    def _cpu_load_text(self, extra: float, extra_scoring: float) -> str:
        text = f"CPU at {100 * (self._cpu_load + extra) / self._cpu_budget:.1f}% of {_cores(self._cpu_budget)} cores"
        if self._cpu_scoring_budget > 0:
            share = 100 * (self._cpu_scoring + extra_scoring) / self._cpu_scoring_budget
            text += f", scoring thread at {share:.1f}% of {_cores(self._cpu_scoring_budget)}"
        return text

    def _sort_key(self, s: StreamDemand) -> tuple[float, str]:
        return (-self._full_cost(s), s.id)

    def _full_cost(self, s: StreamDemand) -> float:
        # GPU-independent size for ordering: the cheapest full-rate cost on any GPU here, or the CPU cost in
        # H.264 engine terms when no GPU decodes the codec.
        costs = [engine_cost(s, Tier.ALL, g) for g in self.gpus if g.supports(s.codec)]
        if costs:
            return min(costs)
        if not self.gpus and self.cpu is not None:
            return self.cpu.cost(s, Tier.ALL)
        return cpu_cost(s, Tier.ALL, self._cpu_factor) / TURING_PER_ENGINE_FPS["h264"]

    # --- explaining ----------------------------------------------------------------------------------------

    def _codec_gap(self, s: StreamDemand) -> str | None:
        """Why no usable GPU can decode the stream's codec at all, or None when one can."""
        usable = self._usable()
        if any(self.gpus[i].supports(s.codec) for i in usable):
            return None
        if not usable:
            if not self.gpus:
                return "there is no GPU here"
            return f"no GPU is usable (failed: {', '.join(f'gpu {i}' for i in sorted(self._failed))})"
        names = sorted({self.gpus[i].name for i in usable})
        what = codec_display(s.codec)
        verb = "has" if len(names) == 1 else "have"
        return f"{what} cannot be decoded on any GPU here ({', '.join(names)} {verb} no {what} decoder)"

    def _cpu_phrase(self, s: StreamDemand, tier: Tier) -> str:
        if self.cpu is None:
            return "CPU decode has no spare capacity"
        need, scoring = self._cpu_need(s, tier)
        # The budget that runs out first is the one worth naming.
        if self._cpu_load + need <= self._cpu_budget + _EPS and self._cpu_scoring_budget > 0:
            free = max(0.0, self._cpu_scoring_budget - self._cpu_scoring)
            return (f"the CPU engine's scoring thread has {_cores(free)} of {_cores(self._cpu_scoring_budget)} cores "
                    f"free and the stream needs {_cores(scoring)} at {tier_words(tier)}")
        free = self._cpu_free()
        if free <= _EPS:
            return f"the CPU is full ({_cores(self._cpu_budget)} cores in use)"
        return (f"the CPU has {_cores(free)} of {_cores(self._cpu_budget)} cores free and the stream needs "
                f"{_cores(need)} at {tier_words(tier)}")

    def _gpu_shortfall(self, s: StreamDemand, tier: Tier) -> tuple[str, float]:
        """What no GPU had free for the stream at `tier` (to follow "no GPU had", before "free at <tier>"),
        and the engine units it needs there."""
        gpus = [i for i in self._usable() if self.gpus[i].supports(s.codec)]
        need = min(engine_cost(s, tier, self.gpus[i]) for i in gpus)
        mem = stream_memory_mb(s, tier)
        units_ok = any(
            self._load[i] + engine_cost(s, tier, self.gpus[i]) <= self._budget[i] + _EPS for i in gpus
        )
        mem_ok = any(self._mem[i] + mem <= self._mem_budget[i] + _EPS for i in gpus)
        if not units_ok:
            return f"{need:.2f} engine units", need
        if not mem_ok:
            return f"{mem:.0f} MB of memory", need
        return f"{need:.2f} engine units and {mem:.0f} MB together", need

    def _largest_free(self, s: StreamDemand, tier: Tier) -> tuple[int, float, str]:
        """The GPU with the most engine units free for this stream (index, units) and a note on memory when
        memory is what is short."""
        gpus = [i for i in self._usable() if self.gpus[i].supports(s.codec)]
        i = max(gpus, key=lambda j: (self._budget[j] - self._load[j], -j))
        m = max(gpus, key=lambda j: (self._mem_budget[j] - self._mem[j], -j))
        note = ""
        if all(self._mem[j] + stream_memory_mb(s, tier) > self._mem_budget[j] + _EPS for j in gpus):
            note = (
                f" (memory: largest free is {max(0.0, self._mem_budget[m] - self._mem[m]):.0f} MB on gpu {m})"
            )
        return i, max(0.0, self._budget[i] - self._load[i]), note

    # --- deciding ------------------------------------------------------------------------------------------

    def _min_need(self, s: StreamDemand) -> tuple[float, float, float]:
        """Engine units and memory the stream needs at its cheapest tier on the cheapest GPU, and the cores it
        needs there on the CPU when no GPU decodes its codec (where it needs nothing, it reserves nothing)."""
        tier = s.candidate_tiers()[-1]
        costs = [engine_cost(s, tier, self.gpus[i]) for i in self._usable() if self.gpus[i].supports(s.codec)]
        if costs:
            return min(costs), stream_memory_mb(s, tier), 0.0
        return 0.0, 0.0, (self.cpu.cost(s, tier) if self.cpu is not None else 0.0)

    def _cpu_reserve_breach(self, s: StreamDemand, tier: Tier, cost: float, reserve: _Reserve | None) -> str | None:
        """`_reserve_breach` for the CPU: the cores a placement there must leave the streams only the CPU can
        take (a CPU-only engine: every stream), so that all are monitored before some are decoded in full."""
        if reserve is None:
            return None
        tiers = s.candidate_tiers()
        if tier is not tiers[-1]:
            cores, count, who = reserve.cpu, reserve.cpu_streams, ""
        elif len(tiers) == 1:
            cores, count, who = reserve.flex_cpu, reserve.flex_cpu_streams, " that can run in a cheaper tier"
        else:
            return None
        if count <= 0 or self._cpu_free() - cost >= cores - _EPS:
            return None
        return (f"would not leave the {_cores(cores)} cores that the {count} streams still to be placed{who} need "
                "at their cheapest tier")

    def _reserve_breach(
        self, s: StreamDemand, tier: Tier, cost: float, mem: float, reserve: _Reserve | None
    ) -> str | None:
        """None when taking `cost`/`mem` leaves the rest of the batch what it is owed, else a sentence saying
        what it would not leave.

        A better-than-cheapest tier must leave every remaining stream its cheapest tier. A stream that can
        only run at full rate must leave the remaining downgradable streams their cheapest tier, so a stream
        that needs a thousandth of an engine in keyframes is never refused for one that needs a third of one.
        Reserves are totals over all GPUs (fragmentation is ignored), which is why a batch ends with a pass
        that retries its refusals without them.
        """
        if reserve is None:
            return None
        tiers = s.candidate_tiers()
        if tier is not tiers[-1]:
            units, memory, count, who = reserve.units, reserve.memory_mb, reserve.streams, ""
        elif len(tiers) == 1:
            units, memory, count = reserve.flex_units, reserve.flex_memory_mb, reserve.flex_streams
            who = " that can run in a cheaper tier"
        else:
            return None
        if count <= 0:
            return None
        usable = self._usable()
        free_units = sum(max(0.0, self._budget[i] - self._load[i]) for i in usable)
        free_mem = sum(max(0.0, self._mem_budget[i] - self._mem[i]) for i in usable)
        if free_units - cost < units - _EPS:
            kept = f"{units:.2f} engine units"
        elif free_mem - mem < memory - _EPS:
            kept = f"{memory:.0f} MB"
        else:
            return None
        return (
            f"would not leave the {kept} that the {count} streams still to be placed{who} "
            "need at their cheapest tier"
        )

    def _choose(self, s: StreamDemand, prefix: str = "", reserve: _Reserve | None = None) -> Placement:
        """Where `s` would go now, at its best possible tier; changes nothing.

        With a `reserve` (the rest of a batch), a placement must leave the others what they are owed at
        their cheapest tier (see `_reserve_breach`): admitting every stream at all comes before decoding some
        of them in full.
        """
        codec_gap = self._codec_gap(s)
        gpus = [i for i in self._usable() if self.gpus[i].supports(s.codec)]
        tiers = s.candidate_tiers()
        short: list[tuple[str, Tier]] = []  # what no GPU had free, tier by tier
        notes: list[str] = [codec_gap] if codec_gap else []
        held: list[str] = []  # tiers that fitted but would have eaten the reserve
        held_note = ""
        cpu_short: list[str] = []  # what the CPU lacked, tier by tier
        cpu_noted = False
        for tier in tiers:
            mem = stream_memory_mb(s, tier)
            best: tuple[float, int, float] | None = None
            for i in gpus:
                cost = engine_cost(s, tier, self.gpus[i])
                if self._fits(i, cost, mem):
                    key = (self._frac(i, cost), i, cost)
                    if best is None or key < best:
                        best = key
            if best is not None:
                frac, i, cost = best
                breach = self._reserve_breach(s, tier, cost, mem, reserve)
                if breach is None:
                    if tier is Tier.ALL:
                        how = "fits at full rate"
                    else:
                        how = f"admitted in {tier.value} tier: {self._why(short, notes, held_note)}"
                    reason = f"{prefix}{self._gpu_label(i)}: {how}; load {100 * frac:.1f}% of budget"
                    return Placement(s.id, Target.GPU, i, tier, cost, mem, reason)
                held.append(f"{tier_words(tier)} ({cost:.2f} engine units)")
                held_note = f"{' or '.join(held)} {breach}"
            elif not codec_gap:
                short.append((self._gpu_shortfall(s, tier)[0], tier))
            if self.cpu is None:
                continue
            if self._cpu_fits(s, tier):
                need_cpu, scoring = self._cpu_need(s, tier)
                breach = self._cpu_reserve_breach(s, tier, need_cpu, reserve)
                if breach is None:
                    load = self._cpu_load_text(need_cpu, scoring)
                    if not self.gpus:  # a CPU engine: no GPU to compare with
                        how = ("fits at full rate" if tier is Tier.ALL else
                               f"admitted in {tier.value} tier: {'; '.join(cpu_short + ([held_note] if held_note else []))}")
                        reason = f"{prefix}cpu: {how}; {load}"
                    else:
                        reason = (f"{prefix}cpu: decoded on CPU threads at {tier_words(tier)}: "
                                  f"{self._why(short, notes, held_note)}; {load}")
                    return Placement(s.id, Target.CPU, None, tier, need_cpu, mem, reason)
                held.append(f"{tier_words(tier)} on the CPU ({_cores(need_cpu)} cores)")
                held_note = f"{' or '.join(held)} {breach}"
            else:
                cpu_short.append(self._cpu_phrase(s, tier))
                if not cpu_noted:
                    notes.append(cpu_short[-1])
                    cpu_noted = True
        return self._refusal(s, codec_gap, prefix)

    @staticmethod
    def _why(short: list[tuple[str, Tier]], notes: list[str], held_note: str) -> str:
        # Tiers short of the same thing share one phrase: "190 MB of memory free at full rate or the
        # skip_nonref tier", not the amount twice.
        groups: list[tuple[str, list[str]]] = []
        for what, tier in short:
            if groups and groups[-1][0] == what:
                groups[-1][1].append(tier_words(tier))
            else:
                groups.append((what, [tier_words(tier)]))
        phrases = [f"{what} free at {' or '.join(tiers)}" for what, tiers in groups]
        parts = ([f"no GPU had {' or '.join(phrases)}"] if phrases else []) + (
            [held_note] if held_note else []
        )
        return "; ".join(parts + notes)

    def _refusal(self, s: StreamDemand, codec_gap: str | None, prefix: str) -> Placement:
        tier = s.candidate_tiers()[-1]
        mem = stream_memory_mb(s, tier)
        cpu = self._cpu_phrase(s, tier)
        if not self.gpus and self.cpu is not None:
            why = s.cheapest_tier_why()
            tier_text = f" ({tier.value} is its cheapest allowed tier: {why})" if why else ""
            need = self.cpu.cost(s, tier)
            return Placement(s.id, Target.REFUSED, None, None, need, 0.0, f"{prefix}refused: {cpu}{tier_text}")
        if codec_gap:
            return Placement(
                s.id, Target.REFUSED, None, None, 0.0, mem, f"{prefix}refused: {codec_gap} and {cpu}"
            )
        _, need = self._gpu_shortfall(s, tier)
        why = s.cheapest_tier_why()
        tier_text = f"{tier.value}: {why}" if why else tier.value
        i, free, mem_note = self._largest_free(s, tier)
        reason = (
            f"{prefix}refused: needs {_units(need, free)} engine units and {mem:.0f} MB "
            f"at the cheapest allowed tier ({tier_text}); "
            f"largest free is {_units(free, need)} on gpu {i}{mem_note}; {cpu}"
        )
        return Placement(s.id, Target.REFUSED, None, None, need, mem, reason)

    def _place_batch(self, streams: Iterable[StreamDemand], prefix: str = "") -> list[Placement]:
        """Place streams largest first, each at the best tier that leaves the rest what they are owed, on the
        GPU least loaded after taking it; then retry the refused ones against what is really left."""
        order = sorted(streams, key=self._sort_key)
        needs = [self._min_need(s) for s in order]
        flexible = [len(s.candidate_tiers()) > 1 for s in order]
        reserve = _Reserve(
            units=sum(u for u, _, _ in needs),
            memory_mb=sum(m for _, m, _ in needs),
            streams=len(order),
            flex_units=sum(u for (u, _, _), f in zip(needs, flexible, strict=True) if f),
            flex_memory_mb=sum(m for (_, m, _), f in zip(needs, flexible, strict=True) if f),
            flex_streams=sum(flexible),
            cpu=sum(c for _, _, c in needs),
            flex_cpu=sum(c for (_, _, c), f in zip(needs, flexible, strict=True) if f),
            cpu_streams=sum(1 for _, _, c in needs if c),
            flex_cpu_streams=sum(1 for (_, _, c), f in zip(needs, flexible, strict=True) if f and c),
        )
        placed: dict[str, Placement] = {}
        for s, (units, mem, cpu), flex in zip(order, needs, flexible, strict=True):
            reserve.take(units, mem, flex, cpu)
            placed[s.id] = self._commit(s, self._choose(s, prefix, reserve))
        for s in order:
            if placed[s.id].target is Target.REFUSED:
                self._release(s.id)
                placed[s.id] = self._commit(s, self._choose(s, prefix))
        return [placed[s.id] for s in order]

    def _admit_refused(self) -> list[Placement]:
        waiting = [self._streams[i] for i, p in self._placements.items() if p.target is Target.REFUSED]
        for s in waiting:
            self._release(s.id)
        placed = self._place_batch(waiting, prefix="admitted after capacity was freed: ")
        return [p for p in placed if p.admitted]

    def _upgrade_in_place(self, gpu_indices: Iterable[int], cpu: bool) -> list[Placement]:
        """Raise downgraded streams on these GPUs (and the CPU) to a better tier where they now fit, never
        moving them."""
        ids = [sid for i in gpu_indices for sid in self._members[i]]
        if cpu:
            ids += [sid for sid, p in self._placements.items() if p.target is Target.CPU]
        todo = [self._streams[sid] for sid in ids if self._placements[sid].downgraded]
        changes: list[Placement] = []
        for s in sorted(todo, key=self._sort_key):
            old = self._placements[s.id]
            tiers = s.candidate_tiers()
            assert old.tier is not None
            for tier in tiers[: tiers.index(old.tier)]:
                mem = stream_memory_mb(s, tier)
                self._release(s.id)
                if old.target is Target.GPU:
                    assert old.gpu is not None
                    cost = engine_cost(s, tier, self.gpus[old.gpu])
                    ok = self._fits(old.gpu, cost, mem)
                    where = self._gpu_label(old.gpu)
                    load = f"load {100 * self._frac(old.gpu, cost):.1f}% of budget"
                else:
                    cost, scoring = self._cpu_need(s, tier)
                    ok = self._cpu_fits(s, tier)
                    where = "cpu"
                    load = self._cpu_load_text(cost, scoring)
                if ok:
                    reason = (
                        f"{where}: upgraded in place from the {old.tier.value} tier to {tier_words(tier)} "
                        f"after capacity was freed; {load}"
                    )
                    p = Placement(s.id, old.target, old.gpu, tier, cost, mem, reason)
                    changes.append(self._commit(s, p))
                    break
                self._commit(s, old)
        return changes

    # --- public API ----------------------------------------------------------------------------------------

    def plan(self, streams: Iterable[StreamDemand]) -> Plan:
        """Place all `streams` from scratch (GPUs marked failed stay failed), largest first."""
        streams = list(streams)
        seen: set[str] = set()
        for s in streams:
            if s.id in seen:
                raise ValueError(f"duplicate stream id {s.id!r}")
            seen.add(s.id)
        with self._lock:
            self._reset()
            self._place_batch(streams)
            return self._snapshot()

    def add(self, stream: StreamDemand) -> Placement:
        """Place one more stream on the least-loaded GPU it fits; existing streams stay where they are."""
        with self._lock:
            if stream.id in self._streams:
                raise ValueError(f"stream {stream.id!r} is already scheduled")
            return self._commit(stream, self._choose(stream))

    def update(self, stream: StreamDemand) -> list[Placement]:
        """The stream's demand as it turned out once open (its real codec, size and rate, where the plan had the
        operator's `expect` or the 1080p30 H.264 assumption). It stays where it is, at its tier, when it fits
        there; otherwise it is placed again (a cheaper tier, another GPU, the CPU, or refused), moving no other
        stream. Capacity it no longer needs goes to refused streams, then to upgrades in place. Returns the
        placements that changed, this stream's first."""
        with self._lock:
            old_s = self._streams.get(stream.id)
            if old_s is None:
                raise KeyError(f"stream {stream.id!r} is not scheduled")
            old = self._placements[stream.id]
            if stream == old_s:
                return []
            self._release(stream.id)
            self._streams[stream.id] = stream
            if old.target is Target.REFUSED:  # not running, so nothing was learnt from it; kept as it was
                self._commit(stream, old)
                return []
            what = f"re-planned once open, as {_demand_words(stream)} (planned as {_demand_words(old_s)}): "
            p = self._in_place(stream, old)
            if p is None:
                p = self._choose(stream, prefix=what)
            self._commit(stream, p)
            changes: dict[str, Placement] = {} if p == old else {stream.id: p}
            if p.target is not old.target or p.cost < old.cost - _EPS:
                more = self._use_freed(old)
                changes.update((c.stream_id, c) for c in more)  # the last placement of each stream counts
            first = [changes.pop(stream.id)] if stream.id in changes else []
            return first + list(changes.values())

    def replace(self, stream: StreamDemand) -> list[Placement]:
        """A stream changed by the operator (restarted with new settings): placed again with the first claim on
        the capacity it had, before any refused stream (removing it and adding it back would hand a running
        stream's place to a refused one). What it no longer takes goes to refused streams, then to upgrades.
        Returns the placements that changed, this stream's first (always there)."""
        with self._lock:
            if stream.id not in self._streams:
                raise KeyError(f"stream {stream.id!r} is not scheduled")
            old = self._release(stream.id)
            del self._streams[stream.id]
            self._commit(stream, self._choose(stream))
            changes: dict[str, Placement] = {}
            if old.target is not Target.REFUSED:
                changes.update((c.stream_id, c) for c in self._use_freed(old))
            changes.pop(stream.id, None)
            return [self._placements[stream.id], *changes.values()]

    def _in_place(self, s: StreamDemand, old: Placement) -> Placement | None:
        """`old`'s target and tier for the stream's new demand, when that still fits there (None otherwise)."""
        assert old.tier is not None
        mem = stream_memory_mb(s, old.tier)
        if old.target is Target.GPU:
            assert old.gpu is not None
            if not self.gpus[old.gpu].supports(s.codec) or old.gpu in self._failed:
                return None
            cost = engine_cost(s, old.tier, self.gpus[old.gpu])
            if not self._fits(old.gpu, cost, mem):
                return None
            return replace(old, cost=cost, memory_mb=mem)
        if old.target is Target.CPU and self._cpu_fits(s, old.tier):
            return replace(old, cost=self._cpu_need(s, old.tier)[0], memory_mb=mem)
        return None

    def remove(self, stream_id: str) -> list[Placement]:
        """Drop a stream and use the freed capacity: first for refused streams (placed without moving anyone),
        then to upgrade downgraded streams on the same GPU in place. Returns the placements that changed."""
        with self._lock:
            if stream_id not in self._streams:
                raise KeyError(f"stream {stream_id!r} is not scheduled")
            old = self._release(stream_id)
            del self._streams[stream_id]
            if old.target is Target.REFUSED:
                return []
            return self._use_freed(old)

    def _use_freed(self, old: Placement) -> list[Placement]:
        """Capacity freed where `old` was: first for refused streams (placed without moving anyone), then to
        upgrade downgraded streams there in place."""
        changes = self._admit_refused()
        if old.target is Target.GPU:
            assert old.gpu is not None
            changes += self._upgrade_in_place([old.gpu], cpu=False)
        else:
            changes += self._upgrade_in_place([], cpu=True)
        return changes

    def fail_gpu(self, index: int) -> list[Placement]:
        """Take a GPU out of service and re-place its streams on the others (or the CPU, or refuse them);
        streams elsewhere are untouched. Returns the new placements of the moved streams."""
        with self._lock:
            self._check_index(index)
            if index in self._failed:
                return []
            self._failed.add(index)
            moving = [self._streams[sid] for sid in self._members[index]]
            for s in moving:
                self._release(s.id)
            log.warning(
                "gpu %d (%s) taken out of service: re-placing %d streams",
                index,
                self.gpus[index].name,
                len(moving),
            )
            prefix = f"moved off failed gpu {index}: "
            return self._place_batch(moving, prefix)

    def restore_gpu(self, index: int) -> list[Placement]:
        """Put a GPU back in service. Refused streams are admitted where they now fit; nothing else moves
        (call `rebalance` to spread load onto it). Returns the placements that changed."""
        with self._lock:
            self._check_index(index)
            if index not in self._failed:
                return []
            self._failed.discard(index)
            return self._admit_refused()

    def rebalance(self, max_moves: int = 16, tolerance: float = 0.05) -> list[Placement]:
        """Even out GPU load by moving as few streams as possible, while the spread of load over usable GPUs
        (empty ones included) exceeds `tolerance`.

        Each move takes the largest stream from the most loaded GPU that does not overshoot the least loaded
        one; streams keep their tier. Afterwards downgraded streams are upgraded in place where they now fit.
        Returns the placements that changed.
        """
        with self._lock:
            changes: list[Placement] = []
            moves = 0
            while moves < max_moves:
                usable = self._usable()
                fracs = [self._frac(i) for i in usable]
                if len(usable) < 2 or _imbalance(fracs) <= tolerance:
                    break
                move = self._best_move(usable)
                if move is None:
                    break
                s, src, dst = move
                old = self._release(s.id)
                assert old.tier is not None
                cost = engine_cost(s, old.tier, self.gpus[dst])
                reason = (
                    f"{self._gpu_label(dst)}: moved from gpu {src} to even out load, same tier "
                    f"({tier_words(old.tier)}); load {100 * self._frac(dst, cost):.1f}% of budget"
                )
                p = self._commit(s, Placement(s.id, Target.GPU, dst, old.tier, cost, old.memory_mb, reason))
                changes = [c for c in changes if c.stream_id != s.id] + [p]
                moves += 1
            upgrades = self._upgrade_in_place(self._usable(), cpu=False)
            ups = {u.stream_id for u in upgrades}
            return [c for c in changes if c.stream_id not in ups] + upgrades

    def _best_move(self, usable: list[int]) -> tuple[StreamDemand, int, int] | None:
        src = max(usable, key=lambda i: (self._frac(i), -i))
        src_frac = self._frac(src)
        on_src = sorted(
            (self._streams[sid] for sid in self._members[src]),
            key=lambda s: (-self._placements[s.id].cost, s.id),
        )
        for dst in sorted(usable, key=lambda i: (self._frac(i), i)):
            if dst == src or self._frac(dst) >= src_frac - _EPS:
                break
            gap = src_frac - self._frac(dst)
            fallback: StreamDemand | None = None
            for s in on_src:
                p = self._placements[s.id]
                assert p.tier is not None
                if not self.gpus[dst].supports(s.codec):
                    continue
                cost = engine_cost(s, p.tier, self.gpus[dst])
                if not self._fits(dst, cost, p.memory_mb):
                    continue
                new_src = (self._load[src] - p.cost) / self._budget[src]
                new_dst = self._frac(dst, cost)
                if new_dst <= new_src + _EPS:
                    return s, src, dst
                if abs(new_src - new_dst) < gap - _EPS:
                    fallback = s  # overshoots the midpoint but still narrows the gap; keep the smallest such
            if fallback is not None:
                return fallback, src, dst
        return None

    def _check_index(self, index: int) -> None:
        if not 0 <= index < len(self.gpus):
            raise IndexError(f"gpu index {index} out of range (0..{len(self.gpus) - 1})")

    # --- reading -------------------------------------------------------------------------------------------

    def _snapshot(self) -> Plan:
        gpus = tuple(
            GpuLoad(
                i,
                g.name,
                i not in self._failed,
                len(self._members[i]),
                self._load[i],
                self._budget[i],
                self._mem[i],
                self._mem_budget[i],
            )
            for i, g in enumerate(self.gpus)
        )
        return Plan(dict(self._placements), gpus, self._cpu_load, self._cpu_budget, self._cpu_scoring,
                    self._cpu_scoring_budget)

    def snapshot(self) -> Plan:
        """The current plan, including every incremental change so far."""
        with self._lock:
            return self._snapshot()

    def placement(self, stream_id: str) -> Placement:
        with self._lock:
            return self._placements[stream_id]

    @property
    def failed_gpus(self) -> frozenset[int]:
        with self._lock:
            return frozenset(self._failed)
