"""Step metrics in the Prometheus format: the only module that imports ``prometheus_client``.

Each step pod creates one :class:`StepMetrics` for its (run, step, unit), records gauges,
counters and summaries on it, and at the end (or periodically) pushes them to a Pushgateway
under the grouping key ``run/step/unit`` and/or writes them into the run's store as
``metrics/<step>-<unit>.prom``. Metrics are advisory: a Pushgateway that is down is logged as a
warning and never fails the step.

Every series carries the labels ``run``, ``step`` and ``unit``, so the ``.prom`` files of many
units concatenate into one unambiguous exposition, and they agree with the Pushgateway's
grouping key (which would otherwise reject a push whose labels contradict it).
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Summary, generate_latest, push_to_gateway

from puzzle.layout import metrics_key

if TYPE_CHECKING:
    from puzzle.store import Store

log = logging.getLogger(__name__)

PREFIX = "puzzle_"
JOB = "puzzle"  # the Pushgateway's job label for every push
_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_RESERVED_LABELS = ("run", "step", "unit")


class StepMetrics:
    """Metrics of one unit of one step, in a registry of its own.

    ``observe`` records into a Summary (``_count`` and ``_sum``): these add up across units and
    pushes without agreeing on bucket boundaries beforehand, which for values as different as
    seconds, losses and token counts a Histogram would need.
    """

    def __init__(self, run_id: str, step: str, unit: str, pushgateway_url: str | None = None) -> None:
        for field, value in (("run_id", run_id), ("step", step), ("unit", unit)):
            if not isinstance(value, str) or value == "":
                raise ValueError(f"{field}: value {value!r} is not allowed; must be a non-empty string")
        self.run_id = run_id
        self.step = step
        self.unit = unit
        self.pushgateway_url = pushgateway_url or None
        self.registry = CollectorRegistry(auto_describe=True)
        self._metrics: dict[str, tuple[str, Any, tuple[str, ...]]] = {}

    def _metric(self, kind: str, name: str, help: str, labels: dict[str, Any]) -> Any:
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(
                f"metric name {name!r} is not allowed; use letters, digits and '_' (not starting with a digit)"
            )
        full = name if name.startswith(PREFIX) else PREFIX + name
        clash = sorted(set(labels) & set(_RESERVED_LABELS))
        if clash:
            raise ValueError(f"metric {full}: labels {clash} are set by StepMetrics itself; use other names")
        bad = sorted(k for k in labels if not _NAME.match(k) or k.startswith("__"))
        if bad:
            raise ValueError(f"metric {full}: label names {bad} are not allowed")
        names = tuple(sorted(labels))
        known = self._metrics.get(full)
        if known is None:
            cls = {"gauge": Gauge, "counter": Counter, "summary": Summary}[kind]
            metric = cls(full, help or full, labelnames=(*_RESERVED_LABELS, *names), registry=self.registry)
            self._metrics[full] = known = (kind, metric, names)
        was_kind, metric, was_names = known
        if was_kind != kind:
            raise ValueError(f"metric {full} is a {was_kind}; it cannot also be used as a {kind}")
        if was_names != names:
            raise ValueError(f"metric {full} has labels {list(was_names)}; got {list(names)}")
        return metric.labels(
            run=self.run_id, step=self.step, unit=self.unit, **{k: str(v) for k, v in labels.items()}
        )

    def set(self, name: str, value: float, help: str = "", **labels: Any) -> None:
        """Gauge: the current value (e.g. ``bld_normalized_mse``)."""
        self._metric("gauge", name, help, labels).set(float(value))

    def inc(self, name: str, amount: float = 1.0, help: str = "", **labels: Any) -> None:
        """Counter: only goes up. Exposed as ``puzzle_<name>_total``."""
        if amount < 0:
            raise ValueError(f"inc {name}: amount {amount} is not allowed; counters only go up (use set)")
        self._metric("counter", name, help, labels).inc(float(amount))

    def observe(self, name: str, value: float, help: str = "", **labels: Any) -> None:
        """Summary: one observation (e.g. a step time); exposed as ``_count`` and ``_sum``."""
        self._metric("summary", name, help, labels).observe(float(value))

    def text(self) -> str:
        """The Prometheus text exposition of this instance's metrics."""
        return generate_latest(self.registry).decode("utf-8")

    @property
    def grouping_key(self) -> dict[str, str]:
        return {"run": self.run_id, "step": self.step, "unit": self.unit}

    def push(self) -> bool:
        """Replace this unit's group on the Pushgateway. Returns False (and warns) on failure."""
        if not self.pushgateway_url:
            return False
        try:
            push_to_gateway(
                self.pushgateway_url,
                job=JOB,
                registry=self.registry,
                grouping_key=self.grouping_key,
                timeout=10,
            )
            return True
        except Exception as err:  # noqa: BLE001 - metrics must never kill a step: only a warning
            log.warning(
                "could not push metrics to %s (run=%s step=%s unit=%s): %s",
                self.pushgateway_url,
                self.run_id,
                self.step,
                self.unit,
                err,
            )
            return False

    @property
    def key(self) -> str:
        """The store key ``metrics/<step>-<unit>.prom`` (unit made file-name safe)."""
        return metrics_key(self.step, self.unit)

    def write(self, store: Store) -> str:
        """Write the text exposition to ``metrics/<step>-<unit>.prom`` in ``store``; returns the key."""
        store.put_text(self.key, self.text())
        return self.key
