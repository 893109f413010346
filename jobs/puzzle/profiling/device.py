"""Which device a scenario is measured on, and how that device is named in every record.

A CUDA scenario absent here (no GPU, or fewer than its index) has no target device: its costs are
estimated, not measured. A CPU device is named by its model and the torch threads a measurement uses,
so records taken with different thread counts never pass for one another.
"""

from __future__ import annotations

import platform

import torch

from puzzle.config import Scenario


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux; ``platform`` elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {cpu_model()} ({torch.get_num_threads()} threads)"


def target_device(scenario: Scenario) -> torch.device | None:
    """The device a scenario is measured on, or None when it is absent here (then: estimate)."""
    dev = torch.device(scenario.device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return None
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            return None
        return dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())
    if dev.type != "cpu":
        raise ValueError(f"scenario {scenario.name!r} device: {scenario.device!r} is not allowed; use 'cpu', 'cuda' or 'cuda:N'")
    return dev
