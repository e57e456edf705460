"""The `/events` format over a real server: the job in full once, then what changed; ids
that are positions in the output, and a resume from one that gives exactly what was
missed (jobs/api/events.py; docs/contract.md)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from jobs.api.body_limit import DRAIN_S
from jobs.api.events import change_event, first_event, resume_position
from tests.conftest import wait_for
from tests.fake_llm import FakeLLM
from tests.server import Event, Server, applied, read_events

PIECES = [f"w{i} " for i in range(40)] + ["end."]
REPLY = "".join(PIECES)


@pytest.fixture
def llm() -> Iterator[FakeLLM]:
    with FakeLLM(pieces=PIECES, delay_s=0.1) as fake:
        yield fake


@pytest.fixture
def server(make_server: Callable[..., Server], llm: FakeLLM) -> Server:
    return make_server(env={"OPENAI_BASE_URL": llm.base_url})


def _chat(client: httpx.Client, question: str = "cpu?") -> str:
    job = client.post("/api/jobs", json={"kind": "chat", "input": {
        "messages": [{"role": "user", "content": question}]}})
    assert job.status_code == 202, job.text
    return str(job.json()["id"])


def _ids_are_positions(events: list[Event], start: dict[str, Any] | None = None) -> None:
    for event, copy in zip(events, applied(events, start), strict=True):
        assert event.id == str(len(copy.get("output") or "")), (event.id, event.fields)


def test_a_first_event_in_full_then_only_what_changed(server: Server) -> None:
    question = "cpu? " * 2000
    with server.client() as client:
        job_id = _chat(client, question)
        events = read_events(client, job_id)
        final = client.get(f"/api/jobs/{job_id}").json()
    first, rest = events[0], events[1:]
    assert first.fields["input"]["messages"][0]["content"] == question
    assert set(first.fields) >= {"id", "state", "output", "input", "progress", "result"}
    assert "output_delta" not in first.fields
    assert rest, "the job changed after the first event"
    for event in rest:
        assert "input" not in event.fields and "id" not in event.fields, event.fields
        assert "output" not in event.fields, "the output only grows: deltas"
    deltas = [e.fields["output_delta"] for e in rest if "output_delta" in e.fields]
    assert len(deltas) >= 3 and all(deltas), f"the reply streams in pieces: {deltas}"
    _ids_are_positions(events)
    copy = applied(events)[-1]
    assert copy["output"] == REPLY == final["output"]
    assert {k: v for k, v in copy.items() if k != "queue_position"} == \
        {k: v for k, v in final.items() if k != "queue_position"}


def test_a_resume_gets_exactly_the_missed_output_then_the_live_stream(server: Server) -> None:
    with server.client() as client:
        job_id = _chat(client)
        # A client that read part of the reply, then lost its connection.
        before = read_events(client, job_id, until=lambda events: len(
            applied(events)[-1].get("output") or "") >= 12)
        held = applied(before)[-1]
        last_id = before[-1].id
        assert last_id is not None and int(last_id) == len(held["output"]) > 0
        assert held["state"] == "running"
        after = read_events(client, job_id, headers={"Last-Event-ID": last_id})
        final = client.get(f"/api/jobs/{job_id}").json()
    resumed = after[0].fields
    assert "output" not in resumed and "input" in resumed and "state" in resumed
    assert REPLY.startswith(held["output"] + resumed["output_delta"])
    assert after[-1].fields.get("state") == "completed" and len(after) >= 2, "then live"
    _ids_are_positions(after, held)
    assert applied(after, held)[-1]["output"] == final["output"] == REPLY, \
        "no gap, nothing twice"


def test_after_in_the_query_resumes_and_the_header_wins(server: Server) -> None:
    with server.client() as client:
        job_id = _chat(client)
        done = read_events(client, job_id)
        assert applied(done)[-1]["output"] == REPLY
        tail = read_events(client, job_id, params={"after": "10"})
        both = read_events(client, job_id, params={"after": "10"},
                           headers={"Last-Event-ID": "20"})
        beyond = read_events(client, job_id, params={"after": str(len(REPLY) + 5)})
    assert [e.fields["output_delta"] for e in tail] == [REPLY[10:]]
    assert [e.id for e in tail] == [str(len(REPLY))]
    assert [e.fields["output_delta"] for e in both] == [REPLY[20:]]
    # Past the end: the client's copy cannot be the job's, so it gets the output in full.
    assert [e.fields.get("output") for e in beyond] == [REPLY]


@pytest.mark.parametrize("header, query", [
    ("abc", None), ("-1", None), ("1.5", None), ("1e3", None), ("0x10", None),
    ("9" * 20, None), (None, "x"), (None, "-3")])
def test_an_id_that_is_no_position_is_a_400_that_says_what_to_do(
        server: Server, header: str | None, query: str | None) -> None:
    with server.client() as client:
        job_id = _chat(client)
        answer = client.get(f"/api/jobs/{job_id}/events",
                            headers={"Last-Event-ID": header} if header else None,
                            params={"after": query} if query else None)
    assert answer.status_code == 400, answer.text
    detail = answer.json()["detail"]
    assert "Last-Event-ID" in detail and "Leave it out" in detail


def test_events_that_change_small_fields_share_their_position() -> None:
    job = {"state": "running", "output": "ab", "progress": None, "input": {"x": "y" * 10}}
    progressed = {**job, "progress": {"fraction": 0.5, "message": None}}
    assert change_event(job, progressed) == (
        'id: 2\ndata: {"progress":{"fraction":0.5,"message":null}}\n\n')
    assert change_event(job, dict(job)) is None
    grown = {**job, "output": "abcé"}
    assert change_event(job, grown) == 'id: 4\ndata: {"output_delta":"cé"}\n\n'
    started_again = {**job, "output": "x"}
    assert change_event(job, started_again) == 'id: 1\ndata: {"output":"x"}\n\n'
    assert first_event(grown, 2).startswith("id: 4\n")
    assert '"output_delta":"cé"' in first_event(grown, 2)
    assert resume_position(None, None) is None and resume_position("", "7") == 7
    assert resume_position("3", "7") == 3


def test_a_new_attempt_sends_the_job_in_full_and_ids_name_their_attempt() -> None:
    first = {"state": "running", "output": "abc", "attempt": 1, "progress": None}
    retrying = {**first, "state": "queued", "output": "", "attempt": 2}
    event = change_event(first, retrying)
    assert event is not None and event.startswith("id: 2.0\n")
    assert '"state":"queued"' in event and '"output":""' in event  # the whole job
    again = {**retrying, "state": "running", "output": "abcdef"}
    assert change_event(retrying, again) == (
        'id: 2.6\ndata: {"state":"running","output_delta":"abcdef"}\n\n')
    # A resume from the first attempt's position gets the job in full, not a delta.
    assert '"output":"abcdef"' in first_event(again, resume_position("3", None))
    assert '"output_delta":"def"' in first_event(again, resume_position("2.3", None))


def test_a_stream_follows_a_job_into_its_next_attempt_and_to_its_end(
        server: Server) -> None:
    # The next attempt's output starts again: each of its reads, a prefix of the last
    # attempt's output, was taken for an old one and left out; the stream said nothing of
    # the retry, and closed without the final state when that came in the meantime.
    with server.client() as client:
        job_id = client.post("/api/jobs", json={"kind": "probe", "max_attempts": 2, "input": {
            "pieces": ["said in attempt 1"], "seconds": 60}}).json()["id"]
        with ThreadPoolExecutor(1) as pool:
            stream = pool.submit(read_events, client, job_id)

            def running_with_output() -> int | None:
                job = client.get(f"/api/jobs/{job_id}").json()
                return job["pid"] if job["state"] == "running" and job["output"] else None

            pid = wait_for(running_with_output, 60, 0.05, "the first attempt's output")
            client.post("/api/queue/pause").raise_for_status()  # its retry waits, queued
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: client.get(f"/api/jobs/{job_id}").json()["attempt"] == 2, 60,
                     0.05, "the job queued again")
            assert client.delete(f"/api/jobs/{job_id}").status_code == 200
            events = stream.result(60)
    seen = applied(events)
    assert list(dict.fromkeys((job["state"], job["attempt"]) for job in seen
                              if job["attempt"] == 2)) == [("queued", 2), ("cancelled", 2)], \
        [event.fields for event in events]
    assert seen[-1]["output"] == "" and seen[-1]["earlier_errors"][0]["type"] == "lost"


def test_a_get_with_wait_s_answers_once_the_job_has_ended(
        make_server: Callable[..., Server]) -> None:
    """Long polling: `GET /api/jobs/{id}?wait_s=S` answers when the job ends (by its runner
    or a cancel), or after S seconds as it is then; a 503 where every event stream of the
    worker is taken; a client gone gives its slot back; a bad `wait_s` says what to send."""
    server = make_server(env={"OFFLOAD_MAX_EVENT_STREAMS": "1"})
    sleep = {"kind": "sleep", "input": {"seconds": 1, "steps": 1}}
    with server.client() as client, server.client() as waiter, ThreadPoolExecutor(1) as pool:
        job_id = client.post("/api/jobs", json=sleep).json()["id"]
        answer = client.get(f"/api/jobs/{job_id}", params={"wait_s": 60}, timeout=90)
        assert answer.status_code == 200 and answer.json()["state"] == "completed", answer.text

        assert client.post("/api/queue/pause").status_code == 200
        queued = client.post("/api/jobs", json=sleep).json()["id"]
        t0 = time.monotonic()
        answer = client.get(f"/api/jobs/{queued}", params={"wait_s": 0.5})
        assert answer.json()["state"] == "queued" and time.monotonic() - t0 >= 0.45

        # While an event stream holds the worker's one slot, a wait is a 503 to retry.
        other = client.post("/api/jobs", json=sleep).json()["id"]
        with client.stream("GET", f"/api/jobs/{queued}/events") as stream:
            lines = stream.iter_lines()  # kept: a dropped iterator closes the stream
            assert next(lines).startswith(("id:", "data:"))
            answer = client.get(f"/api/jobs/{other}", params={"wait_s": 60}, timeout=90)
            assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
            assert "ask again later, or without wait_s" in answer.json()["detail"]
        # A wait whose client has gone holds the slot no longer (it did for its 60 s).
        with socket.create_connection(("127.0.0.1", server.port)) as gone:
            gone.sendall(f"GET /api/jobs/{queued}?wait_s=60 HTTP/1.1\r\n"
                         "Host: 127.0.0.1\r\n\r\n".encode())
            time.sleep(0.5)  # its wait has begun
        deadline = time.monotonic() + 30
        while (answer := client.get(f"/api/jobs/{other}", params={"wait_s": 0.2})
               ).status_code == 503 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert answer.status_code == 200 and answer.json()["state"] == "queued", answer.text
        # A body streamed past the limit is a 413, as on any route (it ended the wait: 200).
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sender:
            sender.sendall(f"GET /api/jobs/{queued}?wait_s=30 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                           "Transfer-Encoding: chunked\r\n\r\n".encode())
            with contextlib.suppress(OSError):  # the server may close while we still send
                for _ in range(20):
                    sender.sendall(b"10000\r\n" + b"x" * 0x10000 + b"\r\n")
                sender.sendall(b"0\r\n\r\n")
            assert sender.recv(64).startswith(b"HTTP/1.1 413"), "a body over the limit"
        # A cancel ends a wait.
        waiting = pool.submit(waiter.get, f"/api/jobs/{queued}", params={"wait_s": 60},
                              timeout=90)
        time.sleep(0.5)  # mostly waiting by now; answered alike if not
        assert client.delete(f"/api/jobs/{queued}").status_code == 200
        assert waiting.result(60).json()["state"] == "cancelled"

        # Its bounds, whatever is wrong: nan was "less than or equal to 60", and so no number.
        for bad in ("61", "-1", "soon", "nan", "inf", "-inf"):
            answer = client.get(f"/api/jobs/{other}", params={"wait_s": bad})
            assert (answer.status_code, answer.json()) == (422, {
                "detail": "invalid request: query.wait_s: must be a number from 0 to 60"}), bad
        answer = client.get("/api/history", params={"seconds": "nan"})  # the other float
        assert (answer.status_code, answer.json()) == (422, {
            "detail": "invalid request: query.seconds: must be a number above 0 and at most "
                      "10800"}), answer.text
        assert client.get("/api/jobs/" + "0" * 32, params={"wait_s": 5}).status_code == 404


@pytest.mark.parametrize(("served_by", "stop"), [
    ("uvicorn", "SIGTERM"), ("gunicorn", "SIGTERM"),
    # Gunicorn's quick stop: its master sends its workers SIGQUIT, which cut them (after
    # its graceful timeout) where SIGTERM's stop answers them.
    ("gunicorn", "SIGINT"), ("gunicorn", "SIGQUIT")])
def test_a_stop_of_plain_uvicorn_or_gunicorn_ends_streams_and_waits(
        make_server: Callable[..., Server], served_by: str, stop: str) -> None:
    """`uvicorn api_entry:app` (or gunicorn's workers) stopped while a job's stream and a
    wait are followed: they end at once and the server stops. Uvicorn waits for requests
    under way before the app's shutdown: it waited for as long as the job ran (gunicorn
    for its graceful timeout, then cut them)."""
    server = make_server(gunicorn=served_by == "gunicorn", workers=2 if served_by ==
                         "gunicorn" else 1)
    ended: list[str] = []
    with server.client() as client:
        assert client.post("/api/queue/pause").status_code == 200
        job_id = client.post("/api/jobs", json={"kind": "sleep"}).json()["id"]
        opened = threading.Barrier(3)

        def follow() -> None:
            try:
                with server.client() as own, own.stream(
                        "GET", f"/api/jobs/{job_id}/events", timeout=120) as stream:
                    lines = stream.iter_lines()
                    next(lines)
                    opened.wait(30)
                    for _ in lines:
                        pass
                ended.append("stream ended")
            except httpx.HTTPError as exc:
                ended.append(f"stream cut: {exc!r}")

        def wait() -> None:
            try:
                with server.client() as own:
                    opened.wait(30)
                    answer = own.get(f"/api/jobs/{job_id}", params={"wait_s": 60}, timeout=120)
                ended.append(f"wait answered {answer.status_code}")
            except httpx.HTTPError as exc:
                ended.append(f"wait cut: {exc!r}")

        followers = [threading.Thread(target=follow), threading.Thread(target=wait)]
        for each in followers:
            each.start()
        opened.wait(30)
        time.sleep(0.5)  # the wait has begun (if not, it is answered 503 all the same)
        assert server.proc is not None
        server.proc.send_signal(getattr(signal, stop))
        try:
            server.proc.wait(30)
        finally:
            for each in followers:
                each.join(60)
    assert sorted(ended) == ["stream ended", "wait answered 503"], ended


def test_a_stream_asked_for_oddly_ends_and_keeps_its_slot_free(
        make_server: Callable[..., Server]) -> None:
    """A HEAD of a job's events is its headers alone: it was answered as the GET, which
    follows the job until it ends, so the connection's next request waited that long (and
    the stream held a slot). A body streamed past the limit once an answer has begun can
    no longer get its 413: no more of it is read, the answer goes on to its end, and the
    connection closes after it (a traceback in the server's log and a stream cut off)."""
    server = make_server(env={"OFFLOAD_MAX_EVENT_STREAMS": "1"})
    with server.client() as client:
        queued = client.post("/api/jobs", json={"kind": "sleep", "delay_s": 3600}).json()["id"]
        head = client.head(f"/api/jobs/{queued}/events")
        assert head.status_code == 200, head.text
        assert head.headers["content-type"].startswith("text/event-stream")
        assert head.content == b""
        health = client.get("/api/health", timeout=10)  # the same connection, next
        assert health.status_code == 200, health.text
        assert client.head("/api/jobs/" + "0" * 32 + "/events").status_code == 404
        # A HEAD of a long poll is answered at once too: it waited out its `wait_s`.
        started = time.monotonic()
        head = client.head(f"/api/jobs/{queued}", params={"wait_s": 5})
        assert head.status_code == 200 and head.content == b"", head
        assert time.monotonic() - started < 2, "the HEAD waited as its GET does"
        assert client.head("/api/jobs/" + "0" * 32, params={"wait_s": 5}).status_code == 404

        # 1.1 MB: what the server no longer reads fits the sockets' buffers.
        stream = _send_a_large_body(server, f"/api/jobs/{queued}/events", chunks=17)
        with stream:
            answer = stream.recv(65536)
            assert answer.startswith(b"HTTP/1.1 200") and b"connection: close" in answer
            time.sleep(1)  # the body is over the limit by now: the stream goes on
            assert client.delete(f"/api/jobs/{queued}").status_code == 200
            answer += _read_to_close(stream)
        assert answer.endswith(b"\r\n0\r\n\r\n"), answer[-300:]  # its last chunk
        assert b'"state":"cancelled"' in answer
        # Its slot is free again: another stream opens.
        with client.stream("GET", f"/api/jobs/{queued}/events") as events:
            assert events.status_code == 200
            assert next(events.iter_lines()).startswith(("id:", "data:"))

        # A file whose length was declared is sent whole (cut off, it was a traceback).
        whole = client.get("/static-offline-docs/swagger-ui-bundle.js").content
        with _send_a_large_body(server, "/static-offline-docs/swagger-ui-bundle.js",
                                chunks=17, receive_buffer=4096) as sent:
            answer = _read_to_close(sent)
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(whole)
        # An answer that never reads the body: closed with the body unread, the connection
        # was reset, and the client lost the answer (or could not send the rest).
        with _send_a_large_body(server, "/api/health", chunks=17) as sent:
            answer = _read_to_close(sent)
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"}"), answer[-300:]
        # Of a declared length, the rest is read after the answer: the connection goes on.
        with httpx.Client(base_url=server.url, timeout=30) as own:
            assert own.request("GET", "/api/health", content=b"x" * 1_000_000).is_success
            assert own.get("/api/health").is_success
        # A client that stops sending its body is not waited for (DRAIN_S).
        with socket.create_connection(("127.0.0.1", server.port), timeout=DRAIN_S - 1) as stalled:
            stalled.sendall(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                            b"Transfer-Encoding: chunked\r\n\r\n4\r\nxxxx\r\n")
            assert _read_to_close(stalled).startswith(b"HTTP/1.1 200")
    server.stop()
    assert "Traceback" not in server.log.read_text()


def _send_a_large_body(server: Server, path: str, chunks: int,
                       receive_buffer: int | None = None) -> socket.socket:
    """A GET with a chunked body of `chunks` times 64 KiB, sent; the socket, to read."""
    sender = socket.socket()
    if receive_buffer is not None:  # the answer is still being sent when the body is
        sender.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sender.settimeout(30)
    try:
        sender.connect(("127.0.0.1", server.port))
        sender.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                       "Transfer-Encoding: chunked\r\n\r\n".encode())
        for _ in range(chunks):
            sender.sendall(b"10000\r\n" + b"x" * 0x10000 + b"\r\n")
        sender.sendall(b"0\r\n\r\n")
    except OSError:
        sender.close()  # not left to fail another test as unclosed
        raise
    return sender


def _read_to_close(sender: socket.socket) -> bytes:
    answer = b""
    while piece := sender.recv(65536):
        answer += piece
    return answer
