"""The benchmarks run (their figures are judged in bench/, not here)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Any

import pytest

from bench import core, scale


def test_core_benchmark_runs_and_reports() -> None:
    results = {"lifecycle": core.lifecycle(rounds=2),
               "throughput": core.throughput(n=10, cap=4),
               "peak_rss": core.peak_rss(rounds=1)}
    assert results["throughput"]["completed"] == 10
    table = core.report(results)
    assert "lifecycle / bare start" in table and "jobs/s" in table


def test_scale_benchmark_runs_and_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scale, "REQUESTS", 5)
    results = {"sizes": [scale.measure(10), scale.measure(300)]}
    assert results["sizes"][1]["/api/jobs"]["n"] == 5
    table = scale.report(results)
    assert "| `/api/history` | 300 |" in table and "p99 <= 50 ms" in table


def test_the_tables_poll_with_big_chats_runs_and_reports(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scale, "POLLS", 2)
    chats = scale.big_chats(2)
    assert chats["full"]["n"] == chats["summary"]["n"] == 2
    assert chats["summary"]["bytes"] * 100 < chats["full"]["bytes"]
    table = "\n".join(scale.big_chats_table(chats))
    assert "| `/api/jobs?limit=50&fields=summary` |" in table


def test_durability_benchmark_runs_and_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import durability

    monkeypatch.setattr(durability, "ROUNDS", 1)
    monkeypatch.setattr(durability, "SUBMITS", 5)
    results = durability.run()
    assert [(m["submit"]["n"], m["completed"]) for m in results["modes"]] == [(5, True)] * 2
    assert "| no fsync (OFFLOAD_FSYNC=0) |" in durability.report(results)


def test_report_gathers_every_suite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import __main__ as bench_main

    monkeypatch.setattr(bench_main, "RESULTS", tmp_path)
    (tmp_path / "core.md").write_text("# Benchmark: core\n\nstamp\n\n| a | b |\n")
    report = bench_main.write_report().read_text()
    assert "## core\nstamp\n\n| a | b |" in report
    assert "## soak\n\nnot run yet: `python -m bench soak`" in report
@pytest.mark.ray
def test_ray_benchmark_runs_and_reports(ray_head: Any) -> None:
    from bench import ray

    results = ray.run(rounds=2, address=ray_head.address)
    assert results["ray"]["lifecycle"]["n"] == 2
    table = ray.report(results)
    assert "Ray launcher" in table and "dispatch" in table


def test_http_benchmark_runs_and_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import http

    monkeypatch.setattr(http, "LATENCY_JOBS", 5)
    monkeypatch.setattr(http, "THROUGHPUT_JOBS", 5)
    monkeypatch.setattr(http, "WARMUP_JOBS", 1)
    monkeypatch.setattr(http, "IDLE_GAP_S", 0)
    monkeypatch.setattr(http, "TURNS", 2)
    monkeypatch.setattr(http, "TURN_LATENCY_JOBS", 3)
    results = http.run()
    systems = [row["system"] for row in results["rows"]]
    assert "Offload over HTTP, cap 2" in systems and "Offload over HTTP, cap 8" in systems
    assert "Offload over HTTP, cap 2, one batch request" in systems
    if importlib.util.find_spec("huey") is not None:
        assert any(system.startswith("Huey") for system in systems)
    assert all(row["throughput"]["completed"] == 5 for row in results["rows"])
    offload_rows = [row for row in results["rows"] if row["system"].startswith("Offload")]
    assert all(row["throughput_waited"]["completed"] == 5 and row["latency_waited"]["n"] == 5
               for row in offload_rows), "each job waited on by GET ?wait_s= too"
    # The CPU of each part of the path, measured: the API's, the supervisor's and the
    # runners' each more than nothing over the rows (the clock's tick, 10 ms, can hide
    # one row's five jobs); released from a paused queue, every job completed.
    parts = ("API", "supervisor", "launcher and runners")
    assert all(row["cpu_ms"][part] >= 0 for row in offload_rows for part in parts)
    assert all(sum(row["cpu_ms"][part] for row in offload_rows) > 0 for part in parts)
    released = [row["let_go"] for row in offload_rows if "let_go" in row]
    assert len(released) == 1 and released[0]["throughput"]["completed"] == 5, released
    table = http.report(results)
    assert "| system | jobs/s | idle latency median (ms) | p90 (ms)" in table
    assert "| blocking wait: jobs/s |" in table
    assert "| cap 2, jobs stored on a paused queue, then let go |" in table, table
    for peer in ("RQ", "Celery"):  # measured with a redis-server, else a note says why not
        assert any(system.startswith(f"{peer}, ") for system in systems) or f"{peer}: " in table
    # The goals' ratios, each of the same minute: the systems measured in turns.
    turns = results["in_turns"]["rounds"]
    assert len(turns) == 2 and all(
        turn["offload"]["n"] == turn["floor"]["n"] == turn["spares"]["n"] == 3
        and turn["offload_throughput"]["completed"] == turn["cap8_throughput"]["completed"] == 5
        for turn in turns), turns
    assert results["in_turns"]["rq"] == any(system.startswith("RQ, ") for system in systems)
    assert all(turn["rq_throughput"]["completed"] == 5 and turn["offload_idle_cores"] >= 0
               for turn in turns if results["in_turns"]["rq"]), turns
    assert table.count("| median of the rounds |") == 2, table
    alone = {"rq": False, "rounds": [{name: turn[name] for name in (
        "floor", "offload", "spares", "offload_throughput", "cap8_throughput")}
        for turn in turns]}  # as without Redis
    said = http._in_turns_table(alone)
    assert "RQ" not in said[0] and said[-1].startswith("\nRQ: not measured in turns"), said


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server on the PATH")
@pytest.mark.parametrize("peer", ["rq", "celery"])  # each its function in bench/http.py
def test_http_benchmark_measures_the_redis_peers(
        peer: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import http

    if importlib.util.find_spec(peer) is None:
        pytest.skip(f"{peer} is not installed (the bench extra)")
    monkeypatch.setattr(http, "LATENCY_JOBS", 3)
    monkeypatch.setattr(http, "THROUGHPUT_JOBS", 5)
    monkeypatch.setattr(http, "WARMUP_JOBS", 1)
    monkeypatch.setattr(http, "IDLE_GAP_S", 0)
    row = getattr(http, peer)()
    assert row is not None and row["latency"]["n"] == 3
    assert row["throughput"]["completed"] == 5
    assert row["latency_waited"]["n"] == 3 and row["throughput_waited"]["completed"] == 5


def test_events_benchmark_runs_and_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import events

    monkeypatch.setattr(events, "ROUNDS", 1)
    monkeypatch.setattr(events, "FAST_WRITES", 5)
    monkeypatch.setattr(events, "CHAT_PHASE_S", 1.0)
    monkeypatch.setattr(events, "FOLLOWERS", 3)
    monkeypatch.setattr(events, "IDLE_S", 0.5)
    results = events.run()
    assert [mode["mode"] for mode in results["modes"]] == list(events.MODES)
    for mode in results["modes"]:
        assert mode["crowd"]["n"] == 5, "every write at a chat's pace reaches the follower"
        assert all(f["min"] >= 2 for f in mode["followers_events"])
    table = events.report(results)
    assert "write -> seen median / p90 (ms)" in table and "| whole job |" in table


def test_llm_benchmark_sees_a_first_token_on_events() -> None:
    from bench import llm

    assert llm.first_token_on_events(rounds=2)["first_token_visible"]["n"] == 2
