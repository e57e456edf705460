"""`/openapi.json` as the API answers: every error is `{"detail": "<what went wrong and
what to do>"}` (FastAPI would describe a 422 as its own list of errors, which a client
generated from the description then fails to read), and the refusals any request can
meet (`jobs.api.guards`) are listed on every route."""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI

DETAIL = {"title": "Detail", "type": "object", "required": ["detail"],
          "properties": {"detail": {"title": "Detail", "type": "string",
                                    "description": "what went wrong and what to do"}}}
DETAIL_REF = {"application/json": {"schema": {"$ref": "#/components/schemas/Detail"}}}
UNFIT = "the request does not fit the route: `detail` names each field and what to send"
ANY_REQUEST = {
    "400": "a control character in the path, more than one `Origin` or `Authorization` "
           "header, or a body that cannot be read as JSON",
    "401": "`OFFLOAD_API_TOKEN` is set and the request did not send it as "
           "`Authorization: Bearer <token>`",
    "403": "without a token: a request not from a loopback address, or from another local "
           "account; or a change asked for by a page of another origin",
    "413": "a body over 1 MB",
    "421": "without a token: a `Host` that names neither loopback nor "
           "`OFFLOAD_ALLOWED_HOSTS`",
    "503": "without a token: the server is short of file descriptors and could not tell "
           "whose connection this is; retry in a moment",
}
FRAMEWORK_422 = "Validation Error"  # FastAPI's description of its own 422
FRAMEWORK_SCHEMAS = ("HTTPValidationError", "ValidationError")


def install(app: FastAPI) -> None:
    framework_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            describe_errors(framework_openapi())  # kept by the framework: done once
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


def describe_errors(schema: dict[str, Any]) -> None:
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    for name in FRAMEWORK_SCHEMAS:
        schemas.pop(name, None)
    schemas["Detail"] = copy.deepcopy(DETAIL)
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            if responses.get("422", {}).get("description") == FRAMEWORK_422:
                responses["422"] = {"description": UNFIT}  # its list of errors goes too
            for status, description in ANY_REQUEST.items():
                response = responses.setdefault(status, {})
                own = response.get("description")
                response["description"] = f"{own}; or {description}" if own else description
            for status, response in responses.items():
                if status[0] in "45":
                    response.setdefault("content", copy.deepcopy(DETAIL_REF))
            operation["responses"] = dict(sorted(responses.items()))
