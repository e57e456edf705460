"""What both baseline apps share: the seed's in-process result dict and its LLM call."""

from __future__ import annotations

import json
import os
import urllib.request
import uuid
from typing import Any

import psutil
from fastapi import FastAPI
from pydantic import BaseModel

results: dict[str, dict[str, Any]] = {}  # job_id -> result, lost on every restart


class ChatRequest(BaseModel):
    messages: list[dict[str, str]]
    session_id: str | None = None


def chat_blocking(messages: list[dict[str, str]]) -> str:
    """The seed's `chat_with_expert_sync`: one streamed completion, read to the end."""
    body = json.dumps({"messages": messages, "stream": True}).encode()
    request = urllib.request.Request(f"{os.environ['OPENAI_BASE_URL']}/chat/completions",
                                     data=body, headers={"Content-Type": "application/json"})
    parts = []
    with urllib.request.urlopen(request, timeout=120) as response:
        for raw in response:
            line = raw.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                delta = json.loads(line[6:])["choices"][0]["delta"]
                parts.append(delta.get("content") or "")
    return "".join(parts)


def process(job_id: str, messages: list[dict[str, str]]) -> None:
    try:
        results[job_id] = {"status": "completed", "reply": chat_blocking(messages)}
    except Exception as exc:
        results[job_id] = {"status": "error", "message": str(exc)}


def new_job() -> str:
    job_id = uuid.uuid4().hex
    results[job_id] = {"status": "processing"}
    return job_id


def add_common_routes(app: FastAPI) -> None:
    psutil.cpu_percent(None)

    @app.get("/api/history")
    async def history() -> dict[str, Any]:
        mem = psutil.virtual_memory()
        counts: dict[str, int] = {}
        for result in results.values():
            counts[result["status"]] = counts.get(result["status"], 0) + 1
        return {"cpu": psutil.cpu_percent(None), "mem": mem.percent, "counts": counts}

    @app.get("/api/ai_chat_result/{job_id}")
    async def result(job_id: str) -> dict[str, Any]:
        return results.get(job_id, {"status": "not_found"})
