"""What `ar report` says, as data: built once from the evidence, rendered twice (HTML in
report/page.py, Markdown in report/markdown.py) and served live (report/serve.py).

Every number comes from research/evidence.py and research/findings.py, read the way `ar
log` reads them (report/log.py's summary and best chain): the report never computes a
mean, a gain or an interval of its own. The diffs come from git (doors/gitops.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from autoresearch_cli.doors import gitops
from autoresearch_cli.doors.ledger import CostTotal
from autoresearch_cli.doors.records import IN_FLIGHT, Run
from autoresearch_cli.doors.text import one_line
from autoresearch_cli.report import log
from autoresearch_cli.report.plot import PlotData, plot_data
from autoresearch_cli.research.evidence import CommitEvidence, Evidence, Gain, gain
from autoresearch_cli.research.findings import Ablation, Transfer, ablations, transfers

Row = log.Row
CENTIBIT = 0.01  # "cost per 0.01 val_bpb gained"
LATEST = 12  # decisions shown on the live page
NOT_FAILURES = ("ok", *IN_FLIGHT)  # statuses that are no failure of any kind


@dataclass(frozen=True)
class Headline:
    """Baseline -> best on one split (val decides; the holdout never does)."""

    split: str
    baseline: CommitEvidence | None
    best: CommitEvidence | None
    gain: Gain | None


@dataclass(frozen=True)
class Step:
    """One kept step: `ar log --best`'s row, its diff, and its ablation if it had one."""

    row: Row
    diff: str
    ablation: Ablation | None


@dataclass(frozen=True)
class FailureGroup:
    word: str  # crash, timeout, oom, invalid, interrupted, disturbed
    reason: str  # the reason's head, shared by the group
    ids: tuple[int, ...]


@dataclass(frozen=True)
class Costs:
    llm: CostTotal
    machine_hours: float  # every run in the sandbox, training and scoring, summed
    training_hours: float
    gain: float | None  # baseline -> best on val, positive when better

    def per_centibit(self, amount: float) -> float | None:
        """`amount` per 0.01 val_bpb gained (None without a positive gain)."""
        return amount / (self.gain / CENTIBIT) if self.gain and self.gain > 0 else None


@dataclass(frozen=True)
class Running:
    """An experiment in flight, for the live page."""

    id: int
    kind: str
    status: str
    description: str
    started_at: str
    percent: float | None
    loss: float | None


@dataclass
class Report:
    title: str
    generated_at: str
    summary: Row  # report/log.summary: the same facts as `ar log`'s last line
    val: Headline
    holdout: Headline
    plot: PlotData
    noise_sigma: float | None  # single-run noise on the best's class
    steps: list[Step]
    ablations: list[Ablation]
    transfers: list[Transfer]
    failures: list[FailureGroup]
    costs: Costs
    whole_diff: str
    noise: list[str]
    latest: list[Row] = field(default_factory=list)
    running: list[Running] = field(default_factory=list)
    class_names: dict[int, str] = field(default_factory=dict)  # run id -> slot class

    @property
    def optimism(self) -> float | None:
        """How much more the val split shows than the holdout: the selection's optimism."""
        if self.val.gain is None or self.holdout.gain is None:
            return None
        return self.val.gain.value - self.holdout.gain.value


def build(evidence: Evidence, cost: CostTotal, repo: Path | None = None, title: str = "ar",
          progress=None) -> Report:
    """The whole report. `repo`: the workspace, for diffs (None: no diffs); `progress`:
    a function of a running Run to its (percent, loss), for the live page."""
    best, start = evidence.best(), evidence.baseline()
    found = ablations(evidence)
    by_step = {ablation.step.id: ablation for ablation in found}
    chain = log.best_chain(evidence)
    shas = tuple(commit.sha for commit in evidence.chain())
    diffs, whole_diff = _chain_diffs(repo, shas)
    steps = [Step(row, diffs[index - 1], by_step.get(row["id"]))
             for index, row in enumerate(chain) if index]
    gained = evidence.gain()
    held_start = evidence.holdout(start) if start else None
    held_best = evidence.holdout(best) if best else None
    costs = Costs(cost, _hours(evidence, "total_seconds"), _hours(evidence, "training_seconds"),
                  gained.value if gained else None)
    return Report(
        title=title, generated_at=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        summary=log.summary(evidence, cost),
        val=Headline("val", start, best, gained),
        holdout=Headline("holdout", held_start, held_best,
                         gain(held_start, held_best) if start and best else None),
        plot=plot_data(evidence),
        noise_sigma=evidence.noise(best.slot_class).sigma if best else None,
        steps=steps, ablations=found, transfers=transfers(evidence),
        failures=failure_groups(evidence),
        costs=costs,
        whole_diff=whole_diff,
        noise=log.noise_lines(evidence),
        latest=latest_decisions(evidence),
        running=running(evidence, progress),
        class_names={run.id: run.slot_class or "" for run in evidence.runs},
    )


def _diff(repo: Path | None, old: str, new: str) -> str:
    return gitops.diff(repo, old, new) if repo is not None and old != new else ""


@functools.lru_cache(maxsize=4)
def _chain_diffs(repo: Path | None, shas: tuple[str, ...]) -> tuple[tuple[str, ...], str]:
    """(the diff of each step of the chain `shas` from the step before, the whole diff).
    The steps' in one git call (each commit against its git parent, which ar made it on),
    a call of its own for a step whose git parent is not the step before. Cached: commits
    never change, and the live page rebuilds its report on every row the loop writes."""
    whole = _diff(repo, shas[0], shas[-1]) if len(shas) > 1 else ""
    if repo is None:
        return ("",) * max(len(shas) - 1, 0), whole
    own = gitops.own_diffs(repo, list(shas[1:]))
    return tuple(own[new][1] if own.get(new, ("",))[0] == old else _diff(repo, old, new)
                 for old, new in zip(shas, shas[1:], strict=False)), whole


def _hours(evidence: Evidence, column: str) -> float:
    return sum(getattr(run, column) or 0.0 for run in evidence.runs) / 3600


def reason_head(reason: str | None) -> str:
    """What runs failing the same way share: the reason up to its first colon (the rest
    quotes a log line or a number that differs between them)."""
    return one_line((reason or "no reason recorded").split(": ", 1)[0], 160)


def failure_groups(evidence: Evidence) -> list[FailureGroup]:
    """Every run that did not end ok, grouped by its outcome word and reason, most first."""
    groups: dict[tuple[str, str], list[int]] = {}
    for run in evidence.runs:
        if run.status in NOT_FAILURES:
            continue
        groups.setdefault((evidence.word(run), reason_head(run.reason)), []).append(run.id)
    ordered = sorted(groups.items(), key=lambda item: (-len(item[1]), item[0]))
    return [FailureGroup(word, reason, tuple(ids)) for (word, reason), ids in ordered]


def latest_decisions(evidence: Evidence, count: int = LATEST) -> list[Row]:
    """The last `count` runs that ended, newest first, as `ar log` shows them."""
    ended = [row for row in log.table_rows(evidence, count * 3)
             if row["outcome"] not in IN_FLIGHT]
    return list(reversed(ended[-count:]))


def running(evidence: Evidence, progress=None) -> list[Running]:
    """Experiments in flight, with their training progress where `progress` can tell."""
    found = []
    for run in evidence.runs:
        if run.status not in IN_FLIGHT:
            continue
        percent, loss = progress(run) if progress is not None else (None, None)
        found.append(Running(run.id, run.kind, run.status, one_line(run.description or "", 200),
                             run.started_at, percent, loss))
    return found


def step_label(run: Run | None) -> str:
    if run is None:
        return "-"
    return f"#{run.id} {one_line(run.description or '', 80)}"
