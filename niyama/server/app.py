"""The FastAPI app: OpenAI endpoints over an `EngineClient`.

Handlers parse and validate (protocol.py), submit, and stream the events the engine client makes from
the engine's messages. Every error leaves as OpenAI-style JSON; bad input is a 4xx and the server keeps
serving.
"""

from __future__ import annotations

import asyncio
import hmac
import importlib.metadata
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse

from .batch_api import BatchConfig, add_batch_routes
from .choices import Choices, choice_generations
from .engine_client import EngineClient, EngineStopped, Event, Stream
from .errors import APIError, add_handlers
from .metrics import CONTENT_TYPE, ServerMetrics
from .protocol import (Answer, Generation, ModelInfo, ResponseWriter, check_model, detokenize_ids, parse_body,
                       parse_generation, prompt_ids, usage)
from .request_qos import QoSPolicy
from .schemas import (GENERATION_ERRORS, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Completion,
                      CompletionChunk, CompletionRequest, DetokenizeRequest, DetokenizeResponse, Health, ModelCard,
                      ModelList, TokenizeRequest, TokenizeResponse, Version, openapi, route)

log = logging.getLogger("niyama.server")
try:
    VERSION = importlib.metadata.version("niyama")
except importlib.metadata.PackageNotFoundError:      # run from a checkout that is not installed
    VERSION = "unknown"


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 16 * 2**20    # a larger body gets 413 before it is read
    max_queued: int = 1024              # requests in flight (waiting + running); beyond: 429 + Retry-After
    api_key: str | None = None          # when set, /v1/* needs "Authorization: Bearer <key>" (401 otherwise)
    max_model_len: int | None = None    # prompt + output tokens per request (default: the model's context)

    def __post_init__(self):
        if self.max_body_bytes < 1024 or self.max_queued < 1:
            raise ValueError("the body limit must be >= 1 KiB and the queue bound >= 1")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("--max-model-len must be >= 2")


def build_app(runner: EngineClient, served_name: str, qos: QoSPolicy, limits: Limits | None = None,
              batches: BatchConfig | None = None) -> FastAPI:
    """`runner`: a started-up engine (its model loaded), owned by the app from now on: the app starts
    talking to it when it starts serving and shuts it down when it stops. `batches`: serve the Batch API
    (/v1/files, /v1/batches) with its state there."""
    limits = limits or Limits()
    in_flight = [0]                      # requests submitted and not yet finished (event loop only)
    runner.metrics = ServerMetrics(served_name, tuple(qos.tiers.values()))
    info = runner.info
    context = info["max_position"]
    if limits.max_model_len is not None:
        if limits.max_model_len > context:
            raise ValueError(f"--max-model-len {limits.max_model_len} is over the model's context of {context} tokens")
        context = limits.max_model_len
    model = ModelInfo(served_name, context, info["kv_tokens"], info["vocab_size"], runner.tokenizer,
                      info["sampling_defaults"])
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        runner.start(asyncio.get_running_loop())
        yield
        await asyncio.to_thread(runner.shutdown)

    app = FastAPI(title="niyama", version=VERSION, lifespan=lifespan)
    app.state.engine = runner
    add_handlers(app)
    app.openapi = lambda: openapi(app)      # adds the request bodies the handlers read themselves

    @app.get("/health", **route(Health, errors=(503,)))
    async def health():
        if not runner.alive:
            raise APIError(runner.stopped, 503, type="server_error", code="engine_stopped")
        stats = runner.stats
        degraded = stats.degraded
        status = {"status": "degraded", "reason": degraded} if degraded else {"status": "ok"}
        return {**status, "model": served_name, "kv_blocks_free": stats.kv_free, "kv_blocks": stats.kv_blocks,
                "kv_blocks_cached": stats.kv_cached,
                "engine": {"mode": info["mode"], "pid": info["pid"]}}

    card = {"id": served_name, "object": "model", "created": started, "owned_by": "niyama",
            "max_model_len": model.context, "vocab_size": model.vocab_size, "default_sampling": model.sampling,
            "tiers": [t.describe() for t in qos.tiers.values()], "default_tier": qos.default_tier}

    @app.get("/v1/models", **route(ModelList))
    async def models():
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}", **route(ModelCard, errors=(404,)))
    async def model_card(model_id: str):
        check_model({"model": model_id}, model)
        return card

    @app.get("/version", **route(Version))
    async def version():
        return {"version": VERSION}

    @app.post("/tokenize", **route(TokenizeResponse, TokenizeRequest, errors=(400, 401, 404, 413, 415)))
    async def tokenize(request: Request):
        check_key(request)
        body = parse_body(await read_body(request))
        check_model(body, model)
        ids = await asyncio.to_thread(prompt_ids, body, model)
        return {"count": len(ids), "max_model_len": model.context, "tokens": ids}

    @app.post("/detokenize", **route(DetokenizeResponse, DetokenizeRequest, errors=(400, 401, 404, 413, 415)))
    async def detokenize(request: Request):
        check_key(request)
        body = parse_body(await read_body(request))
        check_model(body, model)
        return {"prompt": detokenize_ids(body, model)}

    @app.get("/metrics", response_class=PlainTextResponse, responses={200: {"description": "Prometheus text format"}})
    async def prometheus():
        return Response(runner.render_metrics(), media_type=CONTENT_TYPE)

    @app.post("/v1/completions", **route(Completion, CompletionRequest, CompletionChunk, GENERATION_ERRORS))
    async def completions(request: Request):
        return await generate(request, "completion")

    @app.post("/v1/chat/completions",
              **route(ChatCompletion, ChatCompletionRequest, ChatCompletionChunk, GENERATION_ERRORS))
    async def chat_completions(request: Request):
        return await generate(request, "chat")

    async def generate(request: Request, kind: str):
        arrival = time.monotonic()          # the request's deadlines count from here
        check_key(request)
        if in_flight[0] >= limits.max_queued:       # before reading and tokenizing: overload costs nothing more
            raise APIError(f"the server holds {in_flight[0]} requests, its limit; retry shortly", 429,
                           type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
        raw = await read_body(request)
        # parsing and tokenizing a large body takes seconds: off the event loop, so other clients are served
        gen = await asyncio.to_thread(lambda: parse_generation(parse_body(raw), kind, model, qos))
        choices = await start(gen, arrival)
        writer = ResponseWriter(gen, model.tokenizer)
        if gen.stream:
            return StreamingResponse(sse(choices, gen, writer), media_type="text/event-stream")
        return await collect(request, choices, gen, writer)

    async def respond(kind: str, body: dict, arrival: float | None = None) -> dict:
        """One generation from a parsed body, answered in full without HTTP (the Batch API's lines): the
        response body, or an APIError. Not counted against `max_queued`: that bound is for HTTP clients.
        Cancelling the awaiting task aborts the request."""
        arrival = time.monotonic() if arrival is None else arrival
        gen = await asyncio.to_thread(parse_generation, body, kind, model, qos)
        if gen.stream:
            raise APIError("stream must be false here: the response is stored whole", param="stream")
        return await collect(None, await start(gen, arrival), gen, ResponseWriter(gen, model.tokenizer))

    app.state.respond = respond

    async def start(gen: Generation, arrival: float) -> Choices:
        """Submit the request's first choice (choices.py submits the others)."""
        choices = Choices(lambda g: submit(g, arrival), runner.abort, choice_generations(gen))
        await choices.start()
        return choices

    async def submit(gen: Generation, arrival: float) -> Stream:
        try:
            stream = runner.submit(gen, arrival)
        except EngineStopped as e:
            raise APIError(f"the server cannot take requests: {e}", 503, type="server_error",
                           code="engine_stopped") from None
        if stream.verdict is not None:
            await admission_verdict(stream)
        return stream

    async def admission_verdict(stream: Stream) -> None:
        """A tier that rejects infeasible requests: wait for the engine's verdict (it comes before the next
        step) so that a rejection is a 429 before any response has started, streamed or not."""
        try:
            rejected = await stream.verdict
        except BaseException:                  # cancelled: the client left while waiting
            runner.abort(stream)
            raise
        if rejected is None:
            return
        if rejected.status != 429:             # the engine stopped meanwhile
            raise APIError(rejected.error, rejected.status, code="engine_stopped")
        raise APIError(rejected.error, 429, type="rate_limit_error", code="deadline_infeasible",
                       headers={"Retry-After": str(rejected.retry_after_s)})

    def check_key(request: Request) -> None:
        if limits.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {limits.api_key}".encode()):
            raise APIError("incorrect or missing API key: send 'Authorization: Bearer <key>'", 401,
                           code="invalid_api_key")

    async def read_body(request: Request) -> bytes:
        kind = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if kind != "application/json" and not kind.endswith("+json"):
            raise APIError(f"Content-Type must be application/json, got {kind!r} (curl: add "
                           "-H 'Content-Type: application/json')", 415)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise APIError(f"the request body is {declared} bytes; the limit is {limits.max_body_bytes}", 413)
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limits.max_body_bytes:
                raise APIError(f"the request body is over the limit of {limits.max_body_bytes} bytes", 413)
        return bytes(body)

    async def watch_disconnect(request: Request, choices: Choices) -> None:
        """The body is read, so the next ASGI message is the client leaving: abort at once, and end the
        handler's wait (an aborted request gets no more events from the engine)."""
        while True:
            if (await request.receive())["type"] == "http.disconnect":
                choices.close()
                choices.end(Event("", 0, finish_reason="abort"))
                return

    async def collect(request: Request | None, choices: Choices, gen: Generation, writer: ResponseWriter):
        """The whole response; `request`: the HTTP request whose client may leave (None: an internal one)."""
        answers = [Answer(gen.echo) for _ in range(gen.n)]
        failed = None
        counted = gen.n if request is not None else 0
        in_flight[0] += counted
        watcher = asyncio.create_task(watch_disconnect(request, choices)) if counted else None
        try:
            async for i, event in choices:
                if event.error:
                    failed = event
                    break
                a = answers[i]
                a.text += event.text
                a.token_ids += event.token_ids
                a.logprobs += event.logprobs or ()
                a.finish_reason, a.num_tokens = event.finish_reason, event.num_tokens
                if watcher is not None and watcher.done():
                    return Response(status_code=499)
        finally:
            if watcher is not None:
                watcher.cancel()
            in_flight[0] -= counted
            choices.close()
        if failed is not None:
            raise APIError(failed.error, failed.status)
        return writer.full(answers, usage(len(gen.prompt_ids), sum(a.num_tokens for a in answers)), choices.qos())

    async def sse(choices: Choices, gen: Generation, writer: ResponseWriter):
        first = [True] * gen.n
        made = [0] * gen.n                # tokens per choice, for the usage chunk
        in_flight[0] += gen.n
        try:
            if gen.echo:                  # the prompt first, as its own chunk
                for i in range(gen.n):
                    yield data(writer.chunk(gen.echo, first=True, index=i))
                    first[i] = False
            async for i, event in choices:
                if event.error:
                    yield data(APIError(event.error, event.status).body())
                    break
                text = writer.content(i, event.text)
                told = event.token_ids and (text or gen.return_token_ids or
                                            (event.finish_reason is None and gen.tools is None))
                if told:
                    yield data(writer.chunk(text, first=first[i], token_ids=event.token_ids,
                                            num_tokens=event.num_tokens, logprobs=event.logprobs, index=i))
                    first[i] = False
                if event.finish_reason is not None:     # a last token without text (EOS) has its logprobs here
                    made[i] = event.num_tokens
                    ends, reason = writer.tool_call_end(i, event.finish_reason, first[i])
                    for body in ends:
                        yield data(body)
                        first[i] = False
                    yield data(writer.chunk("", reason, qos=choices.qos(), num_tokens=event.num_tokens,
                                            index=i, **({} if told else {"token_ids": event.token_ids,
                                                                         "logprobs": event.logprobs})))
            else:
                if gen.include_usage:
                    yield data(writer.usage_chunk(usage(len(gen.prompt_ids), sum(made))))
            yield "data: [DONE]\n\n"
        finally:                          # the client went away (cancelled) or the stream ended
            in_flight[0] -= gen.n
            choices.close()

    if batches is not None:          # its lines run through `respond`
        add_batch_routes(app, batches, check_key, served_name)
    return app


def data(body: dict) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"
