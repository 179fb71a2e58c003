"""A commit's evidence: the one record of what the ledger's runs say, read by everything.

A commit is known by its runs on each hardware class (slot class), each on a seed ar
chose. `CommitEvidence` holds a commit's scored runs on one class: their seeds, mean and
interval. `Evidence` is the whole ledger seen that way, and defines, once:

- **the best** (the incumbent): the commit at the tip of the research branch, i.e. named
  by the latest branch move (a keep, a revert, a re-judgement), else the first baseline;
  its value is the mean of its runs, never one lucky run;
- **kept**: a new commit whose experiment was decided `keep`; the baseline is the start
  of the record, not a keep;
- **failed**: a run that trained and failed (crash, timeout, oom): a repair may follow;
- **outcome**: the one word `ar log`, the plot, the live view and the prompt show;
- **the holdout view** of a commit (its runs scored on the holdout split, never used for a
  decision), **ablations** (what each kept step carries of the gain) and **transfers**
  (the gain at another budget): what `ar report` shows.

The keep rule, `ar log` (table, --best, --json, the summary line), the plot, the live view,
results.tsv and the llm prompt all ask this module, so "the best" means one thing
everywhere. Nothing here writes: build an Evidence from a ledger's rows, read it, drop it.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cached_property
from statistics import NormalDist

from autoresearch_cli.doors.records import (
    BRANCH_MOVES,
    FAILED,
    IN_FLIGHT,
    MEASURE_KINDS,
    NEW_COMMIT_KINDS,
    STUDY_EVENTS,
    STUDY_KINDS,
    Event,
    Run,
    at_other_budget,
)
from autoresearch_cli.research.keeprule import Noise, noise

CONFIDENCE = 0.95  # of every interval ar prints


def failed(status: str | None) -> bool:
    """Whether a run trained and failed (crash, timeout, oom): a repair can follow."""
    return status in FAILED


def in_flight(status: str | None) -> bool:
    return status in IN_FLIGHT


def outcome(run: Run) -> str:
    """One word for how a run ended: baseline, remeasure, confirmation, keep, discard,
    pending (waiting for a confirmation run), ok (not decided), or its status."""
    if run.status != "ok":
        return run.status
    if run.kind in MEASURE_KINDS or run.kind in STUDY_KINDS or run.kind == "confirmation":
        return run.kind
    if run.decision is None:
        return "pending" if run.evidence else "ok"
    return run.decision


@functools.lru_cache(maxsize=256)  # a ledger asks for few df, and each costs scipy ~0.4 ms
def t_quantile(df: int | None, confidence: float = CONFIDENCE) -> float:
    """The two-sided Student t quantile (normal when df is unknown or large)."""
    upper = 1 - (1 - confidence) / 2
    if not df:
        return NormalDist().inv_cdf(upper)
    from scipy.special import stdtrit  # not scipy.stats: a fifth of its import time

    return float(stdtrit(df, upper))


@dataclass(frozen=True)
class CommitEvidence:
    """A commit's scored runs on one hardware class, and what they say."""

    sha: str
    slot_class: str | None
    runs: tuple[Run, ...]  # scored runs on slot_class, oldest first
    noise: Noise = Noise(None, 0, 0)  # the class's measured noise, for the interval
    metric: str = "val_bpb"  # the split its values come from (holdout_bpb: `holdout`)

    @property
    def values(self) -> tuple[float, ...]:
        return tuple(getattr(run, self.metric) for run in self.runs)

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def seeds(self) -> tuple[int | None, ...]:
        return tuple(run.seed for run in self.runs)

    def by_seed(self) -> dict[int, float]:
        """Its scored runs by seed index (the first on each index). A run from before
        seeds were paired (no index) takes its place in order: such pairs share no seed,
        which only widens their spread."""
        indexed: dict[int, float] = {}
        for position, run in enumerate(self.runs):
            index = run.seed_index if run.seed_index is not None else position
            indexed.setdefault(index, getattr(run, self.metric))
        return indexed

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.runs else None

    @property
    def std(self) -> float | None:
        """The spread of its own runs (None below two)."""
        return statistics.stdev(self.values) if self.n >= 2 else None

    @property
    def half_width(self) -> float | None:
        """Half the CONFIDENCE interval of the mean: from the class's measured noise where
        there is one, else from the commit's own spread; None from one run alone."""
        if not self.runs:
            return None
        if self.noise.sigma is not None:
            return t_quantile(self.noise.df) * self.noise.sigma / math.sqrt(self.n)
        if self.std is not None:
            return t_quantile(self.n - 1) * self.std / math.sqrt(self.n)
        return None

    def describe(self) -> str:
        """`1.9537 ± 0.0120 (5 runs)`: the mean, its interval, the runs behind it."""
        if self.mean is None:
            return "no scored run"
        spread = f" ± {self.half_width:.4f}" if self.half_width is not None else ""
        return f"{self.mean:.6f}{spread} ({self.n} run{'s' * (self.n != 1)})"


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def holdout(commit: CommitEvidence, measured: Noise) -> CommitEvidence:
    """The same commit scored on the holdout split (its runs that have a holdout score,
    `measured` the holdout's noise on its class). No decision ever reads it, so the
    distance between a val gain and its holdout gain is the selection's optimism."""
    runs = tuple(run for run in commit.runs if _finite(run.holdout_bpb))
    return CommitEvidence(commit.sha, commit.slot_class, runs, measured, "holdout_bpb")


@dataclass(frozen=True)
class Gain:
    """How much lower `after` is than `before` (positive: better), with its interval."""

    before: CommitEvidence
    after: CommitEvidence
    value: float
    half_width: float | None
    paired: int = 0  # the seeds both ran on, when the gain is paired (0: means compared)

    @property
    def percent(self) -> float:
        return 100.0 * self.value / self.before.mean if self.before.mean else 0.0

    def describe(self) -> str:
        spread = f" ± {self.half_width:.4f}" if self.half_width is not None else ""
        how = f", {self.paired} seeds paired" if self.paired else ""
        return f"{self.value:+.6f}{spread} ({self.percent:+.2f}%{how})"


def pairs(candidate: CommitEvidence, best: CommitEvidence | None) -> list[tuple[int, float, float]]:
    """(seed index, candidate's run, best's run) for every seed both ran on."""
    if best is None:
        return []
    theirs = best.by_seed()
    return [(index, value, theirs[index]) for index, value in sorted(candidate.by_seed().items())
            if index in theirs]


def missing_partners(candidate: CommitEvidence, best: CommitEvidence | None) -> list[int]:
    """Seed indices the candidate ran on and the best did not (yet)."""
    theirs = best.by_seed() if best is not None else {}
    return sorted(index for index in candidate.by_seed() if index not in theirs)


def gain(before: CommitEvidence, after: CommitEvidence) -> Gain | None:
    """The improvement from `before` to `after` on one class. Paired where they share
    seeds (two or more): the mean of the paired differences, its interval from their own
    spread; else a difference of means, its interval from the class's noise."""
    if before.mean is None or after.mean is None:
        return None
    shared = pairs(after, before)
    if len(shared) >= 2:
        diffs = [b - a for _, a, b in shared]
        half = t_quantile(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
        return Gain(before, after, statistics.fmean(diffs), half, len(diffs))
    measured = after.noise if after.noise.sigma is not None else before.noise
    half = None
    if measured.sigma is not None:
        half = (t_quantile(measured.df) * measured.sigma
                * math.sqrt(1 / before.n + 1 / after.n))
    return Gain(before, after, before.mean - after.mean, half)


def paired_mean(candidate: CommitEvidence, reference: CommitEvidence | None) -> float | None:
    """The candidate's mean estimated through its pairs with `reference`: the reference's
    mean over all its runs plus the mean of the paired differences (a control variate:
    the luck of the seeds both ran on cancels). Its own mean when they share no seed."""
    shared = pairs(candidate, reference)
    if not shared or reference is None or reference.mean is None:
        return candidate.mean
    return reference.mean + statistics.fmean(mine - theirs for _, mine, theirs in shared)


@dataclass
class Evidence:
    """The ledger's runs and branch moves, read as evidence about commits."""

    runs: list[Run]
    events: list[Event] = field(default_factory=list)

    @classmethod
    def load(cls, ledger) -> Evidence:
        """Everything a ledger holds (doors/ledger.Ledger), at this moment."""
        kinds = BRANCH_MOVES + STUDY_EVENTS
        return cls(ledger.runs(), [e for e in ledger.events() if e.kind in kinds])

    # --- indexes ---------------------------------------------------------------------

    @cached_property
    def _by_id(self) -> dict[int, Run]:
        return {run.id: run for run in self.runs}

    @cached_property
    def _scored(self) -> dict[tuple[str, str | None], list[Run]]:
        scored: dict[tuple[str, str | None], list[Run]] = defaultdict(list)
        for run in self.runs:
            if run.scored:
                scored[(run.sha, run.slot_class)].append(run)  # type: ignore[index]
        return scored

    @cached_property
    def _noise(self) -> dict[str | None, Noise]:
        return self._pooled("val_bpb")

    @cached_property
    def _holdout_noise(self) -> dict[str | None, Noise]:
        return self._pooled("holdout_bpb")

    def _pooled(self, metric: str) -> dict[str | None, Noise]:
        groups: dict[str | None, list[list[float]]] = defaultdict(list)
        for (_, slot_class), runs in self._scored.items():
            groups[slot_class].append([getattr(run, metric) for run in runs
                                       if _finite(getattr(run, metric))])
        return {slot_class: noise(values) for slot_class, values in groups.items()}

    def run(self, experiment_id: int) -> Run:
        return self._by_id[experiment_id]

    # --- commits -----------------------------------------------------------------------

    def noise(self, slot_class: str | None) -> Noise:
        """The spread of val_bpb between runs of one commit on `slot_class` (pooled)."""
        return self._noise.get(slot_class, Noise(None, 0, 0))

    def classes(self) -> list[str | None]:
        return sorted(self._noise, key=str)

    def commit(self, sha: str, slot_class: str | None) -> CommitEvidence:
        runs = tuple(self._scored.get((sha, slot_class), ()))
        return CommitEvidence(sha, slot_class, runs, self.noise(slot_class))

    def main_class(self, sha: str) -> str | None:
        """The class with the most scored runs of `sha` (the earliest on a tie), at the
        profile's budget: runs at another budget (`ar transfer`) never stand for a commit."""
        counts = [(len(runs), -runs[0].id, slot_class)
                  for (commit, slot_class), runs in self._scored.items()
                  if commit == sha and not at_other_budget(slot_class)]
        return max(counts)[2] if counts else None

    def on_class(self, sha: str | None, slot_class: str | None = None) -> CommitEvidence | None:
        """`sha`'s evidence on `slot_class`, or on its main class when none is given (None
        when it has no scored run at all)."""
        if sha is None:
            return None
        if slot_class is None:
            if not any(commit == sha for commit, _ in self._scored):
                return None
            slot_class = self.main_class(sha)
        return self.commit(sha, slot_class)

    def proposer(self, sha: str | None) -> Run | None:
        """The run that made `sha`: its experiment (or repair, combination), else the
        first baseline run of it."""
        return self._proposers.get(sha) if sha else None

    @cached_property
    def _proposers(self) -> dict[str, Run]:
        made: dict[str, Run] = {}
        for run in self.runs:
            if run.sha and run.kind == "baseline":
                made.setdefault(run.sha, run)
        for run in reversed(self.runs):  # the first experiment of a commit wins over a baseline
            if run.sha and run.kind in NEW_COMMIT_KINDS:
                made[run.sha] = run
        return made

    @property
    def proposed(self) -> list[str]:
        """Every commit an experiment, repair or combination made."""
        return [sha for sha, run in self._proposers.items() if run.kind in NEW_COMMIT_KINDS]

    # --- the branch's record -------------------------------------------------------------

    @cached_property
    def baseline_sha(self) -> str | None:
        """The commit the research started from: the first scored baseline's."""
        first = next((run for run in self.runs if run.kind == "baseline" and run.scored), None)
        return first.sha if first else None

    @cached_property
    def best_sha(self) -> str | None:
        """The incumbent: the tip named by the latest branch move, else the baseline."""
        moves = [event for event in self.events if event.kind in BRANCH_MOVES and event.sha]
        return moves[-1].sha if moves else self.baseline_sha

    def best(self, slot_class: str | None = None) -> CommitEvidence | None:
        """The incumbent's evidence (on `slot_class`, else on its main class)."""
        return self.on_class(self.best_sha, slot_class)

    def baseline(self, slot_class: str | None = None) -> CommitEvidence | None:
        """The baseline's evidence on the best's class (or `slot_class`): like with like."""
        best = self.best(slot_class)
        return self.on_class(self.baseline_sha, best.slot_class if best else slot_class)

    def is_keep(self, run: Run) -> bool:
        return run.kind in NEW_COMMIT_KINDS and run.decision == "keep"

    @cached_property
    def rejudged_ids(self) -> set[int]:
        """Kept experiments whose later runs no longer held up (a `rejudged` event)."""
        found = set()
        for event in self.events:
            if event.kind == "rejudged" and event.detail:
                head = event.detail.split(":", 1)[0].removeprefix("experiment #")
                if head.isdigit():
                    found.add(int(head))
        return found

    def word(self, run: Run) -> str:
        """outcome(run), and `rejudged` for a keep that later runs took back."""
        word = outcome(run)
        return "rejudged" if word == "keep" and run.id in self.rejudged_ids else word

    @cached_property
    def recorded_shas(self) -> set[str]:
        """Commits that were on the branch's record: the baseline and every keep."""
        shas = {run.sha for run in self.runs if self.is_keep(run) and run.sha}
        return shas | ({self.baseline_sha} if self.baseline_sha else set())

    def chain(self) -> list[CommitEvidence]:
        """The kept steps from the baseline to the best, following parents (so a revert
        is honoured), each on the best's class when it has runs there."""
        best = self.best()
        if best is None:
            return []
        steps, sha, seen = [best], best.sha, {best.sha}
        while sha != self.baseline_sha:
            made = self.proposer(sha)
            parent = made.parent_sha if made else None
            if parent is None or parent in seen:
                break
            seen.add(parent)
            on_best = self.commit(parent, best.slot_class)
            steps.append(on_best if on_best.runs else self.on_class(parent) or on_best)
            sha = parent
        return list(reversed(steps))

    def gain(self, slot_class: str | None = None) -> Gain | None:
        """Baseline -> best, on the best's class."""
        best, start = self.best(slot_class), self.baseline(slot_class)
        return gain(start, best) if best and start else None

    def holdout(self, commit: CommitEvidence) -> CommitEvidence:
        """`commit` scored on the holdout split, with the holdout's noise on its class."""
        return holdout(commit, self._holdout_noise.get(commit.slot_class, Noise(None, 0, 0)))

    def counts(self) -> dict[str, int]:
        """How many runs ended each way (outcome words)."""
        words: dict[str, int] = defaultdict(int)
        for run in self.runs:
            words[self.word(run)] += 1
        return dict(words)

    def parent_mean(self, run: Run) -> float | None:
        """The mean of `run`'s parent on `run`'s class (its main class when it has no runs
        there): what `ar log` and the prompt compare a run with."""
        if run.parent_sha is None:
            return None
        parent = self.commit(run.parent_sha, run.slot_class)
        if not parent.runs:
            parent = self.on_class(run.parent_sha) or parent
        return parent.mean

    def against(self, run: Run) -> CommitEvidence | None:
        """The commit `run`'s candidate was judged against (named in its judgement; else
        its parent), on `run`'s class: its paired evidence is read against this one."""
        judged = run.judgement if isinstance(run.judgement, dict) else {}
        sha = judged.get("against") or run.parent_sha
        if not isinstance(sha, str) or not sha:
            return None
        return self.commit(sha, run.slot_class)

    def commit_of(self, run: Run) -> CommitEvidence | None:
        """The evidence of the commit `run` trained, on its class."""
        return self.commit(run.sha, run.slot_class) if run.sha else None

