"""A chat's token usage, the embedded model's word on its languages, and one answer at a
time per conversation: through the real server and supervisor, with a scripted LLM."""

from __future__ import annotations

import asyncio
import shutil
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from jobs import protocol as p
from jobs.protocol import embedded
from jobs.store.index import JobIndex
from runners.chat import ENGLISH_ONLY, is_english
from tests.conftest import RunningSupervisor, wait_for
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


# -- one answer at a time per conversation ----------------------------------------------

def running_with_output(client: httpx.Client, job_id: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        job: dict[str, Any] = client.get(f"/api/jobs/{job_id}").json()
        return job if job["state"] == "running" and job["output"] else None

    return wait_for(check, 60, 0.05, f"job {job_id} to start answering")


# A client that keeps its history as OpenAI's API has it sends the question still being
# answered with the next ([Q1, Q2]): the turn Q1, A1 went in before Q2, and the model was
# asked Q1 twice.
@pytest.mark.parametrize("history", [[], [{"role": "user", "content": "first question"}]],
                         ids=["without the first question", "with the first question"])
def test_a_second_message_waits_for_the_first_and_sees_its_reply(
        make_server: MakeServer, history: list[dict[str, str]]) -> None:
    with FakeLLM(gated="first question") as llm:
        server = make_server(env={"OPENAI_BASE_URL": llm.base_url,
                                  "OFFLOAD_MAX_CONCURRENT": "4"})
        try:
            with server.client() as client:
                first = ask(client, "first question", session_id="s-1")
                running_with_output(client, first)
                # Sent before the first reply existed: its history lacks that reply.
                second = client.post("/api/ai_chat_async", json={"session_id": "s-1", "messages": [
                    *history, {"role": "user", "content": "second question"}]}).json()["job_id"]
                waiting = client.get(f"/api/jobs/{second}").json()
                other = final(client, ask(client, "another conversation", session_id="s-2"))
                still = client.get(f"/api/jobs/{second}").json()
                llm.gate.set()
                done = final(client, first), final(client, second)
                # Sent after both had ended, without them: the client means to leave them out.
                final(client, ask(client, "third question", session_id="s-1"))
        finally:
            llm.gate.set()
        asked = [r["body"]["messages"] for r in llm.requests]

    assert waiting["state"] == "queued" and waiting["after"] == first, waiting
    assert waiting["progress"]["message"] == "waits for the previous answer in its conversation"
    assert other["state"] == "completed", "another session (or kind) is not held up"
    assert still["state"] == "queued", "the second waits while the first answers"
    assert [job["state"] for job in done] == ["completed", "completed"]
    assert done[1]["started_at"] >= done[0]["finished_at"]
    assert len(asked) == 4
    assert asked[2][1:] == [{"role": "user", "content": "first question"},
                            {"role": "assistant", "content": "Hello, world."},
                            {"role": "user", "content": "second question"}]
    assert asked[3][1:] == [{"role": "user", "content": "third question"}]


def test_a_conversation_whose_id_holds_a_slash_is_read_and_erased(
        make_server: MakeServer) -> None:
    # Any string up to 200 characters is a session id: "team/alice" was taken, and then
    # could be neither read back nor forgotten (a 404: no such route).
    with FakeLLM(pieces=["Noted."]) as llm:
        server = make_server(env={"OPENAI_BASE_URL": llm.base_url})
        with server.client() as client:
            turn = final(client, ask(client, "My secret", session_id="team/alice"))
            read = client.get("/api/sessions/team%2Falice")
            assert read.status_code == 200, read.text
            assert [t["job_id"] for t in read.json()["turns"]] == [turn["id"]]
            erased = client.delete("/api/sessions/team%2Falice")
            assert erased.json() == {"session_id": "team/alice", "erased": 1}, erased.text
            assert client.get(f"/api/jobs/{turn['id']}").status_code == 404


def test_a_conversation_is_erased_with_all_it_left(make_server: MakeServer) -> None:
    # A user's chats are theirs: they could not be deleted, only wait out the retention
    # (72 h by default), questions, replies and logs on disk until then.
    with FakeLLM(pieces=["Sure, ", "Alice."], gated="still thinking") as llm:
        server = make_server(env={"OPENAI_BASE_URL": llm.base_url})
        jobs = server.data_dir / "jobs"
        with server.client() as client:
            done = final(client, ask(client, "My name is Alice.", session_id="mine"))
            answering = ask(client, "still thinking about it", session_id="mine")
            wait_for(lambda: client.get(f"/api/jobs/{answering}").json()["state"] == "running",
                     30, 0.05, "the second turn to answer")
            other = final(client, ask(client, "A chat of another session", session_id="x"))
            erased = client.delete("/api/sessions/mine")
            assert erased.status_code == 200, erased.text
            assert erased.json() == {"session_id": "mine", "erased": 2}
            assert client.get("/api/sessions/mine").json()["turns"] == []
            for job_id in (done["id"], answering):
                assert client.get(f"/api/jobs/{job_id}").status_code == 404
                assert not (jobs / job_id).exists()
            assert client.get(f"/api/jobs/{other['id']}").status_code == 200
            again = client.delete("/api/sessions/mine")
            assert again.json()["erased"] == 0
            # A turn sent while a conversation is forgotten is refused, or found and erased too.
            llm.gate.clear()
            busy = ask(client, "still thinking, once more", session_id="mine-too")
            wait_for(lambda: client.get(f"/api/jobs/{busy}").json()["state"] == "running",
                     30, 0.05, "a new turn to answer")
            supervisor = server.supervisor()
            answers: list[httpx.Response] = []
            with httpx.Client(base_url=server.url, timeout=60) as eraser:
                erasing = threading.Thread(target=lambda: answers.append(
                    eraser.delete("/api/sessions/mine-too")))
                supervisor.suspend()  # the answering turn's stop now takes a while
                try:
                    erasing.start()
                    wait_for(lambda: (jobs / busy / p.STOP_FILE).exists(), 30, 0.02,
                             "the erase to ask the answering turn to stop")
                    late = client.post("/api/ai_chat_async", json={
                        "messages": [{"role": "user", "content": "sent while forgetting"}],
                        "session_id": "mine-too"})
                finally:
                    supervisor.resume()
                erasing.join(60)
            assert late.status_code == 409, late.text
            assert answers[0].status_code == 200, answers[0].text
            assert "being forgotten" in late.json()["detail"]
            assert client.get("/api/sessions/mine-too").json()["turns"] == []
        llm.gate.set()
    on_disk = "\n".join(f.read_text(errors="replace") for f in server.data_dir.rglob("*")
                        if f.is_file())
    assert "My name is Alice." not in on_disk and "still thinking" not in on_disk
    assert "sent while forgetting" not in on_disk
    assert "A chat of another session" in on_disk


def test_a_question_sent_again_with_its_key_is_one_turn_found_by_its_key(
        make_server: MakeServer) -> None:
    # A question sent again after its answer was lost (a page's 30 s given up) was stored
    # twice: the chat took no Idempotency-Key, and a lost turn could be found by its text
    # alone, which another tab's turn could share.
    with FakeLLM(pieces=["Fine."]) as llm:
        server = make_server(env={"OPENAI_BASE_URL": llm.base_url})
        question = {"messages": [{"role": "user", "content": "How is the CPU?"}],
                    "session_id": "keyed"}
        keyed = {"Idempotency-Key": "question-1"}
        with server.client() as client:
            unsent = client.get("/api/ai_chat_async", headers=keyed)
            assert unsent.status_code == 404 and "Idempotency-Key" in unsent.json()["detail"]
            first = client.post("/api/ai_chat_async", json=question, headers=keyed)
            again = client.post("/api/ai_chat_async", json=question, headers=keyed)
            assert first.status_code == again.status_code == 200, again.text
            job_id = first.json()["job_id"]
            assert again.json() == first.json() == {"job_id": job_id, "status": "processing"}
            assert client.get("/api/ai_chat_async", headers=keyed).json() == first.json()
            other = client.post("/api/ai_chat_async", headers=keyed, json={
                **question, "messages": [{"role": "user", "content": "Another one"}]})
            assert other.status_code == 422 and job_id in other.json()["detail"], other.text
            final(client, job_id)
            # The seed's frontend sends no key: each of its questions is a turn.
            final(client, ask(client, "How is the CPU?", session_id="keyed"))
            turns = client.get("/api/sessions/keyed").json()["turns"]
            assert [t["question"] for t in turns] == ["How is the CPU?"] * 2
            assert turns[0]["job_id"] == job_id
            trained = client.post("/api/jobs", json={"kind": "train", "input": {}},
                                  headers={"Idempotency-Key": "not-a-chat"})
            assert trained.status_code == 202, trained.text
            assert client.get("/api/ai_chat_async",
                              headers={"Idempotency-Key": "not-a-chat"}).status_code == 404
            assert client.delete("/api/sessions/keyed").json()["erased"] == 2
            assert client.get("/api/ai_chat_async", headers=keyed).status_code == 404
    assert len(llm.requests) == 2


def test_a_question_following_a_turn_that_is_gone_is_refused(make_server: MakeServer) -> None:
    # A forget the page gave up on, done by the stalled server after the page's check (or
    # met in progress, then sent again unchecked): the next question was stored, carrying
    # the forgotten turns in its messages. It names the turn it follows; gone, it is refused.
    with FakeLLM(pieces=["Noted."]) as llm:
        server = make_server(env={"OPENAI_BASE_URL": llm.base_url})
        secret = "My secret is quokka-swordfish."
        with server.client() as client:
            first = final(client, ask(client, secret, session_id="mine"))["id"]
            carried = [{"role": "user", "content": secret},
                       {"role": "assistant", "content": "Noted."},
                       {"role": "user", "content": "What is my secret?"}]
            question = {"messages": carried, "session_id": "mine", "follows": first}
            taken = client.post("/api/ai_chat_async", json=question)
            assert taken.status_code == 200, taken.text  # the conversation as it is
            second = final(client, taken.json()["job_id"])["id"]
            # A re-run follows the conversation as it is then, not the turn removed since.
            assert client.post(f"/api/jobs/{first}/remove").status_code == 200
            rerun = client.post(f"/api/jobs/{second}/rerun")
            assert rerun.status_code == 202, rerun.text
            final(client, rerun.json()["id"])
            assert client.delete("/api/sessions/mine").json()["erased"] == 2
            late = client.post("/api/ai_chat_async", json={**question, "follows": second},
                               headers={"Idempotency-Key": "after-the-forget"})
            assert late.status_code == 410, late.text
            assert late.json() == {"detail": (
                "this conversation was forgotten, or all its turns removed (the turn this "
                f"question follows, {second}, is gone): start a new one (another "
                "session_id) without its turns")}
            batch = client.post("/api/jobs/batch", json={"jobs": [
                {"kind": "chat", "input": {**question, "follows": second}}]})
            assert batch.status_code == 410, batch.text
            assert batch.json()["stored"] == []
            # Another conversation's turn is not one of this one's.
            other = final(client, ask(client, "hi", session_id="other"))["id"]
            elsewhere = client.post("/api/ai_chat_async", json={**question, "follows": other})
            assert elsewhere.status_code == 410, elsewhere.text
            assert f"the turn this question follows ({other}) is not of this" in elsewhere.text
            assert client.get("/api/sessions/mine").json()["turns"] == []
            for wrong, said in (({"follows": "turn-1"}, "32 lowercase hex"),
                                ({"follows": other, "session_id": None}, "session_id")):
                refused = client.post("/api/ai_chat_async", json={**question, **wrong})
                assert refused.status_code == 422 and said in refused.text, refused.text
            # Naming no turn, it is refused all the same: its session_id was forgotten too.
            unnamed = client.post("/api/ai_chat_async", json={**question, "follows": None})
            assert unnamed.status_code == 410, unnamed.text
    on_disk = "\n".join(f.read_text(errors="replace") for f in server.data_dir.rglob("*")
                        if f.is_file())
    assert "quokka" not in on_disk


def test_a_forgotten_conversation_takes_no_question_under_its_id_again(
        make_server: MakeServer) -> None:
    # A client that sent its history without `follows` after the forget re-opened the
    # conversation: its question, carrying the erased turns, was stored and answered.
    secret = "My secret is quokka-swordfish."
    session = "alice-private-talk"
    carried = {"messages": [{"role": "user", "content": secret},
                            {"role": "assistant", "content": "Noted."},
                            {"role": "user", "content": "What is my secret?"}],
               "session_id": session}
    gone = {"detail": "this conversation was forgotten, and its session_id with it: start a "
                      "new one (another session_id) without its turns"}
    with FakeLLM(pieces=["Noted."]) as llm:
        first = make_server(env={"OPENAI_BASE_URL": llm.base_url})
        with first.client() as client:
            final(client, ask(client, secret, session_id=session))
            assert client.delete(f"/api/sessions/{session}").json()["erased"] == 1
            late = client.post("/api/ai_chat_async", json=carried)
            assert late.status_code == 410, late.text
            assert late.json() == gone
        first.stop()
        # Kept on disk: an API started since (a restart, another worker) refuses it too.
        second = make_server(env={"OPENAI_BASE_URL": llm.base_url})
        with second.client() as client:
            for path, body in (("/api/ai_chat_async", carried),
                               ("/api/jobs", {"kind": "chat", "input": carried}),
                               ("/api/jobs/batch", {"jobs": [{"kind": "chat",
                                                              "input": carried}]})):
                refused = client.post(path, json=body)
                assert refused.status_code == 410, (path, refused.text)
                assert gone["detail"] in refused.json()["detail"], refused.text
            assert client.get(f"/api/sessions/{session}").json()["turns"] == []
            other = final(client, ask(client, "hi", session_id="another-talk"))
            assert other["state"] == "completed", other
    assert len(llm.requests) == 2
    stored = [*second.data_dir.rglob("*")]
    on_disk = "\n".join(f.read_text(errors="replace") for f in stored if f.is_file())
    assert "quokka" not in on_disk
    assert session not in on_disk and all(session not in str(f) for f in stored)


def test_a_question_following_the_turn_a_forget_answered_409_kept_is_refused(
        make_server: MakeServer) -> None:
    # The forget's 409 (a reply still stopping after the wait) kept the newest turn, the
    # one `follows` names: the next question was taken and stored the erased turns again.
    secret = "My secret is quokka-swordfish."
    with FakeLLM(pieces=["Noted."], gated="gated") as llm:
        server = make_server(env={"OPENAI_BASE_URL": llm.base_url,
                                  "OFFLOAD_STOP_GRACE_S": "0.5"})
        with server.client() as client:
            erased = final(client, ask(client, secret, session_id="stops"))["id"]
            kept = ask(client, "And the gated memory?", session_id="stops")
            wait_for(lambda: client.get(f"/api/jobs/{kept}").json()["state"] == "running",
                     30, 0.05, "the second turn to answer")
            supervisor = server.supervisor()
            supervisor.suspend()  # nothing stops the reply meanwhile
            try:
                answer = client.delete("/api/sessions/stops", timeout=60)
            finally:
                supervisor.resume()
            assert answer.status_code == 409, answer.text
            assert final(client, kept)["state"] == "cancelled"
            late = client.post("/api/ai_chat_async", json={
                "messages": [{"role": "user", "content": secret},
                             {"role": "assistant", "content": "Noted."},
                             {"role": "user", "content": "What is my secret?"}],
                "session_id": "stops", "follows": kept})
            assert late.status_code == 410, late.text
            assert client.get(f"/api/jobs/{erased}").status_code == 404
            on_disk = "\n".join(f.read_text(errors="replace")
                                for f in server.data_dir.rglob("*") if f.is_file())
            assert "quokka" not in on_disk
            assert client.delete("/api/sessions/stops").json()["erased"] == 1
        llm.gate.set()


def test_a_question_following_a_turn_removed_by_hand_goes_on(make_server: MakeServer) -> None:
    # The conversation's newest turn removed (the jobs table's Remove), its next question
    # was refused as if the conversation had been forgotten, and the page started a new
    # one, the older turns left on the server. Its other turns are there: it goes on.
    with FakeLLM(pieces=["Noted."]) as llm:
        server = make_server(env={"OPENAI_BASE_URL": llm.base_url})
        with server.client() as client:
            first = final(client, ask(client, "My name is Ada.", session_id="kept"))["id"]
            said = [{"role": "user", "content": "My name is Ada."},
                    {"role": "assistant", "content": "Noted."}]
            second = final(client, ask(client, "I like tea.", session_id="kept"))["id"]
            assert client.post(f"/api/jobs/{second}/remove").status_code == 200
            question = {"messages": [*said, {"role": "user", "content": "I like tea."},
                                     {"role": "assistant", "content": "Noted."},
                                     {"role": "user", "content": "What is my name?"}],
                        "session_id": "kept", "follows": second}
            taken = client.post("/api/ai_chat_async", json=question)
            assert taken.status_code == 200, taken.text
            third = final(client, taken.json()["job_id"])
            assert third["state"] == "completed", third
            assert [t["job_id"] for t in client.get("/api/sessions/kept").json()["turns"]] \
                == [first, third["id"]]
            # Its last turns removed too, nothing is left of it: as forgotten.
            for turn in (first, third["id"]):
                assert client.post(f"/api/jobs/{turn}/remove").status_code == 200
            alone = client.post("/api/ai_chat_async", json={**question,
                                                             "follows": third["id"]})
            assert alone.status_code == 410, alone.text
            assert "or all its turns removed" in alone.text
    assert len(llm.requests) == 3


@pytest.mark.parametrize("headers", [{}, {"Idempotency-Key": ""}], ids=["none", "empty"])
def test_a_chat_looked_up_without_its_key_is_told_to_send_it(
        make_server: MakeServer, headers: dict[str, str]) -> None:
    # It was FastAPI's 422 "header.Idempotency-Key: Field required", which said neither
    # which key nor what the GET is for.
    with make_server().client() as client:
        answer = client.get("/api/ai_chat_async", headers=headers)
    assert answer.status_code == 400, answer.text
    assert answer.json() == {"detail": "send the Idempotency-Key header that the question's "
                                       "POST /api/ai_chat_async was sent with: this GET "
                                       "answers which chat that key started"}


def test_the_schema_says_the_key_a_chat_is_looked_up_by_is_required(
        make_server: MakeServer) -> None:
    # It showed the header as optional: a client generated from /openapi.json could leave it
    # out, and met the 400 that says to send it.
    with make_server().client() as client:
        schema = client.get("/openapi.json").json()
        unsent = client.get("/api/ai_chat_async")
    parameters = schema["paths"]["/api/ai_chat_async"]["get"]["parameters"]
    assert [(each["name"], each["in"], each["required"]) for each in parameters] == [
        ("Idempotency-Key", "header", True)], parameters
    assert parameters[0]["schema"]["maxLength"] == 255
    assert unsent.status_code == 400 and "send the Idempotency-Key" in unsent.text, unsent.text


def test_an_empty_session_id_is_no_conversation(make_server: MakeServer) -> None:
    """`session_id: ""` names no session: such chats do not wait for one another."""
    with FakeLLM(gated="first question") as llm:
        server = make_server(env={"OPENAI_BASE_URL": llm.base_url,
                                  "OFFLOAD_MAX_CONCURRENT": "4"})
        try:
            with server.client() as client:
                first = ask(client, "first question", session_id="")
                running_with_output(client, first)
                other = final(client, ask(client, "another question", session_id=""))
                assert client.get(f"/api/jobs/{first}").json()["state"] == "running"
        finally:
            llm.gate.set()
    assert other["state"] == "completed" and other.get("after") is None, other
    # nor one that can be forgotten: it was, and its chats were taken all the same
    with server.client() as client:
        for method in ("GET", "DELETE"):
            answer = client.request(method, "/api/sessions/")
            assert answer.status_code == 422 and "session_id" in answer.text, answer.text
        assert not (server.data_dir / "forgotten-sessions").exists()


def test_interrupt_cancels_the_answer_in_progress(make_server: MakeServer) -> None:
    with FakeLLM(gated="first question") as llm:
        server = make_server(env={"OPENAI_BASE_URL": llm.base_url})
        try:
            with server.client() as client:
                first = ask(client, "first question", session_id="s-1")
                running_with_output(client, first)
                answer = client.post("/api/jobs", json={"kind": "chat", "input": {
                    "messages": [{"role": "user", "content": "no, this one"}],
                    "session_id": "s-1", "on_busy": "interrupt"}})
                assert answer.status_code == 202, answer.text
                second = final(client, answer.json()["id"])
                cut = final(client, first)
        finally:
            llm.gate.set()
        asked = [r["body"]["messages"] for r in llm.requests]

    assert cut["state"] == "cancelled" and cut["output"] == "Hello", cut
    assert second["state"] == "completed" and second["after"] == first
    assert second["started_at"] >= cut["finished_at"]
    assert asked[1][1:] == [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "Hello [this answer was interrupted]"},
        {"role": "user", "content": "no, this one"}]


# -- the embedded model's languages -------------------------------------------------------

@pytest.mark.parametrize(("text", "english"), [
    ("What does the CPU chart show?", True),
    ("What did Zoë Müller and José say about El Niño?", True),
    ("Why does `for i in range(10): print(i)` print 0..9?", True),
    ("What does 你好 mean?", True),
    ("1234 + 5678", True),
    ("CPU 使用率为什么这么高？", False),
    ("Почему процессор загружен?", False),
    ("¿Qué muestra el gráfico de la CPU?", False),
    ("Pourquoi le CPU est-il si élevé ?", False),
    ("Warum ist die CPU so hoch?", False),
])
def test_what_reads_as_english(text: str, english: bool) -> None:
    assert is_english(text) is english


def test_a_question_not_in_english_is_told_the_embedded_model_speaks_english(
        make_supervisor: Callable[..., RunningSupervisor], data_dir: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner's embedded path (no OPENAI_BASE_URL: the server llm.json names, with the
    supervisor's key), with the scripted server standing in for the model."""
    monkeypatch.delenv("OFFLOAD_LOCAL_MODEL", raising=False)
    with FakeLLM() as llm:
        data_dir.mkdir(parents=True, exist_ok=True)
        p.write_json(data_dir / "llm.json", {"available": True, "ready": True,
                                             "base_url": llm.base_url,
                                             "model": "SmolLM2-135M-Instruct",
                                             "key_id": embedded.key_id("test-key")})
        sup = make_supervisor(runner_env={embedded.KEY_ENV: "test-key"})
        chinese = sup.wait_final(sup.submit("chat", messages=[
            {"role": "user", "content": "CPU 使用率为什么这么高？"}]), 60)
        again = sup.wait_final(sup.submit("chat", messages=[
            {"role": "user", "content": "CPU 使用率为什么这么高？"},
            {"role": "assistant", "content": chinese["result"]["reply"]},
            {"role": "user", "content": "And in English?"}]), 60)
        asked = [r["body"]["messages"] for r in llm.requests]

    assert chinese["state"] == "completed", chinese
    assert chinese["result"]["reply"] == ENGLISH_ONLY + "Hello, world."
    assert chinese["output"] == chinese["result"]["reply"]
    assert ENGLISH_ONLY.count("\n") == 1 and "OPENAI_BASE_URL" in ENGLISH_ONLY
    assert "Ollama" in ENGLISH_ONLY and "LM Studio" in ENGLISH_ONLY
    assert again["result"]["reply"] == "Hello, world.", "asked in English: no word"
    assert asked[1][-2] == {"role": "assistant", "content": "Hello, world."}, \
        "the model does not read the word back"


def asked_of_the_embedded_model(make_supervisor: Callable[..., RunningSupervisor],
                                data_dir: Path, **chat_input: Any
                                ) -> tuple[dict[str, Any], dict[str, Any]]:
    """A chat run on the embedded model (a fake one, its status written as its supervisor
    writes it) once it has ended, and the body of the model's first request."""
    with FakeLLM() as llm:
        data_dir.mkdir(parents=True, exist_ok=True)
        p.write_json(data_dir / "llm.json", {"available": True, "ready": True,
                                             "base_url": llm.base_url,
                                             "key_id": embedded.key_id("test-key")})
        sup = make_supervisor(runner_env={embedded.KEY_ENV: "test-key"})
        job = sup.wait_final(sup.submit("chat", **chat_input), 60)
        return job, llm.requests[0]["body"]


def test_a_long_conversation_fits_the_embedded_models_context(
        make_supervisor: Callable[..., RunningSupervisor], data_dir: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The dashboard sends the whole conversation each time: past the embedded model's
    context, every later message was refused (HTTP 400)."""
    monkeypatch.delenv("OFFLOAD_LOCAL_MODEL", raising=False)
    history = []
    for turn in range(12):
        history += [{"role": "user", "content": f"question {turn} " + "why " * 150},
                    {"role": "assistant", "content": f"answer {turn} " + "because " * 150}]
    last = {"role": "user", "content": "And the last question?"}
    job, asked = asked_of_the_embedded_model(make_supervisor, data_dir,
                                             messages=[*history, last])
    assert job["state"] == "completed", job
    sent = asked["messages"]
    assert sent[0]["role"] == "system" and sent[-1] == last
    assert sent[-3]["content"].startswith("question 11") and len(sent) < len(history)
    # Within the context, as the server counts (about four characters a token here).
    assert sum(len(m["content"]) for m in sent) / 4 + asked["max_tokens"] < embedded.SLOT_CTX


def test_a_long_reply_asked_of_the_embedded_model_keeps_the_conversation(
        make_supervisor: Callable[..., RunningSupervisor], data_dir: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A `max_tokens` near the context's size left every earlier turn out of a short
    conversation: the model no longer knew what it had been told."""
    monkeypatch.delenv("OFFLOAD_LOCAL_MODEL", raising=False)
    conversation = [{"role": "user", "content": "My favourite colour is teal."},
                    {"role": "assistant", "content": "Noted, teal."},
                    {"role": "user", "content": "What is my favourite colour? Then an essay."}]
    job, asked = asked_of_the_embedded_model(make_supervisor, data_dir,
                                             messages=conversation, max_tokens=32768)
    assert job["state"] == "completed", job
    assert asked["messages"][1:] == conversation
    # The rest of the context, as the server counts (about four characters a token here).
    assert 1500 < asked["max_tokens"] < embedded.SLOT_CTX - sum(
        len(m["content"]) for m in asked["messages"]) / 4


def test_a_chat_let_go_to_an_embedded_model_as_it_died_waits_for_its_next_start(
        make_supervisor: Callable[..., RunningSupervisor], data_dir: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Its slot freed as the chats it held died with it, a waiting chat was let go to the
    dead server before its supervisor said so: it failed, or spent an attempt."""
    monkeypatch.delenv("OFFLOAD_LOCAL_MODEL", raising=False)
    status = data_dir / "llm.json"
    dying = socket.create_server(("127.0.0.1", 0))
    with FakeLLM() as llm:

        def die_as_asked() -> None:  # the model's supervisor says so a moment later
            conn, _ = dying.accept()
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()  # reset: "closed the connection before answering"
            time.sleep(0.3)
            p.write_json(status, {**ready, "base_url": llm.base_url, "pid": 2})

        ready = {"available": True, "ready": True, "pid": 1,
                 "base_url": f"http://127.0.0.1:{dying.getsockname()[1]}/v1",
                 "key_id": embedded.key_id("test-key")}
        data_dir.mkdir(parents=True, exist_ok=True)
        p.write_json(status, ready)
        threading.Thread(target=die_as_asked, daemon=True).start()
        sup = make_supervisor(runner_env={embedded.KEY_ENV: "test-key"})
        job = sup.wait_final(sup.submit("chat", messages=[
            {"role": "user", "content": "hi"}]), 60)
    dying.close()
    assert job["state"] == "completed", job
    assert job["attempt"] == 1 and not job.get("earlier_errors"), job
    assert len(llm.requests) == 1


def test_a_chat_waits_for_the_embedded_model_one_patience_in_all(
        make_supervisor: Callable[..., RunningSupervisor], data_dir: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each wait for the model's next start took a fresh patience: a model that died,
    loaded slowly, and died again took the chat past its deadline, a `timeout` that said
    nothing of the model."""
    monkeypatch.delenv("OFFLOAD_LOCAL_MODEL", raising=False)
    status = data_dir / "llm.json"
    dying = socket.create_server(("127.0.0.1", 0))
    ready = {"available": True, "ready": True, "pid": 1,
             "base_url": f"http://127.0.0.1:{dying.getsockname()[1]}/v1",
             "key_id": embedded.key_id("test-key")}
    loading = {"available": True, "ready": False, "detail": "loading the model"}

    def die_twice() -> None:
        for pid in (2, 3):
            conn, _ = dying.accept()
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()  # reset: "closed the connection before answering"
            p.write_json(status, {**loading, "pid": pid})
            if pid == 2:  # a slow load, then ready: most of the chat's patience is spent
                time.sleep(6)
                p.write_json(status, {**ready, "pid": pid})

    data_dir.mkdir(parents=True, exist_ok=True)
    p.write_json(status, ready)
    threading.Thread(target=die_twice, daemon=True).start()
    sup = make_supervisor(runner_env={embedded.KEY_ENV: "test-key"})
    job = sup.wait_final(sup.submit("chat", timeout_s=12, messages=[
        {"role": "user", "content": "hi"}]), 60)
    dying.close()
    # 12 s less the margin: 7 s over both waits, before the job's deadline.
    assert job["state"] == "failed", job
    assert "the embedded model is not ready within the 7 s a chat waits for it" in (
        job["error"]["message"]), job


@pytest.mark.llm
@pytest.mark.slow
def test_the_real_embedded_model_says_so_for_chinese_only(make_server: MakeServer) -> None:
    server = make_server()
    with server.client() as client:
        wait_for(lambda: client.get("/api/health").json()["llm"]["ready"], 120, 0.2,
                 "the embedded model to load")
        chinese = final(client, ask(client, "CPU 使用率为什么这么高？", max_tokens=8), 120)
        english = final(client, ask(client, "Why is the CPU busy?", max_tokens=8), 120)
    assert chinese["state"] == english["state"] == "completed"
    assert chinese["result"]["reply"].startswith(ENGLISH_ONLY)
    assert chinese["output"] == chinese["result"]["reply"]
    assert not english["result"]["reply"].startswith(ENGLISH_ONLY[:20])
    assert english["result"]["usage"]["completion_tokens"] >= 1


def test_two_chats_of_a_session_never_run_together_even_unchained(
        make_supervisor: Callable[..., RunningSupervisor]) -> None:
    """Two API workers that stored a session's chats at the same moment, neither seeing
    the other's (no `after` between them): the supervisor still runs one at a time."""
    with FakeLLM(gated="first question") as llm:
        sup = make_supervisor(max_concurrent=4, runner_env={"OPENAI_BASE_URL": llm.base_url})
        try:
            first = sup.submit("chat", session_id="s-1", messages=[
                {"role": "user", "content": "first question"}])
            wait_for(lambda: sup.job(first)["output"], 30, what="the first answer to start")
            second = sup.submit("chat", session_id="s-1", messages=[
                {"role": "user", "content": "second question"}])
            other = sup.wait_final(sup.submit("chat", session_id="s-2", messages=[
                {"role": "user", "content": "another conversation"}]), 30)
            assert other["state"] == "completed"
            assert sup.job(second)["state"] == "queued"
            llm.gate.set()
            done = sup.wait_final(first, 30), sup.wait_final(second, 30)
        finally:
            llm.gate.set()
    assert [job["state"] for job in done] == ["completed", "completed"]
    assert done[1]["started_at"] >= done[0]["finished_at"]


def test_a_conversation_forgotten_twice_at_once_takes_no_turn_until_both_end(
        data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The first erasure to end let turns in while the other still ran: each answered 200,
    # then the other's next round erased it. The moment is scripted: no race is won on demand.
    from jobs.api.chat_turns import BeingForgotten, TurnGone
    from jobs.api.service import JobService
    from jobs.settings import get_settings
    from jobs.store.job_store import JobStore

    store = JobStore(data_dir / "jobs")
    service = JobService(get_settings(), store)
    held, release = threading.Event(), threading.Event()
    looks = store.session_jobs

    def first_look_waits(session_id: str) -> list[dict[str, Any]]:
        if not held.is_set():  # the first erasure, still at its first round
            held.set()
            release.wait(30)
        return looks(session_id)

    monkeypatch.setattr(store, "session_jobs", first_look_waits)
    turn = {"messages": [{"role": "user", "content": "hi"}], "session_id": "mine"}

    async def both() -> None:
        slow = asyncio.create_task(service.erase_session("mine"))
        await asyncio.to_thread(held.wait, 30)
        assert await service.erase_session("mine") == (0, [])  # the second ends first
        with pytest.raises(BeingForgotten) as refused:
            await service.submit("chat", dict(turn), None)
        assert type(refused.value) is BeingForgotten  # 409, not TurnGone's 410
        release.set()
        assert await slow == (0, [])
        with pytest.raises(TurnGone):  # both ended: its session_id is forgotten
            await service.submit("chat", dict(turn), None)

    asyncio.run(both())
