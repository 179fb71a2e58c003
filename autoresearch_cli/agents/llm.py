"""The llm agent: the one door to language models, through litellm.

litellm is imported on the first call, not with this module: it takes seconds to load.
Its own retries are off; this module retries rate limits, timeouts, dropped connections
and server errors with exponential backoff, and gives up at once on bad credentials or
an unknown model. Every HTTP call, successful or not, is handed to `record_call`.
"""

from __future__ import annotations

import ast
import email.utils
import json
import os
import random
import re
import time
from collections.abc import Callable
from typing import Any

from autoresearch_cli.agents import (
    BudgetExceeded,
    CallRecord,
    HistoryItem,
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
from autoresearch_cli.agents.prompt import build_messages
from autoresearch_cli.errors import AgentError

MAX_ATTEMPTS = 5  # HTTP tries per message, for transient failures
EDIT_RETRIES = 2  # follow-up turns when a reply's edits cannot be used
MAX_OUTPUT_TOKENS = 16384  # room for a whole-file reply
UNKNOWN_OUTPUT_BUDGET = 8192  # output tokens assumed by the cost estimate without model info
MAX_RETRY_AFTER_S = 300.0
CHARS_PER_TOKEN = 3  # an overestimate of the prompt's tokens, for the cost limit
_REPEATED_TYPE = re.compile(r"^(?:(?:litellm\.)?\w+(?:Error|Exception):\s*)+")  # litellm's prefixes
UNKNOWN_PRICE = "model unknown to litellm's price list"
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
    def __init__(self, model: str, *, api_base: str | None = None,
                 api_key_env: str | None = None, temperature: float | None = 0.7,
                 max_cost_usd: float | None = None, record_call: RecordCall | None = None,
                 max_attempts: int = MAX_ATTEMPTS, edit_retries: int = EDIT_RETRIES,
                 base_delay_s: float = 2.0, max_delay_s: float = 60.0,
                 timeout_s: float = 600.0, sleep: Callable[[float], None] = time.sleep):
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
        self.timeout_s = timeout_s
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

    def propose(self, train_py: str, program_md: str, history: list[HistoryItem],
                failure: str | None = None) -> Proposal:
        messages = build_messages(program_md, train_py, history, failure)
        self._attempt = 0
        reply = ""
        summary = ""
        for _ in range(self.edit_retries + 1):
            reply, finish_reason = self._complete(messages)
            try:
                return proposal_from_reply(train_py, reply)
            except EditError as exc:
                problem, summary = str(exc), exc.summary
            if finish_reason == "length":
                problem += ("\nYour reply was cut off at the output token limit; "
                            "SEARCH/REPLACE blocks are much shorter than the whole file.")
            messages = messages + [
                {"role": "assistant", "content": reply},
                {"role": "user", "content": retry_message(problem)},
            ]
        replies = self.edit_retries + 1
        raise ProposalError(f"{summary} (after {replies} replies)", raw_reply=reply)

    # --- calling the model ---------------------------------------------------------------

    def _complete(self, messages: list[dict[str, str]]) -> tuple[str, str | None]:
        """One reply to `messages`, retrying transient failures; (content, finish_reason)."""
        litellm = load_litellm()
        for try_number in range(1, self.max_attempts + 1):
            self._check_budget(litellm, messages)
            self._attempt += 1
            started = time.monotonic()
            try:
                response = litellm.completion(**self._request(litellm, messages))
            except Exception as exc:  # litellm maps every provider failure to its own types
                self._record(messages, None, None, None, time.monotonic() - started,
                             error=error_text(exc))
                kind = classify(litellm, exc)
                if kind == "retry" and try_number < self.max_attempts:
                    self._sleep(self._delay(try_number, exc))
                    continue
                raise self._agent_error(litellm, kind, exc, try_number) from None
            latency = time.monotonic() - started
            choice = response.choices[0]
            content = choice.message.content or ""
            cost, cost_note = self._cost(litellm, response)
            self._record(messages, content, response, (cost, cost_note), latency, error=None)
            return content, getattr(choice, "finish_reason", None)
        raise AssertionError("unreachable")

    def _request(self, litellm: Any, messages: list[dict[str, str]]) -> dict[str, Any]:
        request: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "num_retries": 0,
            "max_retries": 0,
            "timeout": self.timeout_s,
            "drop_params": True,  # e.g. temperature for models that take none
        }
        if self.api_base:
            request["api_base"] = self.api_base
        if self.api_key_env:
            request["api_key"] = os.environ.get(self.api_key_env, "")
        if self.temperature is not None:
            request["temperature"] = self.temperature
        max_tokens = self._max_output_tokens(litellm)
        if max_tokens:
            request["max_tokens"] = max_tokens
        return request

    def _delay(self, try_number: int, exc: BaseException) -> float:
        backoff = self.base_delay_s * 2 ** (try_number - 1) * (0.5 + self._jitter.random())
        delay = min(backoff, self.max_delay_s)
        retry_after = retry_after_s(exc)
        if retry_after is not None:
            delay = max(delay, min(retry_after, MAX_RETRY_AFTER_S))
        return delay

    def _agent_error(self, litellm: Any, kind: str, exc: BaseException,
                     tries: int) -> AgentError:
        detail = error_text(exc)
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

    def _max_output_tokens(self, litellm: Any) -> int | None:
        known = self._info(litellm).get("max_output_tokens")
        return min(int(known), MAX_OUTPUT_TOKENS) if known else None

    def _estimate(self, litellm: Any, messages: list[dict[str, str]]) -> float:
        """An upper estimate of the next call's cost: the prompt plus a full reply."""
        info = self._info(litellm)
        input_price = info.get("input_cost_per_token")
        output_price = info.get("output_cost_per_token")
        if input_price is None or output_price is None:
            return self._last_cost or 0.0
        prompt_tokens = sum(len(message["content"]) for message in messages) // CHARS_PER_TOKEN
        output_tokens = self._max_output_tokens(litellm) or UNKNOWN_OUTPUT_BUDGET
        return prompt_tokens * input_price + output_tokens * output_price

    def _check_budget(self, litellm: Any, messages: list[dict[str, str]]) -> None:
        if self.max_cost_usd is None:
            return
        estimate = self._estimate(litellm, messages)
        if self._spent_usd + estimate > self.max_cost_usd:
            raise BudgetExceeded(
                f"the cost limit of ${self.max_cost_usd:.2f} would be passed: "
                f"${self._spent_usd:.4f} spent, the next call may cost up to ${estimate:.4f}")

    def _cost(self, litellm: Any, response: Any) -> tuple[float | None, str | None]:
        try:
            cost = float(litellm.completion_cost(completion_response=response, model=self.model))
        except Exception:  # litellm raises for models it has no price for
            return None, UNKNOWN_PRICE
        self._spent_usd += cost
        self._last_cost = cost
        return cost, None

    def _record(self, messages: list[dict[str, str]], reply: str | None, response: Any,
                cost: tuple[float | None, str | None] | None, latency_s: float,
                error: str | None) -> None:
        if self.record_call is None:
            return
        usage = getattr(response, "usage", None)
        cost_usd, cost_note = cost or (None, None)
        self.record_call(CallRecord(
            model=self.model,
            prompt=json.dumps(messages),
            reply=reply,
            prompt_tokens=getattr(usage, "prompt_tokens", None),
            completion_tokens=getattr(usage, "completion_tokens", None),
            cost_usd=cost_usd,
            cost_note=cost_note,
            latency_s=round(latency_s, 3),
            error=error,
            attempt=self._attempt,
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


def retry_message(problem: str) -> str:
    return (f"Your reply could not be used: {problem}\n\n"
            "None of its edits were applied. Reply again with the Description line and all "
            "of your edits, made against train.py as shown above.")


def classify(litellm: Any, exc: BaseException) -> str:
    """retry | auth | unknown_model | not_found | fatal."""
    status = getattr(exc, "status_code", None)
    transient = (litellm.Timeout, litellm.APIConnectionError, litellm.RateLimitError,
                 litellm.InternalServerError, litellm.ServiceUnavailableError,
                 litellm.BadGatewayError)
    if status in (401, 403) or isinstance(exc, (litellm.AuthenticationError,
                                                litellm.PermissionDeniedError)):
        return "auth"
    if "LLM Provider NOT provided" in str(exc):
        return "unknown_model"
    if status == 404 or isinstance(exc, litellm.NotFoundError):
        return "not_found"
    if isinstance(exc, transient) or status in (408, 409, 429) or (status or 0) >= 500:
        return "retry"
    return "fatal"


def error_text(exc: BaseException) -> str:
    """One line naming the failure: its type, HTTP status and first line of message."""
    status = getattr(exc, "status_code", None)
    lines = str(exc).strip().splitlines()
    message = _REPEATED_TYPE.sub("", lines[0]) if lines else ""
    kind = type(exc).__name__ + (f" {status}" if status else "")
    return f"{kind}: {message}"[:500]


def retry_after_s(exc: BaseException) -> float | None:
    """Seconds the server asked us to wait (Retry-After or retry-after-ms), if it did."""
    for source in (getattr(exc, "litellm_response_headers", None),
                   getattr(getattr(exc, "response", None), "headers", None)):
        if not source:
            continue
        try:
            headers = {str(key).lower(): str(value) for key, value in dict(source).items()}
        except (TypeError, ValueError):
            continue
        if "retry-after-ms" in headers:
            try:
                return float(headers["retry-after-ms"]) / 1000
            except ValueError:
                pass
        value = headers.get("retry-after")
        if value is None:
            continue
        try:
            return max(0.0, float(value))
        except ValueError:
            pass
        try:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            continue
    return None
