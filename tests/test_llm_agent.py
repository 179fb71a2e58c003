"""The llm agent through litellm for real, against an OpenAI-compatible stub on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import socket

import pytest
from openai_stub import StubServer, chat_body, error_body

from autoresearch_cli.agents import (
    BudgetExceeded,
    CallRecord,
    History,
    HistoryItem,
    ProposalError,
    make_agent,
)
from autoresearch_cli.agents.llm import LLMAgent, load_litellm
from autoresearch_cli.agents.prompt import build_messages, history_section
from autoresearch_cli.doors.config import default_config, settings_of
from autoresearch_cli.errors import AgentError

TRAIN_PY = '''\
"""Fixture train.py."""

DEPTH = 8  # number of layers
MATRIX_LR = 0.04  # learning rate for matrices


def main():
    print(DEPTH * MATRIX_LR)


if __name__ == "__main__":
    main()
'''
PROGRAM_MD = "# Research program\nMake val_bpb lower.\n"
KEY_ENV = "AR_TEST_LLM_KEY"
SEARCH_REPLY = ("Description: raise MATRIX_LR to 0.05\n\ntrain.py\n<<<<<<< SEARCH\n"
                "MATRIX_LR = 0.04  # learning rate for matrices\n=======\n"
                "MATRIX_LR = 0.05  # learning rate for matrices\n>>>>>>> REPLACE\n")
BAD_SEARCH_REPLY = ("Description: x\n<<<<<<< SEARCH\nLEARNING_RATE = 3\n=======\n"
                    "LEARNING_RATE = 4\n>>>>>>> REPLACE\n")


@pytest.fixture
def stub():
    with StubServer() as server:
        yield server


@pytest.fixture
def records() -> list[CallRecord]:
    return []


@pytest.fixture
def agent_for(stub, records, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "dummy-key")

    def build(model: str = "openai/stub-model", **options) -> LLMAgent:
        options.setdefault("api_key_env", KEY_ENV)
        options.setdefault("base_delay_s", 0.001)
        options.setdefault("call_timeout_s", 20)
        return LLMAgent(model, api_base=stub.url, record_call=records.append, **options)

    return build


def last_user_message(request: dict) -> str:
    return request["json"]["messages"][-1]["content"]


# --- replies -------------------------------------------------------------------------------------


def test_search_replace_reply_is_applied_and_recorded(stub, records, agent_for):
    stub.reply(SEARCH_REPLY, prompt_tokens=321, completion_tokens=45)
    proposal = agent_for().propose(TRAIN_PY, PROGRAM_MD, History())
    assert proposal.train_py == TRAIN_PY.replace("0.04", "0.05")
    assert proposal.description == "raise MATRIX_LR to 0.05"
    assert proposal.edit_format == "search_replace" and proposal.raw_reply == SEARCH_REPLY

    (request,) = stub.requests
    assert request["headers"]["Authorization"] == "Bearer dummy-key"
    messages = request["json"]["messages"]
    assert messages[0]["role"] == "system" and "Make val_bpb lower." in messages[0]["content"]
    assert "<<<<<<< SEARCH" in messages[0]["content"]
    assert "MATRIX_LR = 0.04  # learning rate for matrices" in messages[1]["content"]

    (record,) = records
    assert (record.prompt_tokens, record.completion_tokens) == (321, 45)
    assert record.reply == SEARCH_REPLY and record.error is None and record.attempt == 1
    assert record.latency_s >= 0 and "Make val_bpb lower." in record.prompt
    assert record.cost_usd is None and record.cost_note == "model unknown to litellm's price list"


def test_whole_file_reply_is_applied(stub, agent_for):
    new_file = TRAIN_PY.replace("DEPTH = 8", "DEPTH = 10")
    stub.reply(f"Description: deeper\n\n```python\n{new_file}```\n")
    proposal = agent_for().propose(TRAIN_PY, PROGRAM_MD, History())
    assert proposal.train_py == new_file and proposal.edit_format == "whole_file"


def test_reply_without_description_gets_one_from_the_diff(stub, agent_for):
    stub.reply(SEARCH_REPLY.split("\n", 2)[2])
    assert agent_for().propose(TRAIN_PY, PROGRAM_MD, History()).description == "MATRIX_LR 0.04 -> 0.05"


def test_reply_editing_prepare_py_is_rejected_at_once(stub, agent_for):
    stub.reply("Description: longer context\n\nprepare.py\n<<<<<<< SEARCH\nMAX_SEQ_LEN = 256\n"
               "=======\nMAX_SEQ_LEN = 4096\n>>>>>>> REPLACE\n")
    with pytest.raises(ProposalError) as caught:
        agent_for().propose(TRAIN_PY, PROGRAM_MD, History())
    assert caught.value.reason == "reply edits prepare.py; only train.py may change"
    assert "MAX_SEQ_LEN = 4096" in caught.value.raw_reply
    assert len(stub.requests) == 1


def test_reply_without_edits_is_a_proposal_error(stub, agent_for):
    for _ in range(3):
        stub.reply("Description: none\n\nThe model is already as good as it gets.")
    with pytest.raises(ProposalError, match="reply contains no edits"):
        agent_for().propose(TRAIN_PY, PROGRAM_MD, History())
    assert len(stub.requests) == 3


def test_edits_that_do_not_apply_go_back_to_the_model(stub, records, agent_for):
    stub.reply(BAD_SEARCH_REPLY)
    stub.reply("<<<<<<< SEARCH\nDEPTH = 8\n")  # cut off
    stub.reply(BAD_SEARCH_REPLY)
    with pytest.raises(ProposalError) as caught:
        agent_for().propose(TRAIN_PY, PROGRAM_MD, History())
    assert caught.value.reason == "SEARCH block 1 did not match train.py (after 3 replies)"
    assert caught.value.raw_reply == BAD_SEARCH_REPLY
    assert len(stub.requests) == 3
    second, third = stub.requests[1]["json"]["messages"], stub.requests[2]["json"]["messages"]
    assert second[-2] == {"role": "assistant", "content": BAD_SEARCH_REPLY}
    assert "SEARCH block 1 did not match train.py; the closest lines were:" in second[-1]["content"]
    assert "has no ======= line" in third[-1]["content"]
    assert [record.attempt for record in records] == [1, 2, 3]


def test_a_fixed_reply_after_a_failed_one_is_used(stub, agent_for):
    stub.reply(BAD_SEARCH_REPLY)
    stub.reply(SEARCH_REPLY)
    proposal = agent_for().propose(TRAIN_PY, PROGRAM_MD, History())
    assert "MATRIX_LR = 0.05" in proposal.train_py and len(stub.requests) == 2


def test_reply_that_breaks_the_syntax_is_sent_back(stub, agent_for):
    stub.reply(SEARCH_REPLY.replace("MATRIX_LR = 0.05", "MATRIX_LR = (0.05"))
    stub.reply(SEARCH_REPLY)
    agent_for().propose(TRAIN_PY, PROGRAM_MD, History())
    assert "does not parse after the edits" in last_user_message(stub.requests[1])


# --- HTTP failures ---------------------------------------------------------------------------


def test_rate_limit_backs_off_honouring_retry_after(stub, records, agent_for):
    stub.queue(429, error_body("slow down", "rate_limit_exceeded"), {"Retry-After": "2"})
    stub.reply(SEARCH_REPLY)
    delays: list[float] = []
    proposal = agent_for(sleep=delays.append).propose(TRAIN_PY, PROGRAM_MD, History())
    assert "MATRIX_LR = 0.05" in proposal.train_py
    assert len(stub.requests) == 2 and len(delays) == 1 and delays[0] >= 2
    assert [record.error is not None for record in records] == [True, False]
    assert "429" in records[0].error and records[0].reply is None
    assert [record.attempt for record in records] == [1, 2]


def test_server_error_is_retried(stub, records, agent_for):
    stub.queue(500, error_body("boom"))
    stub.queue(503, error_body("overloaded"))
    stub.reply(SEARCH_REPLY)
    agent_for().propose(TRAIN_PY, PROGRAM_MD, History())
    assert len(stub.requests) == 3 and len(records) == 3
    assert "500" in records[0].error and "503" in records[1].error


def test_persistent_server_errors_give_up(stub, records, agent_for):
    for _ in range(3):
        stub.queue(502, error_body("bad gateway"))
    with pytest.raises(AgentError, match="gave up after 3 attempts") as caught:
        agent_for(max_attempts=3).propose(TRAIN_PY, PROGRAM_MD, History())
    assert not isinstance(caught.value, ProposalError)
    assert len(stub.requests) == 3 and len(records) == 3


def test_unauthorised_names_the_key_variable_and_stops(stub, records, agent_for, capfd):
    stub.queue(401, error_body("Incorrect API key provided", "invalid_request_error"))
    with pytest.raises(AgentError, match=f"set {KEY_ENV} to a valid key") as caught:
        agent_for().propose(TRAIN_PY, PROGRAM_MD, History())
    assert len(stub.requests) == 1 and len(records) == 1 and "401" in records[0].error
    assert "\n" not in str(caught.value) and "dummy-key" not in str(caught.value)
    assert capfd.readouterr() == ("", "")  # litellm stays quiet


def test_unauthorised_without_key_setting_names_the_provider_variable(stub, agent_for,
                                                                      monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "dummy-openai-key")
    stub.queue(403, error_body("forbidden", "permission_denied"))
    with pytest.raises(AgentError, match="set OPENAI_API_KEY to a valid key"):
        agent_for(api_key_env=None).propose(TRAIN_PY, PROGRAM_MD, History())
    assert len(stub.requests) == 1


def test_unknown_model_at_the_server_stops_at_once(stub, agent_for):
    stub.queue(404, error_body("The model `nope` does not exist", "invalid_request_error"))
    with pytest.raises(AgentError, match="was not found at http://127.0.0.1"):
        agent_for().propose(TRAIN_PY, PROGRAM_MD, History())
    assert len(stub.requests) == 1


def test_model_without_provider_is_an_agent_error(records):
    agent = LLMAgent("no-such-model-anywhere", record_call=records.append, base_delay_s=0.001)
    with pytest.raises(AgentError, match="unknown model 'no-such-model-anywhere'"):
        agent.propose(TRAIN_PY, PROGRAM_MD, History())
    assert len(records) == 1


def test_connection_refused_is_retried_then_given_up(records, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "dummy-key")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    agent = LLMAgent("openai/stub-model", api_base=f"http://127.0.0.1:{port}/v1",
                     api_key_env=KEY_ENV, record_call=records.append, max_attempts=2,
                     base_delay_s=0.001, call_timeout_s=5)
    with pytest.raises(AgentError, match="gave up after 2 attempts"):
        agent.propose(TRAIN_PY, PROGRAM_MD, History())
    assert len(records) == 2


def test_missing_key_variable_fails_before_any_call(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(AgentError, match=f"set {KEY_ENV} to your API key"):
        LLMAgent("openai/stub-model", api_key_env=KEY_ENV)


# --- cost ------------------------------------------------------------------------------------


def test_cost_is_recorded_and_the_limit_stops_before_a_call(stub, records, agent_for):
    stub.queue(200, chat_body(SEARCH_REPLY, model="gpt-4o-mini", prompt_tokens=300_000,
                              completion_tokens=1000))
    agent = agent_for("openai/gpt-4o-mini", max_cost_usd=0.05)
    agent.propose(TRAIN_PY, PROGRAM_MD, History())
    expected = load_litellm().cost_per_token(model="openai/gpt-4o-mini", prompt_tokens=300_000,
                                             completion_tokens=1000)
    assert records[0].cost_usd == pytest.approx(sum(expected))
    assert records[0].cost_note is None
    assert agent.spent_usd == pytest.approx(sum(expected))
    assert stub.requests[0]["json"]["max_tokens"] == 16384

    stub.reply(SEARCH_REPLY)
    with pytest.raises(BudgetExceeded, match=r"cost limit of \$0.05"):
        agent.propose(TRAIN_PY, PROGRAM_MD, History())
    assert len(stub.requests) == 1 and len(records) == 1


def test_a_tiny_limit_stops_the_first_call(stub, agent_for):
    with pytest.raises(BudgetExceeded):
        agent_for("openai/gpt-4o-mini", max_cost_usd=1e-6).propose(TRAIN_PY, PROGRAM_MD, History())
    assert stub.requests == []


def test_make_agent_builds_the_llm_agent_from_config(stub, records, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "dummy-key")
    config = dataclasses.replace(settings_of(default_config("micro", "t")).agent, name="random",
                                 api_base=stub.url, api_key_env=KEY_ENV, temperature=0.3)
    agent = make_agent(config, seed=1, model="openai/stub-model", max_cost_usd=None,
                       record_call=records.append)
    assert isinstance(agent, LLMAgent)
    stub.reply(SEARCH_REPLY)
    agent.propose(TRAIN_PY, PROGRAM_MD, History())
    assert stub.requests[0]["json"]["temperature"] == 0.3 and len(records) == 1


# --- the prompt --------------------------------------------------------------------------------


def history(count: int) -> History:
    items = [HistoryItem(1, "baseline", 1.5, "baseline", None, 5)]
    for number in range(2, count + 1):
        val_bpb = 1.5 - number * 0.001 if number % 10 == 0 else 1.6
        items.append(HistoryItem(number, f"experiment number {number} " + "x" * 60, val_bpb,
                                 "keep" if number % 10 == 0 else "discard", 0.01, 1,
                                 None if number % 10 == 0 else "discarded: no better"))
    best = items[-1] if count % 10 == 0 else items[0]
    return History(items, noise=0.0123, noise_df=8, best=best)


def test_repair_prompt_carries_the_failure_tail():
    traceback = "Traceback (most recent call last):\n" + "  frame\n" * 2000 + "ValueError: bad shape"
    messages = build_messages(PROGRAM_MD, TRAIN_PY, History(), traceback)
    user = messages[1]["content"]
    assert "ValueError: bad shape" in user and len(user) < 6000
    assert "Fix it if it is something simple, otherwise try something else." in user


def test_short_history_is_shown_whole():
    text = history_section(history(5))
    # 3 header lines, 5 rows, a blank line, the summary
    assert text.count("\n") == 9 and "elided" not in text
    assert "1 | baseline | 1.500000 (5) | - | - | baseline" in text
    assert "2 | discard | 1.600000 (1) | +0.010000 | - | experiment number 2" in text
    assert "discarded: no better" in text
    assert "differ by about 0.0123 val_bpb" in text and "smaller than about 0.0246" in text


def test_long_history_is_grouped_with_the_latest_rows():
    items = history(300)
    text = history_section(items, max_chars=3000)
    assert len(text) < 3300
    rows = {line.split(" | ")[0] for line in text.splitlines() if " | " in line and
            line[0].isdigit()}
    assert rows == {"295", "296", "297", "298", "299", "300"}  # the latest, one by one
    groups = text.split("\n\n")[0]
    assert groups.startswith("Ideas tried so far, grouped by what each change touched")
    assert "300 tries, 30 kept: #10 experiment number 10" in groups  # the keeps first
    assert "#150 " not in text
    assert ("300 experiments in all; the best (the commit every change is judged against) is "
            "300: 1.200000 over 1 run.") in text
