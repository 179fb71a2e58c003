"""What `ar log` shows: pure functions from ledger rows to data, rich tables and a plot.

Every function takes the ledger's experiment rows (`Ledger.experiments()`, all of them:
deltas look up parents that a `--limit` would hide) and returns data; nothing prints.
A delta is `val_bpb - parent's val_bpb`, so negative is better; an improvement is the
decrease in val_bpb, so positive is better.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from autoresearch_cli.errors import ArError
from autoresearch_cli.ledger import FAILED, CostTotal, reference_row

Row = dict[str, Any]

OUTCOME_STYLES = {"keep": "bold green", "baseline": "bold blue", "discard": "dim",
                  "crash": "red", "timeout": "red", "oom": "red", "invalid": "magenta",
                  "interrupted": "yellow", "disturbed": "yellow", "pending": "cyan",
                  "remeasure": "blue", "confirmation": "cyan"}


def outcome(row: Row) -> str:
    """One word for how an experiment ended: baseline, keep, discard, or its status."""
    if row["status"] != "ok":
        return row["status"]
    if row["kind"] in ("baseline", "remeasure", "confirmation"):
        return row["kind"]
    if row["decision"] is None and row.get("evidence"):
        return "pending"  # waiting for a confirmation run
    return row["decision"] or "ok"


def short_sha(sha: str | None) -> str | None:
    return sha[:7] if sha else None


def _references(experiments: list[Row]) -> dict[str, Row]:
    """For every evaluated sha, the row that speaks for it (see ledger.reference_row)."""
    by_sha: dict[str, list[Row]] = defaultdict(list)
    for row in experiments:
        if row["sha"]:
            by_sha[row["sha"]].append(row)
    return {sha: reference_row(rows) for sha, rows in by_sha.items()}


def _parent(row: Row, references: dict[str, Row]) -> Row | None:
    parent = references.get(row["parent_sha"]) if row["parent_sha"] else None
    if parent is None or parent["id"] == row["id"] or parent["status"] != "ok":
        return None
    return parent


def _delta(row: Row, parent: Row | None) -> float | None:
    if parent is None or row["val_bpb"] is None or parent["val_bpb"] is None:
        return None
    return row["val_bpb"] - parent["val_bpb"]


def table_rows(experiments: list[Row], limit: int | None = None) -> list[Row]:
    """The rows of `ar log`, newest last: the last `limit` experiments when given."""
    references = _references(experiments)
    shown = experiments if limit is None else experiments[len(experiments) - max(limit, 0):]
    rows = []
    for row in shown:
        parent = _parent(row, references)
        rows.append({
            "id": row["id"], "kind": row["kind"], "commit": short_sha(row["sha"]),
            "val_bpb": row["val_bpb"], "parent_id": parent["id"] if parent else None,
            "delta_bpb": _delta(row, parent), "memory_gb": row["memory_gb"],
            "outcome": outcome(row), "description": row["description"] or "",
            "reason": row["reason"], "cost_usd": row["cost_usd"], "repair_of": row["repair_of"],
        })
    return rows


def json_rows(experiments: list[Row], limit: int | None = None) -> list[Row]:
    """`ar log --json`: every ledger column, result.json parsed, plus outcome and delta."""
    extras = {row["id"]: row for row in table_rows(experiments, limit)}
    out = []
    for row in experiments:
        if row["id"] not in extras:
            continue
        item = {key: value for key, value in row.items() if key != "result_json"}
        item["result"] = json.loads(row["result_json"]) if row["result_json"] else None
        item["outcome"] = extras[row["id"]]["outcome"]
        item["delta_bpb"] = extras[row["id"]]["delta_bpb"]
        item["parent_id"] = extras[row["id"]]["parent_id"]
        out.append(item)
    return out


def runs_by_sha(experiments: list[Row]) -> dict[tuple[str, str | None], list[float]]:
    """val_bpb of the ok runs of each (commit, hardware class)."""
    runs: dict[tuple[str, str | None], list[float]] = defaultdict(list)
    for row in experiments:
        if row["sha"] and row["status"] == "ok" and row["val_bpb"] is not None:
            runs[(row["sha"], row["slot_class"])].append(row["val_bpb"])
    return runs


def best_chain(experiments: list[Row], best: Row | None) -> list[Row]:
    """`ar log --best`: the kept steps from the baseline to `best` (Ledger.best()).

    Follows parent commits back from the best row, so a revert is honoured. Each step has
    the evidence behind it: its runs (on the hardware it was judged on), their mean and
    spread, and the keep test's outcome; improvements are between means.
    """
    if best is None or best["val_bpb"] is None:
        return []
    references = _references(experiments)
    chain, seen = [best], {best["id"]}
    while chain[-1]["kind"] != "baseline":
        parent = _parent(chain[-1], references)
        if parent is None or parent["id"] in seen or parent["val_bpb"] is None:
            break
        chain.append(parent)
        seen.add(parent["id"])
    chain.reverse()
    all_runs = runs_by_sha(experiments)
    steps, previous, start = [], None, None
    for row in chain:
        runs = all_runs.get((row["sha"], row["slot_class"])) or [row["val_bpb"]]
        mean = statistics.fmean(runs)
        start = mean if start is None else start
        evidence = json.loads(row["evidence"]) if row.get("evidence") else None
        steps.append({
            "id": row["id"], "kind": row["kind"], "commit": short_sha(row["sha"]),
            "val_bpb": mean, "runs": len(runs),
            "spread": statistics.stdev(runs) if len(runs) >= 2 else None,
            "test": _test_outcome(evidence), "p": evidence.get("p") if evidence else None,
            "description": row["description"] or "",
            "improvement": None if previous is None else previous - mean,
            "cumulative_improvement": start - mean,
            "cumulative_percent": 100.0 * (start - mean) / start if start else None,
        })
        previous = mean
    return steps


def _test_outcome(evidence: Row | None) -> str:
    if not evidence:
        return "-"
    if evidence.get("p") is None:
        return evidence.get("reason", "-").split(":")[0] if evidence.get("rule") != "one-run" else "one run"
    return f"p={evidence['p']:.2g} < {evidence['look_level']:.2g} ({len(evidence['runs'])} run(s))"


def noise_lines(experiments: list[Row]) -> list[str]:
    """The measured noise per hardware class: the spread of runs of one commit."""
    from autoresearch_cli.keeprule import noise

    by_class: dict[str | None, list[list[float]]] = defaultdict(list)
    for (_, slot_class), runs in runs_by_sha(experiments).items():
        by_class[slot_class].append(runs)
    lines = []
    for slot_class, groups in sorted(by_class.items(), key=lambda item: str(item[0])):
        measured = noise(groups)
        if measured.sigma is not None:
            lines.append(f"noise on {slot_class or 'this machine'}: {measured.sigma:.4f} val_bpb "
                         f"between runs of one commit ({measured.df} degrees of freedom, "
                         f"{measured.commits} commit(s) run more than once)")
    return lines


def summary(experiments: list[Row], best: Row | None, cost: CostTotal | None = None) -> Row:
    """Counts, the baseline and the best, and what the LLM calls cost."""
    outcomes = [outcome(row) for row in experiments]
    baselines = [row for row in experiments
                 if row["kind"] == "baseline" and row["status"] == "ok" and row["val_bpb"] is not None]
    baseline_bpb = baselines[0]["val_bpb"] if baselines else None
    best_bpb = best["val_bpb"] if best else None
    return {
        "experiments": len(experiments), "kept": outcomes.count("keep"),
        "discarded": outcomes.count("discard"),
        "failed": sum(outcomes.count(status) for status in FAILED),
        "invalid": outcomes.count("invalid"), "interrupted": outcomes.count("interrupted"),
        "disturbed": outcomes.count("disturbed"), "pending": outcomes.count("pending"),
        "confirmations": outcomes.count("confirmation"), "remeasures": outcomes.count("remeasure"),
        "baseline_bpb": baseline_bpb, "best_bpb": best_bpb, "best_id": best["id"] if best else None,
        "improvement": None if baseline_bpb is None or best_bpb is None else baseline_bpb - best_bpb,
        "llm_calls": cost.calls if cost else 0, "cost_usd": cost.usd if cost else None,
        "unpriced_calls": cost.unpriced if cost else 0,
    }


# --- rendering -----------------------------------------------------------------------------


def _number(value: float | None, digits: int = 6) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _signed(value: float | None, better_when_negative: bool = True) -> Text:
    if value is None:
        return Text("-", style="dim")
    better = value < 0 if better_when_negative else value > 0
    style = "green" if better else ("red" if value != 0 else "")
    return Text(f"{value:+.6f}", style=style)


def _cost(value: float | None) -> str:
    return "-" if value is None else f"${value:.4f}"


def render_table(rows: list[Row]) -> Table:
    """A rich Table of `table_rows` output."""
    table = Table(show_edge=False, header_style="bold")
    for name, justify in (("#", "right"), ("commit", "left"), ("val_bpb", "right"),
                          ("Δ parent", "right"), ("mem GB", "right"), ("outcome", "left"),
                          ("cost", "right"), ("description", "left")):
        table.add_column(name, justify=justify, no_wrap=name != "description")
    for row in rows:
        description = Text(row["description"])
        if row["repair_of"] is not None:
            description.append(f" (repair of #{row['repair_of']})", style="dim")
        if row["outcome"] not in ("keep", "discard", "baseline", "ok") and row["reason"]:
            description.append(f" — {row['reason']}", style="dim")
        table.add_row(
            str(row["id"]), row["commit"] or "-", _number(row["val_bpb"]),
            _signed(row["delta_bpb"]), _number(row["memory_gb"], 1),
            Text(row["outcome"], style=OUTCOME_STYLES.get(row["outcome"], "yellow")),
            _cost(row["cost_usd"]), description)
    return table


def render_best_chain(steps: list[Row]) -> Table:
    """A rich Table of `best_chain` output."""
    table = Table(show_edge=False, header_style="bold")
    for name in ("#", "commit", "mean val_bpb", "runs", "spread", "test", "step", "cumulative",
                 "%", "description"):
        table.add_column(name, justify="left" if name in ("commit", "test", "description")
                         else "right")
    for step in steps:
        percent = step["cumulative_percent"]
        table.add_row(
            str(step["id"]), step["commit"] or "-", _number(step["val_bpb"]), str(step["runs"]),
            _number(step["spread"], 4), step["test"],
            _signed(step["improvement"], better_when_negative=False),
            _signed(step["cumulative_improvement"], better_when_negative=False),
            "-" if percent is None else f"{percent:.2f}%", step["description"])
    return table


def summary_text(facts: Row) -> str:
    """One line: counts, baseline → best, cost."""
    parts = [f"{facts['experiments']} experiments: {facts['kept']} kept, "
             f"{facts['discarded']} discarded, {facts['failed']} failed, "
             f"{facts['invalid']} invalid, {facts['interrupted']} interrupted"
             + (f", {facts['disturbed']} disturbed (set aside)" if facts.get("disturbed") else "")
             + (f", {facts['pending']} awaiting confirmation" if facts.get("pending") else "")]
    if facts["best_bpb"] is not None:
        best = f"best {facts['best_bpb']:.6f} (#{facts['best_id']})"
        if facts["baseline_bpb"] is not None:
            best = f"baseline {facts['baseline_bpb']:.6f} → {best}"
        parts.append(best)
    if facts["llm_calls"]:
        cost = f"LLM cost ${facts['cost_usd']:.4f}"
        if facts["unpriced_calls"]:
            cost += f" (+{facts['unpriced_calls']} calls of unknown cost)"
        parts.append(cost)
    return "; ".join(parts)


# --- the progress plot ---------------------------------------------------------------------


def _kept_line(experiments: list[Row]) -> tuple[list[int], list[float]]:
    """The val_bpb in force after each keep, starting from the first ok baseline."""
    xs: list[int] = []
    ys: list[float] = []
    for row in experiments:
        if row["status"] != "ok" or row["val_bpb"] is None:
            continue
        if (row["kind"] == "baseline" and not xs) or row["decision"] == "keep":
            xs.append(row["id"])
            ys.append(row["val_bpb"])
    return xs, ys


def _draw_points(axes: Any, experiments: list[Row], evaluated: list[Row]) -> int:
    """Dots for evaluated runs, the best line, crosses for failed runs; returns keeps."""
    groups = {
        "discard": ([r for r in evaluated if outcome(r) not in ("keep", "baseline")],
                    {"color": "#b0b0b0", "s": 14}),
        "baseline": ([r for r in evaluated if outcome(r) == "baseline"],
                     {"color": "#1f77b4", "s": 40, "edgecolors": "black", "zorder": 3}),
        "keep": ([r for r in evaluated if outcome(r) == "keep"],
                 {"color": "#2ca02c", "s": 40, "edgecolors": "black", "zorder": 3}),
    }
    for label, (rows, style) in groups.items():
        if rows:
            axes.scatter([r["id"] for r in rows], [r["val_bpb"] for r in rows], label=label,
                         **style)
    for row in groups["keep"][0]:
        if row["description"]:
            axes.annotate(row["description"][:40], (row["id"], row["val_bpb"]), fontsize=7,
                          xytext=(4, 4), textcoords="offset points", rotation=20,
                          parse_math=False)
    xs, ys = _kept_line(experiments)
    if xs:
        last_id = max(row["id"] for row in experiments)
        axes.step([*xs, last_id], [*ys, ys[-1]], where="post", color="#2ca02c", linewidth=1.2,
                  label="best")
    failed = [row for row in experiments if row["status"] in FAILED]
    if failed:  # on the bottom edge, in axes coordinates: a crash has no val_bpb
        axes.scatter([r["id"] for r in failed], [0.0] * len(failed), marker="x", s=24,
                     color="#d62728", label="failed", clip_on=False,
                     transform=axes.get_xaxis_transform())
    return len(groups["keep"][0])


def plot_progress(experiments: list[Row], path: str | Path) -> Path:
    """Write a PNG (or any format matplotlib knows by the suffix) of val_bpb per experiment.

    Every evaluated experiment is a dot, kept ones and baselines highlighted, the kept
    val_bpb in force as a step line, and failed runs as red crosses along the bottom.
    Invalid proposals and interrupted runs never produced a number and are left out.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as exc:
        raise ArError("plotting needs matplotlib: pip install 'ar[plot]'") from exc
    evaluated = [row for row in experiments if row["status"] == "ok" and row["val_bpb"] is not None]
    if not evaluated:
        raise ArError("nothing to plot yet: no experiment has a val_bpb")
    figure = Figure(figsize=(11, 5.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    kept = _draw_points(axes, experiments, evaluated)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("experiment #")
    axes.set_ylabel("val_bpb (lower is better)")
    axes.set_title(f"{len(experiments)} experiments, {kept} kept")
    axes.grid(alpha=0.3)
    axes.legend(loc="upper right", fontsize=8)
    figure.tight_layout()
    target = Path(path)
    try:
        figure.savefig(target, dpi=150)
    except (OSError, ValueError) as exc:
        raise ArError(f"cannot write the plot to {target}: {exc}") from exc
    return target
