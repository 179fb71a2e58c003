"""What a failed model call was: pure functions of litellm's exceptions."""

from __future__ import annotations

import email.utils
import re
import time
from typing import Any

_REPEATED_TYPE = re.compile(r"^(?:(?:litellm\.)?\w+(?:Error|Exception):\s*)+")  # litellm's prefixes


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
