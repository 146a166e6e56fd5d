"""The OpenAI-compatible HTTP app (FastAPI): `GET /v1/models`, `POST /v1/completions`,
`POST /v1/chat/completions` (streamed as server-sent events or not), `GET /health` and
`GET /metrics`.

Handlers check a request completely (auth, size, JSON, fields, model, lengths) before it
reaches the engine, then hand it to the `EngineLoop` and relay its updates. A client that
disconnects has its request aborted, which frees its KV-cache blocks at once. Errors are
OpenAI's JSON: 400 invalid field or malformed JSON, 401 wrong API key, 404 unknown model or
route, 413 body too large, 503 server full or shutting down.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from trtllm.kernels.errors import ConfigError, RequestError, TrtllmError

from .config import ServeConfig
from .engine_loop import EngineLoop, QueueFullError, RequestHandle
from .metrics import ServerMetrics
from .protocol import ApiError, Options, parse_chat, parse_completion
from .ranks import Leader
from .responses import Choice, Formatter, TextStream

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class OpenAIServer:
    """The state behind the app: the compiled model, its engine loop and its metrics."""

    def __init__(self, llm, config: ServeConfig):
        if llm.tokenizer is None:
            raise ConfigError("serving needs a tokenizer: compile(model, tokenizer=...), or a model folder or "
                              "engine folder that has one")
        self.llm = llm
        self.config = config
        self.tokenizer = llm.tokenizer
        self.metrics = ServerMetrics(config.model_name)
        # a model split over ranks: the loop's adds, aborts and steps reach the other ranks too (ranks.py)
        self.leader = Leader(llm.runtime) if llm.ranks.world_size > 1 else None
        self.loop = EngineLoop(self.leader or llm.runtime, config.max_requests, self.metrics)
        self.created = int(time.time())
        self.draining = False  # set at shutdown: new requests get 503 while held ones finish

    @asynccontextmanager
    async def lifespan(self, app: FastAPI):
        self.loop.start()
        yield
        self.draining = True
        await asyncio.to_thread(self.loop.stop, True)
        self.stop_ranks()

    def stop_ranks(self) -> None:
        """After the loop's last step: the other ranks of a split model stop following."""
        if self.leader is not None:
            self.leader.stop()

    # -- checks ----------------------------------------------------------------------------

    def authorize(self, request: Request) -> None:
        if self.config.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.config.api_key}".encode()):
            raise ApiError(401, "incorrect API key: send 'Authorization: Bearer <key>' with the server's --api-key",
                           code="invalid_api_key")

    async def read_json(self, request: Request) -> dict:
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length", "")
        too_large = ApiError(413, f"the request body is larger than the server's limit of {limit} bytes")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}")
        return data

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.config.model_name:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves {self.config.model_name!r}",
                           param="model", code="model_not_found")

    def check_fits(self, ids: list[int], max_new_tokens: int) -> None:
        """What the engine would refuse, refused here with a 400 (the engine is another thread's)."""
        runtime = self.llm.runtime
        try:
            runtime.check_prompt(ids)
        except RequestError as exc:
            raise ApiError(400, str(exc), param="prompt") from None
        max_len = runtime.config.max_seq_len
        if len(ids) + max_new_tokens > max_len:
            raise ApiError(400, f"this model's maximum context length is {max_len} tokens; the prompt has {len(ids)} "
                           f"and max_tokens asks for {max_new_tokens}: shorten the prompt or lower max_tokens",
                           param="max_tokens")

    # -- generation ------------------------------------------------------------------------

    def encode(self, prompt: str | tuple[int, ...]) -> list[int]:
        return list(self.tokenizer.encode(prompt)) if isinstance(prompt, str) else list(prompt)

    def render_chat(self, messages: tuple[dict[str, str], ...]) -> list[int]:
        from jinja2 import TemplateError

        if not getattr(self.tokenizer, "chat_template", None):
            raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions")
        try:
            text = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        except TemplateError as exc:
            raise ApiError(400, f"the chat template refused the messages: {exc}", param="messages") from None
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    async def generate(self, request: Request, prompts: list[list[int]], options: Options, max_new_tokens: int,
                       chat: bool) -> Response:
        for ids in prompts:
            self.check_fits(ids, max_new_tokens)
        choices = [(ids, options.sampling_params(max_new_tokens, j)) for ids in prompts for j in range(options.n)]
        try:
            choices[0][1].validate()
        except RequestError as exc:
            raise ApiError(400, str(exc)) from None
        if self.draining:
            raise ApiError(503, "the server is shutting down")
        try:
            handle = self.loop.submit(choices)
        except QueueFullError as exc:
            raise ApiError(503, str(exc)) from None
        formatter = Formatter(self.config.model_name, chat, self.tokenizer, options.return_token_ids)
        states = [Choice(i, TextStream(self.tokenizer, options.stop)) for i in range(len(choices))]
        num_prompt_tokens = sum(len(ids) for ids in prompts)
        if options.stream:
            events = self._events(handle, formatter, states, num_prompt_tokens, options.include_usage)
            return StreamingResponse(events, media_type="text/event-stream")
        watcher = asyncio.ensure_future(self._abort_on_disconnect(request, handle))
        try:
            async for update in handle.updates():
                _apply(states[update.index], update)
        except TrtllmError as exc:
            raise ApiError(400, str(exc)) from None
        finally:
            watcher.cancel()
        return JSONResponse(formatter.response(states, num_prompt_tokens))

    async def _abort_on_disconnect(self, request: Request, handle: RequestHandle) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.loop.abort(handle)

    async def _events(self, handle: RequestHandle, formatter: Formatter, states: list[Choice],
                      num_prompt_tokens: int, include_usage: bool) -> AsyncIterator[str]:
        """The stream's server-sent events. When the client disconnects, the server cancels
        this generator and `finally` aborts the request."""
        done = False
        try:
            if formatter.chat:
                for state in states:
                    yield _event(formatter.role_chunk(state.index))
            async for update in handle.updates():
                state = states[update.index]
                offset = len(state.text.sent)
                piece = _apply(state, update)
                if update.token_ids or update.finish_reason is not None:
                    yield _event(formatter.chunk(state, piece, update.token_ids, update.logprobs, update.top_logprobs,
                                                 offset, update.finish_reason))
            if include_usage:
                yield _event(formatter.usage_chunk(num_prompt_tokens, sum(len(s.token_ids) for s in states)))
            done = True
            yield "data: [DONE]\n\n"
        except TrtllmError as exc:
            done = True
            yield _event(ApiError(400, str(exc)).body())
        except Exception as exc:  # noqa: BLE001 -- the engine failed mid-stream: the client gets it as an event
            done = True
            yield _event(ApiError(500, f"the engine failed: {exc}").body())
        finally:
            if not done:
                self.loop.abort(handle)


def _apply(state: Choice, update) -> str:
    """Add an update to its choice; the new text it makes."""
    state.add(update.token_ids, update.logprobs, update.top_logprobs)
    if update.finish_reason is None:
        return state.text.piece(state.token_ids)
    state.finish_reason = update.finish_reason
    return state.text.last_piece(state.token_ids, update.text)


def _event(data: dict) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


def build_app(llm, config: ServeConfig) -> FastAPI:
    """The app serving `llm` (a `CompiledModel` with a tokenizer); run it with uvicorn."""
    server = OpenAIServer(llm, config)
    app = FastAPI(title="trtllm", lifespan=server.lifespan)
    app.state.server = server

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(ApiError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(ApiError(500, f"internal error: {exc}").body(), status_code=500)

    @app.get("/health")
    async def health() -> Response:
        ok = server.loop.alive and not server.draining
        return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        server.authorize(request)
        return JSONResponse({"object": "list", "data": [{
            "id": config.model_name, "object": "model", "created": server.created, "owned_by": "trtllm",
            "max_model_len": llm.runtime.config.max_seq_len}]})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        server.authorize(request)
        parsed = parse_completion(await server.read_json(request))
        server.check_model(parsed.model)
        prompts = [server.encode(p) for p in parsed.prompts]
        max_new = parsed.options.max_tokens or COMPLETIONS_DEFAULT_MAX_TOKENS
        return await server.generate(request, prompts, parsed.options, max_new, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        server.authorize(request)
        parsed = parse_chat(await server.read_json(request))
        server.check_model(parsed.model)
        ids = server.render_chat(parsed.messages)
        max_new = parsed.options.max_tokens or max(1, llm.runtime.config.max_seq_len - len(ids))
        return await server.generate(request, [ids], parsed.options, max_new, chat=True)

    return app
