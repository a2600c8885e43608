"""Side-by-side benchmarks: every `bench/<name>.py` that exposes `run(quick=False) -> list[dict]`.

Each row is a dict with `benchmark`, `metric`, `value`, `unit` and `note`. A benchmark
measures the things it compares in the same run, interleaved, and reports medians and
ratios, so the machine's load (other processes share the CPU) hits both sides alike.
`python -m bench [NAME ...] [--quick]` runs them all (or the named ones) and prints one table.
Benchmarks are programs, not tests: they assert nothing; targets are stated in the notes.
"""
from __future__ import annotations

import importlib
import math
import pkgutil
import sys
import time
from pathlib import Path

ROW_KEYS = ("benchmark", "metric", "value", "unit", "note")


def available() -> list[str]:
    """Names of the modules in this folder; those without `run` are helpers, skipped when
    run. Nothing is imported here, so one benchmark's missing extra breaks only itself."""
    modules = pkgutil.iter_modules([str(Path(__file__).parent)])
    return sorted(m.name for m in modules if not m.name.startswith("_"))


def run_benchmarks(names: list[str], quick: bool = False) -> tuple[list[dict], list[str]]:
    """All rows of the named benchmarks, and the names of those that failed (each failure
    becomes a row, so one broken benchmark does not hide the others' figures)."""
    rows, failed = [], []
    for name in names:
        start = time.perf_counter()
        try:
            run = getattr(importlib.import_module(f"{__name__}.{name}"), "run", None)
            if not callable(run):
                continue
            result = run(quick=quick)
            for row in result:
                missing = [k for k in ROW_KEYS if k not in row]
                if missing:
                    raise ValueError(f"row {row} lacks {missing}")
            rows.extend(result)
        except Exception as err:  # noqa: BLE001 - reported in the table, and by the exit code
            failed.append(name)
            rows.append({"benchmark": name, "metric": "error", "value": math.nan, "unit": "",
                         "note": f"{type(err).__name__}: {err}"})
        print(f"bench: {name} took {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return rows, failed


def format_value(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int) or (math.isfinite(value) and value == int(value) and abs(value) >= 1000):
        return f"{int(value):,}"
    if not math.isfinite(value):
        return str(value)
    return f"{value:,.3f}" if abs(value) < 1000 else f"{value:,.1f}"


def format_table(rows: list[dict]) -> str:
    cells = [[str(r["benchmark"]), str(r["metric"]), format_value(r["value"]), str(r["unit"]), str(r["note"])]
             for r in rows]
    header = ["benchmark", "metric", "value", "unit", "note"]
    widths = [max(len(c[i]) for c in cells + [header]) for i in range(4)]

    def line(c: list[str]) -> str:
        return (f"{c[0]:<{widths[0]}}  {c[1]:<{widths[1]}}  {c[2]:>{widths[2]}}  "
                f"{c[3]:<{widths[3]}}  {c[4]}").rstrip()

    rule = "-" * (sum(widths) + 8 + max(len("note"), max((len(c[4]) for c in cells), default=0)))
    return "\n".join([line(header), rule] + [line(c) for c in cells])
