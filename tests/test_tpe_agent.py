"""The tpe agent: its search space read from train.py, its trials from the history, its
proposals reproducible; and on a synthetic objective (a pure function of the constants,
no training) it finds a better region than the random agent with the same budget."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from autoresearch_cli.agents import AGENTS, make_agent
from autoresearch_cli.agents.base import History, HistoryItem
from autoresearch_cli.agents.random_agent import RandomAgent, find_constants
from autoresearch_cli.agents.space import infer_space, named_constants
from autoresearch_cli.agents.tpe_agent import TPEAgent, trials_of
from autoresearch_cli.doors.config import default_config, settings_of
from autoresearch_cli.doors.template import render_train_py

TRAIN_PY = render_train_py("cpu")
SYNTHETIC = '''\
"""A train.py with the constants of the real one, for a synthetic objective."""

DEPTH = 4  # transformer layers
MATRIX_LR = 0.04  # attention and MLP matrices (Muon)
EMBEDDING_LR = 0.6  # token embeddings
UNEMBEDDING_LR = 0.004  # lm_head
WEIGHT_DECAY = 0.2  # decays to 0 with progress
ADAM_BETAS = (0.8, 0.95)  # AdamW beta1, beta2
WARMDOWN_RATIO = 0.5  # share of the time budget spent decaying the LR
FINAL_LR_FRAC = 0.0  # LR at the end, as a fraction of the peak
WINDOW_PATTERN = "L"  # per layer
'''


def values(train_py: str) -> dict:
    return {name: constant.value for name, constant in find_constants(train_py).items()}


def test_the_space_is_read_from_values_names_and_comments():
    space = {dim.param: dim for dim in infer_space(TRAIN_PY)}
    lr = space["MATRIX_LR"]
    assert (lr.kind, lr.log) == ("float", True) and lr.low == pytest.approx(0.04 / 3)
    assert lr.high == pytest.approx(0.12)
    beta2 = space["ADAM_BETAS[1]"]  # a momentum: its distance from 1, on a log scale
    assert (beta2.encoding, beta2.log) == ("one_minus", True)
    assert (beta2.low, beta2.high) == (pytest.approx(0.0125), pytest.approx(0.2))
    assert (space["WARMUP_RATIO"].low, space["WARMUP_RATIO"].high) == (0.0, 0.2)  # a share at 0
    assert space["WARMDOWN_RATIO"].high == 1.0 and not space["WARMDOWN_RATIO"].log
    assert "SSSL" in space["WINDOW_PATTERN"].choices
    assert (space["DEPTH"].low, space["DEPTH"].high) == (1, 4)  # layers: two either way
    # a power of two moves by powers of two; the total batch as accumulation over the device's
    assert space["HEAD_DIM"].encoding == space["DEVICE_BATCH_SIZE"].encoding == "log2"
    assert space["TOTAL_BATCH_SIZE"].encoding == "accumulation"
    assert space["ASPECT_RATIO"].encoding == "log2"  # its comment names DEPTH: not a layer count
    ranged = infer_space(SYNTHETIC.replace("# decays to 0 with progress", "# in [0.01, 0.5]"))
    decay = next(dim for dim in ranged if dim.param == "WEIGHT_DECAY")
    assert (decay.low, decay.high, decay.log) == (0.01, 0.5, True)


def test_program_md_can_name_the_constants_that_matter():
    program = "# Research\nTune: MATRIX_LR, WARMDOWN_RATIO and DEVICE_BATCH_SIZE\n"
    assert named_constants(program) == {"MATRIX_LR", "WARMDOWN_RATIO", "DEVICE_BATCH_SIZE"}
    assert named_constants("Raise MATRIX_LR from 0.04 to 0.05") == set()  # only named lines
    pruned = {dim.constant for dim in infer_space(TRAIN_PY, named_constants(program))}
    assert pruned == {"MATRIX_LR", "WARMDOWN_RATIO", "DEVICE_BATCH_SIZE", "TOTAL_BATCH_SIZE"}
    agent = TPEAgent(seed=1)
    for step in range(5):
        moved = _moved(agent.propose(TRAIN_PY, program, _history(step)).train_py)
        assert moved and moved <= pruned


def _moved(train_py: str) -> set[str]:
    before, after = values(TRAIN_PY), values(train_py)
    return {name for name in before if before[name] != after[name]}


def _history(steps: int) -> History:
    """The baseline and `steps` experiments that changed nothing, for seeding draws."""
    items = [HistoryItem(0, "baseline", 1.6, "baseline", None, sha="base", kind="baseline",
                         level=1.6)]
    items += [HistoryItem(i, "x", None, "invalid", None, 0) for i in range(1, steps + 1)]
    return History(items, sources={"base": TRAIN_PY})


def test_proposals_are_reproducible_keep_the_batch_rule_and_are_registered():
    history = _history(0)
    first = TPEAgent(seed=7).propose(TRAIN_PY, "", history)
    assert TPEAgent(seed=7).propose(TRAIN_PY, "", history).train_py == first.train_py
    assert 1 <= len(_moved(first.train_py)) <= 3  # one or two moves; a batch brings its partner
    for seed in range(20):
        after = values(TPEAgent(seed=seed).propose(TRAIN_PY, "", history).train_py)
        ratio = after["TOTAL_BATCH_SIZE"] / after["DEVICE_BATCH_SIZE"]
        assert ratio >= 2**11 / 8 and ratio == 2 ** round(math.log2(ratio))
    assert AGENTS["tpe"].model_backed is False
    settings = settings_of(default_config("micro", "t")).agent
    assert isinstance(make_agent(settings, name="tpe", seed=3), TPEAgent)


def test_a_parent_unlike_the_baseline_moves_what_it_has_and_keeps_the_rest_as_written():
    """Parents beyond the tip may differ from the baseline the space was read from: a
    constant it lacks (or no longer writes as a literal) is not drawn, and only what is
    drawn is written (a value outside the space's range or finer than its steps stays)."""
    from autoresearch_cli.doors.template import set_constants

    parent = set_constants(TRAIN_PY, {"WINDOW_PATTERN": '"L" if True else "S"',
                                      "ADAM_BETAS": "(0.9,)", "MATRIX_LR": "0.2",
                                      "EMBEDDING_LR": "0.6125"})  # fmt: skip
    before = values(parent)
    rewritten = 0
    for seed in range(20):
        after = values(TPEAgent(seed=seed).propose(parent, "", _history(0)).train_py)
        changed = {name for name in before if before[name] != after.get(name)}
        assert 1 <= len(changed) <= 3 and "WINDOW_PATTERN" not in after
        rewritten += "MATRIX_LR" in changed and "EMBEDDING_LR" in changed
    assert rewritten < 3  # drawn together now and then, not rewritten by every proposal


def test_a_negative_constant_gets_a_linear_range_and_zero_none():
    space = {dim.param: dim for dim in infer_space(
        "LOSS_BIAS = -0.5  # added to the loss\nZERO = 0.0  # nothing\n")}  # fmt: skip
    assert (space["LOSS_BIAS"].low, space["LOSS_BIAS"].high) == (-1.5, pytest.approx(-1 / 6))
    assert not space["LOSS_BIAS"].log and "ZERO" not in space
    train_py = "LOSS_BIAS = -0.5  # added to the loss\nMATRIX_LR = 0.04  # matrices\n"
    history = History([HistoryItem(0, "baseline", 1.6, "baseline", None, sha="b",
                                   kind="baseline", level=1.6)], sources={"b": train_py})  # fmt: skip
    for seed in range(5):
        after = values(TPEAgent(seed=seed).propose(train_py, "", history).train_py)
        assert -1.5 <= after["LOSS_BIAS"] <= -1 / 6


def test_the_history_becomes_trials_a_failure_counts_worse_than_the_worst():
    space = infer_space(SYNTHETIC)
    a = SYNTHETIC.replace("MATRIX_LR = 0.04", "MATRIX_LR = 0.05")
    b = SYNTHETIC.replace("MATRIX_LR = 0.04", "MATRIX_LR = 0.08")
    c = SYNTHETIC.replace("MATRIX_LR = 0.04", "MATRIX_LR = 0.02")
    items = [HistoryItem(0, "base", 2.0, "baseline", None, sha="s0", kind="baseline", level=2.0),
             HistoryItem(1, "a", 1.9, "keep", None, sha="s1", parent_sha="s0", level=1.85),
             HistoryItem(2, "b", None, "crash", None, 0, sha="s2", parent_sha="s1"),
             HistoryItem(3, "c", None, "running", None, 0, sha="s3", parent_sha="s1"),
             HistoryItem(4, "d", None, "invalid", None, 0)]
    trials = trials_of(space, History(items, sources={"s0": SYNTHETIC, "s1": a, "s2": b, "s3": c}))
    told = [(t.params["MATRIX_LR"], t.value) for t in trials]
    # the keep is told its level (paired), not its mean; the crash worse than the worst
    assert told == [(0.04, 2.0), (0.05, 1.85), (0.02, None), (0.08, pytest.approx(2.02))]


# --- the search, on a synthetic objective -------------------------------------------------

OPTIMUM = {"MATRIX_LR": 0.1, "EMBEDDING_LR": 1.2, "WARMDOWN_RATIO": 0.85}


def objective(train_py: str) -> float:
    """A smooth bowl in the constants' natural scales: its optimum is 2.5x the matrix LR,
    twice the embedding LR and a longer warmdown; every other constant is best as it is."""
    c = values(train_py)
    b1, b2 = c["ADAM_BETAS"]
    return (1.6 + 0.03 * math.log2(c["MATRIX_LR"] / OPTIMUM["MATRIX_LR"]) ** 2
            + 0.02 * math.log2(c["EMBEDDING_LR"] / OPTIMUM["EMBEDDING_LR"]) ** 2
            + 0.05 * (c["WARMDOWN_RATIO"] - OPTIMUM["WARMDOWN_RATIO"]) ** 2 / 0.09
            + 0.02 * math.log2(c["UNEMBEDDING_LR"] / 0.004) ** 2
            + 0.01 * math.log2(c["WEIGHT_DECAY"] / 0.2) ** 2
            + 0.01 * math.log2((1 - b1) / 0.2) ** 2 + 0.01 * math.log2((1 - b2) / 0.05) ** 2
            + 0.05 * abs(c["DEPTH"] - 4) + 0.3 * c["FINAL_LR_FRAC"]
            + 0.02 * (c["WINDOW_PATTERN"] != "L"))


def search(agent, budget: int, seed: int, noise: float = 0.003) -> float:
    """`budget` proposals, each built on the best so far and kept when its noisy score is
    lower (the loop, without training); the true objective of the best at the end."""
    luck = random.Random(seed)
    sources = {"s0": SYNTHETIC}
    best_sha, best_score = "s0", objective(SYNTHETIC)
    items = [HistoryItem(0, "baseline", best_score, "baseline", None, sha="s0",
                         kind="baseline", level=best_score)]
    for step in range(1, budget + 1):
        proposal = agent.propose(sources[best_sha], "", History(list(items), sources=sources))
        score = objective(proposal.train_py) + luck.gauss(0, noise)
        sha = f"s{step}"
        sources[sha] = proposal.train_py
        kept = score < best_score
        items.append(HistoryItem(step, proposal.description, score, "keep" if kept else "discard",
                                 None, sha=sha, parent_sha=best_sha, level=score))
        if kept:
            best_sha, best_score = sha, score
    return objective(sources[best_sha])


def test_tpe_finds_a_better_region_than_random_with_the_same_budget():
    """30 proposals each, on 12 seeds (measured 2026-12-04: tpe's best 1.630 on average,
    median 1.627; random's 1.642 and 1.632; from 1.740; on 20 seeds tpe ended lower 13
    times). A modest edge: most of the gain of either is in the first dozen proposals."""
    seeds = range(12)
    tpe = [search(TPEAgent(seed=seed), 30, seed) for seed in seeds]
    rand = [search(RandomAgent(seed=seed), 30, seed) for seed in seeds]
    start = objective(SYNTHETIC)
    assert statistics.fmean(tpe) < statistics.fmean(rand) < start
    assert statistics.median(tpe) < statistics.median(rand)
