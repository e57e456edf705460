"""Own errors to HTTP answers, in one place: `{"detail": "<what went wrong and what to do>"}`."""

from __future__ import annotations

import json
import logging
import typing
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from pydantic_core import to_json
from starlette.exceptions import HTTPException as StarletteHTTPException

from jobs import protocol as p
from jobs.api.admission import Overloaded
from jobs.api.chat_turns import BeingForgotten, TurnGone
from jobs.api.events import public
from jobs.api.guards import route_path
from jobs.api.idempotency_keys import IdempotencyConflict, KeyInFlight
from jobs.api.service import BatchStopped, NotRerunnable
from jobs.api.stops import AlreadyFinished, NotRemoved, StillNeeded
from jobs.kinds import InvalidInput, UnknownKind, error_location
from jobs.settings import problem_said
from jobs.store.dependency_lock import DependenciesBusy
from jobs.store.job_store import JobNotFound, StoreUnavailable

log = logging.getLogger(__name__)
SEND_JSON = "send a JSON object with the header Content-Type: application/json"
# Pydantic's error types for a body that is missing or no object (not those of a check of
# the whole object, "give run_at or delay_s, not both": that body was JSON).
NOT_AN_OBJECT = frozenset({"missing", "model_attributes_type", "model_type", "dict_type"})
# Pydantic's error types for a number out of bounds, or none at all (NaN, "abc").
NOT_IN_BOUNDS = frozenset({"greater_than", "greater_than_equal", "less_than",
                           "less_than_equal", "finite_number", "float_parsing", "float_type"})
# Pydantic's error types for a time it cannot read ("23:59", "tomorrow"): it says why, not how.
NOT_A_TIME = frozenset({"datetime_from_date_parsing", "datetime_parsing", "datetime_type"})
NOTHING_STORED = "Nothing was stored."  # a refusal for room, of a job alone
FREE_SPACE = "the data folder's disk is full: free some space on it"  # a 507's
FREE_SPACE_ADVICE = f"{FREE_SPACE}, then retry"


class _Answer(JSONResponse):
    """JSON as a job's `GET` answers it: a NaN a runner wrote (no JSON) is null."""

    def render(self, content: Any) -> bytes:
        return to_json(content, inf_nan_mode="null")


def _detail(status: int, detail: str, **extra: Any) -> JSONResponse:
    return _Answer({"detail": detail, **extra}, status_code=status)


def methods_at(request: Request, literal: bool = False) -> set[str]:
    """The methods of the API's routes on the request's path; `literal`: only of those
    whose path has no parameter (`/api/jobs/batch`, not `/api/jobs/{job_id}`)."""
    path = route_path(request.scope)
    return {method for route in request.app.state.api_routes
            if route.path_regex.match(path) and not (literal and route.param_convertors)
            for method in route.methods}


def not_allowed(request: Request, methods: set[str]) -> Response:
    """A 405 naming the methods the path takes (an OPTIONS: their list alone)."""
    if "GET" in methods:
        methods = {*methods, "HEAD"}  # the guard answers it as a GET without the body
    allow = {"Allow": ", ".join(sorted({*methods, "OPTIONS"}))}
    if request.method == "OPTIONS":
        return Response(status_code=204, headers=allow)
    path = route_path(request.scope)[:104]
    return JSONResponse({"detail": f"{path} takes {', '.join(sorted(methods))}, not "
                                   f"{request.method}"}, status_code=405, headers=allow)


async def _not_found(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, JobNotFound)
    if p.is_valid_id(exc.job_id):  # a job's id as given: that job is gone, not mistyped
        return _detail(404, f"{exc} (removed, pruned, or never submitted here)")
    if methods := methods_at(request, literal=True):
        return not_allowed(request, methods)  # `GET /api/jobs/batch`: no job id, a route
    return _detail(404, f"{exc}; job ids are 32 lowercase hex characters, as returned "
                        "when the job was submitted")


async def _unprocessable(request: Request, exc: Exception) -> JSONResponse:
    return _detail(422, str(exc))


async def _conflict(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AlreadyFinished)
    return _detail(409, f"{exc}: there is nothing to cancel", job=public(exc.job))


async def _refused(request: Request, exc: Exception) -> JSONResponse:
    return _detail(409, str(exc))


async def _gone(request: Request, exc: Exception) -> JSONResponse:
    return _detail(410, str(exc))


async def _try_again_soon(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "1"})


async def _key_in_flight(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=409, headers={"Retry-After": "1"})


async def _overloaded(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Overloaded)
    log.info("submission refused: %s", exc)
    return JSONResponse({"detail": f"{exc}. {NOTHING_STORED}"}, status_code=429,
                        headers={"Retry-After": str(exc.retry_after_s)})


async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    log.error("store unavailable: %s", exc)
    assert isinstance(exc, StoreUnavailable)
    if not exc.standing:  # /api/health says so; a standing problem it says by itself
        request.app.state.service.failed_to_write(str(exc))
    if exc.disk_full:
        return _detail(507, f"{exc}. {exc.outcome}; "
                            f"{FREE_SPACE_ADVICE if exc.retry else FREE_SPACE}.")
    return _detail(503, f"{exc}. {exc.outcome}; check that the data folder exists, is "
                        "writable and has free space, then retry.")


async def _validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = []
    listed: set[tuple[Any, ...]] = set()  # the places whose fields taken are said already
    for error in exc.errors()[:8]:
        loc = tuple(error.get("loc", ()))
        where = error_location(part for part in loc if part != "body")
        if error.get("type") == "json_invalid":  # loc: ("body", the character)
            reason = (error.get("ctx") or {}).get("error")
            problems.append(f"the body is not valid JSON ({reason} at character {where}); "
                            f"{SEND_JSON}")
        elif error.get("type") == "string_unicode":  # "unable to parse raw data as a …"
            # No place: the name of one of the body's own fields is no text.
            problems.append(f"{where}: {p.NOT_TEXT}" if where else f"a field's name {p.NOT_TEXT}")
        elif loc == ("body",) and error.get("type") in NOT_AN_OBJECT:  # or another Content-Type
            problems.append(f"body: {error.get('msg')}; {SEND_JSON}")
        elif (error.get("type") in NOT_IN_BOUNDS and loc[:1] == ("query",)
              and (bounds := _number_bounds(request, str(loc[-1]))) is not None):
            problems.append(f"{where}: must be a number {bounds}")
        elif error.get("type") == "extra_forbidden" and loc[:1] == ("body",):
            taken = "" if loc[1:-1] in listed else _fields_taken(request, loc[1:-1])
            listed.add(loc[1:-1])
            problems.append(f"{where}: {error.get('msg')}{taken}")
        elif error.get("type") in NOT_A_TIME:
            problems.append(f"{where}: not a time: give it in ISO 8601, such as "
                            "2026-12-24T18:00:00Z (UTC unless it names its zone)")
        else:
            problems.append(f"{where or 'body'}: {problem_said(error)}")
    return _detail(422, "invalid request: " + "; ".join(problems))


def _number_bounds(request: Request, name: str) -> str | None:
    """The bounds of the route's float query parameter `name`, said "from 0 to 60"; None
    for another. Pydantic says one bound, the one it tried: "less than or equal to 60"
    for wait_s=nan, which is no number at all."""
    dependant = getattr(request.scope.get("route"), "dependant", None)
    for field in getattr(dependant, "query_params", ()):
        if field.alias == name and field.field_info.annotation is float:
            limits = {key: getattr(each, key) for each in field.field_info.metadata
                      for key in ("gt", "ge", "lt", "le") if hasattr(each, key)}
            if {"ge", "le"} <= limits.keys():
                return f"from {limits['ge']:g} to {limits['le']:g}"
            said = {"gt": "above", "ge": "at least", "lt": "below", "le": "at most"}
            return " and ".join(f"{said[key]} {value:g}" for key, value in limits.items())
    return None


def _fields_taken(request: Request, path: tuple[Any, ...]) -> str:
    """" (jobs.0 takes only: kind, input, ...)": the fields of the body's object at `path`,
    where a field unknown to it was sent; "" where that object is no model."""
    dependant = getattr(request.scope.get("route"), "dependant", None)
    bodies: list[Any] = getattr(dependant, "body_params", [])
    model = _model_in(bodies[0].field_info.annotation) if len(bodies) == 1 else None
    for part in path:
        if model is None:
            return ""
        if not isinstance(part, int):  # an int: an item of a list, of the list's model
            field = model.model_fields.get(str(part))
            model = _model_in(field.annotation) if field is not None else None
    if model is None:
        return ""
    where = error_location(path) or "the body"
    return f" ({where} takes only: {', '.join(model.model_fields)})"


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The model an annotation holds: `JobRerun | None`, `list[JobCreate]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((model for arg in typing.get_args(annotation)
                 if (model := _model_in(arg)) is not None), None)


async def _http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    headers = getattr(exc, "headers", None)
    detail = exc.detail
    if exc.status_code == 400 and isinstance(exc.__cause__, (ValueError, RecursionError)):
        # FastAPI's own "There was an error parsing the body" says nothing of what to do.
        detail = (f"the body cannot be read as JSON: {SEND_JSON}, in UTF-8, not nested "
                  "hundreds of levels deep, with no number of thousands of digits")
    return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=headers)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # A bug: the whole story goes to the log, never to the user.
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return _detail(500, "internal error; the server log has the details")


async def _batch_stopped(request: Request, exc: Exception) -> JSONResponse:
    """As its job's error alone would be answered, saying which jobs were stored before it."""
    assert isinstance(exc, BatchStopped)
    handler = next(HANDLERS[each] for each in type(exc.cause).__mro__ if each in HANDLERS)
    alone = await handler(request, exc.cause)
    answer = json.loads(bytes(alone.body))  # its fields kept
    # A batch says instead which of its jobs were stored: some may have been.
    said = answer["detail"].removesuffix(f" {NOTHING_STORED}").rstrip()
    answer["detail"] = (f"jobs[{exc.at}]: {said}{'' if said.endswith('.') else '.'} "
                        f"{exc.what_was_stored()}")
    answer["stored"] = exc.stored
    retry_after = {k: v for k, v in alone.headers.items() if k.lower() == "retry-after"}
    return _Answer(answer, status_code=alone.status_code, headers=retry_after)


Handler = Callable[[Request, Exception], Awaitable[Response]]
HANDLERS: dict[type[Exception], Handler] = {
    JobNotFound: _not_found, UnknownKind: _unprocessable, InvalidInput: _unprocessable,
    IdempotencyConflict: _unprocessable, AlreadyFinished: _conflict, NotRerunnable: _refused,
    BeingForgotten: _refused, TurnGone: _gone, StillNeeded: _refused,
    NotRemoved: _try_again_soon, DependenciesBusy: _try_again_soon,
    KeyInFlight: _key_in_flight, Overloaded: _overloaded, StoreUnavailable: _unavailable,
    BatchStopped: _batch_stopped, RequestValidationError: _validation,
    StarletteHTTPException: _http, Exception: _unexpected}


def install(app: FastAPI) -> None:
    for exception, handler in HANDLERS.items():
        app.add_exception_handler(exception, handler)
