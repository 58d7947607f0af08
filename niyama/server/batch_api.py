"""OpenAI's Batch API: /v1/files (upload a JSONL of requests, retrieve, list, delete, download) and /v1/batches
(create, retrieve, list, cancel), in OpenAI's object shapes so that the official client works unchanged.

State lives in a data directory (batch_store.py) and survives a restart: batches in progress resume from
the lines not yet answered. Lines run in this process through app.py's `respond` (batch_runner.py), with
the completion window as their deadline. The store opens on the first Batch API request, or at start-up
when the directory already holds state (to resume it); until then the server creates nothing on disk."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse
from pydantic import Field, ValidationError

from .batch_input import ENDPOINTS, InvalidInput, format_duration, input_lines, new_id, parse_window
from .batch_runner import BatchRunner
from .batch_store import BatchStore, DataDirBusy
from .errors import APIError, from_validation
from .schemas import Body, ErrorResponse, Strict

log = logging.getLogger("niyama.server")
MULTIPART_SLACK = 64 * 1024        # an upload's bytes beyond its file's: boundaries, headers, the purpose field
MAX_CREATE_BODY = 64 * 1024


@dataclass(frozen=True)
class BatchConfig:
    data_dir: Path
    max_file_bytes: int = 200_000_000     # OpenAI's 200 MB per input file
    max_lines: int = 50_000               # OpenAI's requests per batch
    max_active: int = 100                 # batches in progress at once; beyond: 429
    max_storage_bytes: int = 10 ** 10     # uploaded files kept, in all; beyond: 400 until files are deleted
    max_files: int = 10_000               # uploaded files kept
    concurrency: int = 256                # lines in flight, over all batches
    min_window_s: float = 60.0            # shortest completion_window accepted

    def __post_init__(self):
        if min(self.max_file_bytes, self.max_lines, self.max_active, self.max_storage_bytes, self.max_files,
               self.concurrency) < 1 or not 0 < self.min_window_s <= 24 * 3600:
            raise ValueError("the Batch API's limits (--batch-max-*, --batch-concurrency) must be >= 1 and "
                             "--batch-min-window within 1s..24h")


class BatchService:
    """The store, its thread, and the runner; shared by the routes and `niyama run-batch`."""

    def __init__(self, config: BatchConfig, respond, model: str):
        self.config = config
        self.respond = respond
        self.model = model
        self.runner: BatchRunner | None = None
        self._store: BatchStore | None = None
        self._opening = asyncio.Lock()
        # SQLite calls go to one thread: serialized, and never on the event loop
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="niyama-batch-store")

    async def call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._thread, partial(fn, *args))

    async def start(self) -> None:
        """Resume the batches of an existing data directory."""
        if (Path(self.config.data_dir).expanduser() / "batches.sqlite3").exists():
            try:
                await self.store()
            except APIError as e:
                log.warning("Batch API: %s", e.message)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.stop()
        if self._store is not None:
            await self.call(self._store.close)
        self._thread.shutdown()

    async def store(self) -> BatchStore:
        async with self._opening:
            if self._store is None:
                try:
                    store = await self.call(BatchStore, self.config.data_dir)
                except DataDirBusy as e:
                    raise APIError(str(e), 503, code="data_dir_busy") from None
                except OSError as e:
                    raise APIError(f"the Batch API cannot open its data directory {self.config.data_dir}: "
                                   f"{e.strerror or e}; check --data-dir", 500) from None
                self.runner = BatchRunner(store, self.respond, self.config.concurrency, self.call)
                for batch in await self.call(store.active_batches):
                    log.info("batch %s: resuming (%s)", batch["id"], batch["status"])
                    self.runner.launch(batch)
                self._store = store
        return self._store

    async def add_file(self, source: Path, filename: str) -> dict:
        """A local file as an uploaded batch input (`niyama run-batch`)."""
        store = await self.store()
        file_id, part = store.new_upload()
        await asyncio.to_thread(shutil.copyfile, source, part)
        return await self.call(store.add_file, file_id, part, filename, "batch")

    async def file(self, file_id: str, param: str = "file_id") -> dict:
        store = await self.store()
        found = await self.call(store.get_file, file_id)
        if found is None:
            raise APIError(f"no file with id {file_id!r}", 404, param=param, code="file_not_found",
                           type="not_found_error")
        return found

    async def batch(self, batch_id: str) -> dict:
        store = await self.store()
        found = await self.call(store.get_batch, batch_id)
        if found is None:
            raise APIError(f"no batch with id {batch_id!r}", 404, param="batch_id", code="batch_not_found",
                           type="not_found_error")
        return found

    async def create(self, input_file_id: str, endpoint: str, completion_window: str,
                     metadata: dict | None = None) -> dict:
        if endpoint not in ENDPOINTS:
            raise APIError(f"endpoint {endpoint!r} is not supported: use {' or '.join(ENDPOINTS)}", param="endpoint",
                           code="invalid_endpoint")
        window_s = parse_window(completion_window, self.config.min_window_s)
        store = await self.store()
        file = await self.file(input_file_id, "input_file_id")
        if file["purpose"] != "batch":
            raise APIError(f"file {input_file_id!r} has purpose {file['purpose']!r}; a batch's input must be uploaded "
                           "with purpose 'batch'", param="input_file_id", code="invalid_file_purpose")
        running = await self.call(store.count_active)
        if running >= self.config.max_active:
            raise APIError(f"{running} batches are in progress, this server's limit (--batch-max-active); wait for one "
                           "to finish or cancel one", 429, type="rate_limit_error", code="too_many_batches",
                           headers={"Retry-After": "60"})
        created = time.time()
        row = {"id": new_id("batch_"), "endpoint": endpoint, "model": self.model, "input_file_id": input_file_id,
               "completion_window": format_duration(window_s), "deadline": created + window_s, "created_at": int(created),
               "metadata": json.dumps(metadata) if metadata else None}
        lines = input_lines(store.file_path(input_file_id), endpoint, self.config.max_lines)
        try:
            batch = await self.call(store.create_batch, row, lines)
        except InvalidInput as e:
            return await self.call(store.create_failed_batch, row, e.errors)
        except FileNotFoundError:          # deleted meanwhile
            raise APIError(f"no file with id {input_file_id!r}", 404, param="input_file_id",
                           code="file_not_found", type="not_found_error") from None
        self.runner.launch(batch)
        return batch

    async def cancel(self, batch_id: str) -> dict:
        batch = await self.batch(batch_id)
        if batch["status"] in ("in_progress", "cancelling"):
            if await self.call(self._store.move, batch_id, "in_progress", "cancelling"):
                self.runner.cancel(await self.batch(batch_id))
            return await self.batch(batch_id)
        raise APIError(f"batch {batch_id!r} is {batch['status']}; only a batch in progress can be cancelled", 409,
                       param="batch_id", code="batch_not_cancellable")


# --- the objects, for FastAPI's serialization and the OpenAPI schema ------------------------------------------

class FileObject(Body):
    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str
    expires_at: int | None = None
    status_details: str | None = None


class Page(Body):
    """OpenAI's cursor-paged list (`after`, `limit`)."""
    object: Literal["list"]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class FileList(Page):
    data: list[FileObject]


class FileDeleted(Body):
    id: str
    object: Literal["file"]
    deleted: bool


class BatchError(Body):
    code: str | None = None
    message: str | None = None
    param: str | None = None
    line: int | None = None


class BatchErrors(Body):
    object: Literal["list"]
    data: list[BatchError]


class RequestCounts(Body):
    total: int
    completed: int
    failed: int


class BatchObject(Body):
    id: str
    object: Literal["batch"]
    endpoint: str
    model: str | None = None
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: Literal["validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling",
                    "cancelled"]
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts
    metadata: dict[str, str] | None = None
    usage: dict | None = Field(None, description="tokens of the answered lines (OpenAI's BatchUsage)")


class BatchList(Page):
    data: list[BatchObject]


class BatchCreateRequest(Strict):
    input_file_id: str = Field(description="the id of a file uploaded with purpose 'batch'")
    endpoint: str = Field(description="/v1/chat/completions or /v1/completions: every line's url")
    completion_window: str = Field(description="'24h', or shorter: '<N>h', '<N>m' (from the server's "
                                               "--batch-min-window); the lines' deadline")
    metadata: dict[str, str] | None = Field(None, description="up to 16 string pairs kept with the batch")


ERROR_WORDS = {400: "invalid request (error.param names the field)", 401: "missing or wrong API key",
               404: "no such file or batch", 409: "the batch is not in progress", 413: "file too large",
               415: "not multipart/form-data or JSON", 429: "too many batches in progress",
               503: "the data directory is in use by another server"}


def responses(*codes: int) -> dict:
    return {code: {"model": ErrorResponse, "description": ERROR_WORDS[code]} for code in codes}


UPLOAD_SCHEMA = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"],
    "properties": {"file": {"type": "string", "format": "binary", "description": "the JSONL of requests"},
                   "purpose": {"type": "string", "enum": ["batch"]}}}}}}}


def add_batch_routes(app: FastAPI, config: BatchConfig, check_key, model: str) -> BatchService:
    """The Batch API's routes on `app` (built by app.build_app, whose `respond` runs the lines); the service
    starts and stops with the app."""
    service = BatchService(config, app.state.respond, model)
    app.state.batches = service
    serving = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a):
        async with serving(a) as state:       # the engine first: resumed lines need it
            await service.start()
            try:
                yield state
            finally:
                await service.stop()

    app.router.lifespan_context = lifespan

    @app.post("/v1/files", response_model=FileObject, openapi_extra=UPLOAD_SCHEMA,
              responses=responses(400, 401, 413, 415, 503))
    async def upload(request: Request):
        check_key(request)
        kind = request.headers.get("content-type", "")
        if not kind.lower().startswith("multipart/form-data"):
            raise APIError("send the file as multipart/form-data with the fields file and purpose (curl: -F "
                           "purpose=batch -F file=@requests.jsonl)", 415)
        cap = config.max_file_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cap + MULTIPART_SLACK:
            raise APIError(too_large(cap), 413, code="file_too_large")
        store = await service.store()
        count, used = await service.call(store.stored_uploads)
        if count >= config.max_files or used >= config.max_storage_bytes:
            raise APIError(storage_full(count, used, config), code="storage_limit_exceeded")
        form = await read_form(request, cap + MULTIPART_SLACK)
        try:
            purpose, file = form.get("purpose"), form.get("file")
            if file is None or isinstance(file, str):
                raise APIError("file is required: the JSONL of requests, as a file field", param="file")
            if purpose != "batch":
                given = "is required" if purpose is None else f"{purpose!r} is not supported"
                raise APIError(f"purpose {given}: this server keeps files for the Batch API only; use 'batch'",
                               param="purpose", code="invalid_purpose")
            file_id, part = store.new_upload()
            size = await asyncio.to_thread(save_upload, file.file, part, cap)
            if size > cap or size == 0 or used + size > config.max_storage_bytes:
                part.unlink(missing_ok=True)
                if size > cap:
                    raise APIError(too_large(cap), 413, code="file_too_large")
                if size == 0:
                    raise APIError("the file is empty: give one request per line", param="file", code="empty_file")
                raise APIError(storage_full(count, used, config), code="storage_limit_exceeded")
            return await service.call(store.add_file, file_id, part, file.filename or "upload.jsonl", "batch")
        finally:
            await form.close()

    @app.get("/v1/files", response_model=FileList, responses=responses(400, 401, 503))
    async def list_files(request: Request, after: str | None = None, limit: int = Query(10_000, ge=1, le=10_000),
                         order: Literal["asc", "desc"] = "desc", purpose: str | None = None):
        check_key(request)
        store = await service.store()
        return page(*await service.call(store.list_files, after, limit, order, purpose))

    @app.get("/v1/files/{file_id}", response_model=FileObject, responses=responses(401, 404, 503))
    async def retrieve_file(request: Request, file_id: str):
        check_key(request)
        return await service.file(file_id)

    @app.delete("/v1/files/{file_id}", response_model=FileDeleted, responses=responses(401, 404, 503))
    async def delete_file(request: Request, file_id: str):
        check_key(request)
        await service.file(file_id)
        store = await service.store()
        return {"id": file_id, "object": "file", "deleted": await service.call(store.delete_file, file_id)}

    @app.get("/v1/files/{file_id}/content", response_class=FileResponse,
             responses={200: {"description": "the file's bytes (JSONL)",
                               "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                   "format": "binary"}}}},
                        **responses(401, 404, 503)})
    async def file_content(request: Request, file_id: str):
        check_key(request)
        file = await service.file(file_id)
        store = await service.store()
        return FileResponse(store.file_path(file_id), media_type="application/octet-stream",
                            filename=file["filename"])

    @app.post("/v1/batches", response_model=BatchObject, responses=responses(400, 401, 404, 413, 415, 429, 503),
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": BatchCreateRequest.model_json_schema()}}}})
    async def create_batch(request: Request):
        check_key(request)
        body = await read_json(request)
        try:
            req = BatchCreateRequest.model_validate(body)
        except ValidationError as e:
            raise from_validation(list(e.errors()), BatchCreateRequest.model_fields) from None
        check_metadata(req.metadata)
        return await service.create(req.input_file_id, req.endpoint, req.completion_window, req.metadata)

    @app.get("/v1/batches", response_model=BatchList, responses=responses(400, 401, 503))
    async def list_batches(request: Request, after: str | None = None, limit: int = Query(20, ge=1, le=100)):
        check_key(request)
        store = await service.store()
        return page(*await service.call(store.list_batches, after, limit))

    @app.get("/v1/batches/{batch_id}", response_model=BatchObject, responses=responses(401, 404, 503))
    async def retrieve_batch(request: Request, batch_id: str):
        check_key(request)
        return await service.batch(batch_id)

    @app.post("/v1/batches/{batch_id}/cancel", response_model=BatchObject, responses=responses(401, 404, 409, 503))
    async def cancel_batch(request: Request, batch_id: str):
        check_key(request)
        return await service.cancel(batch_id)

    return service


def page(data: list[dict], has_more: bool) -> dict:
    return {"object": "list", "data": data, "has_more": has_more, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}


def too_large(cap: int) -> str:
    return (f"the file is over {cap:,} bytes, this server's limit per file (--batch-max-file-bytes); split it into "
            "several files")


def storage_full(count: int, used: int, config: BatchConfig) -> str:
    return (f"this server keeps at most {config.max_files:,} uploaded files and {config.max_storage_bytes:,} bytes "
            f"(--batch-max-storage-bytes) and holds {count:,} files, {used:,} bytes: delete files you no longer need "
            "(DELETE /v1/files/ID)")


def save_upload(source, target: Path, cap: int) -> int:
    """Copy an upload into the data directory, stopping once it is over `cap`: the bytes copied."""
    size = 0
    with open(target, "wb") as out:
        while block := source.read(1 << 20):
            size += len(block)
            if size > cap:
                break
            out.write(block)
    return size


async def read_form(request: Request, cap: int):
    """The multipart form, its bytes counted as they arrive: 413 past `cap` without reading the rest."""
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def limited():
        seen = 0
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > cap:
                raise APIError(too_large(cap - MULTIPART_SLACK), 413, code="file_too_large")
            yield chunk

    try:
        return await MultiPartParser(request.headers, limited(), max_files=1, max_fields=8).parse()
    except MultiPartException as e:
        raise APIError(f"the upload is not valid multipart/form-data ({e}); send the fields file and purpose") from None


async def read_json(request: Request) -> dict:
    kind = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if kind != "application/json":
        raise APIError(f"Content-Type must be application/json, got {kind!r}", 415)
    raw = bytearray()
    async for part in request.stream():
        raw += part
        if len(raw) > MAX_CREATE_BODY:
            raise APIError(f"the request body is over {MAX_CREATE_BODY} bytes; a batch is created from a file id", 413)
    try:
        body = json.loads(raw)
    except ValueError:
        raise APIError("the request body is not valid JSON; send an object with input_file_id, endpoint and "
                       "completion_window") from None
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    return body


def check_metadata(metadata: dict | None) -> None:
    """OpenAI's bounds: 16 pairs, keys of 64 characters, values of 512."""
    if not metadata:
        return
    if len(metadata) > 16:
        raise APIError(f"metadata has {len(metadata)} keys; at most 16", param="metadata")
    for key, value in metadata.items():
        if len(key) > 64 or len(value) > 512:
            raise APIError(f"metadata {key[:64]!r}: keys are at most 64 characters and values 512", param="metadata")


__all__ = ["BatchConfig", "BatchService", "add_batch_routes"]
