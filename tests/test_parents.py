"""Which commit the next experiment builds on: UCB over the parents on offer, a pure rule."""

from __future__ import annotations

import pytest

from autoresearch_cli.agents.base import Parent
from autoresearch_cli.agents.parents import choose_parent, ucb_parent

NOISE = 0.01


def parent(name, level, tried, role="keep"):
    return Parent(name * 40, level, None, name, tried=tried, runs=3, role=role, level=level)


def test_the_best_when_nothing_else_is_on_offer_or_exploring_is_off():
    best = parent("b", 1.90, 10, "best")
    assert ucb_parent([best], NOISE) is best
    assert ucb_parent([best, parent("k", 1.9001, 0)], NOISE, explore=0) is best


def test_a_parent_close_to_the_best_gets_a_turn_once_the_best_was_tried_often():
    best, close = parent("b", 1.900, 1, "best"), parent("k", 1.905, 1)
    assert ucb_parent([best, close], NOISE) is best  # a tie in tries: the better one
    busy = parent("b", 1.900, 8, "best")
    assert ucb_parent([busy, close], NOISE) is close  # tried once against eight


def test_a_parent_far_behind_the_best_is_never_chosen():
    best, far = parent("b", 1.90, 200, "best"), parent("a", 1.96, 0)  # 6 noises behind
    assert ucb_parent([best, far], NOISE) is best


def test_a_candidate_not_shown_better_counts_as_no_better_than_the_best():
    """Its level looked lower, but it was discarded: it gets turns, fewer than the best."""
    best, candidate = parent("b", 1.90, 3, "best"), parent("c", 1.80, 0, "candidate")
    assert ucb_parent([best, candidate], NOISE) is candidate  # untried: its turn
    tried = parent("c", 1.80, 1, "candidate")
    assert ucb_parent([best, tried], NOISE) is best
    turns = {"best": 0, "candidate": 0}
    best_tries = candidate_tries = 0
    for _ in range(40):
        chosen = ucb_parent([parent("b", 1.90, best_tries, "best"),
                             parent("c", 1.80, candidate_tries, "candidate")], NOISE)
        turns[chosen.role] += 1
        best_tries += chosen.role == "best"
        candidate_tries += chosen.role == "candidate"
    assert turns["candidate"] >= 3 and turns["best"] > 2 * turns["candidate"]


def test_without_a_measured_noise_the_scale_is_a_share_of_the_level():
    best, close = parent("b", 2.000, 8, "best"), parent("k", 2.005, 1)
    assert ucb_parent([best, close], None) is close  # 0.5% of 2.0 = 0.01, as NOISE above
    assert ucb_parent([best, parent("k", 2.2, 1)], None) is best


def test_an_unscored_parent_is_never_chosen_and_the_agent_may_choose_itself():
    best, unscored = parent("b", 1.9, 50, "best"), Parent("u" * 40, None, None, "", tried=0)
    assert ucb_parent([best, unscored], NOISE) is best

    class Oldest:
        def choose_parent(self, parents):
            return parents[-1]

    class Stranger:
        def choose_parent(self, parents):
            return parent("z", 1.0, 0)

    offered = [best, parent("k", 1.95, 0)]
    assert choose_parent(Oldest(), offered).sha == "k" * 40
    assert choose_parent(Stranger(), offered) is best  # not on offer: ignored
    assert choose_parent(object(), offered, NOISE, explore=0) is best
    with pytest.raises(ValueError):
        ucb_parent([], NOISE)
