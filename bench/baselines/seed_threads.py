"""Baseline: the seed's sketch, an in-process dict and a background task in the thread pool."""

from __future__ import annotations

from typing import Any

from fastapi import BackgroundTasks, FastAPI

from bench.baselines.common import ChatRequest, add_common_routes, new_job, process

app = FastAPI()
add_common_routes(app)


@app.post("/api/ai_chat_async")
async def ai_chat_async(request: ChatRequest, background_tasks: BackgroundTasks) -> dict[str, Any]:
    job_id = new_job()
    background_tasks.add_task(process, job_id, request.messages)  # sync: runs in a thread
    return {"job_id": job_id, "status": "processing"}
