"""Every way an LLM server can fail, each explained in words a user can act on.

A scripted server (tests/fake_llm.py) produces the faults a real one will not on demand.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import RunningSupervisor, wait_job
from tests.fake_llm import FakeLLM
from tests.server import Server

SECRET = "sk-fault-test-secret-0042"
QUESTION: dict[str, Any] = {"messages": [{"role": "user", "content": "How is the CPU?"}]}


def run_chat(make_supervisor: Callable[..., RunningSupervisor], base_url: str,
             timeout_s: float = 60, **env: str) -> dict[str, Any]:
    sup = make_supervisor(runner_env={"OPENAI_BASE_URL": base_url, "OPENAI_API_KEY": SECRET,
                                      **env})
    job_id = sup.submit("chat", timeout_s=timeout_s, **QUESTION)
    job = sup.wait_final(job_id, timeout=90)
    sup.stop()
    assert SECRET not in str(job), "the key never appears in a job"
    return job


def failed_with(job: dict[str, Any], *needles: str) -> None:
    assert job["state"] == "failed", job
    assert job["error"]["type"] == "provider", job["error"]
    for needle in needles:
        assert needle in job["error"]["message"], (needle, job["error"]["message"])


def test_connection_refused(make_supervisor: Callable[..., RunningSupervisor]) -> None:
    job = run_chat(make_supervisor, "http://127.0.0.1:9/v1")
    failed_with(job, "LLM server not reachable at http://127.0.0.1:9", "connection refused")


def test_host_that_does_not_resolve(make_supervisor: Callable[..., RunningSupervisor]) -> None:
    job = run_chat(make_supervisor, "http://offload-test.invalid:8080/v1")
    failed_with(job, "not reachable at http://offload-test.invalid:8080",
                "cannot resolve the host name")


@pytest.mark.parametrize("status", [401, 403])
def test_rejected_key(make_supervisor: Callable[..., RunningSupervisor], status: int) -> None:
    body = '{"error": {"message": "Incorrect API key provided: ' + SECRET + '"}}'
    with FakeLLM(status=status, error_body=body) as llm:
        job = run_chat(make_supervisor, llm.base_url)
    failed_with(job, f"rejected the API key (HTTP {status})", "OPENAI_API_KEY")


def test_unknown_model_is_named_with_what_the_server_offers(
        make_supervisor: Callable[..., RunningSupervisor]) -> None:
    with FakeLLM(known_model="llama3", models=["llama3", "qwen2"]) as llm:
        job = run_chat(make_supervisor, llm.base_url, OFFLOAD_LLM_MODEL="gpt-9")
    failed_with(job, "does not know the model 'gpt-9'", "llama3, qwen2", "OFFLOAD_LLM_MODEL")


def test_a_wrong_address_is_not_blamed_on_the_model(
        make_supervisor: Callable[..., RunningSupervisor]) -> None:
    # Ollama without /v1 in OPENAI_BASE_URL: "404 page not found", whatever the model.
    with FakeLLM(status=404, error_body="404 page not found") as llm:
        job = run_chat(make_supervisor, llm.base_url, OFFLOAD_LLM_MODEL="fake-model")
    failed_with(job, "has no chat API there (HTTP 404", "ends in /v1")
    assert "does not know the model" not in job["error"]["message"]


@pytest.mark.parametrize("status", [429, 503])
def test_overloaded_server_is_retried_honouring_retry_after(
        make_supervisor: Callable[..., RunningSupervisor], status: int) -> None:
    with FakeLLM(status=status, fail_times=2, retry_after="1",
                 error_body='{"error": {"message": "slow down"}}') as llm:
        job = run_chat(make_supervisor, llm.base_url)
        gaps = [b - a for a, b in zip(llm.request_times, llm.request_times[1:], strict=False)]
    assert job["state"] == "completed", job
    assert job["output"] == "Hello, world."
    assert len(gaps) == 2 and all(gap >= 0.9 for gap in gaps), gaps


def test_a_server_still_loading_its_model_is_waited_for(
        make_supervisor: Callable[..., RunningSupervisor]) -> None:
    """llama-server answers 503 "Loading model" until it has loaded, with no Retry-After:
    three tries in 3 s failed the attempt, though a larger model takes longer to load."""
    loading = '{"error": {"message": "Loading model", "type": "unavailable_error", "code": 503}}'
    with FakeLLM(status=503, fail_times=5, error_body=loading) as llm:
        job = run_chat(make_supervisor, llm.base_url)
    assert job["state"] == "completed" and job["attempt"] == 1, job
    with FakeLLM(status=503, error_body=loading) as llm:
        job = run_chat(make_supervisor, llm.base_url, OFFLOAD_LLM_FIRST_TOKEN_S="3")
    failed_with(job, "was still loading its model after 3 s (HTTP 503)", "try again")


def test_server_failing_every_time_gives_up(
        make_supervisor: Callable[..., RunningSupervisor]) -> None:
    with FakeLLM(status=500, retry_after="0",
                 error_body='{"error": {"message": "CUDA out of memory"}}') as llm:
        job = run_chat(make_supervisor, llm.base_url)
        attempts = len(llm.requests)
    failed_with(job, "HTTP 500", "on 3 attempts", "CUDA out of memory", "try again later")
    assert attempts == 3


def test_stream_cut_midway_keeps_the_partial_reply(
        make_supervisor: Callable[..., RunningSupervisor]) -> None:
    with FakeLLM(pieces=["one ", "two ", "three ", "four"], cut_after=2) as llm:
        job = run_chat(make_supervisor, llm.base_url)
    failed_with(job, "ended before the reply was complete", "partial reply is kept")
    assert job["output"] == "one two "


def test_a_reply_cut_short_says_whether_it_is_kept(make_server: Callable[..., Server]) -> None:
    # Every attempt said "the partial reply is kept", and the next one started afresh.
    with FakeLLM(pieces=["one ", "two ", "three ", "four"], cut_after=2) as llm:
        server = make_server(env={"OPENAI_BASE_URL": llm.base_url})
        with server.client() as client:
            job_id = client.post("/api/jobs", json={"kind": "chat", "max_attempts": 2,
                                                    "input": QUESTION}).json()["id"]
            job = wait_job(client, job_id)
    failed_with(job, "ended before the reply was complete (after 2 pieces); the partial "
                     "reply is kept")
    assert job["output"] == "one two "
    earlier = job["earlier_errors"][0]["message"]
    assert earlier.endswith("(after 2 pieces); it is not kept: the chat is tried again"), earlier


@pytest.mark.parametrize("max_tokens", [64, None])
def test_an_empty_stream_whose_request_the_server_takes_unstreamed_says_it_was_empty(
        make_supervisor: Callable[..., RunningSupervisor], max_tokens: int | None) -> None:
    """An empty stream is asked again unstreamed, for the server's refusal (llama-cpp-python
    names a prompt too long for its context only so), for one token even where the chat
    sets no limit (a whole reply, paid for and thrown away); one it takes says the stream
    was empty, not a refusal of its own making."""
    limit = {"OFFLOAD_LLM_MAX_TOKENS": str(max_tokens)} if max_tokens else {}
    with FakeLLM(pieces=["one ", "two"], cut_after=0) as llm:
        job = run_chat(make_supervisor, llm.base_url, 60, **limit)
        bodies = [request["body"] for request in llm.requests]
    failed_with(job, "ended before the reply was complete (after 0 pieces)")
    assert [(body.get("stream"), body.get("max_tokens")) for body in bodies] == [
        (True, max_tokens), (None, 1)] * (job.get("attempt") or 1), bodies  # at each attempt


def test_an_empty_stream_whose_server_refuses_max_tokens_says_it_was_empty(
        make_supervisor: Callable[..., RunningSupervisor]) -> None:
    """The probe's one-token limit refused (OpenAI's reasoning models take only
    `max_completion_tokens`) says nothing of the prompt: the empty stream stands (a
    transient failure), not a refusal of the probe's own making."""
    with FakeLLM(pieces=["one ", "two"], cut_after=0, refuses_max_tokens=True) as llm:
        job = run_chat(make_supervisor, llm.base_url)
    failed_with(job, "ended before the reply was complete (after 0 pieces)")


def test_an_empty_stream_whose_server_only_streams_says_it_was_empty(
        make_supervisor: Callable[..., RunningSupervisor]) -> None:
    """A server (or proxy) that takes only streamed requests refuses the probe with words
    of its own ("stream must be true"), which say nothing of the prompt's length: the
    chat failed with that refusal, not the empty stream's error."""
    with FakeLLM(pieces=["one ", "two"], cut_after=0, streaming_only=True) as llm:
        job = run_chat(make_supervisor, llm.base_url)
        refused = [request["body"] for request in llm.requests if not request["body"].get(
            "stream")]
    failed_with(job, "ended before the reply was complete (after 0 pieces)")
    assert "stream must be true" not in job["error"]["message"], job["error"]
    assert refused, "the probe was sent, and refused"


@pytest.mark.parametrize("kind", ["json", "sse"])
def test_malformed_stream(make_supervisor: Callable[..., RunningSupervisor], kind: str) -> None:
    with FakeLLM(malformed=kind) as llm:
        job = run_chat(make_supervisor, llm.base_url)
    failed_with(job, "malformed")
    assert job["output"] == "Hello", "what came before the garbage is kept"


def test_content_in_parts_or_of_another_type_is_read_as_text(
        make_supervisor: Callable[..., RunningSupervisor]) -> None:
    # A list of parts (as some servers stream it), a number, an object: the first is text,
    # the others none; before, they crashed the runner's final write (lost, and asked twice).
    pieces = ["Hello", [{"type": "text", "text": ", "}, {"type": "image"}], 7, {"a": 1},
              "world."]
    with FakeLLM(pieces=pieces) as llm:  # type: ignore[arg-type]
        job = run_chat(make_supervisor, llm.base_url)
        asked = len(llm.requests)
    assert job["state"] == "completed", job
    assert job["result"]["reply"] == job["output"] == "Hello, world."
    assert asked == 1


@pytest.mark.parametrize("server", ["silent", "sending comments"])
def test_no_first_token_within_the_limit(
        server: str, make_supervisor: Callable[..., RunningSupervisor]) -> None:
    # A busy server may send comments (": keep-alive") before its first piece: each one
    # reset the socket's timeout, and the limit never fired.
    with FakeLLM(hang_s=60) if server == "silent" else FakeLLM(keepalive_s=60) as llm:
        started = time.monotonic()
        job = run_chat(make_supervisor, llm.base_url, OFFLOAD_LLM_FIRST_TOKEN_S="1")
        waited = time.monotonic() - started
    failed_with(job, "within 1 s", "OFFLOAD_LLM_FIRST_TOKEN_S")
    # Far less than the server's silence, however slow this machine: the limit cut it.
    assert waited < 40


def test_job_deadline_stops_a_slow_reply(
        make_supervisor: Callable[..., RunningSupervisor]) -> None:
    # Its first two pieces must reach a runner at SCHED_IDLE, which any other work on the
    # machine holds back, before the deadline (1.5 s was missed under load); 10 s of reply.
    with FakeLLM(pieces=["a "] * 100, delay_s=0.1) as llm:
        job = run_chat(make_supervisor, llm.base_url, timeout_s=6)
    assert job["state"] == "timeout"
    assert job["error"]["type"] == "timeout"
    assert job["output"].startswith("a a "), "the partial reply is kept"


def test_server_that_does_not_stream(make_supervisor: Callable[..., RunningSupervisor]) -> None:
    with FakeLLM(non_streaming=True) as llm:
        job = run_chat(make_supervisor, llm.base_url)
    assert job["state"] == "completed"
    assert job["result"]["reply"] == "Hello, world." and job["result"]["streamed"] is False


def test_server_that_refuses_streaming_gets_a_plain_request(
        make_supervisor: Callable[..., RunningSupervisor]) -> None:
    with FakeLLM(rejects_stream=True) as llm:
        job = run_chat(make_supervisor, llm.base_url)
        sent = [r["body"].get("stream") for r in llm.requests]
    assert job["state"] == "completed", job
    assert job["output"] == "Hello, world."
    assert sent == [True, None]


def test_expert_prompt_and_context_reach_the_server(
        make_supervisor: Callable[..., RunningSupervisor]) -> None:
    with FakeLLM() as llm:
        sup = make_supervisor(runner_env={"OPENAI_BASE_URL": llm.base_url,
                                          "OFFLOAD_LLM_MAX_TOKENS": "77"})
        job_id = sup.submit("chat", context="CPU average 12%.", temperature=0.3, **QUESTION)
        assert sup.wait_final(job_id)["state"] == "completed"
        body = llm.requests[0]["body"]
    system = body["messages"][0]
    assert system["role"] == "system" and "expert" in system["content"]
    assert "CPU average 12%." in system["content"]
    assert body["messages"][1] == QUESTION["messages"][0]
    assert body["max_tokens"] == 77 and body["temperature"] == 0.3


def test_a_character_split_between_pieces_is_joined(
        make_supervisor: Callable[..., RunningSupervisor]) -> None:
    """A server that escapes characters beyond the BMP as JSON surrogate pairs can split
    one between two pieces (or send a half alone): the reply was lost before, its runner
    failing on each write (UTF-8 holds no half), and asked twice."""
    pieces = ["Hi \ud83d", "\ude00 there", ", lone \udc00 half", " and \ud83d"]
    with FakeLLM(pieces=pieces) as llm:
        job = run_chat(make_supervisor, llm.base_url)
        asked = len(llm.requests)
    assert job["state"] == "completed", job
    assert job["result"]["reply"] == job["output"] == (
        "Hi \U0001f600 there, lone \ufffd half and \ufffd")
    assert asked == 1
