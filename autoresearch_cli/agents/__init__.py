"""Agents propose the next train.py.

`llm` asks a language model (through litellm); `random` mutates the UPPER_CASE
hyperparameters and needs no model. Both implement `Agent.propose`. Importing this
package stays cheap: litellm is imported only when the llm agent makes its first call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from autoresearch_cli.errors import AgentError

EditFormat = Literal["search_replace", "whole_file", "mutation"]
AGENT_NAMES = ("random", "llm")


class ProposalError(AgentError):
    """The reply could not be turned into a valid train.py; the experiment is invalid."""

    def __init__(self, reason: str, raw_reply: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.raw_reply = raw_reply


class BudgetExceeded(AgentError):
    """The next model call could take spending past the cost limit."""


@dataclass
class Proposal:
    description: str  # one line
    train_py: str  # the full new text
    edit_format: EditFormat
    raw_reply: str | None = None


@dataclass
class HistoryItem:
    experiment_id: int | str
    description: str
    val_bpb: float | None
    status: str  # keep, discard, crash, invalid, timeout, ...
    delta: float | None  # val_bpb minus the best before it; negative is better


@dataclass
class CallRecord:
    """One HTTP call to a model, successful or not. Field names match the ledger's."""

    model: str
    prompt: str  # the messages, as JSON
    reply: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    cost_usd: float | None
    cost_note: str | None
    latency_s: float
    error: str | None
    attempt: int  # 1-based count of calls within one propose()


RecordCall = Callable[[CallRecord], None]


class Agent(Protocol):
    def propose(self, train_py: str, program_md: str, history: list[HistoryItem],
                failure: str | None = None) -> Proposal: ...


def make_agent(agent_config: dict[str, Any], *, seed: int | None, model: str | None,
               max_cost_usd: float | None, record_call: RecordCall | None = None) -> Agent:
    """The agent that ar.toml's [agent] table asks for.

    `model` (e.g. from the command line) overrides [agent] model and selects the llm agent.
    """
    name = agent_config.get("name") or "random"
    if model:
        name = "llm"
    model = model or agent_config.get("model") or ""
    if name == "random":
        from autoresearch_cli.agents.random_agent import RandomAgent

        return RandomAgent(seed=seed)
    if name == "llm":
        if not model:
            raise AgentError("the llm agent needs a model: set [agent] model in ar.toml "
                             "(e.g. anthropic/claude-sonnet-4-5) or pass --model")
        from autoresearch_cli.agents.llm import LLMAgent

        return LLMAgent(
            model,
            api_base=agent_config.get("api_base") or None,
            api_key_env=agent_config.get("api_key_env") or None,
            temperature=agent_config.get("temperature"),
            max_cost_usd=max_cost_usd,
            record_call=record_call,
        )
    raise AgentError(f"unknown agent {name!r} in [agent] name; choose one of "
                     f"{', '.join(AGENT_NAMES)}")


__all__ = [
    "AGENT_NAMES", "Agent", "BudgetExceeded", "CallRecord", "HistoryItem", "Proposal",
    "ProposalError", "RecordCall", "make_agent",
]
