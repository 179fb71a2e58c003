"""The llm agent's memory and its follow-ups: a long history grouped by what each change
touched, the failures' reasons, a plateau line, the parent when it is not the best; a
repeat turned back with the earlier result and a reply that says it is done asked for
the next experiment, each in a follow-up turn (real litellm, a stub on 127.0.0.1)."""

from __future__ import annotations

import pytest
from openai_stub import StubServer

from autoresearch_cli.agents.base import History, HistoryItem, Parent, ProposalError
from autoresearch_cli.agents.llm import LLMAgent
from autoresearch_cli.agents.memory import PLATEAU_AFTER, plateau_line
from autoresearch_cli.agents.prompt import build_messages, history_section, sounds_finished

TRAIN_PY = '''\
"""Fixture train.py."""

DEPTH = 8  # number of layers
MATRIX_LR = 0.04  # learning rate for matrices


def mlp(x):
    return x * 2


def main():
    print(DEPTH * MATRIX_LR, mlp(1))
'''
KEY_ENV = "AR_TEST_LLM_KEY"


def lr(value: str) -> str:
    return TRAIN_PY.replace("MATRIX_LR = 0.04", f"MATRIX_LR = {value}")


def long_history() -> History:
    """A baseline, nine MATRIX_LR tries (one kept), four rewrites of mlp that crashed or
    were discarded, and two proposals that never ran."""
    sources = {"base": TRAIN_PY}
    items = [HistoryItem(1, "baseline", 2.0, "baseline", None, 5, sha="base", kind="baseline",
                         level=2.0)]
    for number, value in enumerate(["0.05", "0.06", "0.03", "0.07", "0.045", "0.055", "0.08",
                                    "0.035", "0.065"], start=2):
        sources[f"lr{number}"] = lr(value)
        status = "keep" if value == "0.05" else "discard"
        items.append(HistoryItem(number, f"MATRIX_LR 0.04 -> {value}", 1.99, status, -0.01, 2,
                                 sha=f"lr{number}", parent_sha="base", gain=0.004 * number,
                                 gain_half_width=0.003, pairs=2, level=1.99))
    for number in range(11, 15):
        sha = f"mlp{number}"
        sources[sha] = TRAIN_PY.replace("x * 2", f"x * {number}")
        crashed = number % 2
        items.append(HistoryItem(number, f"mlp times {number}", None if crashed else 2.1,
                                 "crash" if crashed else "discard", None, 0 if crashed else 1,
                                 "RuntimeError: shape mismatch" if crashed else "discarded",
                                 sha=sha, parent_sha="base"))
    items += [HistoryItem(15, "edits prepare.py", None, "invalid", None, 0,
                          "reply edits prepare.py; only train.py may change"),
              HistoryItem(16, "again", None, "invalid", None, 0,
                          "reply edits prepare.py; only train.py may change")]
    best = HistoryItem(2, "MATRIX_LR 0.04 -> 0.05", 1.99, "best", None, 4)
    return History(items, 0.01, 8, best, sources)


def test_a_long_history_is_grouped_by_what_each_change_touched():
    text = history_section(long_history())
    assert "Ideas tried so far, grouped by what each change touched" in text
    assert "- MATRIX_LR: 9 tries, 1 kept: #2 MATRIX_LR 0.04 -> 0.05: keep" in text
    assert "gain +0.0080 ± 0.0030" in text and "5 more" in text  # four shown of nine
    assert "- mlp: 4 tries, none kept" in text
    assert "- not run: 2 tries" in text
    # the latest rows one by one, not all sixteen
    assert "The latest 6 experiments" in text and "\n10 | discard" not in text
    assert "\n16 | invalid" in text
    # failures grouped by how they ended and why
    assert "- crash x2 (#11, #13): RuntimeError: shape mismatch" in text
    assert "- invalid x2 (#15, #16): reply edits prepare.py" in text
    assert "differ by about 0.0100" in text  # the measured noise
    assert "No change has been kept in the last 14 experiments (since #2)" in text


def test_a_short_history_is_listed_row_by_row_and_the_plateau_waits():
    history = long_history()
    history.items = history.items[:4]
    text = history_section(history)
    assert "Ideas tried" not in text and "Experiments so far, one line per commit" in text
    assert "| +0.0120 (2) |" in text  # the paired gain and its pairs
    assert plateau_line(history) == ""
    history.items += [HistoryItem(20 + i, "x", 2.1, "discard", None, sha=None)
                      for i in range(PLATEAU_AFTER)]
    assert f"last {PLATEAU_AFTER + 2} experiments (since #2)" in plateau_line(history)


def test_the_prompt_says_when_it_builds_on_another_commit_than_the_best():
    history = long_history()
    history.parent = Parent("a" * 40, 2.0, 1, "baseline", tried=3, runs=5, role="baseline")
    user = build_messages("program", TRAIN_PY, history, None)[1]["content"]
    assert user.startswith("The train.py below is the baseline's (where the research started, "
                           "val_bpb 2.000000 over 5 runs), not the best's (the best is #2, 1.990000)")
    history.parent = Parent("b" * 40, 1.99, 2, "x", role="best")
    assert build_messages("program", TRAIN_PY, history, None)[1]["content"].startswith(
        "The current train.py")


@pytest.mark.parametrize("reply, finished", [
    ("I'm done: the research is complete.", True),
    ("No further experiments are needed; val_bpb has converged.", True),
    ("There is nothing more to try. Stop here.", True),
    ("Description: raise MATRIX_LR\nI am not done yet", False),
    ("Description: finish the warmdown at 0\n", False),
])
def test_replies_that_say_the_research_is_over(reply, finished):
    assert sounds_finished(reply) is finished


# --- the agent, through litellm --------------------------------------------------------------


@pytest.fixture
def stub():
    with StubServer() as server:
        yield server


@pytest.fixture
def agent(stub, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "dummy-key")
    return LLMAgent("openai/stub-model", api_base=stub.url, api_key_env=KEY_ENV,
                    base_delay_s=0.001, call_timeout_s=20)


def block(old: str, new: str, description: str) -> str:
    return (f"Description: {description}\n\ntrain.py\n<<<<<<< SEARCH\n{old}\n=======\n{new}\n"
            ">>>>>>> REPLACE\n")


def test_a_repeat_is_turned_back_with_the_earlier_result_and_another_idea_asked_for(stub, agent):
    history = long_history()
    repeat = block("MATRIX_LR = 0.04  # learning rate for matrices",
                   "MATRIX_LR = 6e-2     # a bit higher \ud800", "try a higher matrix LR")
    fresh = block("DEPTH = 8  # number of layers", "DEPTH = 6  # number of layers", "fewer layers")
    stub.reply(repeat)
    stub.reply(fresh)
    proposal = agent.propose(TRAIN_PY, "program", history)
    assert proposal.description == "fewer layers"
    follow_up = stub.requests[1]["json"]["messages"][-1]["content"]
    assert follow_up.startswith("Your proposal was turned back before any training: it repeats "
                                "experiment #3 (MATRIX_LR 0.04 -> 0.06)")
    assert "scored 1.990000 over 2 runs (discard" in follow_up
    assert "Propose a different experiment" in follow_up
    # the model's own reply goes back to it encodable (a lone surrogate cannot be sent)
    echoed = stub.requests[1]["json"]["messages"][-2]["content"]
    assert "a bit higher" in echoed and "\ud800" not in echoed


def test_repeats_to_the_end_make_an_invalid_proposal(stub, agent):
    again = block("MATRIX_LR = 0.04  # learning rate for matrices", "MATRIX_LR = 0.050", "again")
    for _ in range(3):
        stub.reply(again)
    with pytest.raises(ProposalError, match=r"repeats experiment #2 .* \(after 3 replies\)"):
        agent.propose(TRAIN_PY, "program", long_history())
    assert len(stub.requests) == 3


def test_a_reply_that_says_it_is_done_gets_asked_for_the_next_experiment(stub, agent):
    stub.reply("I believe the research is complete: no further experiments are needed.")
    stub.reply(block("DEPTH = 8  # number of layers", "DEPTH = 10  # number of layers", "deeper"))
    proposal = agent.propose(TRAIN_PY, "program", History())
    assert proposal.description == "deeper"
    follow_up = stub.requests[1]["json"]["messages"][-1]["content"]
    assert "does not end until the human stops it" in follow_up
    assert "Propose one now" in follow_up
