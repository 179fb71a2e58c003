"""Agents propose the next train.py.

`llm` asks a language model (through litellm); `random` mutates the UPPER_CASE
hyperparameters and needs no model. Both implement `Agent.propose`. Importing this
package stays cheap: litellm is imported only when the llm agent makes its first call.
"""

from __future__ import annotations

from typing import Any

from autoresearch_cli.agents.base import (
    AGENT_NAMES,
    ENDED_BY,
    Agent,
    BudgetExceeded,
    CallRecord,
    EditFormat,
    HistoryItem,
    OnStream,
    Parent,
    Proposal,
    ProposalError,
    RecordCall,
    choose_parent,
)
from autoresearch_cli.errors import AgentError


def make_agent(agent_config: dict[str, Any], *, seed: int | None, model: str | None,
               max_cost_usd: float | None, record_call: RecordCall | None = None,
               on_stream: OnStream | None = None) -> Agent:
    """The agent that ar.toml's [agent] table asks for.

    `model` (e.g. from the command line) overrides [agent] model and selects the llm agent;
    `on_stream` hears how a streamed reply is coming along.
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
            on_stream=on_stream,
            **_limits(agent_config),
        )
    raise AgentError(f"unknown agent {name!r} in [agent] name; choose one of "
                     f"{', '.join(AGENT_NAMES)}")


def _limits(agent_config: dict[str, Any]) -> dict[str, Any]:
    """The llm agent's limits from [agent]: a missing key or 0 keeps the agent's default."""
    limits = {}
    for key in ("max_output_tokens", "call_timeout_s", "proposal_timeout_s"):
        value = agent_config.get(key)
        if value is None or value == 0:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise AgentError(f"[agent] {key} must be a positive number, got {value!r}")
        limits[key] = int(value) if key == "max_output_tokens" else float(value)
    return limits


__all__ = [
    "AGENT_NAMES", "ENDED_BY", "Agent", "BudgetExceeded", "CallRecord", "EditFormat",
    "HistoryItem", "OnStream", "Parent", "Proposal", "ProposalError", "RecordCall",
    "choose_parent", "make_agent",
]
