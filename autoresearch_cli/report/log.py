"""What `ar log` shows: pure functions from the evidence (research/evidence.py) to data and
rich tables; nothing prints.

Every number is the evidence's: a run's delta is its val_bpb minus its parent commit's
mean (negative is better), the best is the incumbent's mean over its runs, and an
improvement is a decrease of means (positive is better), with its interval.
"""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text

from autoresearch_cli.doors.ledger import CostTotal
from autoresearch_cli.doors.records import FAILED, Run
from autoresearch_cli.doors.text import one_line
from autoresearch_cli.research.evidence import CommitEvidence, Evidence, gain

Row = dict[str, Any]

OUTCOME_STYLES = {"keep": "bold green", "baseline": "bold blue", "discard": "dim",
                  "crash": "red", "timeout": "red", "oom": "red", "invalid": "magenta",
                  "interrupted": "yellow", "disturbed": "yellow", "pending": "cyan",
                  "remeasure": "blue", "confirmation": "cyan", "rejudged": "yellow"}


def short_sha(sha: str | None) -> str | None:
    return sha[:7] if sha else None


def _parent_id(evidence: Evidence, run: Run) -> int | None:
    made = evidence.proposer(run.parent_sha) if run.parent_sha else None
    return made.id if made is not None and made.id != run.id else None


def table_rows(evidence: Evidence, limit: int | None = None) -> list[Row]:
    """The rows of `ar log`, newest last: the last `limit` experiments when given."""
    shown = evidence.runs if limit is None else evidence.runs[len(evidence.runs) - max(limit, 0):]
    rows = []
    for run in shown:
        parent = evidence.parent_mean(run) if run.kind != "baseline" else None
        commit = evidence.commit_of(run)
        rows.append({
            "id": run.id, "kind": run.kind, "commit": short_sha(run.sha), "val_bpb": run.val_bpb,
            "commit_mean": commit.mean if commit else None, "commit_runs": commit.n if commit else 0,
            "parent_id": _parent_id(evidence, run),
            "delta_bpb": run.val_bpb - parent if run.scored and parent is not None else None,
            "memory_gb": run.memory_gb, "outcome": evidence.word(run),
            "description": one_line(run.description or "", 500), "reason": one_line(run.reason or "", 500) or None,
            "cost_usd": run.cost_usd, "repair_of": run.repair_of, "seed": run.seed,
        })
    return rows


def json_rows(evidence: Evidence, limit: int | None = None) -> list[Row]:
    """`ar log --json`: every ledger column, result.json parsed, and what the evidence
    says of the run (outcome, delta against the parent's mean, its commit's mean)."""
    out = []
    for row in table_rows(evidence, limit):
        run = evidence.run(row["id"])
        item = {key: value for key, value in vars(run).items() if key != "result_json"}
        item.update(result=run.result, evidence=run.judgement, outcome=row["outcome"],
                    delta_bpb=row["delta_bpb"], parent_id=row["parent_id"],
                    commit_mean=row["commit_mean"], commit_runs=row["commit_runs"])
        out.append(item)
    return out


def _step(commit: CommitEvidence, evidence: Evidence, previous: CommitEvidence | None,
          start: CommitEvidence | None) -> Row:
    made = evidence.proposer(commit.sha)
    judgement = made.judgement if made is not None else None
    step = gain(previous, commit) if previous is not None else None
    total = gain(start, commit) if start is not None and start is not commit else None
    return {
        "id": made.id if made else None, "kind": made.kind if made else None,
        "commit": short_sha(commit.sha), "val_bpb": commit.mean, "runs": commit.n,
        "half_width": commit.half_width, "spread": commit.std,
        "seeds": list(commit.seeds), "slot_class": commit.slot_class,
        "test": _test_outcome(judgement), "p": judgement.get("p") if judgement else None,
        "description": one_line((made.description or "") if made else "", 500),
        "improvement": step.value if step else None,
        "improvement_half_width": step.half_width if step else None,
        "paired": step.paired if step else 0,
        "cumulative_improvement": total.value if total else (0.0 if start is commit else None),
        "cumulative_half_width": total.half_width if total else None,
        "cumulative_percent": total.percent if total else (0.0 if start is commit else None),
    }


def best_chain(evidence: Evidence) -> list[Row]:
    """`ar log --best`: the kept steps from the baseline to the best, each with the
    evidence behind it: its runs on the best's hardware, their mean and interval, the keep
    test's outcome, and its gain over the step before, paired on the seeds both ran on,
    with its interval."""
    chain = evidence.chain()
    start = chain[0] if chain else None
    return [_step(commit, evidence, chain[index - 1] if index else None, start)
            for index, commit in enumerate(chain)]


def _test_outcome(evidence: Row | None) -> str:
    if not evidence:
        return "-"
    if evidence.get("p") is None:
        return (evidence.get("reason") or "-").split(":")[0] if evidence.get("rule") != "one-run" else "one run"
    level = evidence.get("look_level")  # rows written before the sequential test lack it
    pairs = len(evidence.get("runs") or ())
    return f"p={evidence['p']:.2g}" + (f" < {level:.2g}" if level is not None else "") + f" ({pairs} pairs)"


def noise_lines(evidence: Evidence) -> list[str]:
    """The measured noise per hardware class, in words."""
    lines = []
    for slot_class in evidence.classes():
        measured = evidence.noise(slot_class)
        if measured.sigma is not None:
            lines.append(
                f"noise on {slot_class or 'this machine'}: runs of one commit with different "
                f"seeds differ by {measured.sigma:.4f} val_bpb (std; {measured.df} degrees of "
                f"freedom from {measured.commits} commit(s) run more than once): a single-run "
                f"difference below about {2 * measured.sigma:.4f} is luck")
    return lines


def summary(evidence: Evidence, cost: CostTotal | None = None) -> Row:
    """Counts, the baseline and the best (each a mean over its runs, with its interval),
    the gain between them, and what the model calls cost."""
    counts = evidence.counts()
    best, start, gained = evidence.best(), evidence.baseline(), evidence.gain()
    made = evidence.proposer(best.sha) if best else None
    return {
        "experiments": len(evidence.runs), "kept": counts.get("keep", 0),
        "discarded": counts.get("discard", 0),
        "failed": sum(counts.get(status, 0) for status in FAILED),
        "invalid": counts.get("invalid", 0), "interrupted": counts.get("interrupted", 0),
        "disturbed": counts.get("disturbed", 0), "pending": counts.get("pending", 0),
        "rejudged": counts.get("rejudged", 0),
        "confirmations": counts.get("confirmation", 0), "remeasures": counts.get("remeasure", 0),
        "baseline_bpb": start.mean if start else None, "baseline_runs": start.n if start else 0,
        "baseline_half_width": start.half_width if start else None,
        "best_bpb": best.mean if best else None, "best_runs": best.n if best else 0,
        "best_half_width": best.half_width if best else None,
        "best_sha": best.sha if best else None, "best_id": made.id if made else None,
        "slot_class": best.slot_class if best else None,
        "improvement": gained.value if gained else None,
        "improvement_half_width": gained.half_width if gained else None,
        "improvement_paired": gained.paired if gained else 0,
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
                          ("commit mean (runs)", "right"), ("Δ parent", "right"),
                          ("mem GB", "right"), ("outcome", "left"), ("cost", "right"),
                          ("description", "left")):
        table.add_column(name, justify=justify, no_wrap=name != "description")
    for row in rows:
        description = Text(row["description"])
        if row["repair_of"] is not None:
            description.append(f" (repair of #{row['repair_of']})", style="dim")
        if row["outcome"] not in ("baseline", "ok") and row["reason"]:
            description.append(f" — {row['reason']}", style="dim")
        mean = (f"{row['commit_mean']:.6f} ({row['commit_runs']})"
                if row["commit_mean"] is not None else "-")
        table.add_row(
            str(row["id"]), row["commit"] or "-", _number(row["val_bpb"]), mean,
            _signed(row["delta_bpb"]), _number(row["memory_gb"], 1),
            Text(row["outcome"], style=OUTCOME_STYLES.get(row["outcome"], "yellow")),
            _cost(row["cost_usd"]), description)
    return table


def render_best_chain(steps: list[Row]) -> Table:
    """A rich Table of `best_chain` output."""
    table = Table(show_edge=False, header_style="bold")
    for name in ("#", "commit", "mean val_bpb", "± 95%", "runs", "test", "paired gain",
                 "cumulative", "%", "description"):
        table.add_column(name, justify="left" if name in ("commit", "test", "description")
                         else "right")
    for step in steps:
        percent = step["cumulative_percent"]
        table.add_row(
            str(step["id"] if step["id"] is not None else "-"), step["commit"] or "-",
            _number(step["val_bpb"]), _number(step["half_width"], 4), str(step["runs"]),
            step["test"], _gain_text(step["improvement"], step["improvement_half_width"]),
            _gain_text(step["cumulative_improvement"], step["cumulative_half_width"]),
            "-" if percent is None else f"{percent:.2f}%", step["description"])
    return table


def _gain_text(value: float | None, half: float | None) -> Text:
    text = _signed(value, better_when_negative=False)
    if value is not None and half is not None:
        text.append(f" ± {half:.4f}", style="dim")
    return text


def _mean_text(mean: float, runs: int, half: float | None) -> str:
    spread = f" ± {half:.4f}" if half is not None else ""
    return f"{mean:.6f}{spread} ({runs} run{'s' * (runs != 1)})"


def summary_text(facts: Row) -> str:
    """One line: counts, baseline → best as means with their runs and intervals, cost."""
    parts = [f"{facts['experiments']} runs: {facts['kept']} kept, "
             f"{facts['discarded']} discarded, {facts['failed']} failed, "
             f"{facts['invalid']} invalid, {facts['interrupted']} interrupted"
             + (f", {facts['disturbed']} disturbed (set aside)" if facts.get("disturbed") else "")
             + (f", {facts['pending']} awaiting confirmation" if facts.get("pending") else "")
             + (f", {facts['rejudged']} re-judged" if facts.get("rejudged") else "")]
    if facts["best_bpb"] is not None:
        best = (f"best {_mean_text(facts['best_bpb'], facts['best_runs'], facts['best_half_width'])}"
                f" (#{facts['best_id']})")
        if facts["baseline_bpb"] is not None:
            start = _mean_text(facts["baseline_bpb"], facts["baseline_runs"],
                               facts["baseline_half_width"])
            best = f"baseline {start} → {best}"
            if facts["improvement"] is not None and facts["best_sha"] and facts["best_id"]:
                half = facts["improvement_half_width"]
                paired = facts.get("improvement_paired")
                best += (f", gain {facts['improvement']:+.6f}"
                         + (f" ± {half:.4f}" if half is not None else "")
                         + (f" over {paired} paired seeds" if paired else ""))
        parts.append(best)
    if facts["llm_calls"]:
        cost = f"LLM cost ${facts['cost_usd']:.4f}"
        if facts["unpriced_calls"]:
            cost += f" (+{facts['unpriced_calls']} calls of unknown cost)"
        parts.append(cost)
    return "; ".join(parts)


def _gain_cell(found) -> Text:
    return _gain_text(found.value, found.half_width) if found is not None else Text("-", style="dim")


def render_ablations(found: list) -> Table:
    """A rich Table of research/findings.ablations: what each kept step carries."""
    table = Table(show_edge=False, header_style="bold")
    for name in ("removed step", "without it (mean)", "runs", "the step carries", "share"):
        table.add_column(name, justify="left" if name == "removed step" else "right")
    for ablation in found:
        label = f"#{ablation.step.id} {one_line(ablation.step.description or '', 60)}"
        if ablation.variant is None or ablation.carried is None:
            table.add_row(label, Text(ablation.why_not or "no scored run yet", style="yellow"),
                          "-", "-", "-")
            continue
        share = "-" if ablation.share is None else f"{100 * ablation.share:.1f}%"
        table.add_row(label, _number(ablation.variant.mean), str(ablation.variant.n),
                      _gain_cell(ablation.carried), share)
    return table


def render_transfers(found: list) -> Table:
    """A rich Table of research/findings.transfers: the gain at another budget."""
    table = Table(show_edge=False, header_style="bold")
    for name in ("class", "baseline", "best", "gain there", "gain at the profile's budget",
                 "verdict"):
        table.add_column(name, justify="left" if name in ("class", "verdict") else "right")
    for transfer in found:
        ratio = f" ({transfer.ratio:.2f}x)" if transfer.ratio is not None else ""
        table.add_row(transfer.slot_class, _mean_cell(transfer.baseline), _mean_cell(transfer.best),
                      _gain_cell(transfer.gain), _gain_cell(transfer.reference),
                      Text(transfer.verdict + ratio, style="bold"))
    return table


def _mean_cell(commit: CommitEvidence) -> str:
    return "-" if commit.mean is None else f"{commit.mean:.6f} ({commit.n})"
