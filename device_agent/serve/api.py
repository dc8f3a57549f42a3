"""The OpenAI-compatible API: requests checked into :class:`CompletionRequest`, responses.

What is served and what is refused (docs/serve.md has the table): ``model``, ``prompt`` /
``messages``, ``max_tokens`` (``max_completion_tokens``), ``temperature``, ``top_p``,
``seed``, ``stop``, ``stream`` and ``stream_options.include_usage``; ``user`` is accepted
and ignored. Parameters that would change the output in ways this system does not do
(``n > 1``, logprobs, penalties, logit bias, tools, JSON mode, ``echo``, ``suffix``) are
refused with 400 when set to anything but their default, as are names the API does not
have: an answer is never silently different from what was asked.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any

MAX_STOPS = 4  # as OpenAI
MAX_TEMPERATURE = 2.0  # as OpenAI
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default: set temperature 0 for greedy
COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions (chat: up to the limit)
ROLES = ("system", "developer", "user", "assistant")

# Parameters refused unless they hold one of these (their defaults).
_REFUSED_UNLESS = {
    "n": (1, None),
    "best_of": (1, None),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (False, None),
    "suffix": (None, ""),
    "presence_penalty": (0, 0.0, None),
    "frequency_penalty": (0, 0.0, None),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "parallel_tool_calls": (None, True, False),
    "response_format": (None, {"type": "text"}),
}
_COMMON = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream",
           "stream_options", "user", *_REFUSED_UNLESS}
_ACCEPTED = {
    False: _COMMON | {"prompt"},
    True: _COMMON | {"messages", "max_completion_tokens", "metadata", "store"},
}


class ApiError(Exception):
    """An error answer: HTTP ``status`` and OpenAI's error body."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def unsupported(param: str, what: str) -> ApiError:
    return ApiError(400, f"{what} is not supported by this server (multispin-edge serves one "
                    "completion of the target model's own output per request)", param=param,
                    code="unsupported_parameter")


@dataclass
class CompletionRequest:
    chat: bool
    model: str
    prompt: str | list[int]  # text, or token ids as given; chat: filled from the messages
    messages: list[dict[str, str]] = field(default_factory=list)
    max_tokens: int | None = None  # None: the server's default for the endpoint
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = 1.0
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def parse_request(body: Any, chat: bool) -> CompletionRequest:
    """Check a /v1/completions (``chat`` False) or /v1/chat/completions body."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    for name in body:
        if name not in _ACCEPTED[chat]:
            raise ApiError(400, f"Unrecognized request argument supplied: {name}", param=name,
                           code="unrecognized_argument")
    for name, allowed in _REFUSED_UNLESS.items():
        if name in body and not any(_same(body[name], value) for value in allowed):
            raise unsupported(name, f"{name}={body[name]!r}")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model is required (GET /v1/models lists it)", param="model")
    request = CompletionRequest(chat, model, "")
    if chat:
        request.messages = _messages(body.get("messages"))
    else:
        request.prompt = _prompt(body.get("prompt"))
    request.max_tokens = _max_tokens(body, chat)
    temperature = _number(body, "temperature", DEFAULT_TEMPERATURE)
    if not 0 <= temperature <= MAX_TEMPERATURE:
        raise ApiError(400, f"temperature must be in 0..{MAX_TEMPERATURE:g}", param="temperature")
    top_p = _number(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise ApiError(400, "top_p must be in (0, 1]", param="top_p")
    request.temperature, request.top_p = float(temperature), float(top_p)
    seed = body.get("seed")
    if seed is not None and (type(seed) is not int or not 0 <= seed < 2**63):
        raise ApiError(400, "seed must be an integer in 0..2^63-1", param="seed")
    request.seed = secrets.randbelow(2**63) if seed is None else seed
    request.stop = _stops(body.get("stop"))
    stream = body.get("stream", False)
    if not isinstance(stream, bool | None):
        raise ApiError(400, "stream must be true or false", param="stream")
    request.stream = bool(stream)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise unsupported("stream_options", f"stream_options={options!r}")
    if options and not request.stream:
        raise ApiError(400, "stream_options is only allowed with stream true",
                       param="stream_options")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise ApiError(400, "stream_options.include_usage must be true or false",
                       param="stream_options")
    request.include_usage = include_usage
    return request


def _same(value: Any, allowed: Any) -> bool:
    return type(value) is type(allowed) and value == allowed or (
        isinstance(value, int | float) and not isinstance(value, bool)
        and isinstance(allowed, int | float) and not isinstance(allowed, bool)
        and value == allowed)


def _number(body: dict, name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ApiError(400, f"{name} must be a number", param=name)
    return value


def _max_tokens(body: dict, chat: bool) -> int | None:
    """``max_completion_tokens`` (chat) over ``max_tokens``; each checked when given."""
    given = None
    for name in ("max_tokens", "max_completion_tokens") if chat else ("max_tokens",):
        value = body.get(name)
        if value is not None and (type(value) is not int or value < 1):
            raise ApiError(400, f"{name} must be an integer >= 1", param=name)
        given = value if value is not None else given
    if given is None:
        return None if chat else COMPLETIONS_MAX_TOKENS
    return given


def _prompt(prompt: Any) -> str | list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise ApiError(400, "prompt must not be empty", param="prompt")
        return prompt
    if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        return prompt
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, str) for p in prompt):
        raise unsupported("prompt", "a batch of prompts")
    raise ApiError(400, "prompt must be a string or a list of token ids", param="prompt")


def _messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(400, f"{where} must be an object with a role", param=where)
        role = message["role"]
        if role not in ROLES:
            raise unsupported(where, f"role {role!r} (tools are not supported)")
        if extra := sorted(set(message) - {"role", "content", "name"}):
            raise unsupported(where, f"{', '.join(extra)} in a message")
        out.append({"role": "system" if role == "developer" else role,
                    "content": _content(message.get("content"), where)})
        if isinstance(message.get("name"), str):  # for templates that use it
            out[-1]["name"] = message["name"]
    return out


def _content(content: Any, where: str) -> str:
    if content is None:  # an assistant turn may have none
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" \
                    or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise unsupported(where, f"content of type {kind!r} (text only)")
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(400, f"{where}.content must be a string or a list of text parts",
                   param=where)


def _stops(stop: Any) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, "stop must be a string or a list of strings", param="stop")
    if len(stops) > MAX_STOPS:
        raise ApiError(400, f"stop holds at most {MAX_STOPS} strings", param="stop")
    return [s for s in stops if s]


# ---- responses ---------------------------------------------------------------------------
def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(request: CompletionRequest, id_: str, text: str, finish_reason: str,
                    prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """The whole answer of a request that was not streamed."""
    if request.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "logprobs": None, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return {"id": id_, "object": "chat.completion" if request.chat else "text_completion",
            "created": int(time.time()), "model": request.model, "choices": [choice],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk_body(request: CompletionRequest, id_: str, text: str | None,
               finish_reason: str | None = None, first: bool = False) -> dict[str, Any]:
    """One server-sent event of a stream: a text delta, or (``finish_reason``) its end."""
    if request.chat:
        delta: dict[str, str] = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None,
                  "finish_reason": finish_reason}
    return {"id": id_, "object": "chat.completion.chunk" if request.chat else "text_completion",
            "created": int(time.time()), "model": request.model, "choices": [choice]}


def usage_chunk(request: CompletionRequest, id_: str, prompt_tokens: int,
                completion_tokens: int) -> dict[str, Any]:
    """The stream's last event when ``stream_options.include_usage``: no choices."""
    return {"id": id_, "object": "chat.completion.chunk" if request.chat else "text_completion",
            "created": int(time.time()), "model": request.model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}
