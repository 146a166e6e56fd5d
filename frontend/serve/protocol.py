"""The OpenAI API's request bodies, checked field by field into frozen dataclasses.

Every field the server reads is checked here, and a bad one raises `ApiError` (HTTP 400, an
OpenAI-style error that names the field). Fields the API defines and the server does not
implement are refused when set to anything but their default; unknown fields are ignored, as
OpenAI's own clients send some (`user`, ...). Extensions, as vLLM names them: `top_k`,
`min_p`, `repetition_penalty`, `ignore_eos` and `return_token_ids` (each choice then carries
the token ids it generated, and a stream's chunks the ids they add).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from trtllm.runtime.sampling_params import MAX_LOGPROBS, SamplingParams


class ApiError(Exception):
    """An error the client gets as `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status  # HTTP status
        self.message = message
        self.param = param  # the request field at fault, if one is
        self.code = code  # OpenAI's machine-readable code, if it has one

    @property
    def type(self) -> str:
        return {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                413: "invalid_request_error", 503: "service_unavailable"}.get(self.status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Options:
    """The sampling and output fields that completions and chat completions share."""

    max_tokens: int | None  # tokens to generate at most (None: the endpoint's default)
    temperature: float  # 0: greedy; OpenAI's default is 1
    top_p: float  # in (0, 1]
    top_k: int  # 0: all tokens (extension)
    min_p: float  # extension
    presence_penalty: float  # in [-2, 2]
    frequency_penalty: float  # in [-2, 2]
    repetition_penalty: float  # > 0, transformers' rule (extension)
    n: int  # choices per prompt
    seed: int | None  # choice j samples with seed + j
    stop: tuple[str, ...]  # the text ends before the first of these it makes
    logprobs: int | None  # None: no logprobs; k: each token's and the k most likely alternatives
    stream: bool  # answer as server-sent events
    include_usage: bool  # a stream ends with a chunk carrying `usage`
    ignore_eos: bool  # keep going past the model's end-of-sequence token (extension)
    return_token_ids: bool  # choices carry `token_ids` (extension)

    def sampling_params(self, max_new_tokens: int, index: int) -> SamplingParams:
        """The runtime's parameters for choice `index` of a prompt."""
        return SamplingParams(
            max_new_tokens=max_new_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            min_p=self.min_p, presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, seed=None if self.seed is None else self.seed + index,
            stop=self.stop, ignore_eos=self.ignore_eos, logprobs=self.logprobs)


@dataclass(frozen=True)
class CompletionRequest:
    model: str | None  # the model asked for (None: whichever is served)
    prompts: tuple[str | tuple[int, ...], ...]  # each prompt: text, or token ids
    options: Options


@dataclass(frozen=True)
class ChatRequest:
    model: str | None  # the model asked for (None: whichever is served)
    messages: tuple[dict[str, str], ...]  # {"role", "content"} with text content
    options: Options


def _bad(field: str, expected: str, value) -> ApiError:
    return ApiError(400, f"'{field}' must be {expected}, got {value!r}", param=field)


def _int(body: dict, field: str, default, low: int | None = None, high: int | None = None):
    value = body.get(field, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low) or (
            high is not None and value > high):
        bounds = "" if low is None else f" >= {low}" if high is None else f" in [{low}, {high}]"
        raise _bad(field, f"an integer{bounds}", value)
    return value


def _float(body: dict, field: str, default: float, check, expected: str) -> float:
    value = body.get(field, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not check(value):
        raise _bad(field, expected, value)
    return float(value)


def _bool(body: dict, field: str, default: bool) -> bool:
    value = body.get(field, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(field, "true or false", value)
    return value


def _stop(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value) or len(value) > 4:
        raise _bad("stop", "a non-empty string or a list of at most 4 of them", value)
    return tuple(value)


def _refuse_unsupported(body: dict, defaults: dict) -> None:
    for field, default in defaults.items():
        if body.get(field, default) not in (default, None):
            raise ApiError(400, f"'{field}' is not supported by this server; leave it out", param=field)


def _options(body: dict, logprobs: int | None) -> Options:
    stream = _bool(body, "stream", False)
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise _bad("stream_options", "an object", stream_options)
    if stream_options and not stream:
        raise ApiError(400, "'stream_options' is only allowed with 'stream': true", param="stream_options")
    return Options(
        max_tokens=_int(body, "max_tokens", None, low=1),
        temperature=_float(body, "temperature", 1.0, lambda v: 0 <= v <= 2, "a number in [0, 2]"),
        top_p=_float(body, "top_p", 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]"),
        top_k=_int(body, "top_k", 0, low=0),
        min_p=_float(body, "min_p", 0.0, lambda v: 0 <= v <= 1, "a number in [0, 1]"),
        presence_penalty=_float(body, "presence_penalty", 0.0, lambda v: -2 <= v <= 2, "a number in [-2, 2]"),
        frequency_penalty=_float(body, "frequency_penalty", 0.0, lambda v: -2 <= v <= 2, "a number in [-2, 2]"),
        repetition_penalty=_float(body, "repetition_penalty", 1.0, lambda v: v > 0, "a number > 0"),
        n=_int(body, "n", 1, low=1, high=128),
        seed=_int(body, "seed", None),
        stop=_stop(body),
        logprobs=logprobs,
        stream=stream,
        include_usage=_bool(stream_options, "include_usage", False),
        ignore_eos=_bool(body, "ignore_eos", False),
        return_token_ids=_bool(body, "return_token_ids", False),
    )


def _model(body: dict) -> str | None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("model", "a string", model)
    return model


def parse_completion(body: dict) -> CompletionRequest:
    """A `POST /v1/completions` body."""
    _refuse_unsupported(body, {"echo": False, "best_of": 1, "suffix": None, "logit_bias": None})
    prompt = body.get("prompt")
    if isinstance(prompt, str) or _is_ids(prompt):
        prompts = (prompt,)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or _is_ids(p) for p in prompt):
        prompts = tuple(prompt)
    else:
        raise _bad("prompt", "a string, a list of token ids, or a non-empty list of either", prompt)
    prompts = tuple(p if isinstance(p, str) else tuple(p) for p in prompts)
    logprobs = _int(body, "logprobs", None, low=0, high=MAX_LOGPROBS)
    return CompletionRequest(_model(body), prompts, _options(body, logprobs))


def _is_ids(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def parse_chat(body: dict) -> ChatRequest:
    """A `POST /v1/chat/completions` body; message content as text or a list of text parts."""
    _refuse_unsupported(body, {"tools": None, "tool_choice": None, "logit_bias": None, "response_format": None})
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "a non-empty list of {role, content} objects", messages)
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _bad(f"messages[{i}]", "an object with a string 'role'", message)
        checked.append({"role": message["role"], "content": _text_content(message.get("content"), i)})
    top = _int(body, "top_logprobs", None, low=0, high=MAX_LOGPROBS)
    if top is not None and not body.get("logprobs"):
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    logprobs = (top or 0) if _bool(body, "logprobs", False) else None
    if body.get("max_completion_tokens") is not None:
        body = {**body, "max_tokens": body["max_completion_tokens"]}
    return ChatRequest(_model(body), tuple(checked), _options(body, logprobs))


def _text_content(content, i: int) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(
            p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise _bad(f"messages[{i}].content", "a string or a list of {type: 'text', text} parts", content)
