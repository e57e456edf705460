"""HTTP routes. Knows HTTP and the store; nothing of processes."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

VERSION = "0.1.0"

router = APIRouter(prefix="/api")


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    settings = request.app.state.settings
    return {"status": "ok", "version": VERSION, "max_concurrent": settings.max_concurrent}
