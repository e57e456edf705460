"""The whole API on the Ray launcher: a real server configured with OFFLOAD_LAUNCHER=ray
against the session's Ray head; routes, events, log and cancel as on the local one."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.conftest import process_gone, wait_for
from tests.server import Server, applied, read_events

pytestmark = pytest.mark.ray


def test_api_runs_cancels_and_streams_jobs_on_ray(
        ray_head: Any, make_server: Callable[..., Server]) -> None:
    server = make_server(env={"OFFLOAD_LAUNCHER": "ray", "OFFLOAD_RAY_ADDRESS": ray_head.address,
                              "OFFLOAD_MAX_CONCURRENT": "2"})
    with server.client() as client:
        done = client.post("/api/jobs", json={"kind": "sleep",
                                              "input": {"seconds": 1, "steps": 4}}).json()
        long = client.post("/api/jobs", json={"kind": "probe",
                                              "input": {"seconds": 60, "spawn_child": True}})
        assert long.status_code == 202
        events = applied(read_events(client, done["id"]))
        states = [e["state"] for e in events]
        assert states[-1] == "completed" and "running" in states, states
        assert events[-1]["launcher"] == "ray" and events[-1]["result"]["slept_s"] == 1
        fractions = [e["progress"]["fraction"] for e in events if e["progress"]]
        assert len(fractions) >= 2 and fractions == sorted(fractions)

        job_id = long.json()["id"]
        job = wait_for(lambda: (j := client.get(f"/api/jobs/{job_id}").json())
                       .get("progress") and j, 60, what="the grandchild started")
        child_pid = int(job["progress"]["message"].split()[1])  # "child <pid> started"
        answer = client.delete(f"/api/jobs/{job_id}")
        assert answer.status_code == 200 and answer.json()["state"] == "cancelled"
        wait_for(lambda: process_gone(job["pid"]) and process_gone(child_pid), 15,
                 what="runner and grandchild gone")
        log = client.get(f"/api/jobs/{job_id}/log")
        assert log.status_code == 200 and "@@offload" not in log.text
        listed = client.get("/api/jobs", params={"state": "completed"}).json()["jobs"]
        assert [j["launcher"] for j in listed] == ["ray"]
        assert client.get("/api/health").json()["launcher"] == "ray"
    # Ray's records of the ended jobs go, and stay gone: Ray wrote a deleted one again,
    # FAILED, as its supervisor actor died.
    time.sleep(12)
    ours = {f"offload-{done['id']}", f"offload-{job_id}"}
    left = [job["submission_id"] for job in httpx.get(f"{ray_head.address}/api/jobs/").json()
            if job.get("submission_id") in ours]
    assert left == [], left
