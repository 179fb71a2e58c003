"""What `ar log --timing` shows: where each run's wall time went. Pure functions from the
ledger's runs (result.json's `timing`, written by sandbox/experiment.py on ar's clock) to
rows and a rich table; nothing prints.

    plan      the CPU plan: a sample of the machine's load, or the last quiet run's plan
    ready     waiting for the slot's warm server (its first run)
    start     the training job starting: interpreter and imports (warm: a fork of the
              slot's server that has imported torch, sandbox/warm.py)
    warm-up   building the model and the data, compiling, the first steps (not billed)
    train     the steps billed to the budget
    save      saving the weights
    score     the trusted scorer: its fixed part (starting the model workers, loading the
              model, planning the probes) and its arithmetic (the batches)
    other     the sandbox's own work between those

The job reports where its phases begin (sandbox/phases.py); ar times them on its own
clock, and the hard kill never moves for them. A run whose job reported nothing has its
whole job under start.
"""

from __future__ import annotations

import statistics
from typing import Any

from rich.table import Table
from rich.text import Text

from autoresearch_cli.doors.records import Run

Row = dict[str, Any]
# result.json's timing keys, and the columns they head
COLUMNS = (("plan", "plan"), ("server", "ready"), ("start", "start"), ("warmup", "warm-up"), ("train", "train"),
           ("save", "save"), ("score_fixed", "score fixed"), ("score_arithmetic", "score batches"),
           ("other", "other"))  # fmt: skip


def timing_rows(runs: list[Run]) -> list[Row]:
    """One row per run that recorded its timing, oldest first."""
    rows = []
    for run in runs:
        timing = (run.result or {}).get("timing")
        if not isinstance(timing, dict) or not timing.get("total"):
            continue
        row: Row = {"id": run.id, "kind": run.kind, "status": run.status,
                    "launch": _launch(timing.get("launch"))}  # fmt: skip
        row.update({key: _seconds(timing.get(key)) for key, _ in COLUMNS})
        if row["score_fixed"] is None and row["score_arithmetic"] is None:
            row["score_fixed"] = _seconds(timing.get("score"))  # scored by an older scorer
        row["total"] = _seconds(timing["total"])
        row["train_share"] = (row["train"] or 0.0) / row["total"] if row["total"] else None
        rows.append(row)
    return rows


def _seconds(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def _launch(launch: Any) -> str:
    """"warm", "cold", or e.g. "job cold" when the job and the scorer differed."""
    if not isinstance(launch, dict):
        return "-"
    kinds = {role: str(how or "-").split(":")[0] for role, how in launch.items()}
    if len(set(kinds.values())) == 1:
        return next(iter(kinds.values()))
    return ", ".join(f"{role} {how}" for role, how in kinds.items())


def render_timing(rows: list[Row]) -> Table:
    """A rich Table of `timing_rows` output, in seconds."""
    table = Table(show_edge=False, header_style="bold")
    for name in ("#", "kind", *(label for _, label in COLUMNS), "total", "train %", "launch"):
        table.add_column(name, justify="left" if name in ("kind", "launch") else "right")
    for row in rows:
        share = row["train_share"]
        table.add_row(str(row["id"]), row["kind"], *(_cell(row[key]) for key, _ in COLUMNS),
                      _cell(row["total"]), "-" if share is None else f"{100 * share:.0f}%",
                      Text(row["launch"], style="green" if row["launch"] == "warm" else "yellow"))  # fmt: skip
    return table


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def timing_summary(rows: list[Row]) -> str:
    """One line: the share of the wall time that trained, and the median of each phase."""
    if not rows:
        return "no run has recorded its timing yet"
    total = sum(row["total"] for row in rows)
    trained = sum(row["train"] or 0.0 for row in rows)
    medians = []
    for key, label in COLUMNS:
        values = [row[key] for row in rows if row[key] is not None]
        if values and key != "train":
            medians.append(f"{label} {statistics.median(values):.2f} s")
    return (f"{len(rows)} run(s): training took {100 * trained / total:.1f}% of their "
            f"{total:.0f} s in the sandbox; median per run: {', '.join(medians)}")
