"""End to end: the README's command (``puzzle run examples/tiny/puzzle.yaml``) timed, then the issue's goals
checked on the run's report.

Goals (issue 7): the run completes in at most 10 minutes on a 2-core machine; a Puzzle child with at
least 2x *measured* throughput on the primary scenario keeps at least 95% of the parent's task accuracy
and beats both baselines built for the same predicted throughput (higher task accuracy; lower KL to
the parent breaks a tie). Prints the report's table, each goal as met / missed with the numbers, and
writes everything as JSON::

    python benchmarks/bench_end_to_end.py --config examples/tiny/puzzle.yaml --out runs/bench_e2e.json
    python benchmarks/bench_end_to_end.py --resume file://./runs/tiny-...   # goals of an existing run

The wall-clock time is that of the ``puzzle run`` process (a subprocess, exactly as a user types it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MAX_WALL_S = 600.0
MIN_SPEEDUP = 2.0
MIN_RETENTION = 0.95


def run_pipeline(config: str, workers: int | None) -> tuple[str, float]:
    """``puzzle run CONFIG``; returns (run URI, wall seconds). The URI is the last line it prints."""
    cmd = ["puzzle", "run", config] + (["--workers", str(workers)] if workers else [])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)  # status reported below
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"`{' '.join(cmd)}` failed with exit status {proc.returncode}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    return lines[-1].strip(), wall


def _beats(child: dict[str, Any], base: dict[str, Any]) -> bool:
    c, b = child["quality"], base["quality"]
    if c.get("task_accuracy") is None or b.get("task_accuracy") is None:
        return False
    if c["task_accuracy"] != b["task_accuracy"]:
        return c["task_accuracy"] > b["task_accuracy"]
    return (c.get("kl") or 0.0) < (b.get("kl") or 0.0)


def goals(report: dict[str, Any], wall_s: float | None) -> dict[str, Any]:
    """Each goal with its figures and whether it is met."""
    sc = report["primary_scenario"]
    out: dict[str, Any] = {}
    if wall_s is not None:
        out["wall_clock"] = {"seconds": wall_s, "limit_s": MAX_WALL_S, "met": wall_s <= MAX_WALL_S}
    per = []
    for s in report["solutions"]:
        speedup = (s["measured"].get(sc) or {}).get("speedup")
        retention = s["quality"].get("retention")
        beats = {b["id"]: _beats(s, b) for b in report["baselines"]}
        per.append({
            "id": s["id"], "measured_speedup": speedup,
            "predicted_speedup": (s["predicted"].get(sc) or {}).get("speedup"), "retention": retention,
            "task_accuracy": s["quality"].get("task_accuracy"), "kl": s["quality"].get("kl"),
            "beats_baselines": beats,
            "met": bool(speedup is not None and speedup >= MIN_SPEEDUP and retention is not None
                        and retention >= MIN_RETENTION and beats and all(beats.values())),
        })
    out["children"] = per
    out["child_goal_met"] = any(p["met"] for p in per)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="examples/tiny/puzzle.yaml")
    p.add_argument("--resume", metavar="RUN_URI", help="check the goals of an existing, finished run")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--out", type=Path, help="write the results here as JSON")
    a = p.parse_args(argv)

    from puzzle.report import REPORT_JSON, summary_table
    from puzzle.run import open_run

    wall = None
    if a.resume:
        run_uri = a.resume
    else:
        run_uri, wall = run_pipeline(a.config, a.workers)
    store = open_run(run_uri).store
    if not store.exists(REPORT_JSON):
        raise SystemExit(f"{run_uri}: no {REPORT_JSON}; the run has not finished (puzzle run --resume {run_uri})")
    report = store.get_json(REPORT_JSON)
    result = {
        "run": run_uri, "config": a.config if not a.resume else None, "goals": goals(report, wall),
        "table": summary_table(report),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version()},
    }
    print(result["table"])
    g = result["goals"]
    if "wall_clock" in g:
        w = g["wall_clock"]
        print(f"wall clock: {w['seconds']:.0f} s (goal <= {w['limit_s']:.0f} s): {'met' if w['met'] else 'MISSED'}")
    for c in g["children"]:
        print(f"{c['id']}: measured speedup {c['measured_speedup']}, retention {c['retention']}, "
              f"beats baselines {c['beats_baselines']}: {'met' if c['met'] else 'MISSED'}")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
