"""Runners by hand, as a developer debugs them, and the secrets they must keep."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from jobs import protocol as p
from jobs.store.job_store import JobStore
from tests.conftest import ROOT, RunningSupervisor, wait_for
from tests.fake_llm import FakeLLM

SENTINEL = "sk-sentinel-3f9a1c0d5e7b4a2f"


def run(args: list[str], env: dict[str, str] | None = None, timeout: float = 60,
        stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout, input=stdin)


def test_job_file_runs_in_the_foreground(data_dir: Path) -> None:
    store = JobStore(data_dir / "jobs")
    job_id = store.create("sleep", {"seconds": 0.2, "steps": 2}, 30)["id"]
    done = run(["-m", "runners.sleep", "--job-file", str(store.path(job_id))])
    assert done.returncode == 0, done.stderr
    job = store.read(job_id)
    assert job["state"] == "completed"
    assert job["result"]["slept_s"] == 0.2

    again = run(["-m", "runners.sleep", "--job-file", str(store.path(job_id))])
    assert again.returncode == 2
    assert "already finished" in again.stderr and "--force" in again.stderr
    forced = run(["-m", "runners.sleep", "--job-file", str(store.path(job_id)), "--force"])
    assert forced.returncode == 0
    done_again = store.read(job_id)
    assert done_again["pid"] != job["pid"]
    # Another kind's runner: a finished chat's reply was replaced by a sleep's empty one.
    for args in (["--force"], []):  # the launcher's bare form too
        other = run(["-m", "runners.train", "--job-file", str(store.path(job_id)), *args])
        assert other.returncode == 2, other.stderr
        assert other.stderr.strip().endswith(
            f"is a sleep job, not a train one: run it with python -m runners.sleep "
            f"--job-file {store.path(job_id)}"), other.stderr
    assert store.read(job_id) == done_again


def test_a_job_running_is_not_run_again_by_hand(make_server: Callable[..., Any]) -> None:
    # Two runners of one job wrote its file in turn: a final state undone, a cancel lost.
    server = make_server()
    with server.client() as client:
        job = client.post("/api/jobs", json={"kind": "sleep",
                                             "input": {"seconds": 3, "steps": 30}}).json()
        running = wait_for(lambda: (lambda j: j if j["state"] == "running" and j["pid"]
                                    else None)(client.get(f"/api/jobs/{job['id']}").json()))
        job_file = server.data_dir / "jobs" / job["id"] / "job.json"
        for extra in ([], ["--force"]):
            twice = run(["-m", "runners.sleep", "--job-file", str(job_file), *extra],
                        env={"OFFLOAD_DATA_DIR": str(server.data_dir)})
            assert twice.returncode == 2, twice.stderr
            assert f"is running (pid {running['pid']})" in twice.stderr
            assert f"offload cancel {job['id']}" in twice.stderr
        assert client.delete(f"/api/jobs/{job['id']}").status_code == 200
        ended = wait_for(lambda: (lambda j: j if j["state"] in p.FINAL_STATES else None)(
            client.get(f"/api/jobs/{job['id']}").json()))
    assert ended["state"] == "cancelled" and ended["pid"] == running["pid"]


def test_missing_job_file_is_a_clear_error(tmp_path: Path) -> None:
    done = run(["-m", "runners.sleep", "--job-file", str(tmp_path / "nope.json")])
    assert done.returncode == 2
    assert "no job file" in done.stderr
    assert "Traceback" not in done.stderr


def test_direct_form_prints_progress_and_result() -> None:
    done = run(["-m", "runners.sleep", "0.3", "--steps", "3"])
    assert done.returncode == 0, done.stderr
    assert "100.0%" in done.stderr and "step 3/3" in done.stderr
    assert '"slept_s": 0.3' in done.stdout


@pytest.mark.parametrize(("args", "said"), [
    (["99999"], "'seconds' must be a number from 0 to 3600"),
    (["nan"], "'seconds' must be a number from 0 to 3600"),
    (["-1"], "'seconds' must be a number from 0 to 3600"),
    (["1", "--steps", "0"], "'steps' must be a whole number from 1 to 10000"),
    (["0", "--timeout", "-1"], "argument --timeout: must be a number of seconds above 0, not -1"),
    (["0", "--timeout", "nan"], "argument --timeout: must be a number of seconds above 0, not nan"),
    # Taken for the job file's, unsaid: its own input ran (and --data-dir was ignored).
    (["5", "--steps", "2", "--job-file", "job.json"], "seconds, --steps cannot go with "
     "--job-file: a job file runs with its own input and timeout, in the data folder it is in"),
])
def test_a_sleep_by_hand_out_of_bounds_is_bad_usage(args: list[str], said: str) -> None:
    # Out of the API's bounds it exited 1 ("failed"), but for -1 (2); a --timeout of -1 or
    # NaN was run without a deadline, unsaid.
    done = run(["-m", "runners.sleep", *args])
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.splitlines()[-1].endswith(f"error: {said}"), done.stderr
    assert "slept_s" not in done.stdout


@pytest.mark.parametrize("asked", [True, False], ids=["cancel asked", "not asked"])
def test_sigterm_to_a_launched_runner_is_a_cancel_only_when_asked(data_dir: Path,
                                                                  asked: bool) -> None:
    store = JobStore(data_dir / "jobs")
    job_id = store.create("sleep", {"seconds": 60}, 120)["id"]
    # Named by its bare name, from its folder: "cannot put the job's claim on disk (No
    # such file or directory)" (the folder of "job.json" taken as "" to sync).
    (store.path(job_id).parent / p.RUN_FILE).write_text("{}")
    proc = subprocess.Popen([sys.executable, "-m", "runners.sleep", "--job-file",
                             p.JOB_FILE], cwd=store.path(job_id).parent,  # as launched
                            env={**os.environ, "PYTHONPATH": str(ROOT), p.LAUNCHED_ENV: "1"})
    wait_for(lambda: store.read(job_id)["state"] == "running", what="running")
    if asked:  # as a cancel asks, before the supervisor's SIGTERM
        p.request_stop(store.path(job_id), p.JobState.CANCELLED)
    proc.send_signal(signal.SIGTERM)
    code, job = proc.wait(10), store.read(job_id)
    # Not asked for here (a `kill`, a shutdown; or a stop through Ray): not a cancel, and
    # not final: left to the supervisor, which knows whether it asked (none here).
    assert (code, job["state"], job["error"]["type"], job["exit_code"]) == (
        (3, "cancelled", "cancelled", 3) if asked else (75, "running", "lost", 75)), job
    if not asked:
        return
    # Without a job file nor a --timeout, a SIGTERM ended it unsaid (143); with one, it
    # said "cancelled".
    direct = subprocess.Popen([sys.executable, "-m", "runners.sleep", "60", "--steps", "600"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert direct.stderr is not None
    first = direct.stderr.read(1)  # its first step's progress: it runs
    direct.send_signal(signal.SIGTERM)
    _, rest = direct.communicate(timeout=10)
    said = (first + rest).decode()
    assert direct.returncode == 3 and "cancelled" in said, (direct.returncode, said)


def test_a_job_cancelled_as_it_was_launched_never_runs(data_dir: Path) -> None:
    # A cancel that landed between the supervisor's launch and the runner's start (its
    # stop request there before the runner ran) was left to the supervisor's next pass:
    # one stalled or restarting then, the job ran to its end, a queued job cancelled
    # that completed.
    store = JobStore(data_dir / "jobs")
    job_id = store.create("sleep", {"seconds": 3, "steps": 3}, 30)["id"]
    p.request_stop(store.path(job_id), p.JobState.CANCELLED)
    began = time.monotonic()
    done = run(["-m", "runners.sleep", "--job-file", str(store.path(job_id))], timeout=20)
    assert done.returncode == 3, done.stderr
    job = store.read(job_id)
    assert job["state"] == "cancelled" and job["error"]["type"] == "cancelled", job
    assert job["result"] is None and time.monotonic() - began < 3
    # Its stop request stays: a finished job run again by hand (--force) runs all the same.
    forced = run(["-m", "runners.sleep", "--job-file", str(store.path(job_id)), "--force"],
                 timeout=20)
    assert forced.returncode == 0, forced.stderr
    assert store.read(job_id)["state"] == "completed"


def test_runner_own_deadline_writes_timeout(data_dir: Path) -> None:
    store = JobStore(data_dir / "jobs")
    job_id = store.create("sleep", {"seconds": 60}, 0.5)["id"]
    done = run(["-m", "runners.sleep", "--job-file", str(store.path(job_id))], timeout=20)
    assert done.returncode == 3
    job = store.read(job_id)
    assert job["state"] == "timeout"
    assert job["error"]["type"] == "timeout"


def test_a_deadline_that_passes_at_once_is_a_timeout(data_dir: Path) -> None:
    # 1e-300 s (accepted: above 0) fired before the runner could record a stop: a
    # traceback, and the job left "lost".
    store = JobStore(data_dir / "jobs")
    job_id = store.create("sleep", {"seconds": 1}, 1e-300)["id"]
    done = run(["-m", "runners.sleep", "--job-file", str(store.path(job_id))], timeout=20)
    assert done.returncode == 3 and "Traceback" not in done.stderr, done.stderr
    job = store.read(job_id)
    assert job["state"] == "timeout" and job["error"]["type"] == "timeout", job


def test_a_deadline_too_far_for_the_timer_is_no_deadline(data_dir: Path) -> None:
    # A timeout_s edited by hand to 1e308: OverflowError in setitimer, the job "lost".
    store = JobStore(data_dir / "jobs")
    for far in (1e308, 1e10, math.inf):
        job_id = store.create("sleep", {"seconds": 0.2, "steps": 2}, 30)["id"]
        p.write_json(str(store.path(job_id)), {**store.read(job_id), "timeout_s": far})
        done = run(["-m", "runners.sleep", "--job-file", str(store.path(job_id))], timeout=20)
        assert done.returncode == 0 and "Traceback" not in done.stderr, (far, done.stderr)
        job = store.read(job_id)
        assert job["state"] == "completed" and job["result"]["slept_s"] == 0.2, job
    by_hand = run(["-m", "runners.sleep", "0.2", "--timeout", "1e308"], timeout=20)
    assert by_hand.returncode == 0 and "Traceback" not in by_hand.stderr, by_hand.stderr


def test_a_stop_on_the_heels_of_the_deadline_is_one_stop() -> None:
    # The supervisor's SIGTERM at the same deadline, between the runner's own timeout and
    # its final state's write, raised again out of the handler: a traceback, exit 1.
    # (The handlers themselves: the instant between two signals cannot be had on demand.)
    from runners.execution import Stopper, StopRequested

    stopper = Stopper(None)
    with pytest.raises(StopRequested) as stopped:
        stopper._on_deadline(signal.SIGALRM, None)
    assert stopped.value.reason == "timeout"
    stopper._on_signal(signal.SIGTERM, None)  # ignored: the timeout is being written


@pytest.fixture
def watched_stop_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Windows: the supervisor's CTRL_BREAK reaches no runner (each runs in a console of
    its own), so a launched runner watches for its stop request itself. Here that watch,
    switched on in this process, for the job file given; its signal handlers put back."""
    from runners import execution

    monkeypatch.setattr(execution, "WATCHES_STOP_FILE", True)
    job_file = tmp_path / "jobs" / "a" / "job.json"
    job_file.parent.mkdir(parents=True)
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        execution.Stopper(str(job_file), launched=True).install(None)
        yield job_file
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_a_runner_no_signal_reaches_stops_at_its_stop_request(watched_stop_file: Path) -> None:
    # Without the watch, a cancel waited out the grace and killed it, its partial output
    # unsaved.
    from runners import execution

    time.sleep(0.3)
    assert p.request_stop(watched_stop_file, "cancelled")  # as the API's cancel writes it
    with pytest.raises(execution.StopRequested) as stopped:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            time.sleep(0.01)
    assert stopped.value.reason == "cancelled"


def test_a_chat_waiting_for_its_first_token_stops_at_its_stop_request(
        watched_stop_file: Path) -> None:
    # The watch's SIGINT runs in the main thread only once it runs Python again, and a
    # chat waiting for its first token waits in a socket read: it was killed after the
    # grace. Here too a signal raised by another thread wakes no read.
    from runners import execution, llm_client

    with socket.create_server(("127.0.0.1", 0)) as silent:  # takes the request, never answers
        config = llm_client.Config(f"http://127.0.0.1:{silent.getsockname()[1]}/v1",
                                   first_token_s=100)
        threading.Timer(0.5, p.request_stop, (watched_stop_file, "cancelled")).start()
        started = time.monotonic()
        with pytest.raises(execution.StopRequested) as stopped:
            llm_client.chat(config, [{"role": "user", "content": "hi"}], lambda _: None)
    assert stopped.value.reason == "cancelled"
    assert time.monotonic() - started < 30, "woken by the stop, not the time limit"


def test_chat_cli_without_a_server_says_what_to_do() -> None:
    # A key of one character (as Ollama and LM Studio take any): each of its forms left out
    # of what is said, not an empty one, which put "[redacted]" between every character.
    done = run(["-m", "runners.chat", "hello?"], env={"OPENAI_BASE_URL": "http://127.0.0.1:9/v1",
                                                       "OPENAI_API_KEY": "k"})
    assert done.returncode == 1
    assert "LLM server not reachable at http://127.0.0.1:9" in done.stderr
    assert done.stderr.count("not reachable") == 1, done.stderr  # one clear line
    assert "Traceback" not in done.stderr
    usage = run(["-m", "runners.chat"])
    assert usage.returncode == 2
    assert "give a question" in usage.stderr
    # On stdin (`-`), off the command line that every local account can read.
    piped = run(["-m", "runners.chat", "-"], env={"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"},
                stdin="hello?\n")
    assert piped.returncode == 1 and "not reachable" in piped.stderr, piped.stderr
    assert run(["-m", "runners.chat", "-"], stdin=" \n").returncode == 2
    # Out of the API's bounds: said before the embedded model starts (then its HTTP 400).
    for tokens in ("-5", "0", "40000"):
        bad = run(["-m", "runners.chat", "hi", "--max-tokens", tokens])
        assert bad.returncode == 2, bad.stderr
        assert bad.stderr.splitlines()[-1].endswith(
            "error: 'max_tokens' must be a whole number from 1 to 32768"), bad.stderr
        assert "starting the embedded model" not in bad.stderr + bad.stdout
    # A chats' default set out of bounds: as bad (the chat failed with a raw ValueError).
    tokens, temperature = "a whole number from 1 to 32768", "a number from 0 to 2"
    for variable, value, bounds in (("OFFLOAD_LLM_MAX_TOKENS", "abc", tokens),
                                    ("OFFLOAD_LLM_MAX_TOKENS", "40000", tokens),
                                    ("OFFLOAD_LLM_TEMPERATURE", "hot", temperature)):
        bad = run(["-m", "runners.chat", "hi"],
                  env={variable: value, "OPENAI_BASE_URL": "http://127.0.0.1:9/v1"})
        assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
        key = variable.removeprefix("OFFLOAD_LLM_").lower()
        assert bad.stderr.splitlines()[-1].endswith(
            f"error: '{variable}' must be {bounds}, or unset (every chat's {key}; set in the "
            "environment or .env)"), bad.stderr
        assert "asking the model" not in bad.stderr + bad.stdout


def test_a_chat_by_hand_reads_the_env_file_the_server_reads(tmp_path: Path) -> None:
    # It read the environment alone: with the model server and key in `.env`, as the
    # README has it, it started the embedded model instead, and answered from that.
    env = {k: v for k, v in os.environ.items()
           if k not in ("OFFLOAD_ENV_FILE", "OPENAI_BASE_URL", "OPENAI_API_KEY")}
    with FakeLLM(pieces=["from ", "the .env's"], auth=f"Bearer {SENTINEL}") as llm:
        dotenv = tmp_path / ".env"
        dotenv.write_text(f"OPENAI_BASE_URL={llm.base_url}\nOPENAI_API_KEY={SENTINEL}\n"
                          "OFFLOAD_API_TOKEN=the-api-token-no-runner-is-given\n")
        dotenv.chmod(0o600)
        done = subprocess.run([sys.executable, "-m", "runners.chat", "hello?"], cwd=tmp_path,
                              capture_output=True, text=True, env=env, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "from the .env's" in done.stdout
        assert len(llm.requests) == 1
        dotenv.chmod(0o666)  # another account could have written it: not read
        refused = subprocess.run([sys.executable, "-m", "runners.chat", "hello?"],
                                 cwd=tmp_path, capture_output=True, text=True, env=env,
                                 timeout=60)
        assert refused.returncode == 2, refused.stderr
        assert f"refusing to read {dotenv}: every account can write it" in refused.stderr
        dotenv.unlink()
        dotenv.mkdir()  # "cannot read .env ([Errno 21] Is a directory: 3); it must be UTF-8"
        refused = subprocess.run([sys.executable, "-m", "runners.chat", "hello?"],
                                 cwd=tmp_path, capture_output=True, text=True, env=env,
                                 timeout=60)
        assert refused.returncode == 2, refused.stderr
        assert f"cannot read {dotenv}: " in refused.stderr, refused.stderr
        assert "; make it a file of settings, or set OFFLOAD_ENV_FILE" in refused.stderr
        assert len(llm.requests) == 1


def test_a_runner_by_hand_takes_of_the_env_file_what_the_server_gives_runners(
        tmp_path: Path) -> None:
    # It took every line: the API's token (in any case: the server reads names so), other
    # programs' variables; and a value the environment had set empty, which the server
    # keeps (an empty OPENAI_BASE_URL: the embedded model), was taken from the file.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OFFLOAD_", "OPENAI_"))}
    names = ["OFFLOAD_API_TOKEN", "offload_api_token", "OPENAI_BASE_URL", "OPENAI_API_KEY",
             "OFFLOAD_LLM_MAX_TOKENS", "UNRELATED_SECRET"]
    (tmp_path / ".env").write_text("offload_api_token=a-token-of-the-apis-own-1234\n"
                                   "OPENAI_BASE_URL=http://127.0.0.1:9/v1\n"
                                   "openai_api_key=sk-from-the-file\n"
                                   "OFFLOAD_LLM_MAX_TOKENS=64\nUNRELATED_SECRET=x\n")
    (tmp_path / ".env").chmod(0o600)
    show = ("import json, os, sys; from runners import by_hand; problem = by_hand.read_env_file(); "
            f"print(json.dumps([problem, {{n: os.environ.get(n) for n in {names!r}}}]))")
    done = subprocess.run([sys.executable, "-c", show], cwd=tmp_path, capture_output=True,
                          text=True, env={**env, "OPENAI_BASE_URL": ""}, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [None, {
        "OFFLOAD_API_TOKEN": None, "offload_api_token": None, "OPENAI_BASE_URL": "",
        "OPENAI_API_KEY": "sk-from-the-file", "OFFLOAD_LLM_MAX_TOKENS": "64",
        "UNRELATED_SECRET": None}]
    # A value no environment can hold: one line, as bad usage, not a traceback.
    (tmp_path / ".env").write_text("OPENAI_API_KEY=abc\x00def\n")
    nul = subprocess.run([sys.executable, "-m", "runners.sleep", "0"], cwd=tmp_path,
                         capture_output=True, text=True, env=env, timeout=60)
    assert nul.returncode == 2 and "Traceback" not in nul.stderr, nul.stderr
    assert "sets OPENAI_API_KEY to a value with a NUL character" in nul.stderr, nul.stderr


def test_chat_streams_into_output_against_a_scripted_server(
        make_supervisor: Callable[..., RunningSupervisor]) -> None:
    with FakeLLM(pieces=["one ", "two ", "three ", "four"], delay_s=0.4) as llm:
        sup = make_supervisor(runner_env={"OPENAI_BASE_URL": llm.base_url})
        job_id = sup.submit("chat", messages=[{"role": "user", "content": "count"}])
        seen = set()
        while (job := sup.job(job_id))["state"] not in p.FINAL_STATES:
            if job["output"]:
                seen.add(job["output"])
            time.sleep(0.05)
    assert job["state"] == "completed", job
    assert job["output"] == "one two three four"
    assert job["result"]["reply"] == "one two three four"
    assert len(seen) >= 2, f"output should grow while streaming, saw {seen}"


def test_api_key_never_reaches_job_file_log_or_command_line(
        make_supervisor: Callable[..., RunningSupervisor], data_dir: Path) -> None:
    with FakeLLM(delay_s=0.3) as llm:
        sup = make_supervisor(runner_env={"OPENAI_BASE_URL": llm.base_url,
                                          "OPENAI_API_KEY": SENTINEL})
        job_id = sup.submit("chat", messages=[{"role": "user", "content": "hi"}])
        job = sup.wait_state(job_id, "running")
        cmdline = " ".join(psutil.Process(job["pid"]).cmdline())
        final = sup.wait_final(job_id)
        assert llm.requests[0]["headers"]["Authorization"] == f"Bearer {SENTINEL}"
    assert final["state"] == "completed"
    assert SENTINEL not in cmdline
    for path in (data_dir / "jobs").rglob("*"):
        if path.is_file():
            assert SENTINEL not in path.read_text(errors="replace"), path.name


def test_rejected_key_is_explained_and_not_echoed(
        make_supervisor: Callable[..., RunningSupervisor], data_dir: Path) -> None:
    body = '{"error": {"message": "Incorrect API key provided: ' + SENTINEL + '"}}'
    for status in (401, 400):
        with FakeLLM(status=status, error_body=body) as llm:
            sup = make_supervisor(runner_env={"OPENAI_BASE_URL": llm.base_url,
                                              "OPENAI_API_KEY": SENTINEL})
            final = sup.wait_final(sup.submit("chat", messages=[{"role": "user", "content": "x"}]))
            sup.stop()
        assert final["state"] == "failed"
        assert final["error"]["type"] == "provider"
        assert f"HTTP {status}" in final["error"]["message"]
        assert SENTINEL not in final["error"]["message"]
    for path in (data_dir / "jobs").rglob("*"):
        if path.is_file():
            assert SENTINEL not in path.read_text(errors="replace"), path.name


def test_a_whole_number_option_is_an_int() -> None:
    """As the example kind in docs/development.md returns it: 512, not 512.0."""
    from runners import base
    from runners.sinks import ConsoleSink

    job = base.Job(p.new_job("0" * 32, "resize", {"size": 512}, 0), ConsoleSink())
    assert job.number("size", (256, 1, 4096), whole=True) == 512
    assert type(job.number("size", (256, 1, 4096), whole=True)) is int
    assert type(job.number("size", (256, 1, 4096))) is float
