"""The HTTP app: OpenAI-style completions (plain and streamed), stories, the model list,
health, and the story page, over one ``Batcher`` shared by every request.

Text is the app's business: each choice turns the engine's token ids into text with an
``IncrementalDecoder`` and watches for stop strings, holding back any tail that could
still become one. Whatever ends a request early (a stop string, a client that went away)
cancels its engine request, which frees its row at the next step.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from ..data.tokenizer import Tokenizer
from ..inference.batcher import Batcher, Finish
from ..inference.batcher import Request as EngineRequest
from ..inference.prompts import prompt_ids
from ..inference.sampling import SamplingError
from ..inference.streaming import IncrementalDecoder
from . import params
from .params import ApiError, Completion, Limits


class _Choice:
    """One prompt's continuation as text, cut at the first stop string."""

    def __init__(self, tok: Tokenizer, stops: list[str]) -> None:
        self.decoder = IncrementalDecoder(tok.decode)
        self.stops = stops
        self.pending = ""
        self.tokens = 0
        self.finish: str | None = None
        self.request: EngineRequest | None = None

    def push(self, token: int) -> str:
        self.tokens += 1
        return self._filter(self.decoder.push(token))

    def close(self, reason: str) -> str:
        text = self._filter(self.decoder.flush())
        if self.finish is None:
            text, self.pending, self.finish = text + self.pending, "", reason
        return text

    def _filter(self, piece: str) -> str:
        """The text that is certainly before any stop string; sets ``finish`` at one."""
        self.pending += piece
        found = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if found:
            text, self.pending, self.finish = self.pending[:min(found)], "", "stop"
            return text
        hold = next((k for k in range(len(self.pending), 0, -1)
                     if any(s.startswith(self.pending[-k:]) for s in self.stops)), 0)
        text = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(text):]
        return text


class _Job:
    """The engine requests of one HTTP request, and their events as they come."""

    @classmethod
    async def start(cls, batcher: Batcher, tok: Tokenizer, request: Completion) -> _Job:
        """The job, its prompts tokenised in a worker thread: a long prompt takes the
        tokenizer a while, and on the event loop it would stall every other request
        (``/health`` included) meanwhile."""
        prompts = await asyncio.to_thread(prompt_ids, tok, request.prompts)
        return cls(batcher, tok, request, prompts)

    def __init__(self, batcher: Batcher, tok: Tokenizer, request: Completion,
                 prompts: list[list[int]]) -> None:
        self.choices = [_Choice(tok, request.stop) for _ in request.prompts]
        for ids in prompts:  # every prompt checked before any is queued
            try:
                batcher.check(ids, request.max_tokens, request.temperature, request.top_k,
                              request.top_p)
            except SamplingError as exc:
                raise ApiError(str(exc), "prompt") from None
        self.prompt_tokens = sum(len(ids) for ids in prompts)
        self.events: asyncio.Queue[tuple[int, int | Finish]] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        for i, (ids, choice) in enumerate(zip(prompts, self.choices, strict=True)):
            def deliver(event: int | Finish, i: int = i) -> None:
                loop.call_soon_threadsafe(self.events.put_nowait, (i, event))
            choice.request = EngineRequest(ids, request.max_tokens, deliver,
                                           request.temperature, request.top_k, request.top_p,
                                           request.seed)
            batcher.submit(choice.request)

    async def pieces(self) -> AsyncIterator[tuple[int, str, str | None]]:
        """(choice, new text, finish reason or None) until every choice has finished;
        leaving early (a client gone) cancels what still runs."""
        try:
            while any(c.finish is None for c in self.choices):
                i, event = await self.events.get()
                choice = self.choices[i]
                if choice.finish is not None:
                    continue  # the engine catching up with a stop string
                text = (choice.close(event.reason) if isinstance(event, Finish)
                        else choice.push(event))
                if choice.finish is not None:
                    assert choice.request is not None
                    choice.request.cancel()
                if text or choice.finish is not None:
                    yield i, text, choice.finish
        finally:
            for choice in self.choices:
                assert choice.request is not None
                choice.request.cancel()

    def usage(self) -> dict[str, int]:
        done = sum(c.tokens for c in self.choices)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": done,
                "total_tokens": self.prompt_tokens + done}


def create_app(batcher: Batcher, tok: Tokenizer, model_name: str,
               limits: Limits | None = None) -> FastAPI:
    """The app serving ``batcher``'s model under the name ``model_name``, refusing
    requests beyond ``limits`` (None: the defaults)."""
    limits = limits or Limits()
    app = FastAPI(title="deepseek-mini", docs_url=None, redoc_url=None)
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "running": batcher.running,
                "waiting": batcher.waiting, "max_batch": batcher.max_batch}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "created": created, "owned_by": "deepseek-mini"}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await _respond(params.completion(await _body(request, limits), model_name,
                                                limits), request)

    @app.post("/v1/stories")
    async def stories(request: Request) -> Any:
        return await _respond(params.story(await _body(request, limits), model_name), request)

    async def _respond(request: Completion, http: Request) -> Any:
        job = await _Job.start(batcher, tok, request)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                "created": int(time.time()), "model": model_name}
        if request.stream:
            return StreamingResponse(_stream(job, head), media_type="text/event-stream")
        texts = [""] * len(job.choices)

        async def collect() -> None:
            async for i, text, _ in job.pieces():
                texts[i] += text

        if not await _unless_disconnected(collect(), http):
            return Response(status_code=499)  # nobody reads it: the client has gone
        choices = [{"index": i, "text": text, "finish_reason": c.finish, "logprobs": None}
                   for i, (text, c) in enumerate(zip(texts, job.choices, strict=True))]
        return {**head, "choices": choices, "usage": job.usage()}

    return app


async def _stream(job: _Job, head: dict[str, Any]) -> AsyncIterator[str]:
    """Server-sent events: a chunk per piece of text, the last of each choice with its
    finish reason and the usage so far, then ``[DONE]``."""
    async for i, text, finish in job.pieces():
        chunk = {**head, "choices": [{"index": i, "text": text, "finish_reason": finish,
                                      "logprobs": None}]}
        if finish is not None:
            chunk["usage"] = job.usage()
        yield f"data: {json.dumps(chunk)}\n\n"
    yield "data: [DONE]\n\n"


async def _unless_disconnected(work: Coroutine[Any, Any, None], request: Request) -> bool:
    """Run ``work`` to its end, or cancel it (its engine requests with it) as soon as the
    client disconnects: a reply sent in one piece has no write that would fail before
    ``max_tokens``. True when ``work`` ran to its end."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, watch):
            pending.cancel()
        await asyncio.gather(task, watch, return_exceptions=True)
    if task.cancelled():
        return False
    task.result()  # an error in the work is the handler's
    return True


async def _disconnect(request: Request) -> None:
    """Return when the client has gone (the server's next message, once the body is
    read, is ``http.disconnect``)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _body(request: Request, limits: Limits) -> Any:
    raw = await _read_body(request, limits.max_body_bytes)
    if not raw.strip():
        raise ApiError("the request body is empty: send a JSON object")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError("the request body is not valid JSON") from None
    except RecursionError:
        raise ApiError("the request body is nested too deeply") from None
    params.check_text(body)
    return body


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed ``limit`` bytes: from
    its Content-Length before reading any of it, else while it streams in."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(f"{int(declared):,} bytes", limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(f"over {limit:,} bytes", limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: str, limit: int) -> ApiError:
    return ApiError(f"the request body is {size}; this server takes at most {limit:,} "
                    "(serve --max-request-bytes)", None, 413, "request_too_large")
