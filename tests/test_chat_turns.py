"""A chat's token usage, the embedded model's word on its languages, and one answer at a
time per conversation: through the real server and supervisor, with a scripted LLM."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from jobs import protocol as p
from jobs.store.index import JobIndex
from tests.conftest import wait_for
from tests.fake_llm import FakeLLM
from tests.server import Server

MakeServer = Callable[..., Server]
REPORTED = {"prompt_tokens": 31, "completion_tokens": 4, "total_tokens": 35}


def ask(client: httpx.Client, text: str, **extra: Any) -> str:
    answer = client.post("/api/ai_chat_async", json={
        "messages": [{"role": "user", "content": text}], **extra})
    assert answer.status_code == 200, answer.text
    return str(answer.json()["job_id"])


def final(client: httpx.Client, job_id: str, timeout: float = 60) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        job: dict[str, Any] = client.get(f"/api/jobs/{job_id}").json()
        return job if job["state"] in p.FINAL_STATES else None

    return wait_for(ended, timeout, 0.05, f"job {job_id} to end")


# -- usage -------------------------------------------------------------------------------

def test_usage_reported_or_counted_and_totalled_in_health(make_server: MakeServer) -> None:
    with FakeLLM(usage=REPORTED) as llm:
        server = make_server(env={"OPENAI_BASE_URL": llm.base_url})
        with server.client() as client:
            reported = final(client, ask(client, "How is the CPU?"))
            llm.strict = True  # now a server that refuses fields it does not know
            counted = final(client, ask(client, "And the memory?"))
            result = client.get(f"/api/ai_chat_result/{counted['id']}").json()
            totals = wait_for(lambda: (u := client.get("/api/health").json()["usage"])
                              ["chats"] == 2 and u, 10, 0.05, "both chats in the totals")
        sent = [r["body"].get("stream_options") for r in llm.requests]

    assert reported["state"] == "completed", reported
    usage = reported["result"]["usage"]
    assert usage["prompt_tokens"] == 31 and usage["completion_tokens"] == 4
    assert usage["counted"] is False and usage["tokens_per_s"] > 0

    # The refusal cost one request; the stream went on without the option.
    assert sent == [{"include_usage": True}, {"include_usage": True}, None]
    assert counted["state"] == "completed" and counted["output"] == "Hello, world."
    usage = counted["result"]["usage"]
    assert usage["counted"] is True and usage["completion_tokens"] == 4  # pieces streamed
    assert usage["prompt_tokens"] > 0 and usage["tokens_per_s"] > 0
    assert result["usage"] == usage

    assert totals["prompt_tokens"] == 31 + usage["prompt_tokens"]
    assert totals["completion_tokens"] == 8


def _write_chat(jobs_dir: Path, usage: dict[str, int]) -> str:
    job_id = p.new_id()
    data = p.new_job(job_id, "chat", {"messages": [{"role": "user", "content": "hi"}]}, 60)
    data.update({p.F_STATE: p.JobState.COMPLETED, p.F_FINISHED_AT: p.now_iso(),
                 p.F_RESULT: {"reply": "hello", "usage": usage}})
    (jobs_dir / job_id).mkdir(parents=True)
    p.write_json(jobs_dir / job_id / p.JOB_FILE, data)
    return job_id


def test_totals_count_each_chat_once_and_survive_pruning(tmp_path: Path) -> None:
    jobs_dir = tmp_path / "jobs"
    jobs_dir.mkdir()
    index = JobIndex(jobs_dir)
    first = _write_chat(jobs_dir, {"prompt_tokens": 10, "completion_tokens": 5})
    index.refresh()
    index.refresh()
    assert index.usage_totals()["chats"] == 1
    shutil.rmtree(jobs_dir / first)  # pruned
    _write_chat(jobs_dir, {"prompt_tokens": 1, "completion_tokens": 2})
    index.refresh()
    totals = index.usage_totals()
    assert (totals["chats"], totals["prompt_tokens"], totals["completion_tokens"]) == (2, 11, 7)
