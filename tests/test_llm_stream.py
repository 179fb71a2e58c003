"""Streamed, bounded and cancellable model calls: real litellm over HTTP to a stub on
127.0.0.1 that writes slowly, never stops, stalls, is cut off or drops the connection.
Every call is recorded in a real ledger."""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time

import pytest
from openai_stub import (
    Streamed,
    StubServer,
    anthropic_events,
    chunk_events,
    endless_tokens,
    usage_of,
)

from autoresearch_cli.agents import ENDED_BY, History, ProposalError, make_agent
from autoresearch_cli.agents.llm import LLMAgent, load_litellm
from autoresearch_cli.agents.streaming import socket_of
from autoresearch_cli.doors.config import default_config, settings_of
from autoresearch_cli.doors.ledger import Ledger
from autoresearch_cli.errors import AgentError

TRAIN_PY = '''\
"""Fixture train.py."""

DEPTH = 8  # number of layers
MATRIX_LR = 0.04  # learning rate for matrices
'''
PROGRAM_MD = "# Research program\nMake val_bpb lower.\n"
KEY_ENV = "AR_TEST_LLM_KEY"
SEARCH_REPLY = ("Description: raise MATRIX_LR to 0.05\n\ntrain.py\n<<<<<<< SEARCH\n"
                "MATRIX_LR = 0.04  # learning rate for matrices\n=======\n"
                "MATRIX_LR = 0.05  # learning rate for matrices\n>>>>>>> REPLACE\n")
SLACK_S = 5.0  # what a limit may be overrun by on a loaded machine (the target)


def pieces(text: str, size: int = 8) -> list[str]:
    return [text[start:start + size] for start in range(0, len(text), size)]


def good_stream() -> Streamed:
    """A usable reply, streamed at once."""
    return Streamed(list(chunk_events(pieces(SEARCH_REPLY), "stop", usage_of(300, 40))))


@pytest.fixture(scope="module", autouse=True)
def _litellm_loaded():
    """Import litellm before the clock starts: it takes seconds, once per process."""
    load_litellm().get_model_info("gpt-4o-mini")


@pytest.fixture
def stub():
    with StubServer() as server:
        yield server


@pytest.fixture
def ledger(tmp_path):
    with Ledger(tmp_path / "ledger.db") as opened:
        yield opened


@pytest.fixture
def progress() -> list[tuple[float, int, float]]:
    """(when, tokens, seconds) for every progress report."""
    return []


@pytest.fixture
def agent_for(stub, ledger, progress, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "dummy-key")

    def build(model: str = "openai/stub-model", **options) -> LLMAgent:
        options.setdefault("api_key_env", KEY_ENV)
        options.setdefault("base_delay_s", 0.001)
        options.setdefault("call_timeout_s", 20)
        options.setdefault("api_base", stub.url)
        return LLMAgent(model, record_call=lambda record: ledger.record_llm_call(None, record),
                        on_stream=lambda tokens, seconds: progress.append(
                            (time.monotonic(), tokens, seconds)),
                        **options)

    return build


def calls(ledger: Ledger) -> list[dict]:
    recorded = ledger.llm_calls()
    assert all(call["ended_by"] in ENDED_BY for call in recorded)
    return recorded


# --- finishing ------------------------------------------------------------------------------------


def test_a_slow_writer_is_followed_and_reported(stub, ledger, progress, agent_for):
    script = stub.stream(Streamed(list(chunk_events(pieces(SEARCH_REPLY), "stop",
                                                    usage_of(300, 40))), delay_s=0.1))
    proposal = agent_for().propose(TRAIN_PY, PROGRAM_MD, History())
    assert proposal.train_py == TRAIN_PY.replace("0.04", "0.05")
    assert len(script.sent) > 20  # it did arrive in pieces, over seconds

    token_reports = [report for report in progress if report[1] > 0]
    assert token_reports[0][1] == 1  # the first report comes with the first token
    assert token_reports[0][0] - script.sent_at[0] < 2.0
    counts = [tokens for _, tokens, _ in token_reports]
    assert counts == sorted(counts) and counts[-1] > counts[0]
    (call,) = calls(ledger)
    assert call["ended_by"] == "stop" and call["reply"] == SEARCH_REPLY and call["error"] is None
    assert (call["prompt_tokens"], call["completion_tokens"]) == (300, 40)

    request = stub.requests[0]["json"]
    assert request["stream"] is True and request["stream_options"] == {"include_usage": True}
    assert request["max_tokens"] == 12288  # unknown model: room for a whole-file reply


def test_a_local_server_needs_no_key(stub, ledger, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    stub.stream(good_stream())
    LLMAgent("openai/qwen2.5-coder", api_base=stub.url).propose(TRAIN_PY, PROGRAM_MD, History())
    assert stub.requests[0]["headers"]["Authorization"] == "Bearer no-key"


def test_output_limit_comes_from_the_config(stub, agent_for):
    stub.stream(good_stream())
    agent_for(max_output_tokens=512).propose(TRAIN_PY, PROGRAM_MD, History())
    assert stub.requests[0]["json"]["max_tokens"] == 512


def test_make_agent_takes_the_limits_from_the_agent_table(stub, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "dummy-key")
    config = dataclasses.replace(
        settings_of(default_config("micro", "t")).agent, name="llm", model="openai/stub-model",
        api_base=stub.url, api_key_env=KEY_ENV, max_output_tokens=777, call_timeout_s=12,
        proposal_timeout_s=34)
    agent = make_agent(config, seed=None, model=None, max_cost_usd=None)
    assert (agent.max_output_tokens, agent.call_timeout_s, agent.proposal_timeout_s) == (777, 12, 34)
    with pytest.raises(AgentError, match="call_timeout_s must be a positive number"):
        make_agent(dataclasses.replace(config, call_timeout_s="soon"), seed=None, model=None,
                   max_cost_usd=None)


def test_a_reply_cut_off_at_the_output_limit_goes_back_with_advice(stub, ledger, agent_for):
    stub.stream(Streamed(list(chunk_events(pieces(SEARCH_REPLY[:60]), "length",
                                           usage_of(300, 64)))))
    stub.stream(good_stream())
    proposal = agent_for(max_output_tokens=64).propose(TRAIN_PY, PROGRAM_MD, History())
    assert "MATRIX_LR = 0.05" in proposal.train_py
    cut, finished = calls(ledger)
    assert cut["ended_by"] == "length" and cut["reply"] == SEARCH_REPLY[:60]
    assert cut["error"] is None and finished["ended_by"] == "stop"
    follow_up = stub.requests[1]["json"]["messages"][-1]["content"]
    assert "cut off at the output token limit" in follow_up


def test_replies_that_stay_cut_off_end_as_a_proposal_error(stub, ledger, agent_for):
    for _ in range(3):
        stub.stream(Streamed(list(chunk_events(pieces(SEARCH_REPLY[:60]), "length"))))
    with pytest.raises(ProposalError, match=r"after 3 replies"):
        agent_for(max_output_tokens=64).propose(TRAIN_PY, PROGRAM_MD, History())
    assert [call["ended_by"] for call in calls(ledger)] == ["length"] * 3


def test_a_model_repeating_itself_is_stopped_and_told(stub, ledger, agent_for):
    stub.stream(Streamed(list(chunk_events(["Description: loop\n"] + ["again"] * 150))))
    stub.stream(good_stream())
    proposal = agent_for().propose(TRAIN_PY, PROGRAM_MD, History())
    assert "MATRIX_LR = 0.05" in proposal.train_py
    looped, finished = calls(ledger)
    assert looped["ended_by"] == "closed" and "repeating the same chunk" in looped["error"]
    assert looped["reply"].startswith("Description: loop\nagainagain")
    follow_up = stub.requests[1]["json"]["messages"][-1]["content"]
    assert "repeated the same text over and over" in follow_up


# --- limits -------------------------------------------------------------------------------------


def test_a_model_that_never_stops_is_cut_at_the_limits(stub, ledger, agent_for):
    stub.stream(Streamed(endless_tokens, delay_s=0.02))
    stub.stream(Streamed(endless_tokens, delay_s=0.02))
    agent = agent_for(call_timeout_s=1.5, proposal_timeout_s=3.0)
    started = time.monotonic()
    with pytest.raises(ProposalError, match="no usable reply within the proposal time limit of 3 s"):
        agent.propose(TRAIN_PY, PROGRAM_MD, History())
    elapsed = time.monotonic() - started
    assert elapsed < 3.0 + SLACK_S

    first, second = calls(ledger)
    assert first["ended_by"] == "call_timeout" and second["ended_by"] == "proposal_timeout"
    assert first["reply"].startswith(" word0 word1") and first["error"] is None
    assert 1.5 <= first["latency_s"] < 1.5 + SLACK_S
    assert first["latency_s"] + second["latency_s"] < 3.0 + SLACK_S
    follow_up = stub.requests[1]["json"]["messages"][-1]["content"]
    assert "cut off at the time limit for one reply" in follow_up
    # the server saw both connections closed, each within its limit
    wait_for(lambda: len(stub.disconnects) == 2)
    assert stub.disconnects[0] - started < 1.5 + SLACK_S
    assert stub.disconnects[1] - started < 3.0 + SLACK_S


@pytest.mark.parametrize("model", ["openai/stub-model", "hosted_vllm/stub-model"])
def test_a_stalled_stream_is_closed_at_the_call_limit(stub, ledger, agent_for, model):
    stub.stream(Streamed(list(chunk_events(["Description: x\n"], None, done=False)),
                         then="stall"))
    stub.stream(good_stream())
    started = time.monotonic()
    proposal = agent_for(model, call_timeout_s=1.5).propose(TRAIN_PY, PROGRAM_MD, History())
    assert "MATRIX_LR = 0.05" in proposal.train_py
    stalled, finished = calls(ledger)
    assert stalled["ended_by"] == "call_timeout" and stalled["reply"] == "Description: x\n"
    assert 1.5 <= stalled["latency_s"] < 1.5 + SLACK_S and finished["ended_by"] == "stop"
    wait_for(lambda: stub.disconnects)
    assert stub.disconnects[0] - started < 1.5 + SLACK_S


def test_a_server_silent_before_any_token_is_retried(stub, ledger, agent_for):
    stub.stream(Streamed([], then="stall"))
    stub.stream(good_stream())
    agent_for(call_timeout_s=1.0).propose(TRAIN_PY, PROGRAM_MD, History())
    silent, finished = calls(ledger)
    assert silent["ended_by"] == "call_timeout" and silent["reply"] is None
    assert finished["ended_by"] == "stop" and finished["attempt"] == 2


def test_a_proposal_out_of_time_before_the_headers_is_invalid(stub, ledger, agent_for):
    stub.stream(Streamed(lambda: iter(()), first_delay_s=30))  # still reading the prompt
    started = time.monotonic()
    with pytest.raises(ProposalError, match="proposal time limit of 1.5 s"):
        agent_for(proposal_timeout_s=1.5).propose(TRAIN_PY, PROGRAM_MD, History())
    assert time.monotonic() - started < 1.5 + SLACK_S
    (call,) = calls(ledger)
    assert call["ended_by"] == "proposal_timeout" and call["reply"] is None
    wait_for(lambda: stub.disconnects)  # the server can stop reading the prompt
    assert stub.disconnects[0] - started < 1.5 + SLACK_S


# --- failures ----------------------------------------------------------------------------------


def test_a_connection_dropped_mid_stream_is_retried(stub, ledger, agent_for):
    stub.stream(Streamed(list(chunk_events(["Description: ", "raise"], None, done=False)),
                         then="close"))
    stub.stream(good_stream())
    proposal = agent_for().propose(TRAIN_PY, PROGRAM_MD, History())
    assert "MATRIX_LR = 0.05" in proposal.train_py
    dropped, finished = calls(ledger)
    assert dropped["ended_by"] == "closed" and dropped["reply"] == "Description: raise"
    assert dropped["error"] and finished["ended_by"] == "stop"


def test_a_stream_ending_without_a_finish_reason_is_retried_then_given_up(stub, ledger,
                                                                           agent_for):
    for _ in range(2):
        stub.stream(Streamed(list(chunk_events(["Description: ", "raise"], None))))
    with pytest.raises(AgentError, match="gave up after 2 attempts: .*finish_reason"):
        agent_for(max_attempts=2).propose(TRAIN_PY, PROGRAM_MD, History())
    assert [call["ended_by"] for call in calls(ledger)] == ["closed", "closed"]


def test_ctrl_c_closes_the_stream_and_keeps_the_partial_reply(stub, ledger, agent_for):
    script = stub.stream(Streamed(list(chunk_events(["Description: ", "half"], None, done=False)),
                                  then="stall"))

    def interrupt_when_streaming() -> None:
        wait_for(lambda: len(script.sent) == 2)
        time.sleep(0.3)  # the reader is now blocked on the silent socket
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_when_streaming, daemon=True).start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        agent_for(call_timeout_s=30).propose(TRAIN_PY, PROGRAM_MD, History())
    assert time.monotonic() - started < SLACK_S
    (call,) = calls(ledger)
    assert call["ended_by"] == "cancelled" and call["reply"] == "Description: half"
    wait_for(lambda: stub.disconnects)
    assert stub.disconnects[0] - started < SLACK_S
    assert len(stub.requests) == 1


def test_ctrl_c_while_the_server_reads_the_prompt_hangs_up(stub, ledger, agent_for):
    stub.stream(Streamed([], first_delay_s=30))

    def interrupt_when_asked() -> None:
        wait_for(lambda: stub.requests)
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_when_asked, daemon=True).start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        agent_for(call_timeout_s=30).propose(TRAIN_PY, PROGRAM_MD, History())
    (call,) = calls(ledger)
    assert call["ended_by"] == "cancelled" and call["reply"] is None
    wait_for(lambda: stub.disconnects)
    assert stub.disconnects[0] - started < SLACK_S


# --- the cached prefix ----------------------------------------------------------------------------


def test_claude_gets_a_cacheable_prefix_and_cache_reads_are_priced(stub, ledger, agent_for):
    stub.stream(Streamed(list(anthropic_events(pieces(SEARCH_REPLY), input_tokens=100,
                                               output_tokens=40, cache_read_tokens=5000))))
    url = stub.url.removesuffix("/v1")
    agent = agent_for("anthropic/claude-sonnet-4-5", api_base=url)
    proposal = agent.propose(TRAIN_PY, PROGRAM_MD, History())
    assert "MATRIX_LR = 0.05" in proposal.train_py

    (request,) = stub.requests
    assert request["path"] == "/v1/messages"
    system = request["json"]["system"]
    assert isinstance(system, list) and len(system) == 1
    assert system[0]["cache_control"] == {"type": "ephemeral"}
    assert "Make val_bpb lower." in system[0]["text"] and "<<<<<<< SEARCH" in system[0]["text"]
    (user,) = request["json"]["messages"]
    assert "MATRIX_LR = 0.04" in str(user["content"])

    (call,) = calls(ledger)
    assert call["cached_prompt_tokens"] == 5000 and call["ended_by"] == "stop"
    litellm = load_litellm()
    uncached = sum(litellm.cost_per_token(model="anthropic/claude-sonnet-4-5",
                                          prompt_tokens=5100, completion_tokens=40))
    assert 0 < call["cost_usd"] < uncached  # cache reads cost a tenth of fresh input
    assert call["cost_note"] is None


def test_openai_models_keep_plain_messages_and_cached_tokens_are_recorded(stub, ledger,
                                                                          agent_for):
    stub.stream(Streamed(list(chunk_events(pieces(SEARCH_REPLY), "stop",
                                           usage_of(10_000, 40, cached_tokens=8_000),
                                           model="gpt-4o-mini"))))
    agent_for("openai/gpt-4o-mini").propose(TRAIN_PY, PROGRAM_MD, History())
    system = stub.requests[0]["json"]["messages"][0]
    assert system["role"] == "system" and isinstance(system["content"], str)
    (call,) = calls(ledger)
    assert call["cached_prompt_tokens"] == 8_000
    litellm = load_litellm()
    uncached = sum(litellm.cost_per_token(model="openai/gpt-4o-mini", prompt_tokens=10_000,
                                          completion_tokens=40))
    assert 0 < call["cost_usd"] < uncached


def test_a_priced_reply_cut_short_has_an_estimated_cost(stub, ledger, agent_for):
    stub.stream(Streamed(list(chunk_events(["Description: ", "half"], None, done=False)),
                         then="stall"))
    stub.stream(good_stream())
    agent_for("openai/gpt-4o-mini", call_timeout_s=1.0).propose(TRAIN_PY, PROGRAM_MD, History())
    cut = calls(ledger)[0]
    assert cut["ended_by"] == "call_timeout" and cut["prompt_tokens"] is None
    assert cut["cost_usd"] > 0 and cut["cost_note"].startswith("estimated")


@pytest.mark.parametrize("model", ["openai/stub-model", "hosted_vllm/stub-model",
                                   "anthropic/claude-sonnet-4-5"])
def test_the_socket_under_a_stream_is_found_to_hang_up_on(stub, model):
    """A stalled read is woken by shutting its socket down; each provider's litellm stream
    keeps the socket somewhere else."""
    anthropic = model.startswith("anthropic/")
    stub.stream(Streamed(list(anthropic_events(["hi"]) if anthropic else chunk_events(["hi"]))))
    stream = load_litellm().completion(
        model=model, api_base=stub.url.removesuffix("/v1") if anthropic else stub.url,
        api_key="dummy-key", messages=[{"role": "user", "content": "hi"}], stream=True,
        max_tokens=10, timeout=10, max_retries=0)
    try:
        sock = socket_of(stream)
        assert sock is not None and sock.getpeername()[1] == stub.port
    finally:
        stream.close()


def wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)
