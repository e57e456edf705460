"""A query parameter or header a route takes once, sent more than once, is a 422: the
framework took one of them quietly (`fields=summary&fields=full` answered in full)."""

from __future__ import annotations

import typing
from typing import Any

from fastapi import HTTPException, Request


async def each_given_once(request: Request) -> None:
    dependant = getattr(request.scope.get("route"), "dependant", None)
    for where, params, sent in (
            ("query", getattr(dependant, "query_params", []), request.query_params.getlist),
            ("header", getattr(dependant, "header_params", []), request.headers.getlist)):
        for param in params:
            if _takes_many(param.field_info.annotation):  # `state=a&state=b`: any of them
                continue
            times = len(sent(param.alias))
            if times > 1:
                raise HTTPException(422, f"invalid request: {where}.{param.alias}: given "
                                         f"{times} times; give it once")


def _takes_many(annotation: Any) -> bool:
    """Whether an annotation is a list (`list[JobState] | None`)."""
    return typing.get_origin(annotation) is list or any(
        _takes_many(arg) for arg in typing.get_args(annotation))
