"""How every profile and throughput number is timed: warm-up, repeats, the median and its spread.

On CUDA a measurement is bracketed by CUDA events on the current stream (so host-side Python is not
timed, only the GPU's work) and the timed callable is usually a CUDA-graph replay, so per-kernel launch
overhead is what a served model pays, not what eager PyTorch pays. On CPU the same method reads a host
clock: the wall clock (``time.perf_counter``) or, with one torch thread, the calling thread's CPU time
(``time.thread_time``; see :func:`cpu_clock`). Each repetition may run the callable ``inner`` times
between the two clock reads, so a short kernel is timed well above the clock's resolution; the
per-call time is the total divided by ``inner``.

A measurement is only as good as its repetitions agree. With ``max_rel_spread`` set, a measurement
whose ``(p90 - p10) / median`` is above it (a worker paused, a neighbour took the cores) is thrown
away and taken again, up to ``attempts`` times; the result is the attempt with the smallest spread and
records every attempt's spread and whether it is within the bound (``stable``)::

    t = time_callable(fn, "cpu", warmup=3, repeats=10, max_rel_spread=0.75, attempts=3)
    t.median_s, t.rel_spread, t.attempt_spreads, t.stable
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

log = logging.getLogger(__name__)

# A repetition shorter than this is repeated ``inner`` times between clock reads. On GPU the first
# call of a repetition waits for the host to launch it (tens of microseconds for a large CUDA graph)
# while later calls are queued behind running work, as in a real generation loop; 25 ms keeps that
# one exposed launch below 0.2% of a repetition.
_MIN_REPEAT_S = 25e-3
_MAX_INNER = 256

#: Host clocks a CPU measurement may read ("cuda_events" is what any CUDA measurement uses).
CPU_CLOCKS = ("wall", "thread_cpu")


def cpu_clock(setting: str = "auto") -> str:
    """The host clock a CPU measurement reads for ``profile.cpu_clock``.

    ``thread_cpu`` counts only the time the calling thread ran: a step that the OS set aside for a
    neighbour (or a worker paused for two seconds) costs nothing extra, while cache and memory stalls
    still count. It sees only work on the calling thread, so ``auto`` picks it only when torch runs one
    intra-op thread (all work then runs on the caller) and the wall clock otherwise.
    """
    if setting == "auto":
        return "thread_cpu" if torch.get_num_threads() == 1 else "wall"
    if setting not in CPU_CLOCKS:
        raise ValueError(f"cpu_clock: {setting!r} is not allowed; allowed: 'auto', {', '.join(map(repr, CPU_CLOCKS))}")
    return setting


@dataclass(frozen=True)
class Timing:
    """Seconds per call: the median of ``repeats`` repetitions, their spread, and how it was reached."""

    median_s: float
    min_s: float
    max_s: float
    p10_s: float
    p90_s: float
    repeats: int
    inner: int
    clock: str = "wall"  # "cuda_events", "wall" or "thread_cpu"
    attempt_spreads: tuple[float, ...] = ()  # rel_spread of every attempt, in order (this one included)
    max_rel_spread: float | None = None  # the bound the attempts were held to (None: none)

    @property
    def rel_spread(self) -> float:
        """(p90 - p10) / median: how much the repetitions disagree."""
        return (self.p90_s - self.p10_s) / self.median_s if self.median_s > 0 else 0.0

    @property
    def stable(self) -> bool:
        """Within the bound (always, when there was none)."""
        return self.max_rel_spread is None or self.rel_spread <= self.max_rel_spread

    @property
    def attempts(self) -> int:
        return max(1, len(self.attempt_spreads))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = asdict(self)
        d["attempt_spreads"] = list(self.attempt_spreads)
        d["rel_spread"] = self.rel_spread
        d["stable"] = self.stable
        return d


def _quantile(sorted_xs: list[float], q: float) -> float:
    if len(sorted_xs) == 1:
        return sorted_xs[0]
    pos = q * (len(sorted_xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def median_interval(samples: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(low, high, coverage): the distribution-free interval of the median, the order statistics
    x_(j) and x_(n+1-j) with the largest j whose binomial coverage ``1 - 2 P(Bin(n, 1/2) < j)`` is at
    least ``level``; with fewer than 6 samples no such j exists and the interval is (min, max) at the
    coverage it has (5 samples: 0.9375)."""
    if not samples:
        raise ValueError("samples: an empty list is not allowed; give at least one value")
    xs, n = sorted(samples), len(samples)
    below = 0.0  # P(Bin(n, 1/2) < j), accumulated as j grows
    j, coverage = 1, 1.0 - 2.0 * 0.5 ** n
    for k in range(1, (n + 1) // 2):
        below += math.comb(n, k - 1) * 0.5 ** n
        c = 1.0 - 2.0 * (below + math.comb(n, k) * 0.5 ** n)  # coverage of (x_(k+1), x_(n-k))
        if c < level:
            break
        j, coverage = k + 1, c
    return xs[j - 1], xs[n - j], coverage


def summarize(samples: list[float], inner: int = 1, clock: str = "wall") -> Timing:
    if not samples:
        raise ValueError("samples: an empty list is not allowed; time at least one repetition")
    xs = sorted(samples)
    return Timing(statistics.median(xs), xs[0], xs[-1], _quantile(xs, 0.1), _quantile(xs, 0.9), len(xs), inner,
                  clock)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_clock(clock: str) -> Callable[[], float]:
    """The function that reads ``clock`` ("wall" or "thread_cpu") in seconds."""
    if clock == "wall":
        return time.perf_counter
    if clock == "thread_cpu":
        return time.thread_time
    raise ValueError(f"clock: {clock!r} is not allowed; allowed: {', '.join(map(repr, CPU_CLOCKS))}")


def _one(fn: Callable[[], object], device: torch.device, inner: int, clock: str) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / inner
    now = host_clock(clock)
    t0 = now()
    for _ in range(inner):
        fn()
    return (now() - t0) / inner


def time_callable(
    fn: Callable[[], object], device: torch.device | str, warmup: int, repeats: int, inner: int | None = None,
    *, max_rel_spread: float | None = None, attempts: int = 1, clock: str = "wall",
) -> Timing:
    """Median seconds per call of ``fn`` after ``warmup`` untimed calls.

    ``inner`` (default: chosen from one trial so a repetition lasts at least 25 ms, at most 256 calls)
    calls are timed together per repetition. With ``max_rel_spread``, a measurement whose spread is above
    it is taken again (all ``repeats`` repetitions), at most ``attempts`` times in all; the attempt with
    the smallest spread is returned, carrying every attempt's spread. ``clock`` is the host clock on
    CPU ("wall" or "thread_cpu"); CUDA devices always use CUDA events.
    """
    device = torch.device(device)
    if repeats < 1:
        raise ValueError(f"repeats: {repeats} is not allowed; must be >= 1")
    if attempts < 1:
        raise ValueError(f"attempts: {attempts} is not allowed; must be >= 1")
    if max_rel_spread is not None and not max_rel_spread > 0:
        raise ValueError(f"max_rel_spread: {max_rel_spread} is not allowed; must be > 0")
    if device.type == "cuda":
        clock = "cuda_events"
    else:
        host_clock(clock)  # refuse an unknown clock before any work
    for _ in range(max(warmup, 0)):
        fn()
    synchronize(device)
    if inner is None:
        trial = _one(fn, device, 1, clock)
        inner = 1 if trial <= 0 else max(1, min(_MAX_INNER, int(_MIN_REPEAT_S / trial)))
    best: Timing | None = None
    spreads: list[float] = []
    for attempt in range(1, attempts + 1):
        t = summarize([_one(fn, device, inner, clock) for _ in range(repeats)], inner, clock)
        synchronize(device)
        spreads.append(t.rel_spread)
        if best is None or t.rel_spread < best.rel_spread:
            best = t
        if max_rel_spread is None or t.rel_spread <= max_rel_spread:
            break
        if attempt < attempts:
            log.info("timing spread %.0f%% is above the bound %.0f%% (median %.3g s): measuring again (%d/%d)",
                     t.rel_spread * 100, max_rel_spread * 100, t.median_s, attempt + 1, attempts)
    assert best is not None
    return replace(best, attempt_spreads=tuple(spreads), max_rel_spread=max_rel_spread)
