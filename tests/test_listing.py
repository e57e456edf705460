"""`GET /api/jobs?fields=summary`, the listing a table polls, against a real uvicorn server."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from jobs.api.summary import BULKY, INPUT_PREVIEW_CHARS
from tests.conftest import wait_job
from tests.fake_llm import FakeLLM
from tests.server import Server

# A long conversation: four turns of 90,000 characters, within a request's 1 MB.
CONVERSATION = [{"role": "user" if i % 2 == 0 else "assistant",
                 "content": f"turn {i} " + "x" * 90_000} for i in range(4)]


@pytest.fixture
def server(make_server: Callable[..., Server]) -> Iterator[Server]:
    with FakeLLM(pieces=["Fine ", "thanks."], delay_s=0.05) as llm:
        yield make_server(env={"OPENAI_BASE_URL": llm.base_url})


def compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def test_a_summary_lists_each_job_but_its_bulky_parts(server: Server) -> None:
    with server.client() as client:
        chat = client.post("/api/jobs", json={"kind": "chat", "input": {
            "messages": CONVERSATION, "expert": False}}).json()["id"]
        nap = client.post("/api/jobs", json={"kind": "sleep",
                                             "input": {"seconds": 0}}).json()["id"]
        for job_id in (chat, nap):
            assert wait_job(client, job_id)["state"] == "completed"
        full = client.get("/api/jobs")
        brief = client.get("/api/jobs", params={"fields": "summary"})
        assert full.status_code == brief.status_code == 200
        assert client.get("/api/jobs", params={"fields": "full"}).json() == full.json()

    assert len(full.content) > 300_000 and len(brief.content) < 3_000, \
        f"{len(full.content)} bytes in full, {len(brief.content)} summarised"
    listed = {job["id"]: job for job in full.json()["jobs"]}
    summed = {job["id"]: job for job in brief.json()["jobs"]}
    assert list(summed) == list(listed) == [nap, chat]
    for job_id, job in listed.items():
        short = summed[job_id]
        assert set(short) == set(job), "every field, as in full"
        assert {k: v for k, v in short.items() if k not in {*BULKY, "input_preview"}} == \
            {k: v for k, v in job.items() if k not in {*BULKY, "input_preview"}}
        assert short["input"] is short["output"] is short["loss_curve"] is None
        assert job["input_preview"] is None, "a job in full has its whole input"
    assert listed[chat]["output"] == "Fine thanks." and listed[chat]["result"]["reply"]
    # The tokens column's counts stay; the reply goes.
    assert summed[chat]["result"] == {"usage": listed[chat]["result"]["usage"]}
    assert summed[chat]["result"]["usage"]["completion_tokens"] == 2
    assert summed[nap]["result"] is None, "the sleep's result (its input echoed) goes"
    assert summed[nap]["input_preview"] == compact(listed[nap]["input"]), "short: whole"
    preview = summed[chat]["input_preview"]
    assert len(preview) == INPUT_PREVIEW_CHARS and preview.endswith("…")
    assert compact(listed[chat]["input"]).startswith(preview[:-1])


def test_a_summary_pages_and_filters_as_the_full_listing(server: Server) -> None:
    with server.client() as client:
        ids = [client.post("/api/jobs", json={"kind": "sleep", "input": {"seconds": 0}})
               .json()["id"] for _ in range(3)]
        client.post("/api/jobs", json={"kind": "probe", "input": {}})
        for job_id in ids:
            wait_job(client, job_id)

        def pages(**query: Any) -> list[tuple[list[str], str | None]]:
            found, before = [], None
            while True:
                asked = {"kind": "sleep", "limit": 2, **query}
                page = client.get("/api/jobs", params={
                    **asked, **({"before": before} if before else {})}).json()
                found.append(([job["id"] for job in page["jobs"]], page["next_before"]))
                before = page["next_before"]
                if before is None:
                    return found

        summed = pages(fields="summary")
        assert summed == pages(), "the same pages, the same cursors"
        assert [job_id for page, _ in summed for job_id in page] == ids[::-1]


def test_an_unknown_fields_value_is_a_422_that_names_the_known_ones(server: Server) -> None:
    with server.client() as client:
        for bad in ("everything", "SUMMARY", ""):
            answer = client.get("/api/jobs", params={"fields": bad})
            assert answer.status_code == 422, answer.text
            assert answer.json()["detail"] == ("invalid request: query.fields: Input should "
                                               "be 'full' or 'summary'")


def test_an_input_of_empty_strings_is_previewed_from_its_start_alone() -> None:
    # Each "" spent no room: an input of a million of them was copied whole at each poll
    # to be cut to its first 200 characters.
    from jobs.api.summary import _start

    for shape in ([""] * 100_000, {str(n): "" for n in range(100_000)}, [[""]] * 100_000):
        kept = _start(shape, [INPUT_PREVIEW_CHARS])
        assert len(kept) <= INPUT_PREVIEW_CHARS, len(kept)
