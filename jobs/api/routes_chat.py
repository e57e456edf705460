"""The seed's chat endpoints, exactly as its frontend uses them."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Path
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from jobs import protocol as p
from jobs.api.routes_jobs import KEY_MAX_LENGTH, REFUSED, IdempotencyKey, Service
from jobs.inputs import ChatInput
from jobs.models import ChatResult, ChatResultRefused, ChatUsage, Submitted
from jobs.store.job_store import JobNotFound

router = APIRouter(prefix="/api", tags=["chat"])


@router.post("/ai_chat_async", response_model=Submitted, responses=REFUSED)
async def ai_chat_async(body: ChatInput, service: Service,
                        idempotency_key: IdempotencyKey = None) -> dict[str, Any]:
    """Start a chat; answers at once with the job id to poll. With an Idempotency-Key, the
    same question sent again answers the chat the first one started."""
    job = await service.submit("chat", body.model_dump(mode="json", exclude_none=True), None,
                               idempotency_key)
    return {"job_id": job[p.F_ID], "status": "processing"}


# Required, as the schema says (KEY_REQUIRED); read as optional so that its absence gets
# the 400 that says which key to send, rather than FastAPI's 422 "Field required".
ChatKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=KEY_MAX_LENGTH,
                                       include_in_schema=False)]
KEY_REQUIRED = {"name": "Idempotency-Key", "in": "header", "required": True,
                "description": "the key the question's POST /api/ai_chat_async was sent with",
                "schema": {"type": "string", "minLength": 1, "maxLength": KEY_MAX_LENGTH,
                           "title": "Idempotency-Key"}}


@router.get("/ai_chat_async", response_model=Submitted,
            openapi_extra={"parameters": [KEY_REQUIRED]},
            responses={400: {"description": "no Idempotency-Key header, or an empty one"},
                       404: {"description": "no chat was started with this Idempotency-Key"}})
async def chat_of_key(service: Service, idempotency_key: ChatKey = None) -> dict[str, Any]:
    """What the `POST` with this Idempotency-Key answered, without sending it again: a
    page whose answer was lost finds its turn by the key, not by the question's text."""
    if not idempotency_key:  # FastAPI's own "Field required" says nothing of which key
        raise HTTPException(400, "send the Idempotency-Key header that the question's POST "
                                 "/api/ai_chat_async was sent with: this GET answers which "
                                 "chat that key started")
    job = await run_in_threadpool(service.chat_of_key, idempotency_key)
    if job is None:
        raise HTTPException(404, "no chat was started with this Idempotency-Key (yet): "
                                 "look again in a moment, or send the question again with it")
    return {"job_id": job[p.F_ID], "status": "processing"}


def _named(session_id: str) -> None:
    """A conversation's route names one: a chat with `session_id: ""` is in none."""
    if not session_id:
        raise HTTPException(422, "name the conversation: /api/sessions/{session_id}, with "
                                 "the session_id its chats were sent with")


@router.get("/sessions/{session_id:path}")  # an id may hold a slash
async def chat_session(session_id: Annotated[str, Path(max_length=200)],
                       service: Service) -> dict[str, Any]:
    """A chat session's turns, oldest first, so a reloaded page shows the conversation."""
    _named(session_id)
    turns = await run_in_threadpool(service.session, session_id)
    return {"session_id": session_id, "turns": turns}


@router.delete("/sessions/{session_id:path}", responses={
    409: {"description": "a turn still stopping: erase again shortly"},
    507: {"description": "the data folder's disk is full: the ended turns are erased, those "
                         "answering stopped and kept: erase again once there is room"}})
async def erase_chat_session(session_id: Annotated[str, Path(max_length=200)],
                             service: Service) -> dict[str, Any]:
    """Forget a conversation: its session id is refused from then on, its answering
    turns are cancelled, then every turn is deleted from the server (questions, replies,
    logs)."""
    _named(session_id)
    erased, stopping = await service.erase_session(session_id)
    if stopping:
        raise HTTPException(409, f"erased {erased} turns; {len(stopping)} still stopping: "
                                 "erase the conversation again in a moment")
    return {"session_id": session_id, "erased": erased}


def _usage(value: object) -> ChatUsage | None:
    try:
        return None if value is None else ChatUsage.model_validate(value)
    except ValidationError:
        return None


@router.get("/ai_chat_result/{job_id}", response_model=ChatResult,
            responses={404: {"model": ChatResultRefused}})
async def ai_chat_result(job_id: str, service: Service) -> Any:
    """`processing` with its `state`, `completed` with `reply`, `error` with `message`, or
    `not_found`."""
    if not p.is_valid_id(job_id):
        refused = ChatResultRefused(status="not_found",
                                    detail="job ids are 32 lowercase hex characters")
        return JSONResponse(refused.model_dump(mode="json"), 404)
    try:
        job = await service.get(job_id)
    except JobNotFound:
        return {"status": "not_found"}
    if job.get(p.F_KIND) != "chat" and job.get(p.F_KIND) in p.BUILT_IN_KINDS:
        return {"status": "not_found"}  # a sleep or a training: no chat has that id
    state = job.get(p.F_STATE)
    if state == p.JobState.COMPLETED:
        # Not a chat's result (a kind of one's own, a hand edit): its output, no usage,
        # rather than a 500 for an answer that does not fit.
        found = job.get(p.F_RESULT)
        result: dict[str, Any] = found if isinstance(found, dict) else {}
        reply = result.get("reply")
        return {"status": "completed",
                "reply": reply if isinstance(reply, str) else job.get(p.F_OUTPUT) or "",
                "usage": _usage(result.get("usage"))}
    if state in p.FINAL_STATES:
        error = job.get(p.F_ERROR) or {}
        return {"status": "error", "message": error.get("message") or f"the chat ended {state}"}
    return {"status": "processing", "state": state}
