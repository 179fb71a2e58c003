"""The keep rule: is a candidate better than the best, given how noisy runs are here?

A time-budgeted score moves with luck (the seed: initialisation and data order) and with
the compute the machine gave the run. Most of the seed's luck is shared by two commits
run on the same seed, so ar compares them **in pairs**: a commit's k-th run on a hardware
class gets the workspace's k-th seed, and a candidate's run k is compared with the best's
run k. The test is on the paired differences d_k = candidate_k - best_k:

- **the test**: a one-sided paired t-test of "the mean of d is below -min_delta", with the
  spread of d estimated from the candidate's own pairs (Student's t with n - 1 degrees
  of freedom). How far two commits' runs on one seed agree depends on the change (a
  constant moved a little: nearly the same run; a rewritten model: little in common), so
  a candidate is never judged on a spread measured on other changes: with one pair its
  spread is unknown, and it cannot be kept; from two pairs on, its own pairs say how
  correlated it is with the best, and the test gains power exactly where they agree.
- **sequential looks**: after each pair from the second on, at most `max_runs` pairs.
  Each look tests at level / (max_runs - 1) (Bonferroni over the looks), so a change
  that does nothing is kept at most `level` of the time, whatever its correlation with
  the best, when the paired differences are symmetric (normal or heavy-tailed: the t-test
  is conservative there; `make bench-keep` shows the simulation, and a skewed case).
  A candidate whose mean difference is not below -min_delta is discarded at once (after
  one run too); one that even `max_runs` pairs at its current mean and spread could not
  pass is discarded without more runs (futility); anything between gets another run on
  the next seed (a confirmation).
- **the noise**: the spread of val_bpb between runs of one commit (pooled over commits
  run more than once on a class) is what a single, unpaired number is worth: it sets the
  intervals `ar log` prints, and the words the prompt uses.

Every function here is pure: numbers in, a Judgement out. The scheduler gathers the pairs
from the evidence and acts on the verdict.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from autoresearch_cli.doors.config import RULES  # noqa: F401 (one list, checked at the door)

KEEP, DISCARD, CONFIRM = "keep", "discard", "confirm"
SAME = 1e-9  # runs on different seeds closer than this: the seed does not reach the run


@dataclass(frozen=True)
class Noise:
    sigma: float | None  # std of val_bpb between runs of one commit; None: not measured
    df: int  # degrees of freedom behind sigma: sum over commits of (runs - 1)
    commits: int  # commits run more than once


def noise(groups: Iterable[Sequence[float]]) -> Noise:
    """The pooled standard deviation of runs of the same commit (one group per commit).
    Outliers are kept: a heavy-tailed luck is part of the noise, and leaving it in only
    widens the intervals."""
    squares, df, commits = 0.0, 0, 0
    for runs in groups:
        runs = [value for value in runs if value is not None and math.isfinite(value)]
        if len(runs) < 2 or max(runs) - min(runs) < SAME:  # a pinned seed measures nothing
            continue
        mean = statistics.fmean(runs)
        squares += sum((value - mean) ** 2 for value in runs)
        df += len(runs) - 1
        commits += 1
    return Noise(math.sqrt(squares / df) if df else None, df, commits)


@dataclass(frozen=True)
class Rule:
    """[keep] in ar.toml."""

    name: str = "sequential"  # sequential | one-run (one run decides, as a plain loop does)
    level: float = 0.05  # the chance of keeping a change that is no better, at most
    max_runs: int = 6  # paired runs of one candidate at most (the first and confirmations)
    min_delta: float = 0.0  # the least improvement worth keeping, in val_bpb
    min_runs: int = 2  # pairs before a keep: one run's luck is never kept

    @classmethod
    def from_settings(cls, keep: Any, baseline_std: float | None = None) -> Rule:
        """From [keep] (doors.config.KeepSettings); a negative min_delta means 0, or under
        one-run twice the spread of the baseline's runs (one-run's old default)."""
        min_delta = float(keep.min_delta)
        if min_delta < 0:
            min_delta = 2 * baseline_std if keep.rule == "one-run" and baseline_std else 0.0
        return cls(name=keep.rule, level=float(keep.level), max_runs=int(keep.max_runs),
                   min_delta=min_delta, min_runs=int(keep.min_runs))

    @property
    def look_level(self) -> float:
        """The level of each look that can keep (the looks from min_runs to max_runs)."""
        return self.level / max(1, self.max_runs - self.min_runs + 1)


@dataclass(frozen=True)
class Judgement:
    verdict: str  # keep | discard | confirm
    reason: str  # one line, for `ar log`
    runs: tuple[float, ...]  # the candidate's runs that have a partner, in seed order
    best_runs: tuple[float, ...]  # the best's runs on the same seeds, same order
    seeds: tuple[int, ...] = ()  # the seed indices of the pairs
    spread: float | None = None  # std of the paired differences (own pairs)
    df: int = 0
    t: float | None = None
    p: float | None = None
    look_level: float | None = None
    rule: str = "sequential"

    @property
    def diffs(self) -> tuple[float, ...]:
        return tuple(c - b for c, b in zip(self.runs, self.best_runs, strict=True))

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.runs) if self.runs else None

    @property
    def best_mean(self) -> float | None:
        return statistics.fmean(self.best_runs) if self.best_runs else None

    @property
    def gain(self) -> float | None:
        """The mean paired improvement (positive: the candidate is better)."""
        return -statistics.fmean(self.diffs) if self.runs and self.best_runs else None

    def as_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record.update(runs=list(self.runs), best_runs=list(self.best_runs),
                      seeds=list(self.seeds), mean=self.mean, best_mean=self.best_mean,
                      gain=self.gain)
        return record


def pinned(values: Sequence[float]) -> bool:
    """Whether runs on different seeds all scored the same: the seed does not reach them."""
    return len(values) >= 2 and max(values) - min(values) < SAME


def judge(pairs: Sequence[tuple[int, float, float]], rule: Rule) -> Judgement:
    """keep, discard or confirm a candidate from its (seed index, its run, the best's run
    on that seed) pairs; no pairs: there is no best to beat on this hardware."""
    pairs = tuple(sorted(pairs))
    seeds = tuple(index for index, _, _ in pairs)
    runs = tuple(value for _, value, _ in pairs)
    best = tuple(value for _, _, value in pairs)
    base = dict(runs=runs, best_runs=best, seeds=seeds, rule=rule.name)
    if not pairs:
        return Judgement(KEEP, "kept: no best to beat on this hardware", **base)
    n = len(pairs)
    diffs = [c - b for c, b in zip(runs, best, strict=True)]
    gain = -statistics.fmean(diffs)  # > 0: the candidate is better
    vs = _vs(gain, n)
    if rule.name == "one-run":
        verdict = KEEP if gain > rule.min_delta else DISCARD
        return Judgement(verdict, f"{_word(verdict)}: {vs} (one run decides, min_delta "
                         f"{rule.min_delta:.4g})", **base)
    if pinned(runs):
        return Judgement(DISCARD, f"discarded: its {n} runs on different seeds scored the same "
                         f"({runs[0]:.6f}): the seed ar gives does not reach the run", **base)
    if gain <= rule.min_delta:
        return Judgement(DISCARD, f"discarded: {vs}, no better than the best", **base)
    if n < rule.min_runs:
        return Judgement(CONFIRM, f"needs another run: {vs}; one run's luck is never kept",
                         **base)
    from scipy.stats import t as student_t

    spread = statistics.stdev(diffs)
    level = rule.look_level
    t = (gain - rule.min_delta) / max(spread / math.sqrt(n), 1e-12)
    p = float(student_t.sf(t, n - 1))
    tested = dict(base, spread=spread, df=n - 1, t=round(t, 3), p=p, look_level=level)
    test = f"p={p:.3g} vs {level:.3g}, paired spread {spread:.4f}"
    if p < level:
        return Judgement(KEEP, f"kept: {vs}, {test}", **tested)
    if n >= rule.max_runs:
        return Judgement(DISCARD, f"discarded: {vs}, not shown better after {n} pairs: {test}",
                         **tested)
    # Futility: max_runs pairs at this mean and spread would not pass either.
    t_at_most = (gain - rule.min_delta) / max(spread / math.sqrt(rule.max_runs), 1e-12)
    if float(student_t.sf(t_at_most, rule.max_runs - 1)) >= level:
        return Judgement(DISCARD, f"discarded: {vs}, too small to show with {rule.max_runs} "
                         f"pairs: {test}", **tested)
    return Judgement(CONFIRM, f"needs another run: {vs}, {test}", **tested)


def no_longer_holds(pairs: Sequence[tuple[int, float, float]], rule: Rule) -> str | None:
    """Why a kept commit (the candidate of `pairs`) is no longer shown better than its
    parent, now that both ran on more seeds; None while it holds. It is re-judged only on
    enough pairs (min_runs), and gives way when its mean gain is gone, or when max_runs
    pairs no longer pass the test at the overall level (laxer than a look's, so that a
    keep does not flip on the next pair)."""
    if rule.name == "one-run" or len(pairs) < rule.min_runs:
        return None
    diffs = [candidate - best for _, candidate, best in pairs]
    gain, n = -statistics.fmean(diffs), len(diffs)
    if gain <= rule.min_delta:
        return f"its {n} pairs with its parent show no gain ({gain:+.4f})"
    if n < rule.max_runs:
        return None
    from scipy.stats import t as student_t

    spread = statistics.stdev(diffs)
    p = float(student_t.sf((gain - rule.min_delta) / max(spread / math.sqrt(n), 1e-12), n - 1))
    if p >= rule.level:
        return (f"not shown better than its parent over {n} pairs (gain {gain:+.4f}, p={p:.3g} "
                f"vs {rule.level:g})")
    return None


def _word(verdict: str) -> str:
    return {KEEP: "kept", DISCARD: "discarded"}.get(verdict, verdict)


def _vs(gain: float, pairs: int) -> str:
    return (f"gain {gain:+.4f} over the best on the same seed{'s' * (pairs != 1)} "
            f"({pairs} pair{'s' * (pairs != 1)})")


# --- disturbed runs ---------------------------------------------------------------------


@dataclass(frozen=True)
class Disturbance:
    """[runs] thresholds: below them a run is set aside and run again."""

    min_share: float = 0.9  # of its cores' time, what other processes must leave the job
    min_throughput: float = 0.7  # of the same code's median tokens/s on the same hardware
    retries: int = 2  # runs again of one disturbed run at most

    @classmethod
    def from_settings(cls, keep: Any) -> Disturbance:
        """From [keep] (doors.config.KeepSettings)."""
        return cls(float(keep.min_share), float(keep.min_throughput), int(keep.disturbed_retries))


def run_disturbance(result: dict[str, Any], same_code_tokens_per_s: Sequence[float],
                    limits: Disturbance) -> str | None:
    """`disturbed` for one result.json. On a GPU the host's cores serve every GPU's job:
    their share says little about the run's compute, so only throughput counts there."""
    share = None if result.get("device") == "cuda" else result.get("cpu_share")
    return disturbed(share, result.get("tokens_per_s"), same_code_tokens_per_s, limits)


def disturbed(cpu_share: float | None, tokens_per_s: float | None,
              same_code_tokens_per_s: Sequence[float], limits: Disturbance) -> str | None:
    """Why a run got too little of the machine to be judged, or None when it got enough.

    The share comes from the kernel's counters (sandbox/share.py). Throughput is compared
    only with runs of the same code on the same hardware: a change may make the model
    slower on purpose, but the same code running slower is the machine's doing.
    """
    if cpu_share is not None and cpu_share < limits.min_share:
        return (f"disturbed: other processes took {1 - cpu_share:.0%} of its cores' time "
                f"(it needs at least {limits.min_share:.0%} left to it)")
    if tokens_per_s and same_code_tokens_per_s:
        typical = statistics.median(same_code_tokens_per_s)
        if typical > 0 and tokens_per_s < limits.min_throughput * typical:
            return (f"disturbed: {tokens_per_s:,.0f} tokens/s, {tokens_per_s / typical:.0%} of "
                    f"the same code's {typical:,.0f} on this hardware")
    return None
