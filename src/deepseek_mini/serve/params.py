"""Request bodies of the HTTP API, checked field by field: every mistake becomes an
``ApiError`` naming the field, which the app returns as a 4xx in OpenAI's error shape."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from ..data.instruct import instruct_prompt
from ..inference.sampling import SEED_RANGE, SamplingError, check_sampling

MAX_STOPS = 4  # as OpenAI's API


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server (``serve --max-request-bytes``,
    ``--max-prompts``): a prompt the model can read is at most ``max_position`` tokens,
    a few kilobytes of text, so a megabyte of JSON is room for many; and each prompt takes
    a row of the batch, so a list of hundreds would hold every other client's requests
    back for its whole length."""

    max_body_bytes: int = 1 << 20
    max_prompts: int = 64


class ApiError(Exception):
    """A request the server refuses: HTTP ``status``, a message and the field at fault."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": "invalid_request_error",
                          "param": self.param, "code": self.code}}


@dataclass
class Completion:
    """What a completion or a story request asks for."""

    prompts: list[str]
    max_tokens: int
    temperature: float
    top_p: float | None
    top_k: int | None
    seed: int | None
    stop: list[str]
    stream: bool


def _number(body: dict, name: str, default: float | None) -> float | None:
    value = body.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ApiError(f"{name} must be a number, got {value!r}", name)
    if not math.isfinite(value):  # JSON's NaN and Infinity, which Python reads
        raise ApiError(f"{name} must be a finite number, got {value!r}", name)
    return float(value)


def _integer(body: dict, name: str, default: int | None) -> int | None:
    value = body.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(f"{name} must be an integer, got {value!r}", name)
    return value


def _text(body: dict, name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise ApiError(f"{name} must be a string, got {value!r}", name)
    return value


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or len(stops) > MAX_STOPS
            or not all(isinstance(s, str) and s for s in stops)):
        raise ApiError(f"stop must be a non-empty string or a list of at most {MAX_STOPS}, "
                       f"got {stop!r}", "stop")
    return stops


def check_model(body: dict, served: str) -> None:
    model = body.get("model", served)
    if model != served:
        raise ApiError(f"model {model!r} does not exist; this server has {served!r}", "model",
                       404, "model_not_found")


def sampling(body: Any, prompts: list[str], defaults: tuple[int, float]) -> Completion:
    """The sampling fields common to completions and stories; ``defaults`` are the
    endpoint's max_tokens and temperature."""
    max_tokens = _integer(body, "max_tokens", defaults[0])
    temperature = _number(body, "temperature", defaults[1])
    top_p = _number(body, "top_p", None)
    top_k = _integer(body, "top_k", None)
    assert max_tokens is not None and temperature is not None
    if max_tokens < 0:
        raise ApiError(f"max_tokens must be >= 0, got {max_tokens}", "max_tokens")
    if temperature < 0:
        raise ApiError(f"temperature must be >= 0 (0 = greedy), got {temperature:g}",
                       "temperature")
    if top_k is not None and top_k < 1:
        raise ApiError(f"top_k must be >= 1, got {top_k}", "top_k")
    try:  # the engine's own bounds (a tiny temperature or top_p overflows its arithmetic)
        check_sampling(temperature, top_k, top_p)
    except SamplingError as exc:
        raise ApiError(str(exc), "top_p" if str(exc).startswith("top_p") else
                       "temperature") from None
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(f"stream must be true or false, got {stream!r}", "stream")
    if body.get("n", 1) != 1:
        raise ApiError("n must be 1: send the prompt several times instead", "n")
    if body.get("echo", False) or body.get("logprobs") is not None:
        raise ApiError("echo and logprobs are not supported", "echo" if body.get("echo")
                       else "logprobs")
    seed = _integer(body, "seed", None)
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise ApiError(f"seed must be a 64-bit integer, from -2**63 to 2**64 - 1, got {seed}",
                       "seed")
    return Completion(prompts, max_tokens, temperature, top_p, top_k, seed, _stops(body),
                      stream)


def completion(body: Any, served: str, limits: Limits | None = None) -> Completion:
    """``POST /v1/completions``: ``prompt`` is a string or a list of at most
    ``limits.max_prompts`` strings."""
    body = _object(body)
    check_model(body, served)
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if (not isinstance(prompts, list) or not prompts
            or not all(isinstance(p, str) for p in prompts)):
        raise ApiError(f"prompt must be a string or a non-empty list of strings, got "
                       f"{_short(prompt)}", "prompt")
    limits = limits or Limits()
    if len(prompts) > limits.max_prompts:
        raise ApiError(f"prompt is a list of {len(prompts)} prompts; this server takes at "
                       f"most {limits.max_prompts} in one request (serve --max-prompts)",
                       "prompt")
    if not all(p.strip() for p in prompts):
        raise ApiError("prompt is empty", "prompt")
    return sampling(body, prompts, (16, 1.0))


def story(body: Any, served: str) -> Completion:
    """``POST /v1/stories``: the TinyStoriesInstruct prompt from summary, words and
    features, as ``generate --summary/--words/--features`` builds it."""
    body = _object(body)
    check_model(body, served)
    fields = {name: _text(body, name) for name in ("summary", "words", "features")}
    fields = {k: v if v is not None and v.strip() else None for k, v in fields.items()}
    if not any(fields.values()):
        raise ApiError("give at least one of summary, words or features", "summary")
    return sampling(body, [instruct_prompt(**fields)], (200, 0.8))


def check_text(body: Any) -> None:
    """Every string in ``body`` is Unicode text: JSON's ``\\ud800`` escapes can spell a lone
    surrogate, which Python reads but no tokenizer or UTF-8 writer takes."""
    items = body.items() if isinstance(body, dict) else [(None, body)]
    for key, value in items:
        try:
            json.dumps([key, value], ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            named = key if isinstance(key, str) and key.isascii() else None
            raise ApiError(f"{named or 'the request'} holds a lone UTF-16 surrogate (such as "
                           "\\ud800): not valid Unicode text", named) from None


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters: an error message never echoes a
    megabyte back."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object", None)
    return body
