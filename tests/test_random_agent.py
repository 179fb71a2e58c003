"""The random agent: seeded, reproducible mutations of UPPER_CASE hyperparameters."""

from __future__ import annotations

import ast
import random
import re

import pytest

from autoresearch_cli.agents import History, HistoryItem, make_agent
from autoresearch_cli.agents.random_agent import (
    RandomAgent,
    apply_changes,
    draw_changes,
    find_constants,
)
from autoresearch_cli.doors.config import default_config, settings_of
from autoresearch_cli.errors import AgentError

TRAIN_PY = '''\
"""Fixture train.py: the hyperparameter block of a real one, and a little code."""

import os

# ---------------------------------------------------------------------------
# Hyperparameters

ASPECT_RATIO = 64  # model_dim = depth * aspect_ratio
HEAD_DIM = 128  # target head dimension for attention
WINDOW_PATTERN = "SSSL"  # sliding window pattern: L=full, S=half context
TOTAL_BATCH_SIZE = 2**19  # ~524K tokens per optimizer step
EMBEDDING_LR = 0.6  # learning rate for token embeddings (Adam)
UNEMBEDDING_LR = 0.004  # learning rate for lm_head (Adam)
MATRIX_LR = 0.04  # learning rate for matrix parameters (Muon)
SCALAR_LR = 0.5  # learning rate for per-layer scalars (Adam)
WEIGHT_DECAY = 0.2  # cautious weight decay for Muon
ADAM_BETAS = (0.8, 0.95)  # Adam beta1, beta2
WARMUP_RATIO = 0.0  # fraction of time budget for LR warmup
WARMDOWN_RATIO = 0.5  # fraction of time budget for LR warmdown
FINAL_LR_FRAC = 0.0  # final LR as fraction of initial
DEPTH = 8  # number of transformer layers
DEVICE_BATCH_SIZE = 128  # per-device batch size (reduce if OOM)
SEED = 42  # fixed: changing it only chases noise


def main():
    config = {"depth": DEPTH, "lr": MATRIX_LR}  # NOT_A_CONSTANT = 1
    return config


if __name__ == "__main__":
    main()
'''

ASSIGNMENT = re.compile(r"^([A-Z][A-Z0-9_]*) = (.+?)  # (.*)$")


def values(text: str) -> dict[str, object]:
    return {name: constant.value for name, constant in find_constants(text).items()}


def changed(before: str, after: str) -> dict[str, tuple[object, object]]:
    old, new = values(before), values(after)
    return {name: (old[name], new[name]) for name in old if old[name] != new[name]}


def proposals(seed: int, count: int) -> list:
    agent = RandomAgent(seed=seed)
    history = History()
    result = []
    for number in range(count):
        proposal = agent.propose(TRAIN_PY, "program", history)
        result.append(proposal)
        history.items.append(HistoryItem(number, proposal.description, None, "discard", None))
    return result


def test_find_constants_reads_the_hyperparameter_block():
    found = values(TRAIN_PY)
    assert found["TOTAL_BATCH_SIZE"] == 2**19
    assert found["ADAM_BETAS"] == (0.8, 0.95)
    assert found["WINDOW_PATTERN"] == "SSSL"
    assert "NOT_A_CONSTANT" not in found


def test_same_seed_same_proposals_and_different_seeds_differ():
    first = [(p.description, p.train_py) for p in proposals(seed=7, count=10)]
    again = [(p.description, p.train_py) for p in proposals(seed=7, count=10)]
    other = [(p.description, p.train_py) for p in proposals(seed=8, count=10)]
    assert first == again
    assert first != other


def test_every_proposal_is_valid_python_that_changes_one_or_two_values():
    for seed in range(60):
        proposal = RandomAgent(seed=seed).propose(TRAIN_PY, "program", History())
        ast.parse(proposal.train_py)
        assert proposal.train_py != TRAIN_PY
        assert proposal.edit_format == "mutation" and proposal.raw_reply is None
        differences = changed(TRAIN_PY, proposal.train_py)
        batch_pair = {"TOTAL_BATCH_SIZE", "DEVICE_BATCH_SIZE"} <= differences.keys()
        assert 1 <= len(differences) <= 2 + batch_pair
        assert "SEED" not in differences
        # the description names each change as NAME old -> new
        for name in differences:
            assert re.search(rf"\b{name} \S.* -> ", proposal.description)


def test_only_values_change_and_comments_stay():
    for seed in range(30):
        proposal = RandomAgent(seed=seed).propose(TRAIN_PY, "program", History())
        old_lines, new_lines = TRAIN_PY.splitlines(), proposal.train_py.splitlines()
        assert len(old_lines) == len(new_lines)
        for old, new in zip(old_lines, new_lines, strict=True):
            if old != new:
                old_match, new_match = ASSIGNMENT.match(old), ASSIGNMENT.match(new)
                assert old_match and new_match
                assert old_match.group(1) == new_match.group(1)
                assert old_match.group(3) == new_match.group(3)


def test_values_move_as_specified():
    old = values(TRAIN_PY)
    seen: set[str] = set()
    for seed in range(300):
        new = values(RandomAgent(seed=seed).propose(TRAIN_PY, "program", History()).train_py)
        for name in (n for n in old if old[n] != new[n]):
            seen.add(name)
            before, after = old[name], new[name]
            if name.endswith("_LR") or name == "WEIGHT_DECAY":
                assert after / before == pytest.approx(
                    min((0.5, 0.7, 0.8, 1.25, 1.4, 2.0), key=lambda f: abs(f - after / before)),
                    rel=0.01)
            elif name.endswith(("_RATIO", "_FRAC")) and name != "ASPECT_RATIO":
                assert 0.0 <= after <= 1.0
            elif name == "DEPTH":
                assert abs(after - before) == 1
            elif name in ("ASPECT_RATIO", "HEAD_DIM"):
                assert after in (before * 2, before // 2)
            elif name == "WINDOW_PATTERN":
                assert after != before and set(after) <= {"S", "L"}
            elif name == "ADAM_BETAS":
                assert all(0.5 <= beta < 1 for beta in after)
    assert seen >= {"MATRIX_LR", "EMBEDDING_LR", "DEPTH", "WINDOW_PATTERN", "ADAM_BETAS",
                    "WARMUP_RATIO", "TOTAL_BATCH_SIZE", "DEVICE_BATCH_SIZE", "HEAD_DIM"}


def test_batch_sizes_stay_powers_of_two_and_divisible():
    sequence_length = 2048  # prepare.py's; TOTAL must be a multiple of DEVICE * this
    text = TRAIN_PY
    for step in range(200):
        changes = draw_changes(find_constants(text), random.Random(step))
        text = apply_changes(text, find_constants(text), changes)
        found = values(text)
        total, device = found["TOTAL_BATCH_SIZE"], found["DEVICE_BATCH_SIZE"]
        assert total & (total - 1) == 0 and device & (device - 1) == 0
        assert total % (device * sequence_length) == 0
    assert re.search(r"^TOTAL_BATCH_SIZE = 2\*\*\d+  # ", text, re.MULTILINE)


def test_avoids_descriptions_already_in_history():
    text = "DEPTH = 8  # layers\n"
    tried = History([HistoryItem(1, "DEPTH 8 -> 9", 1.1, "discard", 0.01)])
    for seed in range(20):
        assert RandomAgent(seed=seed).propose(text, "", tried).description == "DEPTH 8 -> 7"
    # when every change was tried already, it still proposes one
    tried.items.append(HistoryItem(2, "DEPTH 8 -> 7", 1.2, "discard", 0.02))
    assert RandomAgent(seed=0).propose(text, "", tried).train_py != text


def test_ratio_at_zero_starts_small_and_ratios_clamp_at_one():
    text = "WARMUP_RATIO = 0.0  # warmup\nFINAL_LR_FRAC = 1.0  # end\n"
    for seed in range(40):
        found = values(RandomAgent(seed=seed).propose(text, "", History()).train_py)
        assert 0.0 <= found["WARMUP_RATIO"] <= 0.1 and found["FINAL_LR_FRAC"] <= 1.0


def test_nothing_to_mutate_is_an_agent_error():
    with pytest.raises(AgentError, match="no UPPER_CASE hyperparameters"):
        RandomAgent(seed=0).propose("SEED = 1\nname = 'x'\n", "", History())
    with pytest.raises(AgentError, match="does not parse"):
        RandomAgent(seed=0).propose("DEPTH = (\n", "", History())


def test_make_agent_picks_the_agent_and_trust_is_the_agents_property():
    from autoresearch_cli.agents import AGENTS, model_backed
    from autoresearch_cli.agents.llm import LLMAgent

    settings = settings_of(default_config("micro", "t")).agent
    chosen = make_agent(settings, name="random", seed=1)
    assert isinstance(chosen, RandomAgent) and chosen.model_backed is False
    with pytest.raises(AgentError, match="unknown agent"):
        make_agent(settings, name="oracle", seed=1)
    with pytest.raises(AgentError, match="needs a model"):
        make_agent(settings, name="llm", seed=1)
    # the registry and the classes agree; a name ar does not know counts as model-written
    assert AGENTS["random"].model_backed is RandomAgent.model_backed is False
    assert AGENTS["llm"].model_backed is LLMAgent.model_backed is True
    assert model_backed("llm") and model_backed("tree-search") and not model_backed("random")


def test_a_draw_that_repeats_a_commit_under_another_description_is_drawn_again():
    """The same history length gives the same first draw; when the history holds a commit
    with that train.py (described otherwise), the agent draws something else."""
    baseline = HistoryItem(1, "baseline", 1.5, "baseline", None, sha="base", kind="baseline")
    unseen = HistoryItem(2, "a proposal that never ran", None, "invalid", None, 0)
    first = RandomAgent(seed=7).propose(TRAIN_PY, "", History([baseline, unseen]))
    ran = HistoryItem(2, "written by hand", 1.6, "discard", 0.1, sha="ran", parent_sha="base")
    told = History([baseline, ran], sources={"base": TRAIN_PY, "ran": first.train_py})
    again = RandomAgent(seed=7).propose(TRAIN_PY, "", told)
    assert again.train_py not in (first.train_py, TRAIN_PY)
