"""The types agents and the loop share: proposals, history, parents, LLM call records.

This module imports nothing of the agents package, so every agent module can import it
without going through the package (no import circle).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from autoresearch_cli.errors import AgentError

EditFormat = Literal["search_replace", "whole_file", "mutation", "combination"]


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


@dataclass(frozen=True)
class Parent:
    """An evaluated commit an experiment may build on."""

    sha: str
    val_bpb: float | None  # None: it has no ok evaluation (a crashed baseline)
    experiment_id: int | None
    description: str
    tried: int = 0  # experiments already built on it (those in flight included)
    runs: int = 0  # its scored runs on the best's hardware class
    role: str = "best"  # best | baseline | keep (an earlier one) | candidate
    # Its mean through its pairs with the best (research/evidence.paired_mean): what the
    # choice of a parent weighs; val_bpb when it has no pairs.
    level: float | None = None


@dataclass
class HistoryItem:
    """One tried change: a commit (its mean over its runs) or a proposal that never ran."""

    experiment_id: int | str
    description: str
    val_bpb: float | None  # the commit's mean val_bpb over its runs; None: never scored
    status: str  # baseline, keep, discard, pending, running, crash, invalid, timeout, ...
    delta: float | None  # val_bpb minus its parent's mean; negative is better
    runs: int = 1  # the scored runs behind val_bpb
    reason: str | None = None  # why it ended so (the keep test's line, a failure's cause)
    sha: str | None = None  # its commit (None: the proposal never became one)
    parent_sha: str | None = None  # the commit it changed
    kind: str = "experiment"  # baseline | experiment | repair | combination
    # Its paired evidence against the commit it was judged against (the best of its time;
    # else its parent), on the seeds both ran on: how much lower its runs were (positive:
    # better), the half-width of that gain's interval, and the pairs behind it.
    gain: float | None = None
    gain_half_width: float | None = None
    pairs: int = 0
    # Its mean estimated through those pairs: the reference's mean over all its runs plus
    # the mean paired difference (its own mean without pairs). The seed's luck the two
    # shared cancels, so levels of different commits compare better than their means.
    level: float | None = None


@dataclass
class History:
    """What an agent is told of the research so far."""

    items: list[HistoryItem] = field(default_factory=list)
    noise: float | None = None  # the spread of val_bpb between runs of one commit
    noise_df: int = 0
    best: HistoryItem | None = None  # the incumbent, as the keep test sees it
    sources: dict[str, str] = field(default_factory=dict, repr=False)  # sha -> its train.py
    parent: Parent | None = None  # the commit this proposal builds on (None: not said)

    def __len__(self) -> int:
        return len(self.items)

    def train_py(self, sha: str | None) -> str | None:
        """train.py as committed at `sha`, when the history holds it."""
        return self.sources.get(sha) if sha else None


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
    ended_by: str | None = None  # one of ENDED_BY: what ended the call
    cached_prompt_tokens: int | None = None  # prompt tokens the provider read from its cache


# What ended a model call: the model (stop, length: the output limit), a limit of ours
# (call_timeout, proposal_timeout), the user (cancelled, Ctrl-C), the server or the
# network (error: before the reply began; closed: the stream broke off or ended without
# a finish reason).
ENDED_BY = ("stop", "length", "call_timeout", "proposal_timeout", "cancelled", "error",
            "closed")

RecordCall = Callable[[CallRecord], None]
OnStream = Callable[[int, float], None]  # (tokens received so far, seconds since the call began)


class Agent(Protocol):
    # Whether the train.py it proposes comes from a model (and so is written by something
    # rewarded by the score): such code runs only confined, or where the user allowed it.
    model_backed: bool

    def propose(self, train_py: str, program_md: str, history: History,
                failure: str | None = None, record_call: RecordCall | None = None
                ) -> Proposal:
        """A new train.py for `train_py`; each model call made for it goes to `record_call`."""
        ...
