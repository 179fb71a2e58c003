"""Combinations: two experiments of one parent that both beat it, run at the same time,
are worth trying together (a three-way merge, pipeline.combine).

`Winners` remembers, per parent, the experiments whose runs beat it on the same seeds and
when each ended, in ticks (a count of runs started and judged): two ran at the same time
when one ended after the other started.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from autoresearch_cli.research import keeprule
from autoresearch_cli.research.evidence import CommitEvidence, pairs


def beat(mine: CommitEvidence, parent: CommitEvidence, rule: keeprule.Rule) -> bool:
    """Material for a combination: its runs beat its parent's on the same seeds (one run
    decides: the combination is judged on its own evidence)."""
    lax = dataclasses.replace(rule, name="one-run")
    return keeprule.judge(pairs(mine, parent), lax).verdict == keeprule.KEEP


@dataclass
class Winners:
    # parent sha -> (id, sha, tick it ended) of the runs that beat it
    by_parent: dict[str, list[tuple[int, str, int]]] = field(default_factory=dict)
    ticks: int = 0
    started_at: dict[int, int] = field(default_factory=dict)

    def started(self, exp_id: int) -> None:
        self.ticks += 1
        self.started_at[exp_id] = self.ticks

    def judged(self) -> None:
        self.ticks += 1

    def add(self, exp_id: int, sha: str, parent_sha: str, tip: str) -> tuple[int, int] | None:
        """Record a winner; the pair to combine when an earlier winner of the same parent
        ended while this one ran and one of the two is the tip (the combination's base)."""
        winners = self.by_parent.setdefault(parent_sha, [])
        began = self.started_at.get(exp_id, 0)
        pair = None
        for earlier_id, earlier_sha, ended in winners:
            if ended > began and tip in (earlier_sha, sha):
                pair = (min(earlier_id, exp_id), max(earlier_id, exp_id))
                break
        winners.append((exp_id, sha, self.ticks))
        return pair
