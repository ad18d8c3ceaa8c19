"""The one client for OpenAI-compatible chat endpoints (LLM judge, teacher), stdlib only.

POST {base}/chat/completions with retries on 429, 5xx and network failures
(exponential backoff); any other HTTP error fails at once.
"""

from __future__ import annotations

import http.client
import json
import re
import time
import urllib.error
import urllib.request

MAX_ATTEMPTS = 3
_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$")


class EndpointError(RuntimeError):
    def __init__(self, endpoint: str, reason: str):
        super().__init__(f"{endpoint}: {reason}")
        self.endpoint = endpoint
        self.reason = reason


def chat_endpoint(base_url: str) -> str:
    return f"{base_url.rstrip('/')}/chat/completions"


def post_json(endpoint: str, body: dict, *, api_key: str | None, timeout_s: float, backoff_s: float = 1.0) -> bytes:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data, last_failure = json.dumps(body).encode(), ""
    for attempt in range(MAX_ATTEMPTS):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1))
        request = urllib.request.Request(endpoint, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return response.read()
        except urllib.error.HTTPError as error:
            last_failure = f"HTTP {error.code}: {_error_body(error)}"
            if error.code != 429 and error.code < 500:
                raise EndpointError(endpoint, last_failure) from error
        except (OSError, http.client.HTTPException) as error:  # refused, reset, timed out, cut short
            last_failure = f"{type(error).__name__}: {getattr(error, 'reason', error)}"
    raise EndpointError(endpoint, f"gave up after {MAX_ATTEMPTS} attempts; last: {last_failure}")


def reply_json(raw: bytes) -> dict:
    """The first choice's content as a JSON object (markdown fences tolerated: some
    servers ignore response_format). Raises ValueError/KeyError/TypeError when malformed."""
    content = json.loads(raw)["choices"][0]["message"]["content"].strip()
    parsed = json.loads(_FENCE.sub("", content))
    if not isinstance(parsed, dict):
        raise TypeError(f"reply is JSON {type(parsed).__name__}, not an object")
    return parsed


def _error_body(error: urllib.error.HTTPError) -> str:
    try:
        return error.read(300).decode("utf-8", "replace")
    except (OSError, http.client.HTTPException):
        return str(error.reason)
