"""The FastAPI app: OpenAI endpoints over an `EngineClient`.

Handlers parse and validate (protocol.py), submit, and stream the events the engine client makes from
the engine's messages. Every error leaves as OpenAI-style JSON; bad input is a 4xx and the server keeps
serving.
"""

from __future__ import annotations

import asyncio
import hmac
import importlib.metadata
import ipaddress
import json
import logging
import os
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect

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

# most request bodies parsed and tokenized at once (each on a thread, holding its text and ids): a flood of
# large bodies queues here instead of running hundreds of tokenizations together
TOKENIZE_CONCURRENCY = max(2, min(8, os.cpu_count() or 2))
SHUTDOWN = "the server is shutting down; retry on another replica or shortly"


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 16 * 2**20    # a larger body gets 413 before it is read
    max_queued: int = 1024              # requests in flight (read, parsed, waiting, running; n choices: n);
                                        # beyond: 429 + Retry-After
    api_key: str | None = None          # when set, /v1/* needs "Authorization: Bearer <key>" (401 otherwise)
    max_model_len: int | None = None    # prompt + output tokens per request (default: the model's context)
    loopback_only: bool = False         # bound to loopback: answer only Host values that name loopback (421)

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
    in_flight = [0]                      # HTTP generations being read, parsed or served, n each (event loop only)
    tokenizing = asyncio.Semaphore(TOKENIZE_CONCURRENCY)
    live: set[Choices] = set()           # the HTTP generations being answered, to end at shutdown
    draining = [False]                   # SIGTERM came: the grace period runs
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
    if limits.loopback_only:
        app.add_middleware(LoopbackHosts)
    add_handlers(app)
    app.openapi = lambda: openapi(app)      # adds the request bodies the handlers read themselves

    @app.api_route("/health", methods=["GET", "HEAD"], **route(Health, errors=(503,)))
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
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}", **route(ModelCard, errors=(404,)))
    async def model_card(model_id: str, request: Request):
        check_key(request)
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
        async with tokenizing:
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

    def check_room(more: int) -> None:
        if in_flight[0] + more > limits.max_queued:
            raise APIError(f"the server holds {in_flight[0]} requests, its limit is {limits.max_queued}; retry "
                           "shortly", 429, type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})

    async def generate(request: Request, kind: str):
        arrival = time.monotonic()          # the request's deadlines count from here
        check_key(request)
        # counted from here, before reading and tokenizing (overload costs nothing more), so that a burst
        # cannot pass the check before any of it is counted; released once, in `finally` (a stream: by sse)
        check_room(1)
        in_flight[0] += 1
        held = [1]
        try:
            raw = await read_body(request)
            # parsing and tokenizing a large body takes seconds: off the event loop, so other clients are served
            async with tokenizing:
                gen = await asyncio.to_thread(lambda: parse_generation(parse_body(raw), kind, model, qos))
            if gen.n > 1:                       # each choice is a request in the engine
                check_room(gen.n - 1)
                in_flight[0] += gen.n - 1
                held[0] = gen.n
            if draining[0]:
                raise APIError(SHUTDOWN, 503, code="server_shutdown")
            choices = await start(gen, arrival)
            writer = ResponseWriter(gen, model.tokenizer)
            if gen.stream:
                live.add(choices)
                counted, held = held, None      # released when the stream ends, or if it never starts
                return StreamingResponse(sse(choices, gen, writer, counted), media_type="text/event-stream",
                                         background=BackgroundTask(release, counted, choices))
            return await collect(request, choices, gen, writer)
        finally:
            if held is not None:
                in_flight[0] -= held[0]

    async def respond(kind: str, body: dict, arrival: float | None = None) -> dict:
        """One generation from a parsed body, answered in full without HTTP (the Batch API's lines): the
        response body, or an APIError. Not counted against `max_queued`: that bound is for HTTP clients.
        Cancelling the awaiting task aborts the request."""
        arrival = time.monotonic() if arrival is None else arrival
        async with tokenizing:
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
        # a page in any browser may POST without asking first if the type is text/plain or absent: neither is
        # served (a missing Content-Type is not taken for JSON)
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json" and not kind.endswith("+json"):
            got = repr(kind) if kind else "none"
            raise APIError(f"Content-Type must be application/json, got {got} (curl: add "
                           "-H 'Content-Type: application/json')", 415)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise APIError(f"the request body is {declared} bytes; the limit is {limits.max_body_bytes}", 413)
        body = bytearray()
        try:
            async for part in request.stream():
                body += part
                if len(body) > limits.max_body_bytes:
                    raise APIError(f"the request body is over the limit of {limits.max_body_bytes} bytes", 413)
        except ClientDisconnect:            # the client left mid-body: nothing to answer, nothing to report
            client_left("before its request body was read")
            raise APIError("the client closed the connection", 499) from None
        return bytes(body)

    def client_left(when: str) -> None:
        log.debug("a client disconnected %s", when)
        if runner.metrics is not None:
            runner.metrics.client_left()

    async def watch_disconnect(request: Request, choices: Choices) -> None:
        """The body is read, so the next ASGI message is the client leaving: abort at once, and end the
        handler's wait (an aborted request gets no more events from the engine)."""
        while True:
            if (await request.receive())["type"] == "http.disconnect":
                client_left("before its response was complete")
                stop(choices, Event("", 0, finish_reason="abort"))
                return

    def stop(choices: Choices, event: Event) -> None:
        """End a request's choices now with `event` and abort them in the engine. (Not `choices.close()`
        first: that cancels the tasks that hand `event` on, and the handler would wait for it for ever.)"""
        for stream in choices.streams:
            if stream is not None and not stream.finished:
                runner.abort(stream)
        choices.end(event)

    async def collect(request: Request | None, choices: Choices, gen: Generation, writer: ResponseWriter):
        """The whole response; `request`: the HTTP request whose client may leave (None: an internal one)."""
        answers = [Answer(gen.echo) for _ in range(gen.n)]
        failed = None
        watcher = asyncio.create_task(watch_disconnect(request, choices)) if request is not None else None
        if request is not None:
            live.add(choices)
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
            live.discard(choices)
            choices.close()
        if failed is not None:
            raise APIError(failed.error, failed.status, code="server_shutdown" if failed.error == SHUTDOWN else None)
        return writer.full(answers, usage(len(gen.prompt_ids), sum(a.num_tokens for a in answers)), choices.qos())

    async def sse(choices: Choices, gen: Generation, writer: ResponseWriter, held: list[int]):
        """`held`: what this request counts in `in_flight`, released when the stream ends."""
        first = [True] * gen.n
        made = [0] * gen.n                # tokens per choice, for the usage chunk
        ended = False
        try:
            if gen.echo:                  # the prompt first, as its own chunk
                for i in range(gen.n):
                    yield data(writer.chunk(gen.echo, first=True, index=i))
                    first[i] = False
            async for i, event in choices:
                if event.error:
                    yield data(APIError(event.error, event.status,
                                        code="server_shutdown" if event.error == SHUTDOWN else None).body())
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
            ended = True
        finally:                          # the client went away (cancelled) or the stream ended
            if not ended and not draining[0]:
                client_left("before its stream ended")
            release(held, choices)

    def release(held: list[int], choices: Choices) -> None:
        """A stream's end: its count in `in_flight` returns and its requests stop (once; the response's
        background task calls it too, for a stream that was never started)."""
        if held[0]:
            in_flight[0] -= held[0]
            held[0] = 0
            live.discard(choices)
            choices.close()

    def drain(grace_s: float) -> None:
        """SIGTERM: requests in flight get `grace_s` seconds to finish; then each still running ends with a
        503 error (a stream: an error event and [DONE]); requests that finish parsing meanwhile get 503."""
        def expire():
            for choices in list(live):
                stop(choices, Event("", 0, error=SHUTDOWN, status=503))
        draining[0] = True
        asyncio.get_running_loop().call_later(grace_s, expire)

    app.state.drain = drain

    if batches is not None:          # its lines run through `respond`
        add_batch_routes(app, batches, check_key, served_name)
    return app


class LoopbackHosts:
    """A server bound to loopback answers only requests whose Host names loopback (localhost, 127.0.0.1,
    [::1], any port): a web page that rebinds its own DNS name to 127.0.0.1 reaches the port but sends its own
    name, and gets 421 instead of the model's answers."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), None)
            if host is not None and not loopback_host(host):
                err = APIError(f"this server answers on loopback only, not for Host {host[:100]!r}; use "
                               "localhost or 127.0.0.1", 421, code="invalid_host")
                return await JSONResponse(err.body(), status_code=421)(scope, receive, send)
        await self.app(scope, receive, send)


def loopback_host(host: str) -> bool:
    """A Host header's value (host[:port]) names a loopback address."""
    name = host.strip().lower()
    if name.startswith("["):
        name = name[1:].partition("]")[0]
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    if name in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def data(body: dict) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"
