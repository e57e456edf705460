"""Baseline: the seed's original design, the LLM call inside the async handler."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from bench.baselines.common import ChatRequest, add_common_routes, new_job, process

app = FastAPI()
add_common_routes(app)


@app.post("/api/ai_chat_async")
async def ai_chat_async(request: ChatRequest) -> dict[str, Any]:
    job_id = new_job()
    process(job_id, request.messages)  # blocks the event loop for the whole chat
    return {"job_id": job_id, "status": "processing"}
