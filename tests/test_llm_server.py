"""llama.cpp's llama-server as the embedded model's engine, through the product's wiring
(the API and the real supervisor): chats stream at once, and a cancelled chat frees its
slot."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sysconfig
import time
import venv
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from jobs import protocol as p
from jobs.protocol import embedded
from tests.conftest import free_port, stop_process, wait_for

pytestmark = [pytest.mark.llm, pytest.mark.slow]

# A long answer (greedy decoding repeats itself past 1500 tokens): each chat still
# decodes when the others start, and past a deadline of a few seconds.
LONG = [{"role": "user", "content": "List 200 animals, one per line, numbered."}]
OTHER_KEY = "sk-another-servers-key-5e0c"


@pytest.fixture
def model_server(make_server: Callable[..., Any]) -> tuple[Any, dict[str, Any]]:
    if embedded.server_binary() is None:
        pytest.skip("llama-server is not built here: run `python launch.py` (it builds it)")
    # A key of another server's in the environment (a shell's, say): never the model's.
    server = make_server(env={"OPENAI_BASE_URL": "", "OFFLOAD_MAX_CONCURRENT": "4",
                              "OFFLOAD_LLM_ENGINE": "auto", "OPENAI_API_KEY": OTHER_KEY})
    status = wait_for(lambda: (s := embedded.read_status(str(server.data_dir)) or {})
                      .get("ready") and s, 120, 0.2, "the embedded model to load")
    assert status["engine"] == embedded.LLAMA_SERVER and status["slots"] == 4, status
    return server, status


def _slots(status: dict[str, Any]) -> list[dict[str, Any]]:
    """llama-server's slots, asked with its key (in its environment: never on its command
    line, which every local account can read)."""
    proc = psutil.Process(status["pid"])
    assert OTHER_KEY not in str(proc.environ())
    key = proc.environ()["LLAMA_API_KEY"]
    assert key not in " ".join(proc.cmdline())
    base = status["base_url"].removesuffix("/v1")
    assert httpx.get(f"{base}/slots", timeout=10).status_code == 401
    answer = httpx.get(f"{base}/slots", headers={"Authorization": f"Bearer {key}"}, timeout=10)
    answer.raise_for_status()
    slots: list[dict[str, Any]] = answer.json()
    return slots


def _chat(client: httpx.Client, messages: list[dict[str, str]], max_tokens: int,
          timeout_s: float = 120) -> str:
    answer = client.post("/api/jobs", json={"kind": "chat", "timeout_s": timeout_s, "input": {
        "messages": messages, "max_tokens": max_tokens, "temperature": 0, "expert": False}})
    assert answer.status_code in (200, 201, 202), answer.text
    job_id: str = answer.json()["id"]
    return job_id


def test_chats_submitted_together_stream_at_the_same_time(
        model_server: tuple[Any, dict[str, Any]]) -> None:
    server, status = model_server
    with server.client() as client:
        ids = [_chat(client, LONG, 1500) for _ in range(3)]

        def all_streaming() -> bool:
            jobs = [client.get(f"/api/jobs/{i}").json() for i in ids]
            assert not any(j["state"] in p.FINAL_STATES for j in jobs), \
                "a chat finished before every one had started streaming"
            return all(j["state"] == "running" and j["output"] for j in jobs)

        wait_for(all_streaming, 120, 0.1, "every chat to stream")
        busy = sum(s["is_processing"] for s in _slots(status))
        for job_id in ids:
            client.delete(f"/api/jobs/{job_id}")
    assert busy >= 2, "the chats decode in slots of their own"


def test_every_slot_has_decoded_before_the_model_is_said_ready(
        model_server: tuple[Any, dict[str, Any]]) -> None:
    """The first batch of several slots is the slow one: the supervisor sends it before
    llm.json says ready, so chats sent together never pay for it."""
    _, status = model_server
    slots = _slots(status)
    assert len(slots) == 4
    assert all("id_task" in slot for slot in slots), slots  # a slot never used has none


def test_a_cancelled_or_late_chat_frees_its_slot_and_the_next_chat_answers(
        model_server: tuple[Any, dict[str, Any]]) -> None:
    server, status = model_server
    with server.client() as client:
        job_id = _chat(client, LONG, 3000)
        wait_for(lambda: client.get(f"/api/jobs/{job_id}").json()["output"], 120, 0.05,
                 "the long answer to start")
        assert any(s["is_processing"] for s in _slots(status))
        assert client.delete(f"/api/jobs/{job_id}").status_code in (200, 202)
        job = wait_for(lambda: (j := client.get(f"/api/jobs/{job_id}").json())["state"]
                       in p.FINAL_STATES and j, 30, 0.05, "the cancel")
        assert job["state"] == "cancelled", job
        # Generous: the runner's process tree dies, its connection closes, the slot is
        # released (llama-server notices a closed connection at its next token).
        wait_for(lambda: not any(s["is_processing"] for s in _slots(status)), 10, 0.05,
                 "llama-server to stop decoding for the cancelled chat")

        # A chat past its deadline: the same.
        late = _chat(client, LONG, 3000, timeout_s=3)
        job = wait_for(lambda: (j := client.get(f"/api/jobs/{late}").json())["state"]
                       in p.FINAL_STATES and j, 60, 0.05, "the deadline")
        assert job["state"] == "timeout" and job["output"], job
        wait_for(lambda: not any(s["is_processing"] for s in _slots(status)), 10, 0.05,
                 "llama-server to stop decoding for the chat past its deadline")

        after = _chat(client, [{"role": "user", "content": "Say hello."}], 16)
        wait_for(lambda: client.get(f"/api/jobs/{after}").json()["output"], 60, 0.05,
                 "the next chat's first token")
        final = wait_for(lambda: (j := client.get(f"/api/jobs/{after}").json())["state"]
                         in p.FINAL_STATES and j, 60, 0.1, "the next chat to end")
        assert final["state"] == "completed", json.dumps(final)[:500]


def test_a_model_server_stopped_by_a_signal_is_restarted_and_its_chat_answered(
        model_server: tuple[Any, dict[str, Any]]) -> None:
    """SIGSTOP: the kernel still accepts connections for the stopped server, which answers
    none. It is restarted (llm.json stops saying ready), and the chat it left hanging is
    answered by the new one instead of waiting out its first-token limit twice."""
    server, status = model_server
    with server.client() as client:
        job_id = _chat(client, LONG, 200)
        wait_for(lambda: client.get(f"/api/jobs/{job_id}").json()["output"], 120, 0.05,
                 "the answer to start")
        os.kill(status["pid"], signal.SIGSTOP)
        try:
            wait_for(lambda: not (embedded.read_status(str(server.data_dir)) or {})
                     .get("ready"), 10, 0.2, "llm.json to stop saying ready")
            again = wait_for(lambda: (s := embedded.read_status(str(server.data_dir)) or {})
                             .get("ready") and s, 60, 0.2, "the model server to start again")
        finally:
            with contextlib.suppress(OSError):
                os.kill(status["pid"], signal.SIGCONT)
        assert again["pid"] != status["pid"], again
        assert not psutil.pid_exists(status["pid"]) or psutil.Process(
            status["pid"]).status() == psutil.STATUS_ZOMBIE
        job = wait_for(lambda: (j := client.get(f"/api/jobs/{job_id}").json())["state"]
                       in p.FINAL_STATES and j, 90, 0.1, "the chat to end")
    assert job["state"] == "completed" and job["attempt"] == 2, json.dumps(job)[:800]


def test_a_killed_model_server_is_said_down_at_once_and_its_chats_answered_after(
        model_server: tuple[Any, dict[str, Any]]) -> None:
    """SIGKILL of llama-server during 3 chats: /api/health says it is down as soon as
    llm.json does (it said "ready" from a cache up to 2 s old), the supervisor starts it
    again, the 3 chats are answered on their second attempt, and one sent while it was
    down is answered too."""
    server, status = model_server
    with server.client() as client:
        ids = [_chat(client, LONG, 200) for _ in range(3)]
        wait_for(lambda: all(client.get(f"/api/jobs/{i}").json()["output"] for i in ids), 120,
                 0.05, "the 3 answers to start")
        assert client.get("/api/health").json()["llm"]["ready"] is True
        os.kill(status["pid"], signal.SIGKILL)
        wait_for(lambda: not (embedded.read_status(str(server.data_dir)) or {}).get("ready"),
                 10, 0.01, "llm.json to stop saying ready")
        llm = client.get("/api/health").json()["llm"]
        assert llm["ready"] is False and llm["detail"] != "ok", llm
        ids.append(_chat(client, [{"role": "user", "content": "Say hello."}], 16))
        finals = [wait_for(functools.partial(_ended, client, i), 180, 0.1, "the chats to end")
                  for i in ids]
        llm = client.get("/api/health").json()["llm"]
    assert [(j["state"], j["attempt"]) for j in finals] == [("completed", 2)] * 3 + [
        ("completed", 1)], json.dumps(finals)[:2000]
    assert all("stream" in j["earlier_errors"][0]["message"] for j in finals[:3]), finals
    assert llm["ready"] is True and llm["model"] == "SmolLM2-135M-Instruct", llm


def test_a_stop_while_chats_decode_stops_the_model_server_itself(
        model_server: tuple[Any, dict[str, Any]]) -> None:
    """llama-server asked to stop while it answers two requests never ends. The supervisor
    waited 10 s for it, so the API killed the supervisor after 5 (every stop while chats,
    or the start's warm-up, were answered took 5.5 s), leaving llm.json saying ready."""
    server, status = model_server
    with server.client() as client:
        for _ in range(3):
            _chat(client, LONG, 1500)
        wait_for(lambda: sum(s["is_processing"] for s in _slots(status)) >= 2, 120, 0.1,
                 "two chats to decode at once")
    started = time.monotonic()
    server.stop()
    took = time.monotonic() - started
    said = embedded.read_status(str(server.data_dir)) or {}
    assert not said.get("ready") and "is stopped" in said.get("detail", ""), \
        f"the supervisor did not stop its model server ({took:.1f} s): {said}"
    assert not psutil.pid_exists(status["pid"])


def test_a_long_conversation_of_numbers_is_cut_to_the_context_the_server_counts(
        model_server: tuple[Any, dict[str, Any]]) -> None:
    """Digits take a token each, three times the guess for prose: the earliest turns are
    left out until the server takes the prompt, not refused with a 400. A message that
    alone cannot fit says so, in words a user can act on."""
    _long_conversations_fit_or_say_so(model_server[0])


def test_a_long_conversation_on_llama_cpp_python_is_cut_or_said_too_long(
        fallback_server: Any) -> None:
    """llama-cpp-python's server answers a streamed prompt longer than its context with
    an empty stream, which failed twice as "stream ended ... after 0 pieces", whether its
    earliest turns could go or not. Asked again unstreamed, it counts the tokens: the
    conversation is cut, or said too long, as on llama-server."""
    _long_conversations_fit_or_say_so(fallback_server)


def _long_conversations_fit_or_say_so(server: Any) -> None:
    numbers = " ".join(str(n % 10) for n in range(500))  # 999 characters, 999 tokens
    turns: list[dict[str, str]] = []
    for _ in range(10):
        turns += [{"role": "user", "content": numbers}, {"role": "assistant", "content": "ok"}]
    with server.client() as client:
        long_one = _chat(client, [*turns, {"role": "user", "content": "Say hello."}], 16)
        too_long = _chat(client, [{"role": "user", "content": numbers * 3}], 16)
        done = [wait_for(functools.partial(_ended, client, job_id), 120, 0.1,
                         "the chat to end") for job_id in (long_one, too_long)]
    assert done[0]["state"] == "completed", json.dumps(done[0])[:800]
    assert done[0]["result"]["usage"]["prompt_tokens"] <= embedded.SLOT_CTX - 16
    assert done[1]["state"] == "failed" and done[1]["attempt"] == 1, json.dumps(done[1])[:800]
    message = done[1]["error"]["message"]
    assert message.startswith("the message is too long for the embedded model: with the "
                              "system prompt (and its context) it takes "), message
    assert "shorten it" in message and "increasing" not in message, message


def test_chats_beyond_the_models_slots_wait_queued_saying_so(
        make_server: Callable[..., Any]) -> None:
    """`offload parallel 16` with a model of 2 slots: chats past them waited inside
    llama-server, `running` with no word, until their first-token limit failed them. They
    wait in Offload's queue instead, with no place in it, and `offload list` says why."""
    from tests.test_cli import cli

    if embedded.server_binary() is None:
        pytest.skip("llama-server is not built here: run `python launch.py` (it builds it)")
    server = make_server(env={"OPENAI_BASE_URL": "", "OFFLOAD_MAX_CONCURRENT": "2",
                              "OFFLOAD_LLM_ENGINE": "auto"})
    wait_for(lambda: (embedded.read_status(str(server.data_dir)) or {}).get("ready"), 120,
             0.2, "the embedded model to load")
    raised = cli(server.url, "parallel", "16")
    assert raised.returncode == 0, raised.stderr
    assert "chat at once: at most 2, the embedded model's slots" in raised.stdout, raised.stdout
    with server.client() as client:
        ids = [_chat(client, LONG, 64) for _ in range(4)]
        most, listed, reasons, deadline = 0, "", set(), time.monotonic() + 300
        while not all(finals := [_ended(client, i) for i in ids]):
            jobs = [client.get(f"/api/jobs/{i}").json() for i in ids]
            most = max(most, sum(job["state"] == "running" for job in jobs))
            # No place in the queue: the slots, not the queue, hold them back.
            held = sum(job["state"] == "queued" and job["queue_position"] is None
                       for job in jobs)
            if held == 2 and not listed:
                listed = cli(server.url, "list", "--kind", "chat").stdout
                reasons = {job["waits_for"]["reason"] for job in jobs
                           if job["state"] == "queued" and job["queue_position"] is None}
            assert time.monotonic() < deadline, "the chats did not end in 300 s"
            time.sleep(0.05)
    assert most <= 2, f"{most} chats ran at once on 2 slots"
    assert "held: the embedded model's 2 slots" in listed, listed  # busy, or soon to be
    assert reasons == {"model_slots"}, reasons
    assert [(j["state"], j["attempt"]) for j in finals] == [("completed", 1)] * 4, \
        json.dumps(finals)[:1500]


def what_wait_says_first(url: str, job_id: str) -> str:
    """The first line `offload wait` says of a held chat (it then waits: stopped there)."""
    from tests.test_cli import start_cli

    waiting = start_cli(url, "wait", job_id)
    try:
        assert waiting.stderr is not None
        return waiting.stderr.readline().decode()
    finally:
        waiting.kill()
        waiting.communicate(timeout=30)


def test_chats_held_by_their_own_cap_as_low_as_the_slots_say_both(
        make_server: Callable[..., Any]) -> None:
    """OFFLOAD_KIND_CAPS' chat=2 on a model of 2 slots: a third chat was said held by the
    model's slots alone, with OFFLOAD_LLM_SLOTS as the way on, which alone starts none.
    Both caps are named, and both ways on; once the chats' cap is raised, the slots
    alone."""
    from tests.test_cli import cli

    if embedded.server_binary() is None:
        pytest.skip("llama-server is not built here: run `python launch.py` (it builds it)")
    server = make_server(env={"OPENAI_BASE_URL": "", "OFFLOAD_MAX_CONCURRENT": "4",
                              "OFFLOAD_LLM_SLOTS": "2", "OFFLOAD_KIND_CAPS": "train=1,chat=2",
                              "OFFLOAD_LLM_ENGINE": "auto"})
    wait_for(lambda: (embedded.read_status(str(server.data_dir)) or {}).get("ready"), 120,
             0.2, "the embedded model to load")
    with server.client() as client:
        ids = [_chat(client, LONG, 1500) for _ in range(3)]

        def third_held() -> dict[str, Any] | None:
            job: dict[str, Any] = client.get(f"/api/jobs/{ids[2]}").json()
            waits = job["waits_for"] or {}
            return waits if job["state"] == "queued" and waits.get("running") == 2 else None

        try:
            waits = wait_for(third_held, 120, 0.1, "the third chat to be held")
            listed = cli(server.url, "list", "--kind", "chat").stdout
            said = what_wait_says_first(server.url, ids[2])
            raised = cli(server.url, "parallel", "3", "--kind", "chat")
            assert raised.returncode == 0, raised.stderr

            def held_by_slots_alone() -> dict[str, Any] | None:
                now = third_held()
                return now if now and now.get("kind_cap") is None else None

            after = wait_for(held_by_slots_alone, 30, 0.1, "the count with the chats' cap raised")
            listed_after = cli(server.url, "list", "--kind", "chat").stdout
        finally:
            for job_id in ids:
                client.delete(f"/api/jobs/{job_id}")
    assert waits == {"reason": "model_slots", "model_slots": 2, "kind_cap": 2, "running": 2,
                     "jobs": None}, waits
    assert "held: kind chat's cap 2 and the model's 2 slots busy" in listed, listed
    assert "raise both, with offload parallel N --kind chat and OFFLOAD_LLM_SLOTS" in said, said
    assert after["reason"] == "model_slots" and after["model_slots"] == 2, after
    assert "held: the embedded model's 2 slots busy" in listed_after, listed_after


def _ended(client: httpx.Client, job_id: str) -> Any:
    job = client.get(f"/api/jobs/{job_id}").json()
    return job["state"] in p.FINAL_STATES and job


@pytest.fixture
def own_environment(tmp_path: Path) -> tuple[Path, Path]:
    """An environment of its own, with this one's packages and a link to its llama-server
    that a test may take away (this one's stays): its interpreter and that link."""
    binary = embedded.server_binary()
    if binary is None:
        pytest.skip("llama-server is not built here: run `python launch.py` (it builds it)")
    folder = tmp_path / "venv"
    venv.create(folder, with_pip=False, symlinks=True)
    python = folder / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    paths = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    Path(site, "offload-test.pth").write_text("\n".join(sorted(paths)) + "\n")
    batched = Path(embedded.batched_model_path()).parent  # the model as launch.py wrote it
    if batched.is_dir():
        (folder / "share").mkdir()
        (folder / embedded.BATCHED_MODEL_DIR).symlink_to(batched)
    link = folder / "bin" / Path(binary).name
    link.symlink_to(binary)
    return python, link


def test_a_model_restarted_while_llama_server_is_missing_keeps_to_its_slots(
        own_environment: tuple[Path, Path], make_server: Callable[..., Any]) -> None:
    """The chats' cap is the slots of the engine chosen at start. A restart that found
    llama-server missing (a reinstall under way) ran the model on llama-cpp-python's
    server, one slot, while chats were still started two at a time: one of them waited
    inside it with no word. The model waits for llama-server instead, saying so, and comes
    back on it with its two slots; the chats sent meanwhile are answered."""
    python, link = own_environment
    server = make_server(env={"OPENAI_BASE_URL": "", "OFFLOAD_MAX_CONCURRENT": "2",
                              "OFFLOAD_LLM_ENGINE": "auto"}, python=str(python))
    status = wait_for(lambda: (s := embedded.read_status(str(server.data_dir)) or {})
                      .get("ready") and s, 120, 0.2, "the embedded model to load")
    assert status["engine"] == embedded.LLAMA_SERVER and status["slots"] == 2, status
    target = link.readlink()
    link.unlink()
    os.kill(status["pid"], signal.SIGKILL)

    def said_missing() -> dict[str, Any] | None:
        status = embedded.read_status(str(server.data_dir)) or {}
        return status if "missing" in str(status.get("detail")) else None

    missing = wait_for(said_missing, 30, 0.1, "llm.json to say llama-server is missing")
    assert not missing["ready"] and missing["available"], missing
    assert "llama-server" in missing["detail"] and "--reinstall" in missing["detail"], missing
    with server.client() as client:
        hello = [{"role": "user", "content": "Say hello."}]
        ids = [_chat(client, hello, 16) for _ in range(2)]
        time.sleep(5)  # past the restart's backoff and a load, on any engine
        waiting = embedded.read_status(str(server.data_dir)) or {}
        assert not waiting["ready"] and "missing" in waiting["detail"], waiting
        assert client.get("/api/queue").json()["model_slots"] == 2
        assert client.get("/api/health").json()["llm"]["detail"] == missing["detail"]
        link.symlink_to(target)  # the reinstall is done
        again = wait_for(lambda: (s := embedded.read_status(str(server.data_dir)) or {})
                         .get("ready") and s, 120, 0.2, "the embedded model to start again")
        finals = [wait_for(functools.partial(_ended, client, i), 120, 0.1, "the chats to end")
                  for i in ids]
    assert again["engine"] == embedded.LLAMA_SERVER and again["slots"] == 2, again
    assert again["pid"] != status["pid"], again
    assert [j["state"] for j in finals] == ["completed"] * 2, json.dumps(finals)[:1500]


def test_a_supervisor_started_again_while_llama_server_is_missing_runs_the_apis_engine(
        own_environment: tuple[Path, Path], make_server: Callable[..., Any]) -> None:
    """The API chose llama-server at its start, and keeps to its two slots. A supervisor
    it started again (the first one killed) while llama-server was missing chose for
    itself: llama-cpp-python's server, one slot, for its whole life, while the API said
    and started two chats at a time. It runs the API's engine: it waits for llama-server,
    saying so, as a restart of the model does, and comes back on it."""
    python, link = own_environment
    server = make_server(env={"OPENAI_BASE_URL": "", "OFFLOAD_MAX_CONCURRENT": "2",
                              "OFFLOAD_LLM_ENGINE": "auto"}, python=str(python))
    status = wait_for(lambda: (s := embedded.read_status(str(server.data_dir)) or {})
                      .get("ready") and s, 120, 0.2, "the embedded model to load")
    assert status["engine"] == embedded.LLAMA_SERVER and status["slots"] == 2, status
    first = server.supervisor()
    target = link.readlink()
    link.unlink()
    first.kill()  # its model server dies with it

    def next_model() -> dict[str, Any] | None:
        """What the next supervisor's model does: waits for llama-server, or runs."""
        now = embedded.read_status(str(server.data_dir)) or {}
        waits = "missing" in str(now.get("detail"))
        return now if waits or (now.get("ready") and now.get("pid") != status["pid"]) else None

    after = wait_for(next_model, 120, 0.2, "the next supervisor's model to start or wait")
    with server.client() as client:
        assert server.supervisor().pid != first.pid
        assert after["engine"] == embedded.LLAMA_SERVER and after["slots"] == 2, after
        assert not after["ready"] and "--reinstall" in after["detail"], after
        hello = [{"role": "user", "content": "Say hello."}]
        ids = [_chat(client, hello, 16) for _ in range(2)]
        assert client.get("/api/queue").json()["model_slots"] == 2
        assert client.get("/api/health").json()["llm"]["detail"] == after["detail"]
        link.symlink_to(target)  # the reinstall is done
        again = wait_for(lambda: (s := embedded.read_status(str(server.data_dir)) or {})
                         .get("ready") and s, 120, 0.2, "the embedded model to start again")
        finals = [wait_for(functools.partial(_ended, client, i), 120, 0.1, "the chats to end")
                  for i in ids]
    assert again["engine"] == embedded.LLAMA_SERVER and again["slots"] == 2, again
    assert [j["state"] for j in finals] == ["completed"] * 2, json.dumps(finals)[:1500]


@pytest.fixture(params=[embedded.LLAMA_SERVER, embedded.LLAMA_CPP_PYTHON])
def another_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """llama-server, or llama-cpp-python's server, started by hand, as another server
    (OPENAI_BASE_URL): its address."""
    engine: str = request.param
    model = embedded.model_path(None)
    if model is None or (engine == embedded.LLAMA_SERVER and embedded.server_binary() is None):
        pytest.skip("llama-server is not built here: run `python launch.py` (it builds it)")
    port = free_port()
    with open(tmp_path / "another-server.log", "ab") as out:
        proc = subprocess.Popen(embedded.server_command(model, engine=engine),
                                env=embedded.server_env(port, None, engine),
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_for(lambda: embedded.answers(base_url, None), 120, 0.2, f"{engine} to load")
        yield base_url
    finally:
        stop_process(proc)


def test_a_conversation_longer_than_another_servers_context_says_so(
        another_server: str, make_server: Callable[..., Any]) -> None:
    """Another server gets the whole conversation; one longer than its model's context
    failed with the server's own words, "HTTP 400 ... try increasing it" (its context,
    which a chat's user cannot change), or, from llama-cpp-python's server, an empty
    stream ("stream ended ... after 0 pieces")."""
    server = make_server(env={"OPENAI_BASE_URL": another_server})
    numbers = " ".join(str(n % 10) for n in range(1500))  # a token a digit: 3,000
    with server.client() as client:
        job_id = _chat(client, [{"role": "user", "content": numbers}], 8)
        job = wait_for(functools.partial(_ended, client, job_id), 120, 0.1, "the chat to end")
    assert job["state"] == "failed" and job["attempt"] == 1, json.dumps(job)[:1500]
    message = job["error"]["message"]
    assert message.startswith("the conversation is too long for the model at "
                              f"{another_server}: it takes "), message
    assert "start a new conversation" in message and "HTTP 400" not in message, message


@pytest.fixture
def fallback_server(make_server: Callable[..., Any]) -> Any:
    """The embedded model on llama-cpp-python's server (OFFLOAD_LLM_ENGINE), loaded."""
    server = make_server(env={"OPENAI_BASE_URL": "", "OFFLOAD_MAX_CONCURRENT": "4",
                              "OFFLOAD_LLM_ENGINE": embedded.LLAMA_CPP_PYTHON})
    status = wait_for(lambda: (s := embedded.read_status(str(server.data_dir)) or {})
                      .get("ready") and s, 120, 0.2, "the embedded model to load")
    assert status["engine"] == embedded.LLAMA_CPP_PYTHON and status["slots"] == 1, status
    assert "llama_cpp.server" in " ".join(psutil.Process(status["pid"]).cmdline())
    return server


def test_llama_cpp_python_server_stays_the_fallback(fallback_server: Any) -> None:
    with fallback_server.client() as client:
        job_id = _chat(client, [{"role": "user", "content": "Say hello."}], 16)
        final = wait_for(lambda: (j := client.get(f"/api/jobs/{job_id}").json())["state"]
                         in p.FINAL_STATES and j, 120, 0.1, "the chat to end")
    assert final["state"] == "completed" and final["output"], json.dumps(final)[:500]


def test_chats_held_on_llama_cpp_python_are_told_a_way_on_that_starts_them(
        make_server: Callable[..., Any]) -> None:
    """llama-cpp-python's server has one slot, whatever OFFLOAD_LLM_SLOTS says, yet
    `offload parallel`, `wait` and `show` told a held chat's user to raise
    OFFLOAD_LLM_SLOTS, which starts none. They say the server runs one chat at a time, and
    that llama-server runs more; `/api/queue` and `/api/health` say which engine runs."""
    from tests.test_cli import cli

    server = make_server(env={"OPENAI_BASE_URL": "", "OFFLOAD_MAX_CONCURRENT": "4",
                              "OFFLOAD_LLM_SLOTS": "4", "OFFLOAD_KIND_CAPS": "train=1,chat=1",
                              "OFFLOAD_LLM_ENGINE": embedded.LLAMA_CPP_PYTHON})
    wait_for(lambda: (embedded.read_status(str(server.data_dir)) or {}).get("ready"), 120,
             0.2, "the embedded model to load")
    with server.client() as client:
        ids = [_chat(client, LONG, 1500) for _ in range(2)]

        def second_held(by_cap: bool) -> dict[str, Any] | None:
            job: dict[str, Any] = client.get(f"/api/jobs/{ids[1]}").json()
            waits = job["waits_for"] or {}
            held = job["state"] == "queued" and waits.get("running") == 1
            return waits if held and (waits.get("kind_cap") is not None) == by_cap else None

        try:
            wait_for(functools.partial(second_held, True), 120, 0.1, "the second chat held")
            said_by_both = what_wait_says_first(server.url, ids[1])
            raised = cli(server.url, "parallel", "3", "--kind", "chat")
            assert raised.returncode == 0, raised.stderr
            wait_for(functools.partial(second_held, False), 30, 0.1, "the chats' cap raised")
            shown = cli(server.url, "show", ids[1]).stdout
            queue = client.get("/api/queue").json()
            health = client.get("/api/health").json()
        finally:
            for job_id in ids:
                client.delete(f"/api/jobs/{job_id}")
    assert queue["model_slots"] == 1 and queue["model_engine"] == embedded.LLAMA_CPP_PYTHON
    assert health["queue"]["model_engine"] == embedded.LLAMA_CPP_PYTHON, health["queue"]
    assert "chat at once: at most 1, llama-cpp-python's server runs one chat at a time" \
        in raised.stdout, raised.stdout
    assert "both hold it" in said_by_both, said_by_both
    assert "held:" in shown, shown
    for said in (raised.stdout, said_by_both, shown):
        assert "whatever OFFLOAD_LLM_SLOTS says" in said or "(OFFLOAD_LLM_SLOTS" not in said
        assert "raise both" not in said and "OFFLOAD_LLM_SLOTS sets" not in said, said
    for said in (said_by_both, shown):
        assert "llama-cpp-python's server has one slot, whatever OFFLOAD_LLM_SLOTS says" \
            in said and "python launch.py --reinstall" in said, said
