"""Agents propose the next train.py.

`llm` asks a language model (through litellm); `random` mutates the UPPER_CASE
hyperparameters and needs no model; `tpe` searches them with Optuna's TPE sampler, told
each result's paired evidence. Each implements `Agent` (agents/base.py) and is one
entry of AGENTS: a new agent (a tree search, another model client) is one module beside
these and one entry there. Whether an agent's train.py comes from a model is a property
of the agent (`model_backed`), never of its name: such code runs only confined, or where
the user explicitly allowed it. Importing this package stays cheap: litellm is imported
only when the llm agent makes its first call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from autoresearch_cli.agents.base import (
    ENDED_BY,
    Agent,
    BudgetExceeded,
    CallRecord,
    EditFormat,
    History,
    HistoryItem,
    OnStream,
    Parent,
    Proposal,
    ProposalError,
    RecordCall,
)
from autoresearch_cli.agents.parents import choose_parent
from autoresearch_cli.errors import AgentError


@dataclass(frozen=True)
class AgentEntry:
    make: Callable[..., Agent]  # (settings, seed=, model=, max_cost_usd=, record_call=, on_stream=)
    model_backed: bool  # what it proposes is written by a model (its class says the same)


def _random(settings: Any, *, seed: int | None, **_: Any) -> Agent:
    from autoresearch_cli.agents.random_agent import RandomAgent

    return RandomAgent(seed=seed)


def _tpe(settings: Any, *, seed: int | None, **_: Any) -> Agent:
    from autoresearch_cli.agents.tpe_agent import TPEAgent

    return TPEAgent(seed=seed)


def _llm(settings: Any, *, model: str, max_cost_usd: float | None,
         record_call: RecordCall | None, on_stream: OnStream | None, **_: Any) -> Agent:
    if not model:
        raise AgentError("the llm agent needs a model: set [agent] model in ar.toml "
                         "(e.g. anthropic/claude-sonnet-4-5) or pass --model")
    from autoresearch_cli.agents.llm import LLMAgent

    return LLMAgent(model, api_base=settings.api_base or None,
                    api_key_env=settings.api_key_env or None, temperature=settings.temperature,
                    max_cost_usd=max_cost_usd, record_call=record_call, on_stream=on_stream,
                    **_limits(settings))


AGENTS: dict[str, AgentEntry] = {
    "random": AgentEntry(_random, model_backed=False),
    "tpe": AgentEntry(_tpe, model_backed=False),
    "llm": AgentEntry(_llm, model_backed=True),
}


def agent_name(settings: Any, name: str | None = None, model: str | None = None) -> str:
    """The agent asked for: `name` (the command line), else [agent] name; a model given on
    the command line means the llm agent."""
    return "llm" if model else (name or settings.name or "random")


def model_backed(name: str | None) -> bool:
    """Whether runs proposed by the agent called `name` hold model-written code; a name
    this ar does not know counts as model-written."""
    entry = AGENTS.get(name or "")
    return entry.model_backed if entry is not None else True


def make_agent(settings: Any, *, name: str | None = None, seed: int | None = None,
               model: str | None = None, max_cost_usd: float | None = None,
               record_call: RecordCall | None = None,
               on_stream: OnStream | None = None) -> Agent:
    """The agent [agent] (doors.config.AgentSettings) asks for, or `name`; `model` (from the
    command line) overrides [agent] model and selects the llm agent; `on_stream` hears how
    a streamed reply is coming along."""
    chosen = agent_name(settings, name, model)
    entry = AGENTS.get(chosen)
    if entry is None:
        raise AgentError(f"unknown agent {chosen!r}; choose one of {', '.join(AGENTS)}")
    return entry.make(settings, seed=seed, model=model or settings.model or "",
                      max_cost_usd=max_cost_usd, record_call=record_call, on_stream=on_stream)


def _limits(settings: Any) -> dict[str, Any]:
    """The llm agent's limits from [agent]: 0 keeps the agent's default."""
    limits = {}
    for key in ("max_output_tokens", "call_timeout_s", "proposal_timeout_s"):
        value = getattr(settings, key, None)
        if value is None or value == 0:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise AgentError(f"[agent] {key} must be a positive number, got {value!r}")
        limits[key] = int(value) if key == "max_output_tokens" else float(value)
    return limits


__all__ = [
    "AGENTS", "ENDED_BY", "Agent", "AgentEntry", "BudgetExceeded", "CallRecord", "EditFormat",
    "History", "HistoryItem", "OnStream", "Parent", "Proposal", "ProposalError", "RecordCall",
    "agent_name", "choose_parent", "make_agent", "model_backed",
]
