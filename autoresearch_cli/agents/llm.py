"""The llm agent: the one door to language models, through litellm.

litellm is imported on the first call, not with this module: it takes seconds to load.
Its own retries are off; this module retries rate limits, timeouts, dropped connections
and server errors with exponential backoff, and gives up at once on bad credentials or
an unknown model. Every HTTP call, successful or not, is handed to `record_call`.

Every call is bounded: an output-token limit, a time limit per call and one per proposal
(retries and follow-ups included). Calls stream (see streaming.py), so a limit or Ctrl-C
closes the connection and the server stops generating; the partial reply is recorded.
The static part of the prompt comes first and is marked cacheable for Claude models.
"""

from __future__ import annotations

import ast
import json
import os
import random
import time
from collections.abc import Callable
from typing import Any

from autoresearch_cli.agents.base import (
    BudgetExceeded,
    CallRecord,
    History,
    OnStream,
    Proposal,
    ProposalError,
    RecordCall,
)
from autoresearch_cli.agents.edits import (
    EditError,
    apply_blocks,
    check_whole_file,
    describe_change,
    parse_reply,
)
from autoresearch_cli.agents.failures import classify, error_text, retry_after_s
from autoresearch_cli.agents.novelty import find_repeat, repeat_message
from autoresearch_cli.agents.prompt import (
    NOT_FINISHED,
    build_messages,
    mark_cacheable,
    message_text,
    repeat_followup,
    retry_message,
    sounds_finished,
)
from autoresearch_cli.agents.streaming import StreamedReply, cached_tokens, stream_reply
from autoresearch_cli.doors.text import unicode_safe
from autoresearch_cli.errors import AgentError

MAX_ATTEMPTS = 5  # HTTP tries per message, for transient failures
EDIT_RETRIES = 2  # follow-up turns when a reply's edits cannot be used
MAX_OUTPUT_TOKENS = 16384  # the most asked for, even of a model that allows more
DEFAULT_OUTPUT_TOKENS = 12288  # without model info: a whole-file reply (the template: ~7k tokens)
CALL_TIMEOUT_S = 300.0  # one streamed call
PROPOSAL_TIMEOUT_S = 900.0  # all calls of one proposal
MAX_RETRY_AFTER_S = 300.0
NO_KEY = "no-key"  # sent to a server at api_base when no key is configured
CHARS_PER_TOKEN = 3  # an overestimate of the prompt's tokens, for the cost limit
UNKNOWN_PRICE = "model unknown to litellm's price list"
ESTIMATED_PRICE = "estimated: the stream ended before the server reported usage"
CACHE_CONTROL_PROVIDERS = ("anthropic", "bedrock", "vertex_ai")  # with Claude models
CUT_OFF = {
    "length": ("\nYour reply was cut off at the output token limit; SEARCH/REPLACE blocks are "
               "much shorter than the whole file."),
    "call_timeout": ("\nYour reply was cut off at the time limit for one reply; SEARCH/REPLACE "
                     "blocks are much shorter than the whole file."),
    "repeating": "\nYour reply was stopped because it repeated the same text over and over.",
}
REPEATING = "repeating the same chunk"  # litellm's message when a stream loops
# A call that ended so has no error to record: the model finished, or a limit of ours
# (its name is in ended_by) or the user ended it.
ENDED_CLEANLY = ("stop", "length", "call_timeout", "proposal_timeout", "cancelled")
PROVIDER_KEYS = {
    "anthropic": "ANTHROPIC_API_KEY",
    "openai": "OPENAI_API_KEY",
    "gemini": "GEMINI_API_KEY",
    "mistral": "MISTRAL_API_KEY",
    "groq": "GROQ_API_KEY",
    "deepseek": "DEEPSEEK_API_KEY",
    "openrouter": "OPENROUTER_API_KEY",
    "xai": "XAI_API_KEY",
    "together_ai": "TOGETHERAI_API_KEY",
    "cohere": "COHERE_API_KEY",
}


def load_litellm() -> Any:
    """litellm, set up to stay offline and quiet (the core never prints)."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    litellm.suppress_debug_info = True
    return litellm


class LLMAgent:
    model_backed = True  # its train.py is written by a model: it runs only confined

    def __init__(self, model: str, *, api_base: str | None = None,
                 api_key_env: str | None = None, temperature: float | None = 0.7,
                 max_cost_usd: float | None = None, record_call: RecordCall | None = None,
                 max_attempts: int = MAX_ATTEMPTS, edit_retries: int = EDIT_RETRIES,
                 base_delay_s: float = 2.0, max_delay_s: float = 60.0,
                 max_output_tokens: int | None = None, call_timeout_s: float = CALL_TIMEOUT_S,
                 proposal_timeout_s: float = PROPOSAL_TIMEOUT_S,
                 on_stream: OnStream | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        self.model = model
        self.api_base = api_base
        self.api_key_env = api_key_env
        self.temperature = temperature
        self.max_cost_usd = max_cost_usd
        self.record_call = record_call
        self.max_attempts = max(1, max_attempts)
        self.edit_retries = max(0, edit_retries)
        self.base_delay_s = base_delay_s
        self.max_delay_s = max_delay_s
        self.max_output_tokens = max_output_tokens
        self.call_timeout_s = call_timeout_s
        self.proposal_timeout_s = proposal_timeout_s
        self.on_stream = on_stream
        self._sleep = sleep
        self._jitter = random.Random()
        self._spent_usd = 0.0
        self._last_cost: float | None = None
        self._model_info: dict[str, Any] | None = None
        self._attempt = 0
        if api_key_env and not os.environ.get(api_key_env):
            raise AgentError(f"set {api_key_env} to your API key for {model} "
                             "(ar.toml [agent] api_key_env names it)")

    @property
    def spent_usd(self) -> float:
        """What this agent's priced calls have cost so far."""
        return self._spent_usd

    # --- proposing -----------------------------------------------------------------------

    def propose(self, train_py: str, program_md: str, history: History,
                failure: str | None = None, record_call: RecordCall | None = None) -> Proposal:
        """`record_call`, when given, hears this proposal's calls instead of the agent's.

        A reply that cannot be used goes back to the model with the reason, at most
        `edit_retries` times: edits that do not apply, a change that repeats an earlier
        experiment (agents/novelty.py: turned back before any training, with that one's
        result), a reply that says the research is finished (it never is)."""
        litellm = load_litellm()
        recorder = record_call or self.record_call
        messages = build_messages(program_md, train_py, history, failure)
        if self._caches_prefix(litellm):
            messages = mark_cacheable(messages)
        deadline = time.monotonic() + self.proposal_timeout_s
        self._attempt = 0
        reply = ""
        summary = ""
        for _ in range(self.edit_retries + 1):
            reply, ended_by = self._complete(litellm, messages, deadline, recorder)
            reply = unicode_safe(reply)  # a lone surrogate can be neither parsed, saved nor sent back
            try:
                proposal = proposal_from_reply(train_py, reply)
            except EditError as exc:
                problem, summary = str(exc), exc.summary
                if sounds_finished(reply) and not parse_reply(reply).has_edits:
                    problem, summary = NOT_FINISHED, "the reply said the research was finished"
                follow_up = retry_message(problem + CUT_OFF.get(ended_by, ""))
            else:
                repeat = find_repeat(train_py, proposal.train_py, history)
                if repeat is None:
                    return proposal
                summary = repeat_message(repeat)
                follow_up = repeat_followup(summary)
            if ended_by == "proposal_timeout":
                raise ProposalError(f"{self._out_of_time()} (the last reply: {summary})",
                                    raw_reply=reply)
            messages = messages + [
                {"role": "assistant", "content": reply},
                {"role": "user", "content": follow_up},
            ]
        replies = self.edit_retries + 1
        raise ProposalError(f"{summary} (after {replies} replies)", raw_reply=reply)

    # --- calling the model ---------------------------------------------------------------

    def _complete(self, litellm: Any, messages: list[dict[str, Any]],
                  deadline: float, recorder: RecordCall | None = None) -> tuple[str, str]:
        """One reply to `messages` before `deadline`, retrying transient failures:
        (content, ended_by). A reply cut off by a limit counts when it has any content."""
        for try_number in range(1, self.max_attempts + 1):
            self._check_budget(litellm, messages)
            limit_s, limit_name = self._limit(deadline)
            self._attempt += 1
            request = self._request(litellm, messages, limit_s)
            reply = stream_reply(litellm, request, limit_s, limit_name, self.on_stream)
            self._record(litellm, messages, reply, recorder)
            if reply.ended_by == "cancelled":
                raise KeyboardInterrupt
            if reply.ended_by in ("stop", "length") or (reply.content and limit_name == reply.ended_by):
                return reply.content, reply.ended_by
            if reply.ended_by == "closed" and REPEATING in str(reply.error):
                return reply.content, "repeating"  # litellm's guard against a looping model
            if reply.ended_by == "proposal_timeout":
                raise ProposalError(self._out_of_time(), raw_reply=reply.content or None)
            kind = "retry" if reply.error is None or reply.streamed else classify(litellm, reply.error)
            if kind == "retry" and try_number < self.max_attempts:
                self._sleep(min(self._delay(try_number, reply.error),
                                max(0.0, deadline - time.monotonic())))
                continue
            raise self._agent_error(litellm, kind, self._failure(reply), try_number)
        raise AssertionError("unreachable")

    def _limit(self, deadline: float) -> tuple[float, str]:
        """The next call's time limit and its name: the call's own or what is left of the
        proposal's, whichever ends first."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise ProposalError(self._out_of_time())
        if self.call_timeout_s < left:
            return self.call_timeout_s, "call_timeout"
        return left, "proposal_timeout"

    def _out_of_time(self) -> str:
        return f"no usable reply within the proposal time limit of {self.proposal_timeout_s:g} s"

    def _failure(self, reply: StreamedReply) -> str:
        if reply.error is not None:
            return error_text(reply.error)
        if reply.ended_by == "call_timeout":
            return f"no reply within the call time limit of {self.call_timeout_s:g} s"
        return "the server closed the stream before the reply was complete"

    def _request(self, litellm: Any, messages: list[dict[str, Any]],
                 timeout_s: float) -> dict[str, Any]:
        request: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            "num_retries": 0,
            "max_retries": 0,
            "timeout": timeout_s,
            "max_tokens": self._max_output_tokens(litellm),
            "drop_params": True,  # e.g. temperature for models that take none
        }
        if self.api_base:
            request["api_base"] = self.api_base
        if self.api_key_env:
            request["api_key"] = os.environ.get(self.api_key_env, "")
        elif self.api_base and not os.environ.get(PROVIDER_KEYS.get(self._provider(litellm), "-")):
            request["api_key"] = NO_KEY  # a local server takes any key; litellm wants one
        if self.temperature is not None:
            request["temperature"] = self.temperature
        return request

    def _caches_prefix(self, litellm: Any) -> bool:
        """Whether to mark the static prefix cacheable: Claude models take cache_control
        (OpenAI and most others cache long prefixes on their own)."""
        return "claude" in self.model.lower() and self._provider(litellm) in CACHE_CONTROL_PROVIDERS

    def _delay(self, try_number: int, exc: BaseException) -> float:
        backoff = self.base_delay_s * 2 ** (try_number - 1) * (0.5 + self._jitter.random())
        delay = min(backoff, self.max_delay_s)
        retry_after = retry_after_s(exc)
        if retry_after is not None:
            delay = max(delay, min(retry_after, MAX_RETRY_AFTER_S))
        return delay

    def _agent_error(self, litellm: Any, kind: str, detail: str, tries: int) -> AgentError:
        if kind == "auth":
            return AgentError(f"{self.model}: the API key was refused ({detail}); "
                              f"set {self._key_variable(litellm)} to a valid key")
        if kind == "unknown_model":
            return AgentError(f"unknown model {self.model!r}: litellm needs a provider prefix "
                              "such as anthropic/, openai/ or ollama/")
        if kind == "not_found":
            where = f" at {self.api_base}" if self.api_base else ""
            return AgentError(f"model {self.model!r} was not found{where} ({detail}); "
                              "check [agent] model in ar.toml")
        if kind == "retry":
            return AgentError(f"{self.model}: gave up after {tries} attempts: {detail}")
        return AgentError(f"{self.model}: the model call failed: {detail}")

    def _key_variable(self, litellm: Any) -> str:
        if self.api_key_env:
            return self.api_key_env
        provider = self._provider(litellm)
        return PROVIDER_KEYS.get(provider) or (
            f"the API key variable of {provider or 'the provider'} "
            "(and name it in ar.toml [agent] api_key_env)")

    def _provider(self, litellm: Any) -> str:
        try:
            return litellm.get_llm_provider(model=self.model, api_base=self.api_base)[1]
        except Exception:
            return self.model.split("/", 1)[0] if "/" in self.model else ""

    # --- cost ----------------------------------------------------------------------------

    def _info(self, litellm: Any) -> dict[str, Any]:
        if self._model_info is None:
            try:
                self._model_info = dict(litellm.get_model_info(self.model))
            except Exception:  # litellm raises when a model is not in its price list
                self._model_info = {}
        return self._model_info

    def _max_output_tokens(self, litellm: Any) -> int:
        """The output limit of every call: ar.toml's, else litellm's for the model (at most
        MAX_OUTPUT_TOKENS), else one with room for a whole-file reply."""
        if self.max_output_tokens:
            return int(self.max_output_tokens)
        known = self._info(litellm).get("max_output_tokens")
        return min(int(known), MAX_OUTPUT_TOKENS) if known else DEFAULT_OUTPUT_TOKENS

    def _estimate(self, litellm: Any, messages: list[dict[str, Any]]) -> float:
        """An upper estimate of the next call's cost: the prompt plus a full reply."""
        info = self._info(litellm)
        input_price = info.get("input_cost_per_token")
        output_price = info.get("output_cost_per_token")
        if input_price is None or output_price is None:
            return self._last_cost or 0.0
        prompt_tokens = sum(len(message_text(message)) for message in messages) // CHARS_PER_TOKEN
        output_tokens = self._max_output_tokens(litellm)
        return prompt_tokens * input_price + output_tokens * output_price

    def _check_budget(self, litellm: Any, messages: list[dict[str, Any]]) -> None:
        if self.max_cost_usd is None:
            return
        estimate = self._estimate(litellm, messages)
        if self._spent_usd + estimate > self.max_cost_usd:
            raise BudgetExceeded(
                f"the cost limit of ${self.max_cost_usd:.2f} would be passed: "
                f"${self._spent_usd:.4f} spent, the next call may cost up to ${estimate:.4f}")

    def _cost(self, litellm: Any, messages: list[dict[str, Any]],
              reply: StreamedReply) -> tuple[float | None, str | None]:
        """The call's cost from the server's usage (cache reads priced as such); estimated
        from the text when the stream ended before the usage came; None for a model litellm
        has no price for, or a call that brought nothing back."""
        if not reply.chunks:
            return None, None
        try:
            response = litellm.stream_chunk_builder(reply.chunks, messages=messages)
            cost = float(litellm.completion_cost(completion_response=response, model=self.model))
        except Exception:  # litellm raises for models it has no price for
            return None, UNKNOWN_PRICE
        self._spent_usd += cost
        self._last_cost = cost
        return cost, None if reply.usage is not None else ESTIMATED_PRICE

    def _record(self, litellm: Any, messages: list[dict[str, Any]],
                reply: StreamedReply, recorder: RecordCall | None = None) -> None:
        cost_usd, cost_note = self._cost(litellm, messages, reply)
        if recorder is None:
            return
        usage = reply.usage
        kept = reply.content or reply.ended_by in ("stop", "length")
        recorder(CallRecord(
            model=self.model,
            prompt=json.dumps(messages),
            reply=reply.content if kept else None,
            prompt_tokens=getattr(usage, "prompt_tokens", None),
            completion_tokens=getattr(usage, "completion_tokens", None),
            cost_usd=cost_usd,
            cost_note=cost_note,
            latency_s=round(reply.seconds, 3),
            error=None if reply.ended_by in ENDED_CLEANLY else self._failure(reply),
            attempt=self._attempt,
            ended_by=reply.ended_by,
            cached_prompt_tokens=cached_tokens(usage),
        ))


# --- pure helpers --------------------------------------------------------------------------


def proposal_from_reply(train_py: str, reply: str) -> Proposal:
    """The proposal a reply makes. EditError when the model should try again; ProposalError
    when the reply edits another file."""
    parsed = parse_reply(reply)
    if parsed.other_files:
        raise ProposalError(f"reply edits {', '.join(parsed.other_files)}; only train.py may "
                            "change", raw_reply=reply)
    if parsed.blocks:
        new_train_py, edit_format = apply_blocks(train_py, parsed.blocks), "search_replace"
    elif parsed.whole_file is not None:
        new_train_py, edit_format = check_whole_file(train_py, parsed.whole_file), "whole_file"
    else:
        raise EditError("reply contains no edits: give SEARCH/REPLACE blocks for train.py or "
                        "the whole file in one ```python block")
    if new_train_py.strip() == train_py.strip():
        raise EditError("the edits leave train.py unchanged; propose an actual change")
    try:
        ast.parse(new_train_py)
    except SyntaxError as exc:
        raise EditError(f"train.py does not parse after the edits: line {exc.lineno}: "
                        f"{exc.msg}") from None
    description = parsed.description or describe_change(train_py, new_train_py)
    return Proposal(description, new_train_py, edit_format, reply)
