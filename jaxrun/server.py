"""The OpenAI-compatible HTTP server over an Engine (jaxrun.engine_api): FastAPI on uvicorn.

    app = build_app(engine, tokenizer, "my-model")       # tokenizer None: token-id prompts only
    run_server(app, "127.0.0.1", 8000)                   # returns 0 after SIGINT / SIGTERM

Endpoints: POST /v1/completions, POST /v1/chat/completions (both stream as server-sent events),
GET /v1/models, GET /health (503 until engine.ready), GET /metrics (Prometheus).
A client that goes away cancels its engine requests at once, streaming or not. On SIGINT/SIGTERM
the listening socket closes, requests in flight finish (up to `graceful_timeout` seconds, then they
are cancelled), the engine is shut down, and run_server returns.
"""
from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from jaxrun.choice_stream import ChoiceRun
from jaxrun.engine_api import Engine, EngineUnavailable
from jaxrun.openai_protocol import (APIError, ChatBody, CompletionBody, Plan, ServingConfig, TokenStrings,
                                    chat_plan, completion_plan, envelope, model_list, new_id, parse_body, usage)
from jaxrun.openai_responses import formatter, prompt_tokens, whole_response
from jaxrun.server_metrics import ServerMetrics

log = logging.getLogger("jaxrun.server")


def sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, allow_nan=False)}\n\n"


async def _disconnected(receive) -> None:
    """Returns when the client has gone (the request body must have been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class EventStreamResponse(StreamingResponse):
    """Server-sent events from an async iterator of strings. The client's disconnect is watched
    while streaming: the iterator is then closed at once, and `on_close` runs in every case (it
    cancels the engine requests, even when the client left before the first event)."""

    def __init__(self, events: AsyncIterator[str], on_close):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.events, self.on_close = events, on_close

    async def __call__(self, scope, receive, send) -> None:
        async def stream():
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.events:
                await send({"type": "http.response.body", "body": chunk.encode("utf-8"), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        streaming, watching = asyncio.create_task(stream()), asyncio.create_task(_disconnected(receive))
        try:
            await asyncio.wait({streaming, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (streaming, watching):
                t.cancel()
            await asyncio.gather(streaming, watching, return_exceptions=True)
            await self.events.aclose()
            self.on_close()


def internal_error(e: Exception) -> APIError:
    """An unexpected exception, logged with its traceback, as a 500 for the client."""
    log.error("request failed", exc_info=e)
    return APIError(500, f"internal error: {type(e).__name__}: {e}")


class _Serving:
    """The request handlers' shared state: config, engine, metrics."""

    def __init__(self, engine: Engine, cfg: ServingConfig):
        self.engine, self.cfg = engine, cfg
        self.metrics = ServerMetrics(engine, cfg.model_names[0])

    def submit(self, plan: Plan, arrival: float) -> list:
        """One engine request per choice -> their response formatters (all or none submitted)."""
        names = TokenStrings(self.cfg.tokenizer, plan.options.tokens_as_ids)
        runs = []
        try:
            for c in plan.choices:
                stream = self.engine.submit(c.request)
                observer = self.metrics.request(len(c.prompt_ids), arrival)
                runs.append(ChoiceRun(c, stream, plan.options, self.cfg.tokenizer, observer))
        except (ValueError, EngineUnavailable) as e:
            for r in runs:
                r.stream.cancel()
            status = 503 if isinstance(e, EngineUnavailable) else 400
            raise APIError(status, f"the engine refused the request: {e}") from None
        return [formatter(plan, r, names) for r in runs]

    async def respond(self, request: Request, plan: Plan, arrival: float) -> Response:
        formatters = self.submit(plan, arrival)
        rid = new_id(plan.kind)
        if plan.options.stream:
            return EventStreamResponse(self.events(plan, rid, formatters),
                                       on_close=lambda: [f.run.stream.cancel() for f in formatters])
        work = asyncio.create_task(self.collect(formatters))
        watching = asyncio.create_task(_disconnected(request.receive))
        try:
            await asyncio.wait({work, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (work, watching):
                if not t.done():
                    t.cancel()
            await asyncio.gather(work, watching, return_exceptions=True)
        if work.cancelled():                        # the client went away: nobody reads this
            return Response(status_code=499)
        work.result()
        return JSONResponse(whole_response(plan, rid, formatters))

    @staticmethod
    async def collect(formatters: list) -> None:
        async def drain(run: ChoiceRun):
            async for _ in run.updates():
                pass
        tasks = [asyncio.create_task(drain(f.run)) for f in formatters]
        try:
            await asyncio.gather(*tasks)
        finally:                                     # one failure cancels the other choices
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def events(self, plan: Plan, rid: str, formatters: list) -> AsyncIterator[str]:
        """The SSE events of a streamed response: chunks as the choices progress, the usage chunk if
        asked, [DONE]; an engine failure becomes an error event."""
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(i: int, run: ChoiceRun):
            try:
                async for u in run.updates():
                    await queue.put((i, u))
            except Exception as e:                   # noqa: BLE001 - reported to the client below
                await queue.put((i, e))
            finally:
                await queue.put((i, done))

        tasks = [asyncio.create_task(pump(i, f.run)) for i, f in enumerate(formatters)]
        n_prompt, n_out = prompt_tokens(plan), [0] * len(formatters)
        opts = plan.options

        def extra():
            return {"usage": usage(n_prompt, sum(n_out))} if opts.continuous_usage else {}
        try:
            if plan.kind == "chat":
                for f in formatters:
                    yield sse(envelope("chat", rid, plan.model, [f.first_chunk()], chunk=True, **extra()))
            left, failure = len(formatters), None
            while left and failure is None:
                i, item = await queue.get()
                if item is done:
                    left -= 1
                    continue
                try:
                    if isinstance(item, Exception):
                        raise item
                    n_out[i] += len(item.token_ids)
                    choice = formatters[i].chunk(item)
                    if choice is not None:
                        yield sse(envelope(plan.kind, rid, plan.model, [choice], chunk=True, **extra()))
                except Exception as e:                   # noqa: BLE001 - the client gets an error event
                    failure = e if isinstance(e, APIError) else internal_error(e)
                    yield sse(failure.body())
            if failure is None and opts.include_usage:
                yield sse(envelope(plan.kind, rid, plan.model, [], chunk=True, usage=usage(n_prompt, sum(n_out))))
            yield sse("[DONE]")
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def build_app(engine: Engine, tokenizer, served_model_name: str | list[str], max_context: int | None = None, *,
              eos_token_ids=(), default_sampling=(), reasoning_parser: str | None = "qwen3",
              tool_parser: str | None = "qwen3_coder", max_logprobs: int = 20, preprocessor=None,
              image_token_id: int | None = None) -> FastAPI:
    """The FastAPI app serving `engine`.

    tokenizer: ref.tokenizer.Tokenizer or None (token-id prompts only). served_model_name: the name
    (or names; the first is reported) clients send as `model`. max_context: prompt + max_tokens limit
    (default and at most engine.max_context). eos_token_ids: the model's end-of-sequence ids besides the
    tokenizer's. default_sampling: ((name, value), ...) for temperature / top_p / top_k left out of a
    request (openai_protocol.generation_defaults reads them from a checkpoint). preprocessor (the
    checkpoint's ref.config.PreprocessorConfig) and image_token_id: the engine takes images (chat
    image_url parts with data URLs); without them image parts are refused."""
    names = (served_model_name,) if isinstance(served_model_name, str) else tuple(served_model_name)
    if max_context is not None and max_context > engine.max_context:
        raise ValueError(f"max_context {max_context} exceeds the engine's {engine.max_context}")
    eos = frozenset(eos_token_ids) | frozenset(getattr(tokenizer, "eos_token_ids", ()) or ())
    cfg = ServingConfig(names, engine.vocab_size, max_context or engine.max_context, tokenizer, eos,
                        tuple(default_sampling), max_logprobs, reasoning_parser=reasoning_parser,
                        tool_parser=tool_parser, preprocessor=preprocessor, image_token_id=image_token_id)
    serving = _Serving(engine, cfg)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        yield
        engine.shutdown(drain=False)    # uvicorn has let requests in flight finish (or cancelled them)

    app = FastAPI(title="jaxrun", lifespan=lifespan)
    app.state.serving = serving

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, e: Exception):
        return JSONResponse(internal_error(e).body(), status_code=500)

    @app.get("/health")
    async def health():
        if not getattr(engine, "ready", True):
            raise APIError(503, "the engine is not ready")
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models():
        return model_list(cfg, created)

    @app.get("/metrics")
    async def metrics():
        return Response(serving.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(request: Request):
        arrival = time.monotonic()
        plan = completion_plan(parse_body(await request.body(), CompletionBody), cfg)
        return await serving.respond(request, plan, arrival)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        arrival = time.monotonic()
        plan = chat_plan(parse_body(await request.body(), ChatBody), cfg)
        return await serving.respond(request, plan, arrival)

    return app


def run_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, graceful_timeout: float = 30.0,
               log_level: str = "info", sockets=None) -> int:
    """Serve until SIGINT / SIGTERM, then shut down gracefully; returns the exit status 0. Under
    ref.cli.exit_on_interrupt (jaxrun.serve) the first signal stops the server gracefully and a second
    one exits at once; otherwise uvicorn's own handlers do."""
    import uvicorn
    from ref.cli import on_interrupt
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                           timeout_graceful_shutdown=graceful_timeout))
    on_interrupt(lambda: setattr(server, "should_exit", True))
    # uvicorn re-raises the signal it handled once it has shut down: answer that with a no-op
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=sockets)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return 0
