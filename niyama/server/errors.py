"""OpenAI-style errors: a status code and `{"error": {"message", "type", "param", "code"}}`; the one place
that turns a validation error, an HTTP error or a crash into that body."""

from __future__ import annotations

import json
import logging
import uuid

log = logging.getLogger("niyama.server")


class APIError(Exception):
    def __init__(self, message: str, status: int = 400, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.headers = headers or {}
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


MUST = {   # pydantic error type -> what the value must be (formatted with the error's ctx)
    "int_type": "an integer", "float_type": "a number", "bool_type": "true or false", "string_type": "a string",
    "list_type": "a list", "dict_type": "an object", "model_type": "an object", "finite_number": "a finite number",
    "greater_than": "> {gt}", "greater_than_equal": "at least {ge}", "less_than": "< {lt}",
    "less_than_equal": "at most {le}", "too_short": "a list of at least {min_length}", "string_too_short": "non-empty",
    "expected": "{hint}",     # schemas.expect: the field's own words
}


def from_validation(errors: list[dict], fields: dict | None = None) -> APIError:
    """A 400 for the first of pydantic's `errors`: `param` is its location ("messages[0].content") and the
    message says what to send. `fields` (a model's `model_fields`): a missing field's description is the hint."""
    err = errors[0]
    param = location(err["loc"])
    kind = err["type"]
    ctx = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in (err.get("ctx") or {}).items()}
    if kind == "missing":    # (its input is the whole body)
        hint = getattr((fields or {}).get(param), "description", None)
        return APIError(f"{param} is required" + (f": {hint}" if hint else ""), param=param)
    got = shown(err.get("input"))
    if kind == "literal_error":
        message = f"{param} {got} is not supported; use {ctx['expected']}"
    elif kind in MUST:
        message = f"{param} must be {MUST[kind].format(**ctx)}, got {got}"
    else:                    # a rarer check: pydantic's own words
        message = f"{param}: {err['msg']}, got {got}"
    return APIError(message, param=param or None)


def location(loc: tuple) -> str:
    """("messages", 0, "content") -> "messages[0].content"; FastAPI's leading "body"/"path" is dropped."""
    parts = list(loc[1:] if loc and loc[0] in ("body", "path", "query", "header") else loc)
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out


def shown(value) -> str:
    """A bad value as the message quotes it, cut short (a long list's or object's start only: a body may
    hold megabytes)."""
    if isinstance(value, (list, dict)) and len(value) > 8:
        start = value[:8] if isinstance(value, list) else dict(list(value.items())[:8])
        return shown(start)[:56] + " ..."
    text = repr(value) if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def add_handlers(app) -> None:
    """Every error an app raises leaves as OpenAI-style JSON; a crash's details stay in the log."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    def answer(err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return answer(exc)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return answer(APIError(str(exc.detail), exc.status_code, headers=exc.headers,
                               type="not_found_error" if exc.status_code == 404 else None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        return answer(from_validation(list(exc.errors())))

    @app.exception_handler(Exception)
    async def server_error(request, exc: Exception):
        ref = uuid.uuid4().hex[:12]
        log.exception("unhandled error (request %s)", ref)
        return answer(APIError(f"internal error (request {ref}); the server log has the details", 500))
