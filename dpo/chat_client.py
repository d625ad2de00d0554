"""A client for any OpenAI-compatible chat-completions endpoint, for the judge (`dpo.judge`).

llama.cpp's server, ollama, vLLM, `python -m smollm.serve` and hosted APIs all speak the same
protocol: POST `{base}/chat/completions` with a JSON body `{"model", "messages", "temperature",
"max_tokens"}`, and read `choices[0].message.content` back. It is one request, so the standard
library does it (`urllib.request`) and the judge needs no other package.

What a judge run must never do is lose an item silently. So `complete` never raises for a
failure of the endpoint: it returns a `Reply` whose `error` says what went wrong ("timeout",
"connection", "http 503", "refused", "bad response"), with one line per failed attempt in
`attempts`. Timeouts, lost connections, HTTP 429 (rate limited) and 5xx answers are retried, with
a wait that doubles each time; any other HTTP error is final (a wrong model name or key will not
improve). A refusal is final too: a reply with `finish_reason` "content_filter", or a `refusal`
field (OpenAI's structured refusals).
"""
from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

RETRIED_STATUS = {408, 409, 429, 500, 502, 503, 504}


@dataclass
class Reply:
    """One chat completion, or why there is none.

    text: the assistant's message (None on failure).
    finish_reason: the endpoint's ("stop", "length", ...).
    error: None on success, else the kind of the final failure: "timeout", "connection",
        "http <status>", "refused" or "bad response".
    detail: the final failure in one line (the endpoint's own message when it gave one).
    attempts: one line per failed attempt before the last, e.g. "timeout after 30 s".
    seconds: wall time of the request, retries and waits included.
    """

    text: str | None = None
    finish_reason: str | None = None
    error: str | None = None
    detail: str = ""
    attempts: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"text": self.text, "finish_reason": self.finish_reason, "error": self.error, "detail": self.detail,
                "attempts": self.attempts, "seconds": round(self.seconds, 2)}


def completions_url(base: str) -> str:
    """`http://host:8080/v1` -> `http://host:8080/v1/chat/completions` (a full URL is kept)."""
    base = base.rstrip("/")
    return base if base.endswith("/chat/completions") else base + "/chat/completions"


class ChatClient:
    """Chat completions from one endpoint and model, with timeouts and retries.

    url: the endpoint's base URL (`http://127.0.0.1:8080/v1`) or its full completions URL.
    api_key: sent as `Authorization: Bearer ...` when given (the judge reads it from an
        environment variable, never from the command line, so it stays out of logs).
    timeout: seconds one attempt may take; retries: further attempts after a retryable failure;
    retry_wait: seconds before the first retry (doubled for each next one).
    """

    def __init__(self, url: str, model: str, *, api_key: str | None = None, timeout: float = 120.0,
                 retries: int = 2, retry_wait: float = 1.0, max_tokens: int = 512, temperature: float = 0.0):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"--judge-url {url!r}: expected an http:// or https:// URL")
        if timeout <= 0 or retries < 0 or retry_wait < 0 or max_tokens < 1:
            raise ValueError("timeout and max_tokens must be positive, retries and retry_wait >= 0")
        self.url, self.model, self.api_key = completions_url(url), model, api_key
        self.timeout, self.retries, self.retry_wait = timeout, retries, retry_wait
        self.max_tokens, self.temperature = max_tokens, temperature

    def complete(self, messages: list[dict]) -> Reply:
        """The endpoint's reply to `messages`, after up to `retries` retries; never raises for the
        endpoint's failures (see the module docstring)."""
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature,
                           "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        reply, started, wait = Reply(), time.perf_counter(), self.retry_wait
        for attempt in range(self.retries + 1):
            kind, detail, retry = self._attempt(urllib.request.Request(self.url, body, headers), reply)
            if kind is None:
                reply.error, reply.detail = None, ""
                break
            reply.error, reply.detail = kind, detail
            if not retry or attempt == self.retries:
                break
            reply.attempts.append(f"{kind}: {detail}")
            time.sleep(wait)
            wait *= 2
        reply.seconds = time.perf_counter() - started
        return reply

    def _attempt(self, request: urllib.request.Request, reply: Reply) -> tuple[str | None, str, bool]:
        """One request: (error kind or None, detail, retryable?); fills reply.text on success."""
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            return f"http {e.code}", _error_message(e), e.code in RETRIED_STATUS
        except (TimeoutError, socket.timeout):
            return "timeout", f"no reply within {self.timeout:g} s", True
        except urllib.error.URLError as e:
            if isinstance(e.reason, (TimeoutError, socket.timeout)):
                return "timeout", f"no reply within {self.timeout:g} s", True
            return "connection", f"cannot reach {self.url}: {e.reason}", True
        except (ConnectionError, OSError) as e:  # reset or closed mid-reply
            return "connection", f"{self.url}: {e}", True
        try:
            choice = json.loads(raw)["choices"][0]
            message = choice["message"]
            text = message.get("content")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            return "bad response", f"not a chat completion: {raw[:200]!r}", False
        reply.finish_reason = choice.get("finish_reason")
        if message.get("refusal") or reply.finish_reason == "content_filter":
            reply.text = message.get("refusal") or text
            return "refused", str(message.get("refusal") or "finish_reason content_filter")[:300], False
        if not isinstance(text, str):
            return "bad response", f"the message has no text content: {str(message)[:200]}", False
        reply.text = text
        return None, "", False


def _error_message(e: urllib.error.HTTPError) -> str:
    """The endpoint's own error message when its body is OpenAI's {"error": {"message": ...}}."""
    try:
        body = e.read()
        error = json.loads(body).get("error")
        message = error.get("message") if isinstance(error, dict) else error
        return str(message or body[:200])[:300]
    except Exception:  # noqa: BLE001 - any body at all: the status line is enough then
        return str(e.reason)


def api_key_from(env_var: str | None) -> str | None:
    """The API key in environment variable `env_var`, or None when it is unset or empty."""
    return (os.environ.get(env_var) or None) if env_var else None
