"""Shedding optional analysis when the engine cannot keep up with its live streams.

On a CPU the click analysis costs about four times all the other audio kernels together (benchmarks/audio_bench.py:
about 180 against 50 CPU seconds per stream-hour). When the engine falls behind, every live picture and audio
chunk waits longer to be scored and no alert is decided in time; pausing that one analysis on live streams is
the cheapest way back. Files are never shed: their quality check must see everything, and they wait for the
engine instead of dropping.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LoadShedder:
    """Decides from tick durations when the click analysis of live streams pauses and when it comes back.

    A tick of `slow_tick` seconds or more means live media waited that long to be scored; `slow_ticks` of them
    in a row pause the analysis, or fewer when together they last `slow_ticks` x `slow_tick` (an engine far
    behind makes ticks of ten seconds, and three of those would be half a minute of waiting). It comes back after
    `recover_after` seconds of ticks under a quarter of `slow_tick`; if the engine has to pause it again within
    `flap_window` seconds of bringing it back, the wait doubles (up to `recover_max`), so an engine at the edge
    does not flip every minute.
    """

    slow_tick: float = 1.5
    slow_ticks: int = 3
    recover_after: float = 60.0
    recover_max: float = 900.0
    flap_window: float = 300.0
    shed: bool = False
    wait: float = field(default=0.0, init=False)  # the current recovery wait
    _slow_run: int = field(default=0, init=False)
    _slow_sum: float = field(default=0.0, init=False)
    _fast_since: float | None = field(default=None, init=False)
    _restored_at: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.slow_tick <= 0 or self.slow_ticks < 1 or self.recover_after < 0:
            raise ValueError("slow_tick must be > 0, slow_ticks >= 1 and recover_after >= 0")
        self.wait = self.recover_after

    def update(self, tick_seconds: float, now: float) -> bool | None:
        """Take one tick's duration (that had live media to score) at monotonic time `now`. Returns True when
        the analysis is to pause, False when it is to come back, None when nothing changes."""
        if not self.shed:
            if tick_seconds >= self.slow_tick:
                self._slow_run += 1
                self._slow_sum += tick_seconds
            else:
                self._slow_run, self._slow_sum = 0, 0.0
            if self._slow_run < self.slow_ticks and self._slow_sum < self.slow_ticks * self.slow_tick:
                return None
            flapping = self._restored_at is not None and now - self._restored_at < self.flap_window
            self.wait = min(self.recover_max, 2 * self.wait) if flapping else self.recover_after
            self.shed, self._slow_run, self._slow_sum, self._fast_since = True, 0, 0.0, None
            return True
        if tick_seconds >= self.slow_tick / 4:
            self._fast_since = None
            return None
        if self._fast_since is None:
            self._fast_since = now
        if now - self._fast_since < self.wait:
            return None
        self.shed, self._fast_since, self._restored_at = False, None, now
        return False
