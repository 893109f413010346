"""How every profile and throughput number is timed: warm-up, repeats, the median and its spread.

On CUDA a measurement is bracketed by CUDA events on the current stream (so host-side Python is not
timed, only the GPU's work) and the timed callable is usually a CUDA-graph replay, so per-kernel launch
overhead is what a served model pays, not what eager PyTorch pays. On CPU the same method uses the
wall clock (``time.perf_counter``). Each repetition may run the callable ``inner`` times between the
two clock reads, so a short kernel is timed well above the clock's resolution; the per-call time is
the total divided by ``inner``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

# A repetition shorter than this is repeated ``inner`` times between clock reads. On GPU the first
# call of a repetition waits for the host to launch it (tens of microseconds for a large CUDA graph)
# while later calls are queued behind running work, as in a real generation loop; 25 ms keeps that
# one exposed launch below 0.2% of a repetition.
_MIN_REPEAT_S = 25e-3
_MAX_INNER = 256


@dataclass(frozen=True)
class Timing:
    """Seconds per call: the median of ``repeats`` repetitions and their spread."""

    median_s: float
    min_s: float
    max_s: float
    p10_s: float
    p90_s: float
    repeats: int
    inner: int

    @property
    def rel_spread(self) -> float:
        """(p90 - p10) / median: how much the repetitions disagree."""
        return (self.p90_s - self.p10_s) / self.median_s if self.median_s > 0 else 0.0

    def to_dict(self) -> dict[str, float | int]:
        d: dict[str, float | int] = asdict(self)
        d["rel_spread"] = self.rel_spread
        return d


def _quantile(sorted_xs: list[float], q: float) -> float:
    if len(sorted_xs) == 1:
        return sorted_xs[0]
    pos = q * (len(sorted_xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def summarize(samples: list[float], inner: int = 1) -> Timing:
    if not samples:
        raise ValueError("samples: an empty list is not allowed; time at least one repetition")
    xs = sorted(samples)
    return Timing(statistics.median(xs), xs[0], xs[-1], _quantile(xs, 0.1), _quantile(xs, 0.9), len(xs), inner)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _one(fn: Callable[[], object], device: torch.device, inner: int) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / inner
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def time_callable(
    fn: Callable[[], object], device: torch.device | str, warmup: int, repeats: int, inner: int | None = None
) -> Timing:
    """Median seconds per call of ``fn`` after ``warmup`` untimed calls.

    ``inner`` (default: chosen from one trial so a repetition lasts at least 25 ms, at most 256 calls)
    calls are timed together per repetition.
    """
    device = torch.device(device)
    if repeats < 1:
        raise ValueError(f"repeats: {repeats} is not allowed; must be >= 1")
    for _ in range(max(warmup, 0)):
        fn()
    synchronize(device)
    if inner is None:
        trial = _one(fn, device, 1)
        inner = 1 if trial <= 0 else max(1, min(_MAX_INNER, int(_MIN_REPEAT_S / trial)))
    samples = [_one(fn, device, inner) for _ in range(repeats)]
    synchronize(device)
    return summarize(samples, inner)
