"""The keep rule: is a candidate better than the best, given how noisy runs are here?

A time-budgeted score moves with luck (seed, data order) and with the compute the machine
gave the run. One run beating the best by any margin is how a seed change ends up kept.
ar instead measures the noise and tests:

- **noise**: the spread of val_bpb between runs of one commit with different seeds (A/A),
  pooled over every commit run more than once on the same hardware class (baseline
  repeats, re-measures of the best, confirmations). `noise()` is the pooled standard
  deviation and its degrees of freedom.
- **the test**: a one-sided two-sample t-test of "the candidate's mean is lower than the
  best's mean by more than min_delta", with the pooled noise as the per-run spread
  (Student's t with the pooled degrees of freedom: scipy.stats.t).
- **sequential looks**: after each run of the candidate, at most `max_runs`. Each look
  tests at level / max_runs (Bonferroni over the looks), so the chance of keeping a
  change that is no better stays below `level` however the looks go. A clear win passes
  at the first look and is kept after one run; a candidate whose mean is no better than
  the best is discarded at once; one that even `max_runs` runs at its current mean
  could not pass is discarded without more runs (futility); anything between gets
  another run with a new seed (a confirmation).

Every function here is pure: numbers in, a Judgement out. The scheduler gathers the runs
from the ledger and acts on the verdict.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from autoresearch_cli.doors.config import RULES  # noqa: F401 (one list, checked at the door)

KEEP, DISCARD, CONFIRM = "keep", "discard", "confirm"


@dataclass(frozen=True)
class Noise:
    sigma: float | None  # std of val_bpb between runs of one commit; None: not measured
    df: int  # degrees of freedom behind sigma: sum over commits of (runs - 1)
    commits: int  # commits run more than once


def noise(groups: Iterable[Sequence[float]]) -> Noise:
    """The pooled standard deviation of runs of the same commit (one group per commit)."""
    squares, df, commits = 0.0, 0, 0
    for runs in groups:
        runs = [value for value in runs if value is not None and math.isfinite(value)]
        if len(runs) < 2:
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
    max_runs: int = 3  # runs of one candidate at most (the first and its confirmations)
    min_delta: float = 0.0  # the least improvement worth keeping, in val_bpb

    @classmethod
    def from_settings(cls, keep: Any, baseline_std: float | None = None) -> Rule:
        """From [keep] (doors.config.KeepSettings); a negative min_delta means 0, or under
        one-run twice the spread of the baseline's runs (one-run's old default)."""
        min_delta = float(keep.min_delta)
        if min_delta < 0:
            min_delta = 2 * baseline_std if keep.rule == "one-run" and baseline_std else 0.0
        return cls(name=keep.rule, level=float(keep.level), max_runs=int(keep.max_runs),
                   min_delta=min_delta)

    @property
    def look_level(self) -> float:
        return self.level / self.max_runs


@dataclass(frozen=True)
class Judgement:
    verdict: str  # keep | discard | confirm
    reason: str  # one line, for `ar log`
    runs: tuple[float, ...]  # the candidate's ok runs
    best_runs: tuple[float, ...]  # the best's ok runs on the same hardware
    sigma: float | None = None
    df: int = 0
    t: float | None = None
    p: float | None = None
    look_level: float | None = None
    rule: str = "sequential"

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.runs) if self.runs else None

    @property
    def best_mean(self) -> float | None:
        return statistics.fmean(self.best_runs) if self.best_runs else None

    def as_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record.update(runs=list(self.runs), best_runs=list(self.best_runs), mean=self.mean,
                      best_mean=self.best_mean)
        return record


def judge(runs: Sequence[float], best_runs: Sequence[float], measured: Noise,
          rule: Rule) -> Judgement:
    """keep, discard or confirm (one more run) a candidate with `runs` against the best's."""
    runs, best_runs = tuple(runs), tuple(best_runs)
    if not runs:
        raise ValueError("a candidate is judged on at least one ok run")
    if not best_runs:
        return Judgement(KEEP, "kept: no best to beat on this hardware", runs, best_runs,
                         rule=rule.name)
    mean, best = statistics.fmean(runs), statistics.fmean(best_runs)
    gain = best - mean  # > 0: the candidate is better
    if rule.name == "one-run" or measured.sigma is None:
        verdict = KEEP if gain > rule.min_delta else DISCARD
        why = "one run decides" if rule.name == "one-run" else "noise not measured yet: one run decides"
        return Judgement(verdict, f"{_word(verdict)}: {_vs(mean, best, len(runs), len(best_runs))} "
                         f"({why}, min_delta {rule.min_delta:.4g})", runs, best_runs,
                         measured.sigma, measured.df, rule=rule.name)
    from scipy.stats import t as student_t

    sigma = max(measured.sigma, 1e-12)
    se = sigma * math.sqrt(1 / len(runs) + 1 / len(best_runs))
    t = (gain - rule.min_delta) / se
    p = float(student_t.sf(t, measured.df))
    level = rule.look_level
    base = dict(runs=runs, best_runs=best_runs, sigma=measured.sigma, df=measured.df,
                t=round(t, 3), p=p, look_level=level, rule=rule.name)
    vs = _vs(mean, best, len(runs), len(best_runs))
    test = f"p={p:.3g} vs {level:.3g}, noise {measured.sigma:.4f} (df {measured.df})"
    if gain <= rule.min_delta:
        return Judgement(DISCARD, f"discarded: {vs}, no better than the best", **base)
    if p < level:
        return Judgement(KEEP, f"kept: {vs}, {test}", **base)
    if len(runs) >= rule.max_runs:
        return Judgement(DISCARD, f"discarded: {vs}, not shown better after {len(runs)} runs: "
                         f"{test}", **base)
    # Futility: even max_runs runs at this mean would not pass (those runs would add their
    # degrees of freedom to the noise's).
    se_at_most = sigma * math.sqrt(1 / rule.max_runs + 1 / len(best_runs))
    df_at_most = measured.df + rule.max_runs - len(runs)
    if float(student_t.sf((gain - rule.min_delta) / se_at_most, df_at_most)) >= level:
        return Judgement(DISCARD, f"discarded: {vs}, too small to show with {rule.max_runs} "
                         f"runs: {test}", **base)
    return Judgement(CONFIRM, f"needs another run: {vs}, {test}", **base)


def _word(verdict: str) -> str:
    return {KEEP: "kept", DISCARD: "discarded"}.get(verdict, verdict)


def _vs(mean: float, best: float, runs: int, best_runs: int) -> str:
    return (f"{mean:.4f} ({runs} run{'s' * (runs != 1)}) vs best {best:.4f} "
            f"({best_runs} run{'s' * (best_runs != 1)})")


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
