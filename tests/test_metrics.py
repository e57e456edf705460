"""GET /metrics: real jobs through the real server and supervisor, read back with
prometheus_client's own parser, from several workers, and scraped by a real Prometheus."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from jobs import protocol as p
from jobs.protocol.counters import JobCounters, counters_file
from jobs.store.job_store import JobStore
from tests.conftest import ROOT, RunningSupervisor, free_port, wait_for
from tests.fake_llm import FakeLLM
from tests.server import Server

MakeServer = Callable[..., Server]
TOKEN = "t0ken-metrics-5e7a9d3f"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NO_LLM = {"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}
USAGE = {"prompt_tokens": 31, "completion_tokens": 4, "total_tokens": 35}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(client: httpx.Client, headers: dict[str, str] | None = None) -> Samples:
    """Every sample of /metrics by name and labels, parsed by prometheus_client."""
    answer = client.get("/metrics", headers=headers)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(answer.text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def submit(client: httpx.Client, kind: str = "sleep", timeout_s: float | None = None,
           **job_input: Any) -> str:
    body: dict[str, Any] = {"kind": kind, "input": job_input}
    if timeout_s is not None:
        body["timeout_s"] = timeout_s
    answer = client.post("/api/jobs", json=body)
    assert answer.status_code == 202, answer.text
    return str(answer.json()["id"])


def wait_state(client: httpx.Client, job_id: str, states: frozenset[str] | set[str],
               timeout: float = 60) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        job: dict[str, Any] = client.get(f"/api/jobs/{job_id}").json()
        return job if job["state"] in states else None

    return wait_for(reached, timeout, 0.05, f"job {job_id} to be {sorted(states)}")


def test_counts_by_kind_and_state_failures_histograms_and_tokens(
        make_server: MakeServer) -> None:
    with FakeLLM(usage=USAGE) as llm:
        server = make_server(env={"OPENAI_BASE_URL": llm.base_url})
        with server.client() as client:
            before = scrape(client)
            assert value(before, "offload_jobs_finished_total", kind="sleep",
                         state="completed") == 0  # every kind shows, at zero too
            for name in ("offload_job_failures_total", "offload_job_retries_total"):
                for error_type in ("lost", "timeout", "provider", "runner"):  # each type too
                    assert before[(name, (("kind", "chat"), ("type", error_type)))] == 0
                # Shown at zero for good: no job ends so (a damaged file only reads so).
                assert (name, (("kind", "chat"), ("type", "corrupt"))) not in before
            completed = [submit(client, seconds=0.1) for _ in range(2)]
            timed_out = submit(client, seconds=60, timeout_s=1)
            cancelled = submit(client, seconds=60)
            killed = submit(client, seconds=60)
            running = wait_state(client, killed, {"running"})
            wait_state(client, cancelled, {"running"})
            # As /api/history, at most OVERVIEW_MAX_AGE_S behind what a job's own read says.
            wait_for(lambda: value(scrape(client), "offload_jobs", kind="sleep",
                                   state="running") >= 2, 5, 0.05, "two running jobs shown")
            psutil.Process(running["pid"]).kill()  # its runner is lost
            assert client.delete(f"/api/jobs/{cancelled}").status_code == 200
            chat = client.post("/api/ai_chat_async", json={
                "messages": [{"role": "user", "content": "How is the CPU?"}]}).json()["job_id"]
            ends = {job_id: wait_state(client, job_id, p.FINAL_STATES)["state"]
                    for job_id in [*completed, timed_out, cancelled, killed, chat]}
            assert list(ends.values()) == ["completed", "completed", "timeout", "cancelled",
                                           "failed", "completed"]

            def counted() -> Samples | None:
                samples = scrape(client)
                done = sum(v for (name, _), v in samples.items()
                           if name == "offload_jobs_finished_total")
                return samples if done == 6 and value(samples, "offload_llm_ready") and value(
                    samples, "offload_jobs", kind="sleep", state="running") == 0 else None

            after = wait_for(counted, 30, 0.1, "six finished jobs and a ready LLM")

    def finished(kind: str, state: str) -> float:
        return value(after, "offload_jobs_finished_total", kind=kind, state=state)

    assert [finished("sleep", s) for s in ("completed", "timeout", "cancelled", "failed")] == [
        2, 1, 1, 1]
    assert finished("chat", "completed") == 1 and finished("train", "completed") == 0
    assert value(after, "offload_job_failures_total", kind="sleep", type="lost") == 1
    assert value(after, "offload_job_failures_total", kind="sleep", type="timeout") == 1
    assert not [labels for (name, labels), _ in after.items()
                if name == "offload_job_failures_total" and ("type", "cancelled") in labels]
    for kind, jobs in (("sleep", 5), ("chat", 1)):  # every job here started
        for histogram in ("offload_queue_wait_seconds", "offload_job_duration_seconds"):
            assert value(after, f"{histogram}_count", kind=kind) == jobs, (histogram, kind)
            assert value(after, f"{histogram}_bucket", kind=kind, le="+Inf") == jobs
            assert value(after, f"{histogram}_sum", kind=kind) > 0
    # The timed-out job ran past its one-second deadline.
    assert value(after, "offload_job_duration_seconds_sum", kind="sleep") >= 1
    assert value(after, "offload_job_duration_seconds_bucket", kind="sleep", le="0.5") <= 4
    assert value(after, "offload_llm_tokens_total", direction="prompt") == 31
    assert value(after, "offload_llm_tokens_total", direction="completion") == 4
    assert value(after, "offload_jobs", kind="sleep", state="running") == 0
    assert value(after, "offload_llm_ready") == 1
    with server.client() as client:
        default = client.get("/api/queue").json()["max_concurrent_default"]
        assert value(after, "offload_max_concurrent") == default
        client.put("/api/queue/cap", json={"max_concurrent": 3})  # set while it runs
        assert value(scrape(client), "offload_max_concurrent") == 3
        assert value(after, "offload_kind_max_concurrent", kind="train") == 1
        client.put("/api/queue/cap", json={"max_concurrent": 2, "kind": "sleep"})
        assert value(scrape(client), "offload_kind_max_concurrent", kind="sleep") == 2


def test_jobs_removed_as_their_runners_end_are_counted(make_server: MakeServer) -> None:
    # A job removed (or its conversation forgotten) the moment a client saw it end, while
    # its runner still exited, was never counted: the supervisor found its file gone.
    # The supervisor's log said it "was deleted while it ran".
    with FakeLLM(usage=USAGE) as llm:
        server = make_server(env={"OPENAI_BASE_URL": llm.base_url})
        with server.client() as client:
            lingered = []
            for _ in range(3):  # its runner lives on a second after its final state
                job_id = submit(client, "probe", seconds=0, linger_s=1)
                lingered.append(job_id)
                ended = client.get(f"/api/jobs/{job_id}", params={"wait_s": 30}).json()
                assert ended["state"] == "completed"
                assert client.post(f"/api/jobs/{job_id}/remove").status_code == 200
            for turn in range(3):
                session = f"forget-{turn}"
                job_id = client.post("/api/ai_chat_async", json={"session_id": session,
                    "messages": [{"role": "user", "content": "How is the CPU?"}]}).json()["job_id"]
                client.get(f"/api/jobs/{job_id}", params={"wait_s": 30}).raise_for_status()
                assert client.delete(f"/api/sessions/{session}").status_code == 200

            def counted() -> Samples | None:
                samples = scrape(client)
                return samples if value(samples, "offload_jobs", kind="probe",
                                        state="running") == 0 else None

            after = wait_for(counted, 30, 0.1, "the runners to end")
            time.sleep(1)  # a count still missing would have come by now
            after = scrape(client)
    assert value(after, "offload_jobs_finished_total", kind="probe", state="completed") == 3
    assert value(after, "offload_job_duration_seconds_count", kind="probe") == 3
    assert value(after, "offload_jobs_finished_total", kind="chat", state="completed") == 3
    assert value(after, "offload_llm_tokens_total", direction="prompt") == 3 * 31
    assert "deleted while it ran" not in (server.data_dir / "supervisor.log").read_text()
    # What the counters take of each was noted as it was removed, and taken once used (a
    # note of a job counted before goes in ten minutes).
    notes = {path.stem for path in (server.data_dir / "removed").iterdir()}
    assert not notes & set(lingered), notes


def test_notes_of_removed_jobs_go_after_ten_minutes(make_server: MakeServer,
                                                   data_dir: Path) -> None:
    notes = data_dir / "removed"
    notes.mkdir(parents=True)
    old, fresh = notes / f"{p.new_id()}.json", notes / f"{p.new_id()}.json"
    for note in (old, fresh):
        note.write_text('{"kind": "sleep", "state": "completed"}')
    then = time.time() - 11 * 60
    os.utime(old, (then, then))
    server = make_server(env=NO_LLM)  # its supervisor's first pass prunes
    wait_for(lambda: not old.exists(), 30, 0.1, "the old note to go")
    assert fresh.exists()
    server.stop()


def test_a_retried_attempt_is_counted_as_a_retry_not_a_finished_job(
        make_server: MakeServer) -> None:
    server = make_server(env={"OFFLOAD_RETRY_BASE_S": "0.2", "OFFLOAD_RETRY_MAX_S": "0.2"})
    with server.client() as client:
        job_id = client.post("/api/jobs", json={"kind": "sleep", "input": {"seconds": 1},
                                                "max_attempts": 2}).json()["id"]
        first = wait_state(client, job_id, {"running"})
        psutil.Process(first["pid"]).kill()  # its runner is lost: attempt 2 follows
        final = wait_state(client, job_id, p.FINAL_STATES)
        assert (final["state"], final["attempt"]) == ("completed", 2)

        def counted() -> Samples | None:
            samples = scrape(client)
            return samples if value(samples, "offload_jobs_finished_total", kind="sleep",
                                    state="completed") else None

        after = wait_for(counted, 30, 0.1, "the job counted")
    assert value(after, "offload_job_retries_total", kind="sleep", type="lost") == 1
    assert value(after, "offload_job_failures_total", kind="sleep", type="lost") == 0
    assert sum(v for (name, _), v in after.items() if name == "offload_jobs_finished_total") == 1
    assert value(after, "offload_queue_wait_seconds_count", kind="sleep") == 2  # two starts


def test_token_and_host_rules_hold_for_metrics(make_server: MakeServer) -> None:
    guarded = make_server(env={**NO_LLM, "OFFLOAD_API_TOKEN": TOKEN})
    with guarded.client() as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            answer = client.get("/metrics", headers=headers)
            assert answer.status_code == 401, (headers, answer.text)
            assert "OFFLOAD_API_TOKEN" in answer.json()["detail"]
        assert value(scrape(client, AUTH), "offload_llm_ready") == 0
        # Prometheus asks for OpenMetrics; a version that is no number is a 406 that says why.
        for asked in ("application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
                      'application/openmetrics-text; version="1.0.0"'):  # quoted: a 406
            openmetrics = client.get("/metrics", headers={**AUTH, "Accept": asked})
            assert openmetrics.headers["content-type"].startswith(
                "application/openmetrics-text"), (asked, openmetrics.text)
            assert openmetrics.text.endswith("# EOF\n")
        for accept in ("application/openmetrics-text; version=abc", "text/plain; version=x"):
            refused = client.get("/metrics", headers={**AUTH, "Accept": accept})
            assert refused.status_code == 406, refused.text
            assert "send none" in refused.json()["detail"]
    open_server = make_server(env=NO_LLM)
    with open_server.client() as client:
        forged = client.get("/metrics", headers={"Host": f"attacker.example:{open_server.port}"})
        assert forged.status_code == 421
        assert "OFFLOAD_ALLOWED_HOSTS" in forged.json()["detail"]
        scrape(client)


def test_every_worker_answers_the_same_counts(make_server: MakeServer) -> None:
    server = make_server(workers=2, env=NO_LLM)
    with server.client() as client:
        ids = [submit(client, seconds=0.1) for _ in range(3)]
        for job_id in ids:
            wait_state(client, job_id, p.FINAL_STATES)
        wait_for(lambda: value(scrape(client), "offload_jobs_finished_total", kind="sleep",
                               state="completed") == 3, 30, 0.1, "three finished jobs counted")
    by_worker: dict[str, Samples] = {}

    def both_workers() -> bool:
        # A fresh connection each time, so each may reach the other worker; the same
        # connection answers /api/health, whose usage.since tells the workers apart.
        with server.client() as client:
            since = client.get("/api/health").json()["usage"]["since"]
            by_worker[since] = scrape(client)
        return len(by_worker) == 2

    wait_for(both_workers, 60, 0.05, "scrapes answered by both workers")
    first, second = (
        {key: v for key, v in samples.items() if key[0] != "offload_llm_ready"}
        for samples in by_worker.values())
    assert first == second
    assert value(first, "offload_job_duration_seconds_count", kind="sleep") == 3


def prometheus_path() -> str | None:
    found = shutil.which("prometheus")
    if found is None:
        if os.environ.get("CI"):
            raise AssertionError("no prometheus on this machine: .ci/run installs Debian's")
        pytest.skip("no prometheus on the PATH here (apt-get install prometheus)")
    return found


def test_a_real_prometheus_scrapes_it(make_server: MakeServer, tmp_path: Path) -> None:
    binary = prometheus_path()
    assert binary is not None
    server = make_server(env={**NO_LLM, "OFFLOAD_API_TOKEN": TOKEN})
    with server.client(headers=AUTH) as client:
        wait_state(client, submit(client, seconds=0.1), p.FINAL_STATES)
    token_file = tmp_path / "offload-token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    config = tmp_path / "prometheus.yml"
    config.write_text(documented_scrape_config(f"127.0.0.1:{server.port}", token_file))
    port = free_port()
    with open(tmp_path / "prometheus.log", "wb") as log:
        prometheus = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        def series() -> list[dict[str, Any]] | None:
            try:
                answer = httpx.get(f"http://127.0.0.1:{port}/api/v1/query",
                                   params={"query": "offload_jobs_finished_total"}, timeout=5)
            except httpx.HTTPError:
                return None
            assert prometheus.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
            if answer.status_code != 200:
                return None  # a 503 in plain text while its storage starts
            found: list[dict[str, Any]] = answer.json()["data"]["result"]
            return found or None

        found = wait_for(series, 120, 0.5, "Prometheus to scrape the counters")
        up = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": "up"},
                       timeout=5).json()["data"]["result"]
        # The queries docs/metrics.md offers, as Prometheus answers them (one divided two
        # series whose labels differ: it answered nothing).
        answered = {query: httpx.get(f"http://127.0.0.1:{port}/api/v1/query",
                                     params={"query": query}, timeout=5).json()
                    for query in documented_queries()}
    finally:
        prometheus.terminate()
        prometheus.wait(30)
    values = {(s["metric"]["kind"], s["metric"]["state"]): s["value"][1] for s in found}
    assert values[("sleep", "completed")] == "1"
    assert values[("chat", "completed")] == "0"
    assert [s["value"][1] for s in up] == ["1"]  # the token was taken: no 401
    assert len(answered) >= 5 and all(a["status"] == "success" for a in answered.values())
    (fullness,) = [a for q, a in answered.items() if "offload_max_concurrent" in q]
    assert [s["value"][1] for s in fullness["data"]["result"]] == ["0"], fullness


def documented_queries() -> list[str]:
    text = (ROOT / "docs" / "metrics.md").read_text(encoding="utf-8")
    block = text.split("Queries to start from:", 1)[1].split("```\n", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip()]


def documented_scrape_config(target: str, token_file: Path) -> str:
    """The scrape job docs/metrics.md shows, scraping every second here."""
    text = (ROOT / "docs" / "metrics.md").read_text(encoding="utf-8")
    config = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    for documented, actual in (("15s", "1s"), ("127.0.0.1:8001", target),
                               ("/etc/prometheus/offload-token", str(token_file))):
        assert documented in config, documented
        config = config.replace(documented, actual)
    return config


def test_counts_never_go_down_with_pruning_or_a_new_leader(
        make_supervisor: Callable[..., RunningSupervisor], data_dir: Path) -> None:
    path = counters_file(data_dir)

    def completed() -> int:
        return JobCounters.load(path).finished.get("sleep", {}).get("completed", 0)

    first = make_supervisor()
    for job_id in [first.submit(seconds=0.1) for _ in range(3)]:
        first.wait_final(job_id)
    wait_for(lambda: completed() == 3, 20, 0.05, "three jobs counted")
    assert first.store.prune(retention_s=0) == 3  # every job folder is gone
    first.wait_final(first.submit(seconds=0.1))
    wait_for(lambda: completed() == 4, 20, 0.05, "the fourth job counted")

    # A runner that ends while no supervisor leads is counted by the next leader, once.
    handed_over = first.submit(seconds=2)
    first.wait_state(handed_over, "running")
    first.stop()
    assert first.wait_final(handed_over)["state"] == "completed"
    assert completed() == 4
    second = make_supervisor()
    wait_for(lambda: completed() == 5, 20, 0.05, "the job that ended between leaders")
    second.wait_final(second.submit(seconds=0.1))
    wait_for(lambda: completed() >= 6, 20, 0.05, "the sixth job counted")
    assert completed() == 6


def test_a_damaged_counters_file_starts_again_from_zero(tmp_path: Path) -> None:
    path = tmp_path / "job_counters.json"
    path.write_text("{not json")
    assert JobCounters.load(path).finished == {}
    counters = JobCounters()
    counters.ended({"kind": "sleep", "state": "completed", "started_at": "2026-01-01T00:00:00Z",
                    "finished_at": "2026-01-01T00:00:02Z"})
    counters.save(path, 1.0)
    saved = p.read_json(path)
    assert saved is not None
    p.write_json(path, {**saved, "buckets_s": [1, 2]})  # another version's buckets
    again = JobCounters.load(path)
    assert again.finished == {"sleep": {"completed": 1}} and again.saved_at == 1.0
    assert again.duration == {}  # its histograms start again; the counts stay
    # Edited by hand: a negative count, a flag and a sum that is no number were shown
    # (-5.0, 1.0, NaN), and OpenMetrics' readers refused the whole scrape.
    p.write_json(path, {**saved, "finished": {"sleep": {"completed": -5, "failed": True,
                                                        "cancelled": 2}},
                        "tokens": {"prompt": -100, "completion": 7},
                        "duration": {"sleep": {**saved["duration"]["sleep"],
                                               "sum": float("nan")}}})
    edited = JobCounters.load(path)
    assert edited.finished == {"sleep": {"cancelled": 2}}, edited.finished
    assert edited.tokens == {"prompt": 0, "completion": 7}
    assert edited.duration["sleep"].sum == 0 and sum(edited.duration["sleep"].counts) == 0
    # Numbers no float holds: an OverflowError in every scrape and every leader's save.
    path.write_text(json.dumps({**saved, "saved_at": 10**400, "finished": {"sleep": {
        "completed": 10**400}}, "duration": {"sleep": {**saved["duration"]["sleep"],
                                                         "sum": 10**400}}}))
    huge = JobCounters.load(path)
    assert (huge.saved_at, huge.finished, huge.duration["sleep"].sum) == (None, {"sleep": {}}, 0)


def test_a_counters_file_removed_or_in_the_way_while_a_supervisor_leads(
        make_server: MakeServer) -> None:
    # Removed to start from zero, the leader wrote the counts it kept back at its next
    # save: 2, then 0, then 3 (two resets to Prometheus, where one was asked for). With
    # a folder in its place, scrapes showed zeros, not a 503.
    server = make_server(env=NO_LLM)
    path = Path(counters_file(server.data_dir))

    def completed(client: httpx.Client) -> float:
        return value(scrape(client), "offload_jobs_finished_total", kind="sleep",
                     state="completed")

    with server.client() as client:
        for _ in range(2):
            wait_state(client, submit(client, seconds=0), p.FINAL_STATES)
        wait_for(lambda: completed(client) == 2, 20, 0.1, "two jobs counted")
        path.unlink()
        assert completed(client) == 0
        wait_state(client, submit(client, seconds=0), p.FINAL_STATES)
        # Saved at its start already (its wait in the queue): counted once it is reaped.
        wait_for(lambda: path.exists() and completed(client) == 1, 20, 0.05,
                 "the job counted from zero, for good")
        path.unlink()
        path.mkdir()
        answer = client.get("/metrics")
        assert answer.status_code == 503, answer.text[:300]
        assert f"a folder is in the place of {path}: move it away" in answer.json()["detail"]
        wait_state(client, submit(client, seconds=0), p.FINAL_STATES)
        path.rmdir()
        wait_state(client, submit(client, seconds=0), p.FINAL_STATES)
        wait_for(lambda: path.exists() and completed(client) == 2, 20, 0.05,
                 "the counts since the folder went in its place, from zero")
    said = (server.data_dir / "supervisor.log").read_text()
    assert "the job counters file was changed or removed by another hand" in said, said[-3000:]


def test_counters_that_cannot_be_read_are_neither_shown_as_zeros_nor_lost(
        make_server: MakeServer) -> None:
    # A file that cannot be read for now (a link loop here; out of file handles, an I/O
    # error): it was read as no counts, shown as zeros (a reset to Prometheus), and a new
    # leader's first save wrote over the counts for good.
    server = make_server(env=NO_LLM)
    path = Path(counters_file(server.data_dir))
    with server.client() as client:
        for _ in range(2):
            wait_state(client, submit(client, seconds=0), p.FINAL_STATES)
        wait_for(lambda: value(scrape(client), "offload_jobs_finished_total", kind="sleep",
                               state="completed") == 2, 20, 0.1, "two jobs counted")
        # Ends before the handover, counted by no leader yet: its runner still exits.
        wait_state(client, submit(client, "probe", seconds=0, linger_s=10), {"completed"})
    server.stop()
    aside = path.with_name("counters-aside.json")
    path.rename(aside)
    path.symlink_to(path.name)  # a link to itself: ELOOP on every open
    server.start()
    with server.client() as client:
        wait_state(client, submit(client, seconds=0), p.FINAL_STATES)
        answer = client.get("/metrics")
        assert answer.status_code == 503, answer.text[:300]
        assert "cannot read the job counters now" in answer.json()["detail"]
        path.unlink()
        aside.rename(path)
        wait_for(lambda: JobCounters.load(path).finished.get("sleep", {}).get("completed") == 3,
                 20, 0.1, "the counts read again, the job in between added")
        samples = scrape(client)
    assert value(samples, "offload_jobs_finished_total", kind="sleep", state="completed") == 3
    assert value(samples, "offload_jobs_finished_total", kind="probe", state="completed") == 1


@pytest.mark.parametrize("removed", [False, True], ids=["kept", "removed meanwhile"])
def test_a_job_whose_runner_was_still_exiting_at_a_handover_is_counted(
        removed: bool, make_server: MakeServer) -> None:
    # A job is counted once its runner is gone. One whose final state was written before
    # the leader's last save, its runner still exiting, looked counted to the next leader
    # (it finished before that save), and was never counted. Removed (by another API
    # worker) before the next leader came, it was not counted either: no leader saw it.
    first = make_server(env=NO_LLM)
    path = counters_file(first.data_dir)
    with first.client() as client:
        lingering = submit(client, "probe", seconds=0, linger_s=10)
        wait_state(client, lingering, {"completed"})
        wait_state(client, submit(client, seconds=0), {"completed"})
        wait_for(lambda: JobCounters.load(path).finished.get("sleep", {}).get("completed"),
                 20, 0.05, "the sleep counted, and the counters saved")
    first.stop()
    assert JobCounters.load(path).finished.get("probe") is None  # its runner still lingers
    if removed:  # as POST /api/jobs/{id}/remove does
        store = JobStore(first.data_dir / "jobs")
        assert store.remove(lingering, store.read(lingering)) is None
    second = make_server(env=NO_LLM)
    with second.client() as client:
        def counted() -> Samples | None:
            samples = scrape(client)
            return samples if value(samples, "offload_jobs_finished_total", kind="probe",
                                    state="completed") == 1 else None

        samples = wait_for(counted, 20, 0.1, "the lingering job counted by the next leader")
    assert value(samples, "offload_jobs_finished_total", kind="sleep", state="completed") == 1
