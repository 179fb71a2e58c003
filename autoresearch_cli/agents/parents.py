"""Which commit the next experiment builds on: a pure rule over the parents on offer.

Building only on the best walks one path: once the small steps around it are tried, the
search stalls. The parents on offer (research/history.parents) are the best, the earlier
keeps and the baseline, and a few candidates that looked better but were not shown so.
The rule is UCB1 over commits, for a score where lower is better:

    score(p) = value(p) - explore * scale * sqrt(2 ln(N + 1) / (tried(p) + 1))

- value(p): its level (its mean through its pairs with the best, so the seeds' luck they
  shared cancels); a candidate that was not shown better counts as no better than the
  best, plus CANDIDATE_MARGIN of the noise: it must earn its turns;
- tried(p): experiments already built on it; N: all of them, over the parents on offer;
- scale: the measured noise between runs (what a difference in value is worth), else
  FALLBACK_SCALE of the best's level while the noise is not measured.

The lowest score wins, the best on a tie. The bonus of a parent shrinks as it is tried,
so a parent close to the best gets a turn now and then, and one far behind it never
does: a keep 0.05 behind the best, at a noise of 0.012, would wait for thousands of
experiments. `explore` 0 always builds on the best.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from autoresearch_cli.agents.base import Parent

EXPLORE = 1.0  # the weight of the bonus ([agent] explore in ar.toml)
FALLBACK_SCALE = 0.005  # of the best's level: the scale while the noise is not measured
CANDIDATE_MARGIN = 0.5  # of the scale: a candidate not shown better counts this much worse


def ucb_parent(parents: Sequence[Parent], noise: float | None,
               explore: float = EXPLORE) -> Parent:
    """The parent with the lowest UCB score (see the module's docstring); `parents[0]` is
    the best. Parents without a level (never scored) are not chosen."""
    if not parents:
        raise ValueError("no parent to choose from")
    best = parents[0]
    if explore <= 0 or best.level is None:
        return best
    scale = noise if noise and noise > 0 else FALLBACK_SCALE * abs(best.level)
    offered = [parent for parent in parents if parent.level is not None]
    total = sum(parent.tried for parent in offered)
    scores = [(score(parent, best.level, scale, total, explore), index, parent)
              for index, parent in enumerate(offered)]
    return min(scores, key=lambda entry: entry[:2])[2]


def score(parent: Parent, best_level: float, scale: float, total: int,
          explore: float) -> float:
    """UCB1's optimistic value of building on `parent` (lower is better)."""
    value = parent.level if parent.level is not None else math.inf
    if parent.role == "candidate":
        value = max(value, best_level) + CANDIDATE_MARGIN * scale
    bonus = explore * scale * math.sqrt(2 * math.log(total + 1) / (parent.tried + 1))
    return value - bonus


def choose_parent(agent: object, parents: list[Parent], noise: float | None = None,
                  explore: float = EXPLORE) -> Parent:
    """The commit the agent's next experiment builds on: the agent's own `choose_parent`
    when it has one, else the UCB rule. The loop lists the branch tip (the best) first;
    an answer not among `parents` is ignored."""
    chooser = getattr(agent, "choose_parent", None)
    if chooser is not None:
        chosen = chooser(parents)
        if chosen in parents:
            return chosen
        return parents[0]
    return ucb_parent(parents, noise, explore)
